package readiness

import (
	"encoding/base64"
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

// A view survives its object's JSON unchanged, costs about a byte or two per listed ID
// (a reboot lists every peer once: ≈ 15 KB at 5,000 nodes with 40-character names
// elsewhere in the object), and a malformed one is refused with a reason.
func TestViewWireRoundTrip(t *testing.T) {
	var all []uint32
	for id := uint32(1); id <= 5000; id++ {
		all = append(all, id)
	}
	for _, v := range []View{
		{Keys: 0},
		{Keys: 0xffffffffffff, NotIn: []uint32{0}, NotOut: []uint32{0, 1, 127, 128, 16384, 0xffffffff}},
		{Keys: 42, NotIn: all, NotOut: all[4990:]},
	} {
		b, err := json.Marshal(EncodeView(v))
		if err != nil {
			t.Fatal(err)
		}
		var w api.ReadinessView
		if err := json.Unmarshal(b, &w); err != nil {
			t.Fatal(err)
		}
		got, err := DecodeView(&w)
		if err != nil {
			t.Fatalf("%+v: %v", v, err)
		}
		if !equalView(got, v) {
			t.Errorf("round trip: got %+v, want %+v", got, v)
		}
		if len(v.NotIn) == 5000 && len(b) > 2*5000*4/3+200 {
			t.Errorf("a view listing 5,000 peers is %d bytes, want ≤ 2 bytes per ID in base64", len(b))
		}
	}
	enc := func(raw ...byte) string { return base64.StdEncoding.EncodeToString(raw) }
	for _, c := range []struct {
		w    *api.ReadinessView
		want string
	}{
		{nil, "no readiness view"},
		{&api.ReadinessView{Keys: "12"}, "want 16 hex digits"},
		{&api.ReadinessView{Keys: "zzzzzzzzzzzzzzzz"}, "want 16 hex digits"},
		{&api.ReadinessView{Keys: "0000000000000001", NotIn: "!"}, "notIn"},
		{&api.ReadinessView{Keys: "0000000000000001", NotIn: enc(0x80)}, "truncated varint"},
		{&api.ReadinessView{Keys: "0000000000000001", NotOut: enc(1, 0)}, "ids do not ascend"},
		{&api.ReadinessView{Keys: "0000000000000001", NotOut: enc(0xff, 0xff, 0xff, 0xff, 0x0f, 1)}, "id past 32 bits"},
		{&api.ReadinessView{Keys: "0000000000000001", NotOut: enc(0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01)}, "id past 32 bits"},
	} {
		_, err := DecodeView(c.w)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("DecodeView(%+v) = %v, want an error containing %q", c.w, err, c.want)
		}
	}
	huge := make([]byte, MaxViewIDs+1)
	for i := range huge {
		huge[i] = 1
	}
	if _, err := DecodeView(&api.ReadinessView{Keys: "0000000000000001", NotIn: enc(huge...)}); err == nil || !strings.Contains(err.Error(), "more than") {
		t.Errorf("a list of %d ids: %v, want refused", len(huge), err)
	}
}

// TestUsedText: the last view used round-trips as text; anything else is refused.
func TestUsedText(t *testing.T) {
	for _, c := range []struct {
		k  uint64
		ok bool
	}{{0, false}, {0, true}, {0x0123456789abcdef, true}, {^uint64(0), true}} {
		k, ok, err := DecodeUsed(EncodeUsed(c.k, c.ok))
		if err != nil || ok != c.ok || (ok && k != c.k) {
			t.Errorf("%v: %x %v %v", c, k, ok, err)
		}
	}
	for _, bad := range []string{"", "None", "123", "0123456789abcdefg", "0123456789abcdeg"} {
		if _, _, err := DecodeUsed(bad); err == nil {
			t.Errorf("%q decoded", bad)
		}
	}
}
