package master

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/util/workqueue"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/nodeview"
	"github.com/secureoverlay/secureoverlay/readiness"
)

// viewWriter writes each live node's NodeView (docs/protocol-v2.md §9 step 2): the
// reconcile hands over the views its shadow readiness changed (Set), one worker writes the
// newest view of each node off the reconcile path. A burst of changes to one node's view
// costs one write (the queue holds a node once), a failed write is retried with backoff,
// and a view already in the API (as written or as listed at the start: a new leader does
// not rewrite a cluster's worth of unchanged views) is not written again.
//
// Views that gate something go first (readiness.Master.Gates: the view lets its agent use
// a pair its written view does not). A reboot changes every view's key digest, but only
// the views that confirm the rebooted node's pairs gate anything; the rest — the peers'
// views that merely list the rebooted node, the rebooted node's own view that lists
// everyone — wait until no gating view is queued, and are usually superseded by a gating
// one before their turn. Their agents lose nothing meanwhile: they keep their last view.
type viewWriter struct {
	dc      dynamic.Interface
	ns      string
	log     *slog.Logger
	metrics *Metrics
	queue   *viewQueue
	backoff workqueue.TypedRateLimiter[string]

	mu      sync.Mutex
	want    map[string]wantView
	written map[string]writtenView
	lastErr time.Time // last write error logged (one a minute at most)
}

type wantView struct {
	uid    string
	view   readiness.View
	wire   api.ReadinessView
	gating bool
}

// writtenView is a view as the API holds it; view.Seq is 0 for one this leader did not
// write (Gates then treats it as unknown).
type writtenView struct {
	view readiness.View
	wire api.ReadinessView
}

func newViewWriter(dc dynamic.Interface, ns string, log *slog.Logger, m *Metrics) *viewWriter {
	return &viewWriter{dc: dc, ns: ns, log: log, metrics: m, want: map[string]wantView{}, written: map[string]writtenView{},
		queue:   newViewQueue(m.ViewsQueued),
		backoff: workqueue.NewTypedItemExponentialFailureRateLimiter[string](time.Second, time.Minute)}
}

// Set makes v node's view (uid: the Node's, for the owner reference). gates says whether v
// lets the node's agent do anything the view it holds (the written one, nil: none) does
// not (readiness.Master.Gates); such views are written first.
func (w *viewWriter) Set(node, uid string, v readiness.View, gates func(held *readiness.View) bool) {
	wire := *readiness.EncodeView(v)
	w.mu.Lock()
	var held *readiness.View
	if wv, ok := w.written[node]; ok {
		held = &wv.view
	}
	done := held != nil && w.written[node].wire == wire
	gating := !done && gates(held)
	w.want[node] = wantView{uid, v, wire, gating}
	w.mu.Unlock()
	if !done {
		w.queue.add(node, gating)
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
		w.queue.shutDown()
	}()
	if l, err := w.dc.Resource(nodeview.GVR).Namespace(w.ns).List(ctx, metav1.ListOptions{}); err != nil {
		w.log.Warn("cannot list the NodeViews already written; writing every view", "err", err)
	} else {
		w.mu.Lock()
		for i := range l.Items {
			wire, err := nodeview.Parse(&l.Items[i])
			if err != nil {
				continue
			}
			if v, err := readiness.DecodeView(&wire); err == nil {
				w.written[l.Items[i].GetName()] = writtenView{v, wire}
			}
		}
		w.mu.Unlock()
	}
	for w.next(ctx) {
	}
}

func (w *viewWriter) next(ctx context.Context) bool {
	node, ok := w.queue.get()
	if !ok {
		return false
	}
	w.mu.Lock()
	want, ok := w.want[node]
	done := ok && w.written[node].wire == want.wire
	w.mu.Unlock()
	if !ok || done {
		w.backoff.Forget(node)
		return true
	}
	if err := nodeview.Write(ctx, w.dc, w.ns, node, want.uid, want.wire); err != nil {
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
		time.AfterFunc(w.backoff.When(node), func() {
			w.mu.Lock()
			want, ok := w.want[node]
			w.mu.Unlock()
			if ok {
				w.queue.add(node, want.gating)
			}
		})
		return true
	}
	w.metrics.ViewWrites.WithLabelValues("ok").Inc()
	w.backoff.Forget(node)
	w.mu.Lock()
	w.written[node] = writtenView{want.view, want.wire}
	w.mu.Unlock()
	return true
}

// viewQueue holds each node at most once, in one of two FIFOs: gating views, then the
// rest. A node queued as deferred and added again as gating moves up. (client-go's
// workqueue has one priority; its rate limiter still paces the retries.)
type viewQueue struct {
	mu     sync.Mutex
	cond   *sync.Cond
	fifo   [2][]string     // [0] gating, [1] deferred; may hold stale entries
	queued map[string]bool // node -> queued as gating
	n      [2]int          // queued nodes: gating, deferred
	shut   bool
	gauge  *prometheus.GaugeVec
}

func newViewQueue(g *prometheus.GaugeVec) *viewQueue {
	q := &viewQueue{queued: map[string]bool{}, gauge: g}
	q.cond = sync.NewCond(&q.mu)
	return q
}

func (q *viewQueue) add(node string, gating bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.shut {
		return
	}
	g, ok := q.queued[node]
	if ok && (g || !gating) {
		return
	}
	if ok {
		q.n[1]-- // moves up
	}
	p := 1
	if gating {
		p = 0
	}
	q.queued[node] = gating
	q.fifo[p] = append(q.fifo[p], node)
	q.n[p]++
	q.count()
	q.cond.Signal()
}

// get takes the next node, gating views first; false once shut down.
func (q *viewQueue) get() (string, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for {
		for len(q.queued) == 0 && !q.shut {
			q.cond.Wait()
		}
		if q.shut {
			return "", false
		}
		for p, gating := range []bool{true, false} {
			for len(q.fifo[p]) > 0 {
				node := q.fifo[p][0]
				q.fifo[p] = q.fifo[p][1:]
				if g, ok := q.queued[node]; ok && g == gating {
					delete(q.queued, node)
					q.n[p]--
					q.count()
					return node, true
				}
			}
		}
	}
}

func (q *viewQueue) shutDown() {
	q.mu.Lock()
	q.shut = true
	q.mu.Unlock()
	q.cond.Broadcast()
}

// count sets the gauge; the caller holds mu.
func (q *viewQueue) count() {
	q.gauge.WithLabelValues("gating").Set(float64(q.n[0]))
	q.gauge.WithLabelValues("deferred").Set(float64(q.n[1]))
}
