package master

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/internal/testutil"
	"github.com/secureoverlay/secureoverlay/nodeview"
	"github.com/secureoverlay/secureoverlay/readiness"
)

// TestViewWriter: the writer writes a changed view once, not an unchanged one, retries a
// failed write (counted, logged once), writes a forgotten node's view again when it comes
// back, and at start takes the views already in the API as written.
func TestViewWriter(t *testing.T) {
	dc := fakeViewsClient()
	v1 := readiness.View{Keys: 1, NotIn: []uint32{2}}
	v2 := readiness.View{Keys: 2}
	// A previous leader wrote node-b's view.
	if err := nodeview.Write(context.Background(), dc, api.Namespace, "node-b", "uid-b", *readiness.EncodeView(v2)); err != nil {
		t.Fatal(err)
	}
	var writes, failNext atomic.Int32
	dc.PrependReactor("*", "nodeviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if a.GetVerb() == "patch" { // every write starts with one (upsert.Write)
			writes.Add(1)
			if failNext.Load() > 0 {
				failNext.Add(-1)
				return true, nil, errors.New("injected")
			}
		}
		return false, nil, nil
	})
	var logs strings.Builder
	m := NewMetrics()
	w := newViewWriter(dc, api.Namespace, slog.New(slog.NewTextHandler(&logs, nil)), m)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go w.run(ctx)
	settle := func(what string, cond func() bool) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: %d writes, ok %v, error %v", what, writes.Load(), value(m.ViewWrites.WithLabelValues("ok")), value(m.ViewWrites.WithLabelValues("error")))
			}
		}
		time.Sleep(100 * time.Millisecond) // nothing more comes
	}
	// No wait for the start's list: the writer decides nothing before its handler has
	// taken the list (node-b's view as written).
	gates := func(*readiness.View) int { return 1 }
	w.Set("node-b", "uid-b", v2, gates)
	w.Set("node-a", "uid-a", v1, gates)
	settle("node-a written, node-b as listed", func() bool { return value(m.ViewWrites.WithLabelValues("ok")) == 1 })
	if writes.Load() != 1 {
		t.Fatalf("%d writes, want 1 (node-b's view was already in the API)", writes.Load())
	}
	w.Set("node-a", "uid-a", v1, gates)
	time.Sleep(200 * time.Millisecond)
	if writes.Load() != 1 {
		t.Fatalf("an unchanged view written again: %d writes", writes.Load())
	}
	failNext.Store(2)
	w.Set("node-a", "uid-a", v2, gates)
	settle("node-a's next view after two failures", func() bool { return value(m.ViewWrites.WithLabelValues("ok")) == 2 })
	if got := value(m.ViewWrites.WithLabelValues("error")); got != 2 {
		t.Errorf("%v write errors counted, want 2", got)
	}
	if n := strings.Count(logs.String(), "cannot write a NodeView"); n != 1 {
		t.Errorf("write failures logged %d times, want once a minute:\n%s", n, logs.String())
	}
	w.Forget("node-a")
	w.Set("node-a", "uid-a", v2, gates)
	settle("node-a again after it left", func() bool { return value(m.ViewWrites.WithLabelValues("ok")) == 3 })
}

// TestViewWriterGatingFirst: views are written largest gain first, then in arrival order,
// whatever the order they came in; a queued view that comes again takes its newest gain
// (up or down) and keeps its arrival; the views gaining nothing are still written once
// nothing else waits; the writer asks about the view the API holds (nil before the first
// write).
func TestViewWriterGatingFirst(t *testing.T) {
	dc := fakeViewsClient()
	release, entered := make(chan struct{}), make(chan struct{})
	var enter sync.Once
	var mu sync.Mutex
	var order []string
	dc.PrependReactor("patch", "nodeviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
		enter.Do(func() { close(entered) })
		<-release
		mu.Lock()
		order = append(order, a.(k8stesting.PatchAction).GetName())
		mu.Unlock()
		return false, nil, nil
	})
	w, m, _ := runViewWriter(t, dc)
	v := readiness.View{Keys: 1, Seq: 7}
	var asked []*readiness.View
	gain := func(g int) func(*readiness.View) int {
		return func(held *readiness.View) int { asked = append(asked, held); return g }
	}
	w.Set("first", "uid", v, gain(1)) // taken once the writer has listed; its write waits for release
	// Not a sleep: under load the writer may take longer than any fixed wait.
	select {
	case <-entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the writer did not take the first view")
	}
	w.Set("a", "uid", v, gain(0))
	w.Set("b", "uid", v, gain(0))
	w.Set("e", "uid", v, gain(0))
	w.Set("c", "uid", v, gain(0))
	w.Set("d", "uid", v, gain(1))
	w.Set("f", "uid", v, gain(1))
	w.Set("g", "uid", v, gain(2))
	w.Set("e", "uid", v, gain(1)) // moves up, behind d and f (arrived before them)
	w.Set("h", "uid", v, gain(3))
	w.Set("h", "uid", v, gain(1)) // its newest view gains less
	if g, d := value(m.ViewsQueued.WithLabelValues("gating")), value(m.ViewsQueued.WithLabelValues("deferred")); g != 5 || d != 3 {
		t.Errorf("queued: %v gating, %v deferred; want 5, 3", g, d)
	}
	close(release)
	for deadline := time.Now().Add(10 * time.Second); value(m.ViewWrites.WithLabelValues("ok")) < 9; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%v of 9 views written", value(m.ViewWrites.WithLabelValues("ok")))
		}
	}
	mu.Lock()
	got := strings.Join(order, " ")
	mu.Unlock()
	if want := "first g e d f h a b c"; got != want {
		t.Errorf("written in the order %q, want %q", got, want)
	}
	if g, d := value(m.ViewsQueued.WithLabelValues("gating")), value(m.ViewsQueued.WithLabelValues("deferred")); g != 0 || d != 0 {
		t.Errorf("queued after the writes: %v gating, %v deferred", g, d)
	}
	for _, held := range asked {
		if held != nil {
			t.Errorf("gates asked about a held view %+v before any was written", held)
		}
	}
	// Now "d" holds v: the writer asks about it, and an equal view is not even asked about.
	asked = nil
	w.Set("d", "uid", readiness.View{Keys: 2}, gain(1))
	w.Set("e", "uid", v, gain(1))
	if len(asked) != 1 || asked[0] == nil || asked[0].Seq != 7 {
		t.Errorf("gates asked about %+v, want once, about the written view (Seq 7)", asked)
	}
}

// TestViewQueueGap: a node is not taken again within the gap of its last take; others are;
// the queue says when the next one may be taken; gains still order what is takeable.
func TestViewQueueGap(t *testing.T) {
	var now time.Time
	q := newViewQueue(NewMetrics().ViewsQueued, time.Second, func() time.Time { return now })
	take := func() (string, bool, time.Time) {
		q.mu.Lock()
		defer q.mu.Unlock()
		return q.take()
	}
	q.add("x", 5)
	if n, ok, _ := take(); !ok || n != "x" {
		t.Fatalf("took %q %v, want x", n, ok)
	}
	q.add("x", 9)
	if n, ok, next := take(); ok || !next.Equal(now.Add(time.Second)) {
		t.Fatalf("took %q %v (next %v) within x's gap, want nothing until %v", n, ok, next, now.Add(time.Second))
	}
	q.add("a", 1)
	q.add("b", 2)
	if n, _, _ := take(); n != "b" {
		t.Fatalf("took %q, want b (x cools, b gains more than a)", n)
	}
	now = now.Add(time.Second)
	for _, want := range []string{"x", "a"} {
		if n, ok, _ := take(); !ok || n != want {
			t.Fatalf("took %q %v, want %s", n, ok, want)
		}
	}
	if n, ok, next := take(); ok || !next.IsZero() {
		t.Fatalf("took %q %v (next %v) from an empty queue", n, ok, next)
	}
}

// TestViewWriterRestores: a NodeView deleted or edited by someone else (an operator) is
// written again, without a change of the view the master wants; a view the writer wrote
// itself is not written twice.
func TestViewWriterRestores(t *testing.T) {
	dc := fakeViewsClient()
	w, m, ctx := runViewWriter(t, dc)
	v := readiness.View{Keys: 7, NotIn: []uint32{3}}
	want := *readiness.EncodeView(v)
	w.Set("node-a", "uid-a", v, func(*readiness.View) int { return 1 })
	holds := func(what string, ok func(api.ReadinessView, error) bool) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			u, err := dc.Resource(nodeview.GVR).Namespace(api.Namespace).Get(ctx, "node-a", metav1.GetOptions{})
			var got api.ReadinessView
			if err == nil {
				got, err = nodeview.Parse(u)
			}
			if ok(got, err) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: the API holds %+v (%v)", what, got, err)
			}
		}
	}
	isWant := func(got api.ReadinessView, err error) bool { return err == nil && got == want }
	holds("written", isWant)
	// The count follows the write's return, which the API's object may precede.
	for deadline := time.Now().Add(10 * time.Second); value(m.ViewWrites.WithLabelValues("ok")) < 1 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond) // the informer's echo of the write
	if got := value(m.ViewWrites.WithLabelValues("ok")); got != 1 {
		t.Fatalf("%v writes, want 1 (the echo of its own write must not cause another)", got)
	}
	if err := dc.Resource(nodeview.GVR).Namespace(api.Namespace).Delete(ctx, "node-a", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	holds("deleted by hand, written again", isWant)
	if err := nodeview.Write(ctx, dc, api.Namespace, "node-a", "uid-a", *readiness.EncodeView(readiness.View{Keys: 7})); err != nil {
		t.Fatal(err)
	}
	holds("edited by hand, written again", isWant)
	time.Sleep(1500 * time.Millisecond) // nothing more comes (the gap is 1 s)
	if got := value(m.ViewWrites.WithLabelValues("ok")); got != 3 {
		t.Errorf("%v writes, want 3 (first, after the deletion, after the edit)", got)
	}
}

// TestViewWriterNoCRD: with an older manifest (no NodeView CRD) the writer says so once,
// writes nothing, and stops with its context.
func TestViewWriterNoCRD(t *testing.T) {
	dc := fakeViewsClient()
	dc.PrependReactor("list", "nodeviews", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewNotFound(nodeview.GVR.GroupResource(), "")
	})
	var logs testutil.SyncBuffer
	m := NewMetrics()
	w := newViewWriter(dc, api.Namespace, slog.New(slog.NewTextHandler(&logs, nil)), m)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { w.run(ctx); close(done) }()
	w.Set("node-a", "uid-a", readiness.View{Keys: 1}, func(*readiness.View) int { return 1 })
	time.Sleep(3 * time.Second) // the reflector retries meanwhile
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the writer did not stop with its context")
	}
	if n := strings.Count(logs.String(), "the NodeViews cannot be listed"); n != 1 {
		t.Errorf("warned %d times, want once:\n%s", n, logs.String())
	}
	if got := value(m.ViewWrites.WithLabelValues("ok")) + value(m.ViewWrites.WithLabelValues("error")); got != 0 {
		t.Errorf("%v writes attempted without the CRD", got)
	}
}

// TestViewWriterIgnoresLateEcho: the informer may deliver the event of an earlier write
// after a later one; that is not an edit, and must not make the writer rewrite a view that
// did not change (TestNodeViewsAgainstRealAPIServer caught it once in 20 runs).
func TestViewWriterIgnoresLateEcho(t *testing.T) {
	dc := fakeViewsClient()
	w, m, _ := runViewWriter(t, dc)
	time.Sleep(100 * time.Millisecond) // the informer's first list
	one := func(*readiness.View) int { return 1 }
	a, b := readiness.View{Keys: 1, NotIn: []uint32{2}}, readiness.View{Keys: 1}
	writes := func(n float64) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); value(m.ViewWrites.WithLabelValues("ok")) < n; time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%v writes, want %v", value(m.ViewWrites.WithLabelValues("ok")), n)
			}
		}
	}
	w.Set("node-a", "uid-a", a, one)
	writes(1)
	w.Set("node-a", "uid-a", b, one)
	writes(2)                                                                                      // after the per-node second
	w.observed(nodeview.Object(api.Namespace, "node-a", "uid-a", *readiness.EncodeView(a)), false) // a's event, late
	time.Sleep(1500 * time.Millisecond)
	if got := value(m.ViewWrites.WithLabelValues("ok")); got != 2 {
		t.Errorf("%v writes after a late echo, want 2", got)
	}
	// An edit to a value it never wrote is still restored.
	w.observed(nodeview.Object(api.Namespace, "node-a", "uid-a", *readiness.EncodeView(readiness.View{Keys: 9})), false)
	writes(3)
}

// fakeViewsClient is a fake dynamic client that serves NodeViews.
func fakeViewsClient() *dynamicfake.FakeDynamicClient {
	return dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), map[schema.GroupVersionResource]string{nodeview.GVR: nodeview.ListKind})
}

// runViewWriter runs a view writer on dc until the test ends.
func runViewWriter(t *testing.T, dc *dynamicfake.FakeDynamicClient) (*viewWriter, *Metrics, context.Context) {
	m := NewMetrics()
	w := newViewWriter(dc, api.Namespace, slog.New(slog.DiscardHandler), m)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go w.run(ctx)
	return w, m, ctx
}

// TestViewWriterDropsNeedless: a view found needless when set (SetNeeded), or while it
// waits in the queue (Recheck: the row that makes it needless came after it was queued),
// is not written; the view the writer restores after a deletion stays the one written.
//
// v2 must still be queued when Recheck runs, so the writer is kept busy meanwhile: its
// write of node-b's view blocks until released. (The queue forgets its takes once idle, so
// the per-node gap alone does not keep v2 queued: the test used to rely on reaching
// Recheck before the writer woke, and failed so in a CI run under load.)
func TestViewWriterDropsNeedless(t *testing.T) {
	dc := fakeViewsClient()
	entered, release := make(chan struct{}), make(chan struct{})
	var blocked atomic.Bool
	dc.PrependReactor("*", "nodeviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
		var name string
		switch a := a.(type) {
		case k8stesting.PatchAction:
			name = a.GetName()
		case k8stesting.CreateAction:
			if o, ok := a.GetObject().(metav1.Object); ok {
				name = o.GetName()
			}
		}
		if name == "node-b" && blocked.CompareAndSwap(false, true) {
			close(entered)
			<-release
		}
		return false, nil, nil
	})
	w, m, ctx := runViewWriter(t, dc)
	v1, v2, v3 := readiness.View{Keys: 7, NotIn: []uint32{3}}, readiness.View{Keys: 8}, readiness.View{Keys: 9}
	one := func(*readiness.View) int { return 1 }
	writes := func() float64 { return value(m.ViewWrites.WithLabelValues("ok")) }
	holds := func(what, node string, v readiness.View) {
		t.Helper()
		want := *readiness.EncodeView(v)
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			u, err := dc.Resource(nodeview.GVR).Namespace(api.Namespace).Get(ctx, node, metav1.GetOptions{})
			var got api.ReadinessView
			if err == nil {
				got, err = nodeview.Parse(u)
			}
			if err == nil && got == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: the API holds %+v (%v) for %s, want %+v", what, got, err, node, want)
			}
		}
	}
	w.Set("node-a", "uid-a", v1, one)
	holds("first view", "node-a", v1)
	// The writer takes node-b's view and blocks in its write; v2 waits in the queue
	// meanwhile, and its row arrives.
	w.Set("node-b", "uid-b", v1, one)
	select {
	case <-entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the writer did not write node-b's view")
	}
	w.Set("node-a", "uid-a", v2, one)
	if n := w.Recheck(func(string, *readiness.View, readiness.View) bool { return true }); n != 0 {
		close(release)
		t.Fatalf("Recheck dropped %d views that are needed", n)
	}
	n := w.Recheck(func(node string, held *readiness.View, want readiness.View) bool {
		if node != "node-a" || held == nil || held.Keys != v1.Keys || want.Keys != v2.Keys {
			t.Errorf("Recheck asked about %s, held %+v, want %+v", node, held, want)
		}
		return false
	})
	close(release)
	if n != 1 {
		t.Fatalf("Recheck dropped %d views, want 1", n)
	}
	if q := value(m.ViewsQueued.WithLabelValues("gating")) + value(m.ViewsQueued.WithLabelValues("deferred")); q != 0 {
		t.Fatalf("%v views still queued after Recheck dropped node-a's", q)
	}
	holds("node-b's view, once released", "node-b", v1)
	w.SetNeeded("node-a", "uid-a", v3, one, func(*readiness.View) bool { return false })
	time.Sleep(1500 * time.Millisecond) // past the gap: a view still queued would be written
	if got := writes(); got != 2 {
		t.Fatalf("%v writes, want 2 (node-a's first and node-b's; the needless views dropped)", got)
	}
	if got := value(m.ViewsSkipped); got != 2 {
		t.Errorf("%v views skipped, want 2", got)
	}
	holds("the needless views not written", "node-a", v1)
	if err := dc.Resource(nodeview.GVR).Namespace(api.Namespace).Delete(ctx, "node-a", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	holds("deleted by hand: the view written, not a dropped one, comes back", "node-a", v1)
}
