package master

import (
	"context"
	"log/slog"
	"sync"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/util/workqueue"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/nodeview"
)

// viewWriter writes each live node's NodeView (docs/protocol-v2.md §9 step 2): the
// reconcile hands over the views its shadow readiness changed (Set), one worker writes the
// newest view of each node off the reconcile path. A burst of changes to one node's view
// costs one write (the queue holds a node once), a failed write is retried with backoff,
// and a view already in the API (as written or as listed at the start: a new leader does
// not rewrite a cluster's worth of unchanged views) is not written again.
type viewWriter struct {
	dc      dynamic.Interface
	ns      string
	log     *slog.Logger
	metrics *Metrics
	queue   workqueue.TypedRateLimitingInterface[string]

	mu      sync.Mutex
	want    map[string]wantView
	written map[string]api.ReadinessView
	lastErr time.Time // last write error logged (one a minute at most)
}

type wantView struct {
	uid  string
	view api.ReadinessView
}

func newViewWriter(dc dynamic.Interface, ns string, log *slog.Logger, m *Metrics) *viewWriter {
	return &viewWriter{dc: dc, ns: ns, log: log, metrics: m, want: map[string]wantView{}, written: map[string]api.ReadinessView{},
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedItemExponentialFailureRateLimiter[string](time.Second, time.Minute),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "secureoverlay-master-views"})}
}

// Set makes v node's view (uid: the Node's, for the owner reference).
func (w *viewWriter) Set(node, uid string, v api.ReadinessView) {
	w.mu.Lock()
	w.want[node] = wantView{uid, v}
	done := w.written[node] == v
	w.mu.Unlock()
	if !done {
		w.queue.Add(node)
	}
}

// Forget drops a node that left the view: its NodeView goes with its Node (owner), or
// stays, ignored, until the node is live again — and is then written whatever it held (a
// Node deleted and re-created under the same name lost its NodeView with the old one).
func (w *viewWriter) Forget(node string) {
	w.mu.Lock()
	delete(w.want, node)
	delete(w.written, node)
	w.mu.Unlock()
}

// run lists the views already written (a previous leader's), then writes until ctx ends.
func (w *viewWriter) run(ctx context.Context) {
	go func() {
		<-ctx.Done()
		w.queue.ShutDown()
	}()
	if l, err := w.dc.Resource(nodeview.GVR).Namespace(w.ns).List(ctx, metav1.ListOptions{}); err != nil {
		w.log.Warn("cannot list the NodeViews already written; writing every view", "err", err)
	} else {
		w.mu.Lock()
		for i := range l.Items {
			if v, err := nodeview.Parse(&l.Items[i]); err == nil {
				w.written[l.Items[i].GetName()] = v
			}
		}
		w.mu.Unlock()
	}
	for w.next(ctx) {
	}
}

func (w *viewWriter) next(ctx context.Context) bool {
	node, quit := w.queue.Get()
	if quit {
		return false
	}
	defer w.queue.Done(node)
	w.mu.Lock()
	want, ok := w.want[node]
	done := ok && w.written[node] == want.view
	w.mu.Unlock()
	if !ok || done {
		w.queue.Forget(node)
		return true
	}
	if err := nodeview.Write(ctx, w.dc, w.ns, node, want.uid, want.view); err != nil {
		if ctx.Err() != nil {
			return false
		}
		w.metrics.ViewWrites.WithLabelValues("error").Inc()
		w.mu.Lock()
		logIt := time.Since(w.lastErr) > time.Minute
		if logIt {
			w.lastErr = time.Now()
		}
		w.mu.Unlock()
		if logIt {
			w.log.Warn("cannot write a NodeView; retrying (at most one such message a minute)", "node", node, "err", err)
		}
		w.queue.AddRateLimited(node)
		return true
	}
	w.metrics.ViewWrites.WithLabelValues("ok").Inc()
	w.queue.Forget(node)
	w.mu.Lock()
	w.written[node] = want.view
	w.mu.Unlock()
	return true
}
