package watch

import (
	"sync/atomic"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/nodeview"
	"github.com/secureoverlay/secureoverlay/readiness"
)

// TestOwnReadinessView: the watcher follows its own node's NodeView only — another node's
// does not replace it — notifies a change, and forgets it when it is deleted.
func TestOwnReadinessView(t *testing.T) {
	ctx, w, _, dc := watcherOfA(t, api.ModeAccept, node("a", "198.18.0.1/24", "boot-a", nil), node("b", "198.18.0.2/24", "boot-b", nil))
	var notified atomic.Int32
	w.SetOnChange(func(kind string) {
		if kind == "nodeview" {
			notified.Add(1)
		}
	})
	waitFor(t, "caches to sync", w.HasSynced)
	if _, ok := w.ReadinessView(); ok {
		t.Fatal("a view before the master wrote one")
	}
	mine := *readiness.EncodeView(readiness.View{Keys: 42, NotIn: []uint32{2}})
	if err := nodeview.Write(ctx, dc, api.Namespace, "a", "", mine); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a's view", func() bool { v, ok := w.ReadinessView(); return ok && v == mine })
	mine2 := *readiness.EncodeView(readiness.View{Keys: 43})
	if err := nodeview.Write(ctx, dc, api.Namespace, "a", "", mine2); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a's next view", func() bool { v, ok := w.ReadinessView(); return ok && v == mine2 })
	if err := nodeview.Write(ctx, dc, api.Namespace, "b", "", *readiness.EncodeView(readiness.View{Keys: 7})); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	if v, ok := w.ReadinessView(); !ok || v != mine2 {
		t.Fatalf("after b's view was written: %+v, %v; want a's", v, ok)
	}
	if notified.Load() < 2 {
		t.Errorf("%d nodeview notifications, want ≥ 2", notified.Load())
	}
	if err := dc.Resource(nodeview.GVR).Namespace(api.Namespace).Delete(ctx, "b", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := dc.Resource(nodeview.GVR).Namespace(api.Namespace).Delete(ctx, "a", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a's view gone", func() bool { _, ok := w.ReadinessView(); return !ok })
}
