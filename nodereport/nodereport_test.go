package nodereport

import (
	"context"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	dynamicfake "k8s.io/client-go/dynamic/fake"
)

func TestPick(t *testing.T) {
	old := `{"mode":"enforce","lastSync":"2026-12-01T00:00:00Z"}`
	newer := `{"mode":"accept","lastSync":"2026-12-02T00:00:00Z"}`
	for _, tc := range []struct {
		name, ann, obj, want string
		fromObj             bool
	}{
		{"neither", "", "", "", false},
		{"annotation only (an agent of 0.1)", old, "", old, false},
		{"object only", "", old, old, true},
		{"both, same lastSync (dual write): the object", old, old, old, true},
		{"object later", old, newer, newer, true},
		{"annotation later (a downgrade wrote it)", newer, old, newer, false},
		{"annotation unparsable: the object", "{", old, old, true},
		{"object unparsable, annotation parses: the annotation", old, "{", old, false},
	} {
		got, obj := Pick(tc.ann, tc.obj)
		if got != tc.want || obj != tc.fromObj {
			t.Errorf("%s: Pick = %q, %v; want %q, %v", tc.name, got, obj, tc.want, tc.fromObj)
		}
	}
}

func TestObject(t *testing.T) {
	u := Object("ns", "node-1", "uid-1", "enforce", []byte(`{"mode":"enforce"}`))
	if Raw(u) != `{"mode":"enforce"}` || u.GetName() != "node-1" || u.GetNamespace() != "ns" || u.GetKind() != Kind {
		t.Fatalf("object: %+v", u.Object)
	}
	if refs := u.GetOwnerReferences(); len(refs) != 1 || refs[0].Kind != "Node" || refs[0].Name != "node-1" || refs[0].UID != "uid-1" {
		t.Fatalf("owners: %+v", refs)
	}
	if refs := Object("ns", "n", "", "off", nil).GetOwnerReferences(); len(refs) != 0 {
		t.Fatalf("no uid, owners %+v", refs)
	}
}

// TestCacheKeepsDeletedReports: a deleted NodeReport of an existing Node is kept (marked
// Deleted) until the object returns or Forget; of a Node that does not exist, it is not.
func TestCacheKeepsDeletedReports(t *testing.T) {
	dc := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), map[schema.GroupVersionResource]string{GVR: ListKind},
		Object("ns", "a", "", "enforce", []byte(`{"mode":"enforce"}`)))
	var mu sync.Mutex
	nodes := map[string]bool{"a": true, "b": true}
	var events []string
	c := NewCache(CacheConfig[string]{Dynamic: dc, Namespace: "ns",
		Convert:    func(node, raw string) string { return node + ":" + raw },
		NodeExists: func(n string) bool { mu.Lock(); defer mu.Unlock(); return nodes[n] },
		OnChange: func(node string, before, after *Entry[string]) {
			mu.Lock()
			defer mu.Unlock()
			e := node
			if before == nil {
				e += " added"
			}
			if after == nil {
				e += " gone"
			} else if after.Deleted {
				e += " kept"
			}
			events = append(events, e)
		}})
	stop := make(chan struct{})
	defer close(stop)
	c.Start(stop)
	wait := func(what string, f func() bool) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); !f(); time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s (events %v)", what, events)
			}
		}
	}
	wait("sync", c.HasSynced)
	if e, ok := c.Get("a"); !ok || e.Deleted || e.Value != `a:{"mode":"enforce"}` {
		t.Fatalf("a = %+v, %v", e, ok)
	}
	if _, ok := c.Get("b"); ok {
		t.Fatal("b has no report")
	}
	r := dc.Resource(GVR).Namespace("ns")
	ctx := context.Background()
	if err := r.Delete(ctx, "a", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	wait("a kept", func() bool { e, ok := c.Get("a"); return ok && e.Deleted && e.Value == `a:{"mode":"enforce"}` })
	if _, err := r.Create(ctx, Object("ns", "a", "", "off", []byte(`{"mode":"off"}`)), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	wait("a back", func() bool { e, ok := c.Get("a"); return ok && !e.Deleted && e.Value == `a:{"mode":"off"}` })
	// The Node is deleted first (Forget), then its report (the garbage collector).
	mu.Lock()
	delete(nodes, "a")
	mu.Unlock()
	c.Forget("a")
	if err := r.Delete(ctx, "a", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	wait("a gone", func() bool { _, ok := c.Get("a"); return !ok })
	mu.Lock()
	defer mu.Unlock()
	want := []string{"a added", "a kept", "a", "a gone"}
	if len(events) != len(want) {
		t.Fatalf("events %v, want %v", events, want)
	}
	for i := range want {
		if events[i] != want[i] {
			t.Fatalf("events %v, want %v", events, want)
		}
	}
}
