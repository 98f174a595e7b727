package noderow

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	dynamicfake "k8s.io/client-go/dynamic/fake"

	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/readiness"
)

// sample is a row of node id with the given refused peers.
func sample(id uint32, refused ...uint32) readiness.Status {
	in, out := readiness.Keys{}, readiness.Keys{}
	for p := uint32(1); p <= 40; p++ {
		if p != id {
			in[p] = readiness.KeyDigest(string(rune('a' + p)))
			if p%3 != 0 {
				out[p] = in[p]
			}
		}
	}
	return Normal(readiness.NewStatus(id, readiness.KeyDigest("self"), in, out, refused, readiness.DefaultBuckets))
}

// largest is a row the schema admits at its largest: every number at 10 digits, every
// refused slot used.
func largest() readiness.Status {
	r := readiness.Status{ID: 4294967295, Self: 0xfedcba9876543210}
	for j := 0; j < readiness.DefaultBuckets; j++ {
		r.In = append(r.In, 0xffff_ffff_ffff-uint64(j))
		r.Out = append(r.Out, 0xaaaa_aaaa_aaaa+uint64(j))
	}
	for i := 0; i < readiness.MaxRefused; i++ {
		r.Refused = append(r.Refused, 4294967280+uint32(i))
	}
	return r
}

func TestObjectRoundTrip(t *testing.T) {
	for _, r := range []readiness.Status{sample(3), sample(3, 9, 5), largest()} {
		u := Object("ns", "node-1", "uid-1", r)
		if refs := u.GetOwnerReferences(); len(refs) != 1 || refs[0].Kind != "Node" || refs[0].Name != "node-1" || refs[0].UID != "uid-1" {
			t.Fatalf("owners %+v", refs)
		}
		got, err := Parse(u)
		if err != nil || !Equal(got, r) {
			t.Fatalf("Parse = %+v, %v; want %+v", got, err, r)
		}
	}
}

// TestNormal: refused peers sorted, deduplicated and cut to MaxRefused (the lowest);
// an empty list is nil, so rows compare equal after a round trip.
func TestNormal(t *testing.T) {
	s := sample(3)
	s.Refused = []uint32{30, 2, 11, 2, 19, 4, 25, 7, 8, 12, 1}
	n := Normal(s)
	if want := []uint32{1, 2, 4, 7, 8, 11, 12, 19}; len(n.Refused) != len(want) || !Equal(n, readiness.Status{ID: s.ID, Self: s.Self, In: s.In, Out: s.Out, Refused: want}) {
		t.Fatalf("Normal refused %v, want %v", n.Refused, want)
	}
	if err := Validate(n); err != nil {
		t.Fatal(err)
	}
	s.Refused = []uint32{}
	if Normal(s).Refused != nil {
		t.Fatal("empty refused not nil")
	}
}

func TestParseRejects(t *testing.T) {
	good := func() *unstructured.Unstructured { return Object("ns", "n", "u", sample(3, 4)) }
	for _, tc := range []struct {
		name, want string
		edit       func(u *unstructured.Unstructured)
	}{
		{"no id", "id: want a node ID", func(u *unstructured.Unstructured) { delete(u.Object, "id") }},
		{"short self", "self", func(u *unstructured.Unstructured) { u.Object["self"] = "00ff" }},
		{"short in", "in", func(u *unstructured.Unstructured) { u.Object["in"] = "AAAA" }},
		{"out not base64", "out", func(u *unstructured.Unstructured) { u.Object["out"] = strings.Repeat("*", 256) }},
		{"refused zero", "refused", func(u *unstructured.Unstructured) { u.Object["refused"] = []any{int64(0)} }},
		{"refused descending", "refused", func(u *unstructured.Unstructured) { u.Object["refused"] = []any{int64(9), int64(4)} }},
		{"nine refused", "refused", func(u *unstructured.Unstructured) {
			ids := []any{}
			for i := int64(1); i <= 9; i++ {
				ids = append(ids, i)
			}
			u.Object["refused"] = ids
		}},
		{"wrong type", "does not parse", func(u *unstructured.Unstructured) { u.Object["id"] = "x" }},
	} {
		u := good()
		tc.edit(u)
		if _, err := Parse(u); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: Parse error %v, want %q", tc.name, err, tc.want)
		}
	}
	if _, err := Parse(good()); err != nil {
		t.Fatal(err)
	}
}

func TestWriteCreatesThenPatches(t *testing.T) {
	dc := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), map[schema.GroupVersionResource]string{GVR: ListKind})
	writeRead(t, dc)
}

// writeRead: the first write creates, later ones patch (a refused list emptied is
// emptied), and an invalid row is never sent.
func writeRead(t *testing.T, dc dynamic.Interface) {
	t.Helper()
	ctx := context.Background()
	read := func() readiness.Status {
		t.Helper()
		u, err := dc.Resource(GVR).Namespace("secureoverlay").Get(ctx, "node-a", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		r, err := Parse(u)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	for _, r := range []readiness.Status{sample(3, 7, 9), sample(3), sample(3, 5)} {
		if err := Write(ctx, dc, "secureoverlay", "node-a", "uid-a", r); err != nil {
			t.Fatal(err)
		}
		if got := read(); !Equal(got, r) {
			t.Fatalf("read back %+v, want %+v", got, r)
		}
	}
	bad := sample(3)
	bad.In = bad.In[:4]
	if err := Write(ctx, dc, "secureoverlay", "node-a", "uid-a", bad); err == nil {
		t.Fatal("invalid row written")
	}
}

// TestAgainstRealAPIServer: the manifest's CRD accepts what Write sends and refuses what
// Parse refuses; the cache sees rows written, changed and deleted; and the largest row the
// schema admits stays within 2 KiB as the API server serves it (managed fields included,
// a 40-character node name: issue 16's measure).
func TestAgainstRealAPIServer(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a real kube-apiserver; skipped with -short")
	}
	c := kube.Start(t)
	dc := dynamic.NewForConfigOrDie(c.AdminConfig())
	writeRead(t, dc)
	ctx := context.Background()
	r := dc.Resource(GVR).Namespace("secureoverlay")
	for _, tc := range []struct {
		name string
		edit func(u *unstructured.Unstructured)
	}{
		{"id zero", func(u *unstructured.Unstructured) { u.Object["id"] = int64(0) }},
		{"upper-case self", func(u *unstructured.Unstructured) { u.Object["self"] = "ABCDEF0123456789" }},
		{"short in", func(u *unstructured.Unstructured) { u.Object["in"] = "AAAA" }},
		{"no out", func(u *unstructured.Unstructured) { delete(u.Object, "out") }},
		{"nine refused", func(u *unstructured.Unstructured) {
			ids := []any{}
			for i := int64(1); i <= 9; i++ {
				ids = append(ids, i)
			}
			u.Object["refused"] = ids
		}},
	} {
		u := Object("secureoverlay", "bad-"+strings.ReplaceAll(tc.name, " ", "-"), "", sample(3))
		tc.edit(u)
		if _, err := r.Create(ctx, u, metav1.CreateOptions{}); err == nil {
			t.Errorf("%s: the CRD accepted it", tc.name)
		} else if !strings.Contains(err.Error(), "Invalid value") && !strings.Contains(err.Error(), "Required value") && !strings.Contains(err.Error(), "Too many") {
			t.Errorf("%s: %v", tc.name, err)
		}
	}

	changes := make(chan string, 16)
	rc := NewCache(dc, "secureoverlay", func(node string) { changes <- node })
	stop := make(chan struct{})
	defer close(stop)
	rc.Start(stop)
	wait := func(what string, f func() bool) {
		t.Helper()
		for deadline := time.Now().Add(30 * time.Second); !f(); time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
		}
	}
	wait("synced", rc.HasSynced)
	b := sample(4, 1)
	if err := Write(ctx, dc, "secureoverlay", "node-b", "", b); err != nil {
		t.Fatal(err)
	}
	wait("node-b", func() bool { got, ok, err := rc.Get("node-b"); return ok && err == nil && Equal(got, b) })
	// Refused out of order pass the schema (it cannot compare items) but not Parse.
	bad := Object("secureoverlay", "node-c", "", sample(5))
	bad.Object["refused"] = []any{int64(9), int64(2)}
	if _, err := r.Create(ctx, bad, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	wait("node-c as an error", func() bool { _, ok, err := rc.Get("node-c"); return ok && err != nil })
	seen := map[string]bool{}
	rc.Each(func(name string, _ readiness.Status) { seen[name] = true })
	if !seen["node-a"] || !seen["node-b"] || seen["node-c"] {
		t.Fatalf("Each saw %v; want node-a and node-b, not node-c (it does not parse)", seen)
	}
	if err := r.Delete(ctx, "node-b", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	wait("node-b gone", func() bool { _, ok, _ := rc.Get("node-b"); return !ok })

	name := "ip-10-0-12-34.eu-west-1.compute.internal"
	if err := Write(ctx, dc, "secureoverlay", name, "1d3b5f79-2c4e-4a6b-8d0f-2a4c6e8f0b13", largest()); err != nil {
		t.Fatal(err)
	}
	u, err := r.Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := Parse(u); err != nil || !Equal(got, largest()) {
		t.Fatalf("Parse = %v; want the row written", err)
	}
	raw, err := json.Marshal(u.Object)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("largest NodeRow as served (managed fields included), 40-character name: %d bytes", len(raw))
	if len(raw) > 2048 {
		t.Errorf("largest NodeRow is %d bytes as served, want ≤ 2048", len(raw))
	}
}
