package readiness

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"

	"github.com/secureoverlay/secureoverlay/api"
)

// A status survives the report's JSON unchanged, stays small at any cluster size, and a
// malformed one is refused with a reason rather than misread.
func TestWireRoundTrip(t *testing.T) {
	ks := Keys{}
	for id := uint32(1); id <= 5000; id++ {
		ks[id] = KeyDigest("node/" + string(rune(id)))
	}
	refused := []uint32{3, 9, 12, 40, 41, 42, 43, 44, 45, 46}
	s := NewStatus(7, KeyDigest("self"), ks, ks, refused, DefaultBuckets)
	w := Encode(s)
	if len(w.Refused) != MaxRefused || w.RefusedMore != len(refused)-MaxRefused {
		t.Fatalf("refused %v (+%d), want the first %d and %d more", w.Refused, w.RefusedMore, MaxRefused, len(refused)-MaxRefused)
	}
	b, err := json.Marshal(api.NodeReport{Mode: api.ModeEnforce, Readiness: w})
	if err != nil {
		t.Fatal(err)
	}
	if len(b) > 1024 {
		t.Errorf("a report with only its readiness status is %d bytes at 5,000 peers, want ≤ 1 KiB", len(b))
	}
	var back api.NodeReport
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	got, err := Decode(back.Readiness, DefaultBuckets)
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != s.ID || got.Self != s.Self || !slices.Equal(got.In, s.In) || !slices.Equal(got.Out, s.Out) || !slices.Equal(got.Refused, refused[:MaxRefused]) {
		t.Fatalf("round trip: %+v, want %+v", got, s)
	}
	t.Logf("readiness status at 5,000 peers: %d bytes of report JSON", len(b))

	bad := []struct {
		name string
		edit func(w *api.ReadinessStatus)
		want string
	}{
		{"self not hex", func(w *api.ReadinessStatus) { w.Self = "zz" + w.Self[2:] }, "self"},
		{"self short", func(w *api.ReadinessStatus) { w.Self = w.Self[1:] }, "self"},
		{"in not base64", func(w *api.ReadinessStatus) { w.In = "!" + w.In[1:] }, "in"},
		{"out one bucket short", func(w *api.ReadinessStatus) { w.Out = Encode(NewStatus(7, 1, ks, ks, nil, DefaultBuckets-1)).Out }, "out"},
		{"too many refused", func(w *api.ReadinessStatus) { w.Refused = append(w.Refused, 1) }, "refused"},
	}
	for _, c := range bad {
		w := Encode(s)
		c.edit(w)
		if _, err := Decode(w, DefaultBuckets); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error about %s", c.name, err, c.want)
		}
	}
	if _, err := Decode(nil, DefaultBuckets); err == nil {
		t.Error("nil status decoded")
	}
}
