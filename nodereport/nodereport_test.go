package nodereport

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	dynamicfake "k8s.io/client-go/dynamic/fake"

	"github.com/secureoverlay/secureoverlay/conformance/kube"
)

func TestPick(t *testing.T) {
	old := `{"mode":"enforce","lastSync":"2026-12-01T00:00:00Z"}`
	newer := `{"mode":"accept","lastSync":"2026-12-02T00:00:00Z"}`
	for _, tc := range []struct {
		name, ann, obj, want string
		fromObj              bool
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

func TestPickObject(t *testing.T) {
	old := `{"mode":"enforce","lastSync":"2026-12-01T00:00:00Z"}`
	newer := `{"mode":"accept","lastSync":"2026-12-02T00:00:00Z"}`
	for _, tc := range []struct{ name, report, status, want string }{
		{"neither", "", "", ""},
		{"NodeReport only", old, "", old},
		{"NodeStatus only", "", old, old},
		{"both, same lastSync (an agent writing both): the NodeStatus", old, strings.Replace(old, "enforce", "encrypt", 1), strings.Replace(old, "enforce", "encrypt", 1)},
		{"NodeStatus later (the NodeReport left behind)", old, newer, newer},
		{"NodeReport later (a rolled-back agent)", newer, old, newer},
		{"NodeStatus unparsable: the NodeReport", old, "{", old},
		{"NodeReport unparsable: the NodeStatus", "{", old, old},
		{"NodeReport superseded, though later: the NodeStatus", `{"superseded":true,"listsOmitted":true,"lastSync":"2026-12-03T00:00:00Z"}`, old, old},
		{"NodeReport superseded, no NodeStatus: none", `{"superseded":true,"lastSync":"2026-12-03T00:00:00Z"}`, "", ""},
	} {
		if got := PickObject(tc.report, tc.status); got != tc.want {
			t.Errorf("%s: PickObject = %q, want %q", tc.name, got, tc.want)
		}
	}
}

// TestSupersededObject: a superseded report's object says so in its metadata (the CLI's
// metadata-only list skips it); any other report's removes the annotation (null in the
// merge patch).
func TestSupersededObject(t *testing.T) {
	sup := Object("ns", "c", "uid-c", "enforce", []byte(`{"mode":"enforce","superseded":true,"listsOmitted":true}`))
	cur := Object("ns", "c", "uid-c", "enforce", []byte(`{"mode":"enforce","listsOmitted":true}`))
	ann := func(u *unstructured.Unstructured) (any, bool) {
		a, _ := u.Object["metadata"].(map[string]any)["annotations"].(map[string]any)
		v, ok := a[SupersededAnnotation]
		return v, ok
	}
	if v, ok := ann(sup); !ok || v != "true" {
		t.Errorf("superseded report: annotation %v (%v), want \"true\"", v, ok)
	}
	if v, ok := ann(cur); !ok || v != nil {
		t.Errorf("current report: annotation %v (%v), want null (removed by the merge patch)", v, ok)
	}
}

func TestStatusObject(t *testing.T) {
	full := `{"mode":"enforce","inboundFrom":{"a":"0011aabb"},"lastSync":"2026-12-01T00:00:00Z"}`
	u, r := StatusObject("ns", "c", "uid-c", "enforce", []byte(full)), Object("ns", "c", "uid-c", "enforce", []byte(full))
	if u.GetKind() != StatusKind || r.GetKind() != Kind || u.GetAPIVersion() != r.GetAPIVersion() {
		t.Fatalf("kinds %s %s, %s %s", u.GetAPIVersion(), u.GetKind(), r.GetAPIVersion(), r.GetKind())
	}
	// Everything else is the NodeReport's: report, mode, owner, summary.
	u.SetKind(Kind)
	if !equality.Semantic.DeepEqual(u.Object, r.Object) {
		t.Fatalf("NodeStatus %+v\nNodeReport %+v", u.Object, r.Object)
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
	// The summary: the report without its per-peer claims, every other field verbatim.
	full := `{"mode":"enforce","generations":[7],"inboundFrom":{"a":"0011aabb","b":"2233ccdd"},"encryptingTo":{"a":"0011aabb"},"lastSync":"2026-12-01T00:00:00Z"}`
	u = Object("ns", "c", "uid-c", "enforce", []byte(full))
	want := `{"generations":[7],"lastSync":"2026-12-01T00:00:00Z","mode":"enforce"}`
	if got := u.GetAnnotations()[SummaryAnnotation]; got != want || Raw(u) != full {
		t.Fatalf("summary annotation %q (want %q), report %q", got, want, Raw(u))
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

// TestCacheWithoutTheCRD: against a real API server without the NodeReport CRD (a newer
// agent image under an older manifest), the cache does not sync — readers must not act
// on a partial view — and Err says what to do; once the CRD is applied, it syncs.
func TestCacheWithoutTheCRD(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a real kube-apiserver; skipped with -short")
	}
	c := kube.Start(t)
	dc := dynamic.NewForConfigOrDie(c.AdminConfig())
	ctx := context.Background()
	crdGVR := schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	if err := dc.Resource(crdGVR).Delete(ctx, Resource+"."+Group, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if _, err := dc.Resource(GVR).Namespace("secureoverlay").List(ctx, metav1.ListOptions{}); apierrors.IsNotFound(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the NodeReport CRD is still served after its deletion")
		}
	}
	cc := NewCache(CacheConfig[string]{Dynamic: dc, Namespace: "secureoverlay", Convert: func(_, raw string) string { return raw }})
	stop := make(chan struct{})
	defer close(stop)
	cc.Start(stop)
	var err error
	for deadline := time.Now().Add(30 * time.Second); err == nil; time.Sleep(50 * time.Millisecond) {
		if err = cc.Err(); time.Now().After(deadline) {
			t.Fatal("no error while the CRD is missing")
		}
	}
	if cc.HasSynced() || !strings.Contains(err.Error(), "is the CRD nodereports.secureoverlay.io installed? apply the manifest") {
		t.Fatalf("synced %v, error %q", cc.HasSynced(), err)
	}
	t.Logf("without the CRD: %v", err)
	crds, err := kube.OurCRDs()
	if err != nil {
		t.Fatal(err)
	}
	if err := kube.InstallCRDs(ctx, c.AdminConfig(), crds...); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(60 * time.Second); !cc.HasSynced(); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("not synced after the CRD was installed (error %v)", cc.Err())
		}
	}
	if err := cc.Err(); err != nil {
		t.Fatalf("synced, error %v", err)
	}
}

// TestSummaryGoesWithTheLists: a report without per-peer claims is its own summary, so
// its object carries none — created so, and an earlier summary removed when the lists go
// (a stale summary would tell metadata-only readers an old report); it returns with them.
func TestSummaryGoesWithTheLists(t *testing.T) {
	dc := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), map[schema.GroupVersionResource]string{GVR: ListKind})
	ctx := context.Background()
	summary := func(name string) (string, bool) {
		t.Helper()
		u, err := dc.Resource(GVR).Namespace("ns").Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		s, ok := u.GetAnnotations()[SummaryAnnotation]
		return s, ok
	}
	lean := `{"mode":"enforce","listsOmitted":true,"lastSync":"2026-12-06T00:00:00Z"}`
	listed := `{"mode":"enforce","inboundFrom":{"b":"0011aabb"},"lastSync":"2026-12-06T00:00:01Z"}`
	if err := Write(ctx, dc, "ns", "a", "uid-a", "enforce", []byte(lean)); err != nil {
		t.Fatal(err)
	}
	if s, ok := summary("a"); ok {
		t.Errorf("created without lists: summary %q", s)
	}
	if err := Write(ctx, dc, "ns", "a", "uid-a", "enforce", []byte(listed)); err != nil {
		t.Fatal(err)
	}
	if s, ok := summary("a"); !ok || strings.Contains(s, "inboundFrom") {
		t.Errorf("with lists: summary %q, %v", s, ok)
	}
	if err := Write(ctx, dc, "ns", "a", "uid-a", "enforce", []byte(lean)); err != nil {
		t.Fatal(err)
	}
	if s, ok := summary("a"); ok {
		t.Errorf("the lists gone: a stale summary %q is left", s)
	}
}
