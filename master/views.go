package master

import (
	"container/heap"
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/nodeview"
	"github.com/secureoverlay/secureoverlay/readiness"
)

// viewWriter writes each live node's NodeView (docs/protocol-v2.md §9 step 2): the
// reconcile hands over the views its shadow readiness changed (Set), one worker writes the
// newest view of each node off the reconcile path. A burst of changes to one node's view
// costs one write (the queue holds a node once), a failed write is retried with backoff,
// and a view already in the API (as written, or as its informer found it: a new leader does
// not rewrite a cluster's worth of unchanged views) is not written again.
//
// The views that gain most go first (readiness.Master.Gain: the peers a view lets its
// agent use that its written view does not). A reboot changes every view's key digest, but
// only the views that confirm the rebooted node's pairs gain anything: its own (up to N-1
// peers, first) and then each peer's (one). The rest — the peers' views that merely list the
// rebooted node, its own view before any peer confirms — wait until nothing gaining is
// queued, and are usually superseded before their turn. Their agents lose nothing
// meanwhile: they keep their last view.
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
	// recent are the last views this writer wrote per node (recentWrites at most): an
	// informer event carrying one of them, other than the last, is a late echo.
	recent  map[string][]api.ReadinessView
	lastErr time.Time // last write error logged (one a minute at most)
}

const recentWrites = 4

type wantView struct {
	uid  string
	view readiness.View
	wire api.ReadinessView
	gain int
}

// writtenView is a view as the API holds it; view.Seq is 0 for one this leader did not
// write (Gain then treats it as unknown).
type writtenView struct {
	view readiness.View
	wire api.ReadinessView
}

func newViewWriter(dc dynamic.Interface, ns string, log *slog.Logger, m *Metrics) *viewWriter {
	return &viewWriter{dc: dc, ns: ns, log: log, metrics: m, want: map[string]wantView{}, written: map[string]writtenView{}, recent: map[string][]api.ReadinessView{},
		queue:   newViewQueue(m.ViewsQueued, viewGap, time.Now),
		backoff: workqueue.NewTypedItemExponentialFailureRateLimiter[string](time.Second, time.Minute)}
}

// Set makes v node's view (uid: the Node's, for the owner reference). gain says how many
// peers v lets the node's agent use that the view it holds (the written one, nil: none)
// does not (readiness.Master.Gain); the largest gain is written first.
func (w *viewWriter) Set(node, uid string, v readiness.View, gain func(held *readiness.View) int) {
	w.SetNeeded(node, uid, v, gain, nil)
}

// SetNeeded is Set, except that a view needed says is not needed (given the view held) is
// dropped: the view wanted stays the one wanted before (the one to restore should the
// written one be deleted or edited; written if queued already). docs/protocol-v2.md §9
// step 3: a view that gives its agent nothing its peers' rows do not. Nil needed: every
// view is.
func (w *viewWriter) SetNeeded(node, uid string, v readiness.View, gain func(held *readiness.View) int, needed func(held *readiness.View) bool) {
	wire := *readiness.EncodeView(v)
	w.mu.Lock()
	var held *readiness.View
	if wv, ok := w.written[node]; ok {
		held = &wv.view
	}
	done := held != nil && w.written[node].wire == wire
	if !done && needed != nil && !needed(held) {
		// The view wanted stays the one wanted before (written, or queued): the informer
		// compares what it sees with it, and must not take the skipped view for one to
		// restore (TestNodeViewsWithRowsAgainstRealAPIServer failed 1 of 8 so).
		w.mu.Unlock()
		w.metrics.ViewsSkipped.Inc()
		w.log.Debug("NodeView not needed: skipped", "node", node, "notIn", len(v.NotIn), "notOut", len(v.NotOut), "keyViewDigest", fmt.Sprintf("%x", v.Keys))
		return
	}
	g := 0
	if !done {
		g = gain(held)
	}
	w.want[node] = wantView{uid, v, wire, g}
	w.mu.Unlock()
	if !done {
		w.queue.add(node, g)
	}
}

// Recheck drops the queued views that needed (given the view held and the view wanted)
// says are no longer needed — the rows that make them needless may arrive after the view
// was queued: an agent hands its report and its row to two writers, and the master may
// read the report, and queue its peers' views, first. A dropped view's node wants the view
// written again (restored if deleted). It returns how many it dropped.
func (w *viewWriter) Recheck(needed func(node string, held *readiness.View, want readiness.View) bool) int {
	dropped := 0
	for _, node := range w.queue.nodes() {
		w.mu.Lock()
		want, ok := w.want[node]
		wv, had := w.written[node]
		w.mu.Unlock()
		if !ok || !had || needed(node, &wv.view, want.view) {
			continue
		}
		if !w.queue.remove(node) {
			continue // taken meanwhile
		}
		w.mu.Lock()
		if cur, ok := w.want[node]; ok && cur.wire == want.wire {
			w.want[node] = wantView{cur.uid, wv.view, wv.wire, 0}
		}
		w.mu.Unlock()
		w.metrics.ViewsSkipped.Inc()
		w.log.Debug("queued NodeView no longer needed: dropped", "node", node, "keyViewDigest", fmt.Sprintf("%x", want.view.Keys))
		dropped++
	}
	return dropped
}

// Forget drops a node that left the view: its NodeView goes with its Node (owner), or
// stays, ignored, until the node is live again — and is then written whatever it held (a
// Node deleted and re-created under the same name lost its NodeView with the old one).
func (w *viewWriter) Forget(node string) {
	w.mu.Lock()
	delete(w.want, node)
	delete(w.written, node)
	delete(w.recent, node)
	w.mu.Unlock()
}

// run follows the NodeViews in the API with an informer, then writes until ctx ends. The
// informer's first list takes the views already written (a previous leader's: not
// rewritten when equal); later, a view deleted or changed by anyone but this writer is
// written again (an operator's `kubectl delete nodeview`, an edit); a late echo of one of
// this writer's own earlier writes is recognised and ignored.
func (w *viewWriter) run(ctx context.Context) {
	go func() {
		<-ctx.Done()
		w.queue.shutDown()
	}()
	f := dynamicinformer.NewFilteredDynamicSharedInformerFactory(w.dc, 0, w.ns, nil)
	inf := f.ForResource(nodeview.GVR).Informer()
	synced := inf.HasSynced
	if reg, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { w.observed(obj, false) },
		UpdateFunc: func(_, obj any) { w.observed(obj, false) },
		DeleteFunc: func(obj any) {
			if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = t.Obj
			}
			w.observed(obj, true)
		},
	}); err != nil {
		w.log.Warn("cannot follow the NodeViews; writing every view", "err", err)
	} else {
		// The handler has taken the initial list, not just the informer's store: a view a
		// previous leader wrote is known as written before the first write is decided.
		synced = reg.HasSynced
	}
	// An older manifest (no CRD) or RBAC without nodeviews: one warning, not the
	// reflector's message at every retry; nothing is written until it can be listed.
	warned := false
	_ = inf.SetWatchErrorHandler(func(r *cache.Reflector, err error) {
		if apierrors.IsNotFound(err) || apierrors.IsForbidden(err) {
			if !warned {
				warned = true
				w.log.Warn("the NodeViews cannot be listed (the manifest predates them, or RBAC lacks nodeviews: apply the manifest); protocol v2's readiness shadow writes none meanwhile", "err", err)
			}
			return
		}
		cache.DefaultWatchErrorHandler(ctx, r, err)
	})
	f.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), synced) {
		return
	}
	for w.next(ctx) {
	}
}

// observed takes a NodeView as the API holds it (gone: deleted) and queues its node again
// when that is not the view it wants.
func (w *viewWriter) observed(obj any, gone bool) {
	u, ok := obj.(*unstructured.Unstructured)
	if !ok {
		return
	}
	node := u.GetName()
	var held writtenView
	if !gone {
		wire, err := nodeview.Parse(u)
		if err != nil {
			gone = true // unreadable: as good as none
		} else if v, err := readiness.DecodeView(&wire); err != nil {
			gone = true
		} else {
			held = writtenView{v, wire}
		}
	}
	w.mu.Lock()
	cur, had := w.written[node]
	if !gone && had && cur.wire != held.wire && slices.Contains(w.recent[node], held.wire) {
		// The informer's late echo of an earlier write of ours: the API already holds (or
		// will show) the later one. Taking it for an edit would rewrite an unchanged view.
		w.mu.Unlock()
		return
	}
	if gone {
		delete(w.written, node)
	} else if !had || cur.wire != held.wire {
		w.written[node] = held // Seq 0: not a view this writer took (Gain: unknown)
	}
	want, wanted := w.want[node]
	again := wanted && (gone || held.wire != want.wire) && (had || gone)
	w.mu.Unlock()
	if again {
		w.log.Debug("NodeView in the API is not the one wanted: queued again", "node", node, "gone", gone, "keyViewDigest", fmt.Sprintf("%x", held.view.Keys))
		w.queue.add(node, max(want.gain, 1)) // its agent may hold nothing now
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
				w.queue.add(node, want.gain)
			}
		})
		return true
	}
	w.metrics.ViewWrites.WithLabelValues("ok").Inc()
	w.log.Debug("NodeView written", "node", node, "seq", want.view.Seq, "notIn", len(want.view.NotIn), "notOut", len(want.view.NotOut), "keyViewDigest", fmt.Sprintf("%x", want.view.Keys), "gain", want.gain)
	w.backoff.Forget(node)
	w.mu.Lock()
	w.written[node] = writtenView{want.view, want.wire}
	r := append(w.recent[node], want.wire)
	if len(r) > recentWrites {
		r = r[len(r)-recentWrites:]
	}
	w.recent[node] = r
	w.mu.Unlock()
	return true
}

// viewQueue holds each node at most once, ordered by gain (readiness.Master.Gain: the
// peers its view lets its agent use that the view it holds does not), largest first, then
// by arrival; a node queued again takes its newest view's gain and keeps its place in
// arrival. Views that gain nothing wait until nothing else is queued. A node is not taken
// again within gap of its last take: after a reboot the rebooted node's own view gains
// something with almost every peer's status, and taking it every time would halve the
// writes left for the peers' views, each the only way its node learns its pair is ready
// (TestBenchViewsAfterReboot measured both). (client-go's workqueue has one priority and
// no per-item pacing; its rate limiter still paces the retries.)
type viewQueue struct {
	mu    sync.Mutex
	cond  *sync.Cond
	h     viewHeap
	at    map[string]*viewItem // queued: in h or cooling
	cool  map[string]*viewItem // queued within gap of the node's last take
	taken map[string]time.Time // node -> last taken
	seq   uint64
	n     [2]int // queued nodes: gaining something, nothing
	shut  bool
	gap   time.Duration
	now   func() time.Time
	wake  *time.Timer
	gauge *prometheus.GaugeVec
}

type viewItem struct {
	node  string
	gain  int
	seq   uint64
	index int
}

// viewHeap is a container/heap of items: largest gain, then first arrived, on top.
type viewHeap []*viewItem

func (h viewHeap) Len() int { return len(h) }
func (h viewHeap) Less(i, j int) bool {
	if h[i].gain != h[j].gain {
		return h[i].gain > h[j].gain
	}
	return h[i].seq < h[j].seq
}
func (h viewHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].index, h[j].index = i, j
}
func (h *viewHeap) Push(x any) { it := x.(*viewItem); it.index = len(*h); *h = append(*h, it) }
func (h *viewHeap) Pop() any {
	old := *h
	it := old[len(old)-1]
	*h = old[:len(old)-1]
	return it
}

// viewGap is the least time between two writes of one node's view.
const viewGap = time.Second

func newViewQueue(g *prometheus.GaugeVec, gap time.Duration, now func() time.Time) *viewQueue {
	q := &viewQueue{at: map[string]*viewItem{}, cool: map[string]*viewItem{}, taken: map[string]time.Time{}, gap: gap, now: now, gauge: g}
	q.cond = sync.NewCond(&q.mu)
	return q
}

// gainClass is a queued view's gauge class: 0 gaining something, 1 nothing.
func gainClass(gain int) int {
	if gain > 0 {
		return 0
	}
	return 1
}

// add queues node with its newest view's gain.
func (q *viewQueue) add(node string, gain int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.shut {
		return
	}
	if it, ok := q.at[node]; ok {
		q.n[gainClass(it.gain)]--
		it.gain = gain
		if _, cooling := q.cool[node]; !cooling {
			heap.Fix(&q.h, it.index)
		}
	} else {
		q.seq++
		it := &viewItem{node: node, gain: gain, seq: q.seq}
		q.at[node] = it
		if t, ok := q.taken[node]; ok && q.now().Sub(t) < q.gap {
			q.cool[node] = it
		} else {
			heap.Push(&q.h, it)
		}
		q.cond.Signal()
	}
	q.n[gainClass(gain)]++
	q.count()
}

// nodes returns the queued nodes.
func (q *viewQueue) nodes() []string {
	q.mu.Lock()
	defer q.mu.Unlock()
	out := make([]string, 0, len(q.at))
	for node := range q.at {
		out = append(out, node)
	}
	return out
}

// remove drops node from the queue; false if it is not queued.
func (q *viewQueue) remove(node string) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	it, ok := q.at[node]
	if !ok {
		return false
	}
	if _, cooling := q.cool[node]; cooling {
		delete(q.cool, node)
	} else {
		heap.Remove(&q.h, it.index)
	}
	delete(q.at, node)
	q.n[gainClass(it.gain)]--
	q.count()
	return true
}

// take returns the next node, if one may be taken now, else when the next one may (zero:
// nothing queued). The caller holds mu.
func (q *viewQueue) take() (string, bool, time.Time) {
	now := q.now()
	var next time.Time
	for node, it := range q.cool {
		if at := q.taken[node].Add(q.gap); !now.Before(at) {
			delete(q.cool, node)
			heap.Push(&q.h, it)
		} else if next.IsZero() || at.Before(next) {
			next = at
		}
	}
	if len(q.h) == 0 {
		if len(q.at) == 0 {
			clear(q.taken) // idle: no node is within gap of anything queued
		}
		return "", false, next
	}
	it := heap.Pop(&q.h).(*viewItem)
	delete(q.at, it.node)
	q.taken[it.node] = now
	q.n[gainClass(it.gain)]--
	q.count()
	return it.node, true, time.Time{}
}

// get takes the next node, waiting for one; false once shut down.
func (q *viewQueue) get() (string, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for !q.shut {
		node, ok, next := q.take()
		if ok {
			return node, true
		}
		if !next.IsZero() {
			if q.wake != nil {
				q.wake.Stop()
			}
			q.wake = time.AfterFunc(next.Sub(q.now()), func() {
				q.mu.Lock()
				q.mu.Unlock()
				q.cond.Broadcast()
			})
		}
		q.cond.Wait()
	}
	return "", false
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
