// Package agent is the node reconciler's loop (secureoverlay-agent): the thin, stateful
// shell around the pure desired.Compute.
//
// Inputs: a watch.Watcher's caches (Nodes with Calico annotations, boot IDs and the other
// agents' reports; the key Secret with the ring and the cluster mode; Calico IPAM blocks,
// block affinities, IP pools and BGP peers), the data-plane configuration and the MTU
// budget.
//
// Responsibilities:
//   - Every informer event enqueues the one work-queue key; one worker does a full sync:
//     snapshot → desired.Compute → iptables rules that stay (desired.TransitionRules) →
//     xfrm apply → iptables apply → report handed to the writer. Bursts of events coalesce
//     into one sync.
//   - Nothing touches the kernel before every cache has synced.
//   - A periodic resync (interval plus up to 20% jitter) makes both appliers re-read the
//     kernel, repairing drift (another tool flushing our xfrm policies or iptables chain).
//     After any failure the next sync is full too, retried with exponential backoff.
//   - Program before advertise: the report annotation on this node changes its claims only
//     after both appliers succeeded; a failed sync only sets its Error. It is patched
//     (merge patch of that one annotation) only when it changed, or as a heartbeat when
//     LastSync is older than the heartbeat interval, so writes stay bounded. One report
//     writer per agent does the writes off the sync path, newest report first and never an
//     older one after it (reportwriter.go); Run returns once the last one is written.
//   - /healthz (process alive, loop not wedged), /readyz (caches synced, last sync ok, the
//     report written) and Prometheus /metrics.
//   - Shutdown (context cancelled, SIGTERM) leaves the data plane exactly as it is; only
//     `secureoverlay-agent cleanup` removes what we own. When the DaemonSet is being
//     deleted, the main calls Uninstall after Run: a timed local walk-down of the kernel
//     state through the cutover modes (uninstall.go).
package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/util/workqueue"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/budget"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/nodekeys"
	"github.com/secureoverlay/secureoverlay/nodereport"
	"github.com/secureoverlay/secureoverlay/readiness"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/kernelinfo"
	"github.com/secureoverlay/secureoverlay/reconciler/ledger"
	"github.com/secureoverlay/secureoverlay/reconciler/rules"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
	"github.com/secureoverlay/secureoverlay/reconciler/xfrm"
)

// Source is the input side (watch.Watcher).
type Source interface {
	SetOnChange(func(kind string))
	Run(ctx context.Context)
	HasSynced() bool
	NodeCacheSynced() bool
	Err() error
	// Node is what the cache holds of the named Node (watch.CacheNode), or nil.
	Node(name string) *watch.NodeInfo
	Snapshot() watch.Snapshot
}

// NodeHinter is what a Source may add (watch.Watcher): the desired.Hint of an Update from
// the Inputs of NodesVersion since to those of cur — which Nodes its events touched.
type NodeHinter interface {
	Hint(since, cur any) desired.Hint
}

// NodeIDReader is what a Source may add (watch.Watcher): whether it reads the node table
// from the NodeIDs (docs/keys.md §13); the agent then declares api.CapabilityNodeIDs.
type NodeIDReader interface {
	ReadsNodeIDs() bool
}

// InputsBuilder is what a Source may add (watch.Watcher): watch.Inputs for its own
// snapshots, converting only the nodes that changed since the last call.
type InputsBuilder interface {
	Inputs(self string, s watch.Snapshot, cfg desired.Config, epoch string) (desired.Inputs, error)
}

// Xfrm is the xfrm applier (xfrm.Applier).
type Xfrm interface {
	Apply(desired.State) (xfrm.Result, error)
	// ApplyChange applies a desired.Memo's change: by its difference alone when the
	// applier holds the change's previous state, else the whole state want returns.
	ApplyChange(ch desired.Change, want func() desired.State) (xfrm.Result, error)
	QueueResync()
	Observed() []xfrm.KernelSA
	// SetLedger makes Apply record every key in l before installing it, and refuse a key
	// l already holds (xfrm.ErrKeyReuse).
	SetLedger(l xfrm.KeyLedger)
}

// Rules is the iptables applier of the plaintext-IPIP rules (rules.Applier).
type Rules interface {
	Apply(rules []desired.Rule) (rules.Result, error)
	QueueResync()
	Counters() ([]rules.Counter, error)
}

// Config is the agent's configuration.
type Config struct {
	NodeName  string
	Dataplane desired.Config
	// ResyncInterval between full syncs (default 60s; up to 20% jitter is added).
	ResyncInterval time.Duration
	// HeartbeatInterval bounds the age of the published LastSync (default 5m).
	HeartbeatInterval time.Duration
	// WedgeTimeout: a sync running longer makes /healthz fail (default 2m).
	WedgeTimeout time.Duration
	// ExternalMTU, when not 0, is used instead of detection.
	ExternalMTU int
	// RetryMin/RetryMax bound the backoff after a failed sync (default 500ms, 30s).
	RetryMin, RetryMax time.Duration
	// RowInterval is the least time between two writes of this node's readiness row
	// (docs/keys.md §12; default 1s).
	RowInterval time.Duration
	// LedgerDir holds this node's SA key ledger (package ledger; the binary's default is
	// ledger.DefaultDir). The process must hold its lock (ledger.WaitLock). Required.
	LedgerDir string
	// StateFile and ReadyFile are the boot gate's files (package gate): after every
	// successful sync the agent records the mode the kernel holds in StateFile (on disk)
	// and, once per boot, that this boot's data plane is programmed in ReadyFile (tmpfs).
	// Empty StateFile: no gate (the plugin then finds no state and never holds a pod).
	StateFile, ReadyFile string
	// Namespace holds this node's NodeReport (default api.Namespace).
	Namespace string
	// ReportLists is ListsAuto (default: the report lists its per-pair claims only while
	// a live peer's agent reads them, docs/protocol-v2.md §9 step 4) or ListsAlways.
	ReportLists string
	// NodeReports is NodeReportsAuto (default: the report goes to the NodeReport, which
	// every agent watches, only while a live peer's agent reads NodeReports; always to the
	// NodeStatus, which the master and the CLI read; docs/protocol-v2.md §9 step 5) or
	// NodeReportsAlways.
	NodeReports string
	// Lanes is how many per-CPU outbound lanes a new SA epoch of this node sends on (the
	// binary: min(CPUs, DefaultLanes) where the kernel keeps a state's CPU number and
	// --pcpu-sas=auto, else 0; docs/dataplane.md §10). The count of an epoch is fixed when
	// its keys are first published and never grows within it: a restart in the same epoch
	// takes the smaller of this and what was published.
	Lanes uint16
}

// DefaultLanes caps the binary's lane count: each lane adds an outbound state per peer
// and generation here and an inbound one at each peer (docs/dataplane.md §10).
const DefaultLanes = 4

// Deps are the agent's collaborators.
type Deps struct {
	Client kubernetes.Interface // patches this node's report annotation (see Dynamic)
	// Dynamic writes this node's NodeReport (package nodereport). Nil: the agent writes
	// only the report annotation, as 0.1 did (unit tests with a fake clientset).
	Dynamic dynamic.Interface
	Source  Source
	Xfrm    Xfrm
	Rules   Rules
	Metrics *Metrics // default NewMetrics("")
	// DetectMTU finds the external MTU (budget.DetectExternalMTU); used when
	// Config.ExternalMTU is 0.
	DetectMTU func() (int, string, error)
	Now       func() time.Time
	// Sleep waits d or until ctx ends (the uninstall walk-down's timer; default a real
	// timer).
	Sleep  func(ctx context.Context, d time.Duration) error
	Logger *slog.Logger
	// LedgerFail, if set, is called before every write to the ledger file (tests: a
	// process killed at any point, ledger.Ledger.Fail).
	LedgerFail func(op string) error
	// Kernel detects the node's kernel, once in New (default kernelinfo.Read("/")).
	Kernel func() kernelinfo.Info
}

const queueKey = "sync"

// DefaultAPIQPS and DefaultAPIBurst are the agent binary's client-side rate limit toward
// the API server (--kube-api-qps, --kube-api-burst). Every sync whose claims changed hands
// a report to the writer; the writer waits on the limiter, the syncs do not (before the
// writer, client-go's default of 5 QPS, burst 10, put up to 200 ms between an event and
// the kernel once a few changes arrived in a row; docs/performance.md §4). The writer
// coalesces reports, so this bounds an agent's report writes, not the cluster's: each
// change costs one write per node.
const (
	DefaultAPIQPS   = 20
	DefaultAPIBurst = 40
)

// Agent runs the loop. Create it with New, then Run.
type Agent struct {
	// memo keeps the desired state per peer between syncs (only the sync worker uses
	// it): an event-driven sync recomputes and applies the changed peers only; a full
	// sync recomputes and walks everything.
	memo *desired.Memo

	cfg Config
	d   Deps
	log *slog.Logger
	// kernelSeen is what noteKernel last logged (release and esp4_offload's state).
	kernelSeen string
	q          workqueue.TypedRateLimitingInterface[string]

	full      atomic.Bool  // next sync re-reads the kernel
	reset     atomic.Bool  // ... and recomputes the desired state whole (not for a report's hand-over)
	syncStart atomic.Int64 // unix nanos of the running sync, 0 when idle

	mu        sync.Mutex
	ready     bool          // caches synced and last sync ok
	lastErr   string        // last sync error ("" when ok)
	published *watch.Report // last report written
	pubAt     time.Time     // when it was written
	// ownStatus is this node's NodeStatus as read once when the ledger was opened (nil if
	// none; readOwnStatus): what an agent of a later version left (selfReport).
	ownStatus *watch.Report
	// slot holds the jobs handed to the writer (reportwriter.go); writeErr is the last
	// write's error ("" when ok). wake pokes the writer; wmu makes writes one at a time.
	slot     reportSlot
	writeErr string
	wake     chan struct{}
	wmu      sync.Mutex
	budget   Budget
	syncs    int // finished sync attempts (tests)
	// lastRules are the rules of the last successful sync (rulesKnown false after a
	// restart or a failed sync).
	lastRules  []desired.Rule
	rulesKnown bool
	// lastIn are the inputs of the last successful sync: the uninstall walk-down
	// computes its lower modes from them.
	lastIn    *desired.Inputs
	lastNotes string // not-covered and skipped objects, logged when they change
	// lastState is the state the kernel was last brought to in the current SA epoch (nil
	// after a restart or a new epoch): peers in an address conflict keep it (frozen).
	lastState     *desired.State
	lastConflicts string // logged when they change
	// led is this node's SA key ledger, opened by the first sync that sees this node's
	// Node (nil before); epoch is its SA epoch (docs/keys.md, "No key twice"). Only the
	// sync worker (and Uninstall after Run) touch led; mu guards epoch for readers.
	led   *ledger.Ledger
	epoch string
	// hold lists the peers this node was encrypting to when it lost SA state and took a
	// new epoch: their outbound plaintext drop rule stays (enforce) until they report
	// ready for the new keys (desired.Inputs.HoldPlaintext).
	hold []string
	// gateMode is the mode last recorded in the boot gate's state file ("" before the
	// first), gateReady whether this process wrote the ready file (sync worker only).
	gateMode  string
	gateReady bool
	// legacyPeers counts the live peers whose agent reads reports only as the Node
	// annotation (watch.NodeInfo.Legacy), as of the last synced snapshot; -1 unknown
	// (before the caches synced; sync worker only). annotated: our Node's annotation holds
	// the report last written (the writer sets it, under mu).
	legacyPeers int
	annotated   bool
	// keysHeld: publishKeys holds back the keys of a new epoch until it is installed
	// (shadowsInstalled; logged once per hold). Sync worker only.
	keysHeld bool
	// lanes is the lane count published for the SA epoch lanesEpoch (publishKeys). Sync
	// worker only.
	lanes      uint16
	lanesEpoch string
	// keysWant is the NodeKeys content the sync worker handed over last (nil before the
	// first sync that knew the ring), keysUID its owner's UID; keysHave the content
	// written last in this process and keysErr the last write's error (the keys writer
	// sets them; all under mu). kmu serialises writes (the writer and Sync's flush).
	keysWant, keysHave *nodekeys.Keys
	keysUID, keysErr   string
	keysWake           chan struct{}
	kmu                sync.Mutex
	// rowWant is the readiness row the sync worker handed over last (nil before the first
	// publishing sync with a ring ID), rowComplete whether it claimed every peer
	// (readiness.Complete), rowUID its owner's UID; rowHave the row written last in this
	// process and rowErr the last write's error (the row writer sets them; all under mu).
	// rmu serialises writes (the writer and Sync's flush).
	rowWant, rowHave *readiness.Status
	rowComplete      bool
	rowUID, rowErr   string
	rowWake          chan struct{}
	rmu              sync.Mutex

	// viewShadow compares protocol v2's rule on this node's NodeView with the lists (sync
	// worker only).
	viewShadow viewShadow
	// decided: what the view and rows added to the peers' lists in the inputs the memo
	// holds (viewdecide.go; sync only).
	decided decisions
	// confirmations: the view and rows rule's confirmations saved across restarts
	// (confirmations.go; sync only).
	confirmations confirmationsState
	// listed: what the peers' lists confirmed, for peers whose reports have since omitted
	// them (confirmListed; sync only).
	listed readiness.Agent
	// lists decides whether the report lists its per-pair claims (lists.go; sync only).
	lists listsGate
	// nodeReportsGate decides whether the report goes to the NodeReport too
	// (nodereports.go; sync only); nodeReportsOn is its last decision, statusRefused
	// whether the last NodeStatus write was refused (no CRD, no RBAC), nodeReportSuperseded
	// whether this node's NodeReport holds a superseded report (the writer's last write
	// of it; until one, what the cache showed at the first publish, nodeReportKnown). All
	// but the gate and nodeReportsWhy (why it decided so, last logged) under mu.
	nodeReportsGate      listsGate
	nodeReportsWhy       string
	nodeReportsOn        bool
	statusRefused        bool
	nodeReportSuperseded bool
	nodeReportKnown      bool
}

// New wires an agent; it starts nothing.
func New(cfg Config, d Deps) (*Agent, error) {
	if cfg.NodeName == "" {
		return nil, errors.New("agent: no node name")
	}
	if cfg.Namespace == "" {
		cfg.Namespace = api.Namespace
	}
	if d.Client == nil || d.Source == nil || d.Xfrm == nil || d.Rules == nil {
		return nil, errors.New("agent: client, source, xfrm and rules appliers are required")
	}
	cfg.Dataplane = cfg.Dataplane.WithDefaults()
	if err := cfg.Dataplane.Validate(); err != nil {
		return nil, err
	}
	if cfg.ResyncInterval <= 0 {
		cfg.ResyncInterval = time.Minute
	}
	if cfg.HeartbeatInterval <= 0 {
		cfg.HeartbeatInterval = 5 * time.Minute
	}
	if cfg.WedgeTimeout <= 0 {
		cfg.WedgeTimeout = 2 * time.Minute
	}
	if cfg.RetryMin <= 0 {
		cfg.RetryMin = 500 * time.Millisecond
	}
	if cfg.RowInterval <= 0 {
		cfg.RowInterval = time.Second
	}
	for _, e := range []struct {
		v    *string
		what string
	}{{&cfg.ReportLists, "report lists"}, {&cfg.NodeReports, "node reports"}} {
		switch *e.v {
		case "":
			*e.v = ListsAuto // = NodeReportsAuto
		case ListsAuto, ListsAlways:
		default:
			return nil, fmt.Errorf("agent: %s %q: want %s or %s", e.what, *e.v, ListsAuto, ListsAlways)
		}
	}
	if cfg.RetryMax <= 0 {
		cfg.RetryMax = 30 * time.Second
	}
	if cfg.LedgerDir == "" {
		return nil, errors.New("agent: no ledger directory (the binary's --ledger-dir)")
	}
	if d.Metrics == nil {
		d.Metrics = NewMetrics("")
	}
	if d.Now == nil {
		d.Now = time.Now
	}
	if d.Sleep == nil {
		d.Sleep = sleepCtx
	}
	if d.Logger == nil {
		d.Logger = slog.Default()
	}
	if d.Kernel == nil {
		d.Kernel = readKernel
	}
	if cfg.ExternalMTU == 0 && d.DetectMTU == nil {
		return nil, errors.New("agent: neither an external MTU nor a detector")
	}
	a := &Agent{cfg: cfg, d: d, legacyPeers: -1, log: d.Logger.With("node", cfg.NodeName),
		nodeReportsGate: listsGate{capability: api.CapabilityNodeStatus}, nodeReportsOn: true,
		q: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedItemExponentialFailureRateLimiter[string](cfg.RetryMin, cfg.RetryMax),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "secureoverlay-agent"}),
		wake: make(chan struct{}, 1), keysWake: make(chan struct{}, 1), rowWake: make(chan struct{}, 1)}
	a.reset.Store(true)
	a.full.Store(true)
	a.noteKernel()
	d.Source.SetOnChange(a.Trigger)
	return a, nil
}

// Trigger enqueues a sync (all events coalesce into the one key).
func (a *Agent) Trigger(kind string) {
	a.q.Add(queueKey)
}

// Resync enqueues a full sync (both appliers re-read the kernel).
func (a *Agent) Resync() {
	a.reset.Store(true)
	a.full.Store(true)
	a.q.Add(queueKey)
}

// Run runs the watcher, the periodic resync, the single sync worker and the report writer
// until ctx is done. It never touches the data plane on the way out, and returns once the
// last report the worker handed over is written (or its write failed; bounded by
// patchTimeout), so the published claims match what the kernel is left holding.
func (a *Agent) Run(ctx context.Context) {
	a.run(ctx, nil, nil)
}

// run is Run. workerDone (may be nil) is closed as soon as the sync worker has stopped:
// from then on nothing but its caller writes the kernel, while the writers finish. abandon
// (may be nil) closing cancels every write at once, in flight or last: Serve closes it when
// the DaemonSet is being deleted, since our objects go with it and the walk-down must not
// wait up to patchTimeout for an API that is tearing our namespace and RBAC down.
func (a *Agent) run(ctx context.Context, workerDone chan<- struct{}, abandon <-chan struct{}) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// The writer's context outlives ctx: it is cancelled only patchTimeout after the
	// worker stopped, which bounds the last write.
	wctx, wcancel := context.WithCancel(context.WithoutCancel(ctx))
	defer wcancel()
	if abandon != nil {
		go func() {
			select {
			case <-abandon:
				wcancel()
			case <-wctx.Done():
			}
		}()
	}
	stopped := make(chan struct{})
	var writer sync.WaitGroup
	writer.Go(func() { a.writeReports(wctx, stopped) })
	writer.Go(func() { a.writeKeys(wctx, stopped) })
	writer.Go(func() { a.writeRows(wctx, stopped) })
	var wg sync.WaitGroup
	wg.Go(func() { a.d.Source.Run(ctx) })
	wg.Go(func() { a.periodic(ctx) })
	wg.Go(func() { a.afterSync(ctx) })
	go func() { <-ctx.Done(); a.q.ShutDown() }()
	a.Trigger("start")
	for a.processOne(ctx) {
	}
	cancel()
	close(stopped)
	if workerDone != nil {
		close(workerDone)
	}
	bound := time.AfterFunc(patchTimeout, wcancel)
	writer.Wait()
	bound.Stop()
	wg.Wait()
	a.log.Info("agent stopped; data plane left as it is")
}

// afterSync enqueues a sync once every cache has synced: the informers' initial events
// may all be handled while HasSynced is still false.
func (a *Agent) afterSync(ctx context.Context) {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for !a.d.Source.HasSynced() {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
	a.log.Info("caches synced")
	a.Trigger("synced")
}

func (a *Agent) periodic(ctx context.Context) {
	for {
		d := a.cfg.ResyncInterval + time.Duration(rand.Int64N(int64(a.cfg.ResyncInterval)/5+1))
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
			a.Resync()
		}
	}
}

func (a *Agent) processOne(ctx context.Context) bool {
	key, shutdown := a.q.Get()
	if shutdown {
		return false
	}
	defer a.q.Done(key)
	if ctx.Err() != nil {
		// Stopping: a sync queued meanwhile would only delay the end (and an uninstall's
		// first step: docs/agent.md "Uninstall"); the one in progress, if any, finished.
		return false
	}
	if err := a.sync(); err != nil {
		if ctx.Err() == nil {
			a.q.AddRateLimited(key)
		}
		return true
	}
	a.q.Forget(key)
	return true
}

// errNotSynced is returned by Sync while caches are not synced.
var errNotSynced = errors.New("caches not synced yet")

// Sync runs one sync now and then writes the report it handed over (tests, and callers
// without Run; the worker leaves the write to the writer). A failed write is its error.
func (a *Agent) Sync(ctx context.Context) error {
	err := a.sync()
	if werr := a.flushReports(ctx); werr != nil && err == nil {
		return werr
	}
	if kerr := a.writeKeysOnce(context.WithoutCancel(ctx)); kerr != nil && err == nil {
		return kerr
	}
	if rerr := a.writeRowOnce(context.WithoutCancel(ctx)); rerr != nil && err == nil {
		return rerr
	}
	return err
}

// sync runs one sync and hands its report to the writer.
func (a *Agent) sync() (err error) {
	now := a.d.Now()
	a.syncStart.Store(now.UnixNano())
	defer func() {
		a.syncStart.Store(0)
		a.mu.Lock()
		a.syncs++
		a.mu.Unlock()
	}()
	src := a.d.Source
	if !src.HasSynced() {
		a.legacyPeers = -1
		a.setStatus(false, errNotSynced)
		if cerr := src.Err(); cerr != nil && src.NodeCacheSynced() {
			// Publish why we cannot sync; the kernel is left alone.
			a.publishError(cerr)
		}
		return nil // the informers' sync events enqueue the next attempt
	}
	full, reset := a.full.Swap(false), a.reset.Swap(false)
	kind := "partial"
	if a.memo == nil {
		a.memo = desired.NewMemo()
	}
	if full {
		kind = "full"
		a.d.Xfrm.QueueResync()
		a.d.Rules.QueueResync()
		if reset { // not when a partial sync handed over for its report: see there
			a.memo.Reset()
			a.noteKernel()
		}
	}
	defer func() {
		result := "ok"
		if err != nil {
			result = "error"
			a.reset.Store(true)
			a.full.Store(true)
		}
		a.d.Metrics.SyncDuration.WithLabelValues(kind).Observe(a.d.Now().Sub(now).Seconds())
		a.d.Metrics.Syncs.WithLabelValues(kind, result).Inc()
	}()

	b, berr := a.currentBudget(full)
	snap := src.Snapshot()
	if err := a.openLedger(&snap); err != nil {
		return a.fail(err)
	}
	if err := a.checkRing(&snap); err != nil {
		return a.fail(err)
	}
	if err := a.publishKeys(&snap); err != nil {
		return a.fail(err)
	}
	snap.Private = a.led.PrivateKey // protocol v2 generations: this node's key pairs
	var (
		in   desired.Inputs
		mine readiness.Keys
		ch   desired.Change
		st   desired.State
		res  xfrm.Result
		xerr error
	)
	for attempt := 0; ; attempt++ {
		a.mu.Lock()
		epoch := a.epoch
		a.mu.Unlock()
		if ib, ok := src.(InputsBuilder); ok && !full {
			in, err = ib.Inputs(a.cfg.NodeName, snap, a.cfg.Dataplane, epoch)
		} else {
			in, err = watch.Inputs(a.cfg.NodeName, snap, a.cfg.Dataplane, epoch)
		}
		if err != nil {
			return a.fail(fmt.Errorf("inputs: %w", err))
		}
		a.holdRekeyed(&in)
		in.HoldPlaintext = a.hold
		in.Previous = a.lastState
		// Protocol v2 (docs/protocol-v2.md §9 step 3): the view shadow compares the view
		// and rows rule with the peers' lists, then its confirmations are added to them.
		mine = a.viewShadow.keys(&in)
		a.restoreConfirmations(mine)
		if vs, ok := src.(ViewSource); ok {
			w, have := vs.ReadinessView()
			var rows []readiness.Status
			if rs, ok := src.(RowSource); ok {
				rows = peerRows(rs, &in)
			}
			a.d.Metrics.SetViewShadow(a.viewShadow.compare(&in, mine, w, have, rows))
		}
		omits := a.confirmListed(&in, mine)
		send, drop := a.saveConfirmations(mine, omits) // before the kernel follows them
		var decidedChanged []string
		var decided decisions
		in, decidedChanged, decided = a.decided.apply(in, send, drop)
		// The Nodes the watcher's events touched since the memo's inputs, and the peers
		// whose additions changed (none on a full sync: the memo is reset and compares,
		// or recomputes, everything).
		hint := desired.Hint{}
		if h, ok := src.(NodeHinter); ok && !full {
			hint = decidedHint(h, a.memo.NodesVersion(), in.NodesVersion, decidedChanged)
		}
		ch, err = a.memo.Update(in, hint) // desired.Compute(in), per changed peer
		if err != nil {
			return a.fail(fmt.Errorf("compute desired state: %w", err))
		}
		a.decided = decided
		if len(decidedChanged) > 0 {
			a.log.Debug("the NodeView and the peers' rows make pairs ready that the peers' reports do not yet",
				"peers", len(decided.added), "changed", firstNames(decidedChanged, 8))
		}
		a.d.Metrics.MemoUpdates.WithLabelValues(ch.How).Inc()
		st = a.memo.State()
		// Order (docs/dataplane.md §8): rules that stay, xfrm, then the new rules, so an
		// outbound drop rule never outlives the policy it backs and a new drop rule
		// appears only after its policies exist. The first step needs the rules of the
		// last successful sync; after a restart or a failure they are unknown and the
		// step is skipped.
		a.mu.Lock()
		prevRules, known := a.lastRules, a.rulesKnown
		a.mu.Unlock()
		if known {
			if _, err := a.d.Rules.Apply(desired.TransitionRules(prevRules, st.Rules)); err != nil {
				a.mu.Lock()
				a.rulesKnown = false
				a.mu.Unlock()
				return a.fail(fmt.Errorf("apply iptables transition rules: %w", err))
			}
			a.mu.Lock()
			a.lastRules = desired.TransitionRules(prevRules, st.Rules)
			a.mu.Unlock()
		}
		res, xerr = a.d.Xfrm.ApplyChange(ch, a.memo.State)
		a.countWrites(res)
		if errors.Is(xerr, xfrm.ErrKeyReuse) && attempt == 0 {
			// An SA of this epoch is gone from the kernel (another tool flushed it, the
			// agent restarted after cleanup or a crash, or it was removed and is wanted
			// again): re-creating it would restart its sequence under the same key.
			// Change every key instead (Apply wrote nothing) and apply the new state at
			// once.
			if err := a.newEpoch("lost", xerr, &snap); err != nil {
				return a.fail(err)
			}
			// Its SAs are of the old epoch: nothing to freeze, and nothing installed
			// under the new one (publishKeys takes installed from it: cleared first).
			a.lastState = nil
			if err := a.publishKeys(&snap); err != nil { // the new epoch's key pairs
				return a.fail(err)
			}
			a.d.Xfrm.QueueResync()
			full = true
			continue
		}
		break
	}
	a.mu.Lock()
	a.rulesKnown = false
	a.mu.Unlock()
	if err := a.publishKeys(&snap); err != nil { // a new epoch above draws new key pairs
		return a.fail(err)
	}
	var rerr error
	if xerr == nil {
		_, rerr = a.d.Rules.Apply(st.Rules)
	}
	if cs, cerr := a.d.Rules.Counters(); cerr == nil {
		a.d.Metrics.SetPlaintext(plaintextCounts(cs))
	} else {
		a.log.Warn("cannot read rule counters", "error", cerr)
	}
	if xerr != nil || rerr != nil {
		return a.fail(errors.Join(wrapNonNil("apply xfrm", xerr), wrapNonNil("apply iptables rules", rerr)))
	}
	a.releaseHold(st)
	a.recordGate(string(st.Mode))
	a.mu.Lock()
	a.lastRules, a.rulesKnown = st.Rules, true
	a.lastIn = &in
	a.lastState = &st
	notes := fmt.Sprint(st.NotCovered, st.Skipped, snap.Skipped)
	changedNotes := notes != a.lastNotes
	a.lastNotes = notes
	a.mu.Unlock()
	if err := a.publishKeys(&snap); err != nil { // installed: the generations the kernel now holds
		return a.fail(err)
	}
	if changedNotes && (len(st.NotCovered)+len(st.Skipped)+len(snap.Skipped) > 0) {
		a.log.Info("coverage", "notCovered", st.NotCovered, "skipped", st.Skipped, "unparsed", snap.Skipped)
	}
	conflicts := conflictText(st.Conflicts)
	if conflicts != a.lastConflicts {
		if conflicts != "" {
			a.log.Warn("nodes claim the same address; check their projectcalico.org/IPv4Address annotations", "conflicts", conflicts)
		} else {
			a.log.Info("address conflicts resolved")
		}
		a.lastConflicts = conflicts
	}
	a.d.Metrics.Conflicts.Set(float64(len(st.Conflicts)))
	// The kernel now holds st: advertise it.
	self := snap.Node(a.cfg.NodeName)
	selfIP := netip.Addr{}
	if p, perr := desired.ParseNodeAddress(self.IPv4Address); perr == nil {
		selfIP = p.Addr()
	}
	observed := a.d.Xfrm.Observed()
	seq := MaxSeq(observed, selfIP, a.cfg.Dataplane.SoftPackets, st.Generations)
	inSeq := MaxInSeq(observed, selfIP, a.cfg.Dataplane.SoftPackets, st.Generations)
	rep := BuildReport(st, &snap, self.Incarnation, b, seq, inSeq, now)
	a.mu.Lock()
	rep.UID, rep.Epoch = self.UID, a.epoch
	a.mu.Unlock()
	rep.Readiness = ReadinessOf(st, &snap, a.cfg.NodeName, watch.KeyIncarnation(self.Incarnation, self.UID, rep.Epoch))
	if rep.Readiness != nil { // the report's only (publishRow decodes the claims alone)
		rep.Readiness.Used = readiness.EncodeUsed(a.viewShadow.agent.Used())
	}
	a.gateLists(&rep, &snap, now)
	a.gateNodeReports(&snap, now)
	if berr != nil {
		rep.Error = reportError(berr)
	} else if conflicts != "" {
		rep.Error = reportError(errors.New(conflicts))
	}
	a.observe(st, rep, seq)
	a.legacyPeers = 0
	for i := range snap.Nodes {
		if n := &snap.Nodes[i]; n.Name != a.cfg.NodeName && n.Legacy() {
			a.legacyPeers++
		}
	}
	// Reports are written only after a sync that read the kernel back: a partial sync
	// trusts the appliers' caches, which another tool may have made stale (flushed
	// policies). So a partial sync that would publish hands over to a full one at once.
	// That one re-reads the kernel but keeps the memo (it compares every Node): its
	// desired state is the one just programmed, the kernel is what it must verify; the
	// periodic resync and every failure still recompute everything.
	if !full {
		if _, due := a.publishDue(rep); due {
			a.full.Store(true)
			a.q.Add(queueKey)
			return nil // readiness waits for the publishing sync
		}
	}
	// The write leaves the sync path: the writer writes the newest report handed over,
	// and the row writer the newest row (the report's readiness, while incomplete).
	a.publish(rep)
	if mine != nil {
		a.publishRow(rep.Readiness, mine, self.UID)
	}
	a.setStatus(true, berr)
	if res.Writes() > 0 || full {
		a.log.Debug("synced", "kind", kind, "mode", st.Mode, "states", len(st.SAs), "policies", len(st.Policies),
			"rules", len(st.Rules), "writes", res.Writes(), "duration", a.d.Now().Sub(now))
	}
	return nil
}

func plaintextCounts(cs []rules.Counter) []PlaintextCount {
	out := make([]PlaintextCount, 0, len(cs))
	for _, c := range cs {
		out = append(out, PlaintextCount{Direction: c.Rule.Hook.String(), Action: c.Rule.Action.String(), Packets: c.Packets, Bytes: c.Bytes})
	}
	return out
}

func wrapNonNil(what string, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%s: %w", what, err)
}

// fail records err, publishes it (claims unchanged) and returns it.
func (a *Agent) fail(err error) error {
	a.log.Error("sync failed", "error", err)
	a.setStatus(true, err)
	a.d.Metrics.SyncError.Set(1)
	a.publishError(err)
	return err
}

func (a *Agent) setStatus(synced bool, err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.ready = synced && err == nil
	if err != nil {
		a.lastErr = err.Error()
	} else {
		a.lastErr = ""
	}
}

func (a *Agent) countWrites(r xfrm.Result) {
	w := a.d.Metrics.Writes
	w.WithLabelValues("state", "add").Add(float64(r.StatesAdded))
	w.WithLabelValues("state", "replace").Add(float64(r.StatesReplaced))
	w.WithLabelValues("state", "delete").Add(float64(r.StatesDeleted))
	w.WithLabelValues("policy", "add").Add(float64(r.PoliciesAdded))
	w.WithLabelValues("policy", "update").Add(float64(r.PoliciesUpdated))
	w.WithLabelValues("policy", "delete").Add(float64(r.PoliciesDeleted))
}

func (a *Agent) observe(st desired.State, rep watch.Report, seq SeqUse) {
	m := a.d.Metrics
	m.States.Set(float64(len(st.SAs)))
	m.Policies.Set(float64(len(st.Policies)))
	m.Rules.Set(float64(len(st.Rules)))
	m.MaxSeq.Set(seq.Fraction)
	m.LastSync.Set(float64(rep.LastSync.Unix()))
	m.SyncError.Set(0)
	for _, md := range api.Modes {
		v := 0.0
		if md == st.Mode {
			v = 1
		}
		m.Mode.WithLabelValues(string(md)).Set(v)
	}
	m.BudgetMTU.Set(float64(rep.BudgetMTU))
	m.ExternalMTU.Set(float64(rep.ExternalMTU))
	var inbound, dropping int
	for _, p := range st.Peers {
		if p.Inbound {
			inbound++
		}
		if p.DropsPlaintext {
			dropping++
		}
	}
	m.Peers.WithLabelValues("expected").Set(float64(rep.PeersExpected))
	m.Peers.WithLabelValues("encrypted").Set(float64(rep.PeersEncrypted))
	m.Peers.WithLabelValues("inbound").Set(float64(inbound))
	m.Peers.WithLabelValues("dropping").Set(float64(dropping))
	m.Peers.WithLabelValues("skipped").Set(float64(rep.PeersExpected - len(st.Peers)))
	m.NotCovered.Set(float64(len(st.NotCovered)))
}

// currentBudget returns the configured or detected budget; detection runs on full syncs.
func (a *Agent) currentBudget(full bool) (Budget, error) {
	a.mu.Lock()
	b := a.budget
	a.mu.Unlock()
	if b.BudgetMTU != 0 && !full {
		return b, nil
	}
	ext, iface := a.cfg.ExternalMTU, ""
	if ext == 0 {
		var err error
		if ext, iface, err = a.d.DetectMTU(); err != nil {
			return b, fmt.Errorf("detect external mtu: %w", err)
		}
	}
	mtu, err := budget.Budget(ext, a.cfg.Dataplane.ICVBytes)
	if err != nil {
		return b, fmt.Errorf("mtu budget for external mtu %d: %w", ext, err)
	}
	b = Budget{ExternalMTU: ext, BudgetMTU: mtu, Interface: iface}
	a.mu.Lock()
	if a.budget != b {
		a.log.Info("mtu budget", "externalMTU", ext, "interface", iface, "budgetMTU", mtu, "icvBytes", a.cfg.Dataplane.ICVBytes)
	}
	a.budget = b
	a.mu.Unlock()
	return b, nil
}

// previous returns the newest report we handed to the writer (written or not: the kernel
// held its claims when it was built), else the last one written, else the one on our
// Node if it was made in this boot (an agent restart adopts the kernel state and its
// claims).
func (a *Agent) previous() *watch.Report {
	a.mu.Lock()
	p := a.slot.Wanted()
	if p == nil {
		p = a.published
	}
	a.mu.Unlock()
	if p != nil {
		return p
	}
	n := a.d.Source.Node(a.cfg.NodeName)
	if n == nil {
		return nil
	}
	return a.selfReport(n)
}

// selfReport is this node's last report as the caches hold it (me is its NodeInfo): the
// later of its NodeReport's (or annotation's) and its NodeStatus's as read when the
// ledger was opened (readOwnStatus), each only if made in this boot for this Node object.
// An agent of a later version writes its report only as a NodeStatus once no peer reads
// NodeReports, and leaves a superseded NodeReport, which is none (docs/keys.md §6): rolled
// back to this version, this agent still finds its claims.
func (a *Agent) selfReport(me *watch.NodeInfo) *watch.Report {
	r := me.CurrentReport()
	if r != nil && r.Superseded {
		r = nil // left behind when this node's reports went to its NodeStatus only
	}
	a.mu.Lock()
	st := a.ownStatus
	a.mu.Unlock()
	if st == nil || st.Incarnation == "" || st.Incarnation != me.Incarnation || st.UID != me.UID {
		return r
	}
	if r == nil || st.LastSync.After(r.LastSync) {
		return st
	}
	return r
}

// readOwnStatus reads this node's NodeStatus once (openLedger), for selfReport. Errors
// (no CRD, no RBAC, an API server that does not answer within ownStatusTimeout) leave
// none, logged: this version's agents never write one, so it matters only after a
// rollback from a version that does.
func (a *Agent) readOwnStatus() {
	if a.d.Dynamic == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), ownStatusTimeout)
	defer cancel()
	raw, err := nodereport.ReadStatus(ctx, a.d.Dynamic, a.cfg.Namespace, a.cfg.NodeName)
	if err != nil {
		a.log.Info("this node's NodeStatus not read (only a rollback from a version that writes it needs it)", "error", err)
		return
	}
	if raw == "" {
		return
	}
	r, err := watch.ParseReport(raw)
	if err != nil {
		a.log.Warn("this node's NodeStatus does not parse; ignored", "error", err)
		return
	}
	a.mu.Lock()
	a.ownStatus = r
	a.mu.Unlock()
}

// ownStatusTimeout bounds readOwnStatus's one read, on the first sync's path.
const ownStatusTimeout = 5 * time.Second

// enforces is whether peer n's current report says enforce.
func enforces(n *watch.NodeInfo) bool {
	r := n.CurrentReport()
	return r != nil && r.Mode == api.ModeEnforce
}

// reportsOnlyAsStatus is whether peer n's agent may report only as a NodeStatus, which
// agents do not read (docs/keys.md §6): it has no current report here, or a superseded
// one, and its NodeKeys for its boot and Node object declare api.CapabilityNodeStatus. Its
// mode is then unknown here; holdPrevious takes the cluster's.
func reportsOnlyAsStatus(n *watch.NodeInfo) bool {
	k := n.Keys
	r := n.CurrentReport()
	return (r == nil || r.Superseded) && k != nil && n.Incarnation != "" && k.Incarnation.BootID == n.Incarnation &&
		k.Incarnation.UID == n.UID && k.Has(api.CapabilityNodeStatus)
}

// openLedger opens this node's SA key ledger on the first sync that sees its Node
// (docs/keys.md, "No key twice"). A ledger made in this boot for this Node object is
// adopted with its epoch: a restart keeps the kernel's SAs, and no key it recorded is ever
// installed again. Otherwise (first start, reboot, Node re-created, ledger removed by
// cleanup or damaged) a new random epoch starts: every key this node derives is new. The
// ring history is seeded from this node's last report, whatever boot made it.
func (a *Agent) openLedger(snap *watch.Snapshot) error {
	if a.led != nil {
		return nil
	}
	me := snap.Node(a.cfg.NodeName)
	if me == nil {
		return fmt.Errorf("node %q: not found in the API", a.cfg.NodeName)
	}
	if me.Incarnation == "" || me.UID == "" {
		return fmt.Errorf("node %q: no boot ID (status.nodeInfo.bootID) or uid yet", a.cfg.NodeName)
	}
	a.readOwnStatus()
	var seed keys.History
	a.mu.Lock()
	st := a.ownStatus
	a.mu.Unlock()
	for _, r := range []*watch.Report{me.Report, st} {
		if r == nil {
			continue
		}
		for _, g := range r.Generations {
			seed.High = max(seed.High, g)
		}
	}
	l, why, err := ledger.Open(a.cfg.LedgerDir, ledger.Identity{Node: me.Name, BootID: me.Incarnation, UID: me.UID},
		ledger.Options{NewEpoch: watch.NewEpoch, Seed: seed, Fail: a.d.LedgerFail})
	if err != nil {
		return fmt.Errorf("open the sa key ledger: %w", err)
	}
	a.led = l
	a.d.Xfrm.SetLedger(l)
	a.mu.Lock()
	a.epoch = l.Epoch()
	a.mu.Unlock()
	a.d.Metrics.Epochs.WithLabelValues(why).Inc()
	switch why {
	case ledger.ReasonAdopted:
		a.log.Info("SA epoch adopted from this node's ledger", "epoch", l.Epoch(), "keys", l.Len(), "dir", a.cfg.LedgerDir)
	case ledger.ReasonNew:
		a.log.Info("new SA epoch", "epoch", l.Epoch(), "reason", "no ledger in this boot", "dir", a.cfg.LedgerDir)
	default:
		a.log.Warn("new SA epoch: the ledger was not usable, every key of this node changes", "epoch", l.Epoch(), "reason", why, "dir", a.cfg.LedgerDir)
	}
	if why != ledger.ReasonAdopted {
		// A restart in the same boot whose ledger is gone: the kernel may hold SAs the
		// peers still use; hold the plaintext drops toward them as after lost state.
		if r := a.selfReport(me); r != nil && (len(r.EncryptingTo) > 0 || r.ListsOmitted && r.PeersEncrypted > 0) {
			a.holdPrevious(snap)
		}
	}
	return nil
}

// checkRing refuses a ring older than one this node accepted before (a Secret restored
// from a backup or edited): no key is derived from it and the kernel is left as it is.
// An accepted ring's history is recorded in the ledger before it is used.
func (a *Agent) checkRing(snap *watch.Snapshot) error {
	if snap.Ring == nil {
		return nil // Inputs says why
	}
	h := a.led.History()
	if err := h.Check(snap.Ring); err != nil {
		a.d.Metrics.RingRefused.Inc()
		return fmt.Errorf("refusing the key ring (kernel left as it is; restore the newest Secret or let the master rewrite it): %w", err)
	}
	if err := a.led.SetHistory(h.Observe(snap.Ring)); err != nil {
		return fmt.Errorf("record the key ring history in the ledger: %w", err)
	}
	return nil
}

// newEpoch switches to a fresh random SA epoch: every key this node derives changes.
// After lost state, the peers the last published report encrypted to are held (no
// plaintext to them in enforce) until they are ready for the new keys.
func (a *Agent) newEpoch(reason string, cause error, snap *watch.Snapshot) error {
	e := watch.NewEpoch()
	a.mu.Lock()
	old := a.epoch
	a.mu.Unlock()
	if err := a.led.NewEpoch(e); err != nil {
		return fmt.Errorf("start a new sa epoch: %w", err)
	}
	if reason == "lost" {
		a.holdPrevious(snap)
	}
	a.mu.Lock()
	a.epoch = e
	a.mu.Unlock()
	a.d.Metrics.Epochs.WithLabelValues(reason).Inc()
	if cause != nil {
		a.log.Warn("new SA epoch: every key of this node changes", "epoch", e, "previous", old, "reason", reason, "cause", cause)
	} else {
		a.log.Info("new SA epoch", "epoch", e, "reason", reason)
	}
	return nil
}

// holdPrevious holds the plaintext drop toward every peer this node may have been
// encrypting to (docs/dataplane.md §5): those the last state this process programmed sends
// ESP to, and those the newest report handed to the writer and the last one written list
// (peers may still be reading an older one while a newer one waits). A report that omits
// its lists (docs/protocol-v2.md §9 step 4) and claims encrypted peers, with no state of
// this process to say which (a restart whose ledger is gone), holds every peer of snap
// whose agent enforces: the peers that could drop this node's plaintext.
func (a *Agent) holdPrevious(snap *watch.Snapshot) {
	a.hold = nil
	a.mu.Lock()
	written := a.published
	a.mu.Unlock()
	add := func(name string) {
		if !slices.Contains(a.hold, name) {
			a.hold = append(a.hold, name)
		}
	}
	if a.lastState != nil {
		for _, name := range a.lastState.EncryptingPeers() {
			add(name)
		}
	}
	for _, p := range []*watch.Report{a.previous(), written} {
		if p == nil {
			continue
		}
		for name := range p.EncryptingTo {
			add(name)
		}
		if p.ListsOmitted && p.PeersEncrypted > 0 && a.lastState == nil && snap != nil {
			ringEnforces := snap.Ring != nil && snap.Ring.Mode == api.ModeEnforce
			for i := range snap.Nodes {
				n := &snap.Nodes[i]
				if n.Name != a.cfg.NodeName && (enforces(n) || ringEnforces && reportsOnlyAsStatus(n)) {
					add(n.Name)
				}
			}
		}
	}
	slices.Sort(a.hold)
}

// Close releases the ledger file (the process's lock is the caller's).
func (a *Agent) Close() {
	if a.led != nil {
		a.led.Close()
	}
}

// holdRekeyed adds to the hold every peer the last state sent ESP to in enforce whose key
// incarnation in has changed under the same boot ID and Node object: its agent took a new
// SA epoch (lost state) while its pods kept running. Until the pair is ready under its new
// keys the outbound plaintext drop stays (releaseHold ends it), as this node's own hold
// does after its own new epoch (holdPrevious): without it this node would send the peer
// plaintext from the moment it learns the new keys until it learns that the peer holds
// SAs for them — for a peer without lists, a NodeKeys or report event before a NodeRow or
// NodeView one (docs/dataplane.md, "State loss and new epochs"). A reboot (new boot ID:
// the peer's boot gate holds its pods) or a re-created Node object is not held. Sync
// worker only.
func (a *Agent) holdRekeyed(in *desired.Inputs) {
	prevSt, prevIn := a.lastState, a.lastIn
	if prevSt == nil || prevIn == nil || prevSt.Mode != api.ModeEnforce || in.Ring.Mode != api.ModeEnforce {
		return
	}
	var held []string
	holding := make(map[string]bool, len(a.hold))
	for _, name := range a.hold {
		holding[name] = true
	}
	for _, p := range prevSt.Peers {
		if p.SendGeneration == 0 || holding[p.Name] {
			continue
		}
		was, now := nodeNamed(prevIn.Nodes, p.Name), nodeNamed(in.Nodes, p.Name)
		if was == nil || now == nil || was.Incarnation == now.Incarnation || !sameBootAndNode(was.Incarnation, now.Incarnation) {
			continue
		}
		held = append(held, p.Name)
	}
	if len(held) == 0 {
		return
	}
	a.hold = append(a.hold, held...)
	slices.Sort(a.hold)
	a.log.Info("peers took a new SA epoch: plaintext toward them stays dropped until they are ready for their new keys", "peers", len(held), "first", firstNames(held, 8))
}

// nodeNamed finds name in nodes (sorted by name, as inputs give them), or nil.
func nodeNamed(nodes []desired.Node, name string) *desired.Node {
	i, ok := slices.BinarySearchFunc(nodes, name, func(n desired.Node, name string) int { return strings.Compare(n.Name, name) })
	if !ok {
		return nil
	}
	return &nodes[i]
}

// sameBootAndNode reports whether key incarnations a and b (watch.KeyIncarnation:
// bootID/uid/epoch) are of the same boot ID and Node UID.
func sameBootAndNode(a, b string) bool {
	i, j := strings.LastIndexByte(a, '/'), strings.LastIndexByte(b, '/')
	return i > 0 && j > 0 && a[:i] == b[:j]
}

// releaseHold ends the hold of every peer st sends ESP to, no longer has, or may send
// plaintext to anyway (mode below enforce).
func (a *Agent) releaseHold(st desired.State) {
	if len(a.hold) == 0 {
		return
	}
	var keep []string
	for _, name := range a.hold {
		for _, p := range st.Peers {
			if p.Name == name && p.SendGeneration == 0 && st.Mode == api.ModeEnforce {
				keep = append(keep, name)
			}
		}
	}
	if len(keep) != len(a.hold) {
		a.log.Info("peers ready for the new SA epoch (or gone): plaintext hold released", "held", keep)
	}
	a.hold = keep
}

// Epoch returns this node's current SA epoch ("" before the first sync chose one).
func (a *Agent) Epoch() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.epoch
}

// publishError sets Error on the previous claims (or on an empty report claiming nothing)
// and publishes it.
func (a *Agent) publishError(err error) {
	var r watch.Report
	if p := a.previous(); p != nil {
		r = *p
	} else {
		r.Mode = api.ModeOff
		if n := a.d.Source.Node(a.cfg.NodeName); n != nil {
			r.Incarnation, r.UID = n.Incarnation, n.UID
			a.mu.Lock()
			r.Epoch = a.epoch
			a.mu.Unlock()
		}
	}
	r.Error = reportError(err)
	a.publish(r)
}

// publish hands r to the report writer if its claims changed or the heartbeat is due: for
// this node's NodeReport, and for its Node's annotation too while a peer reads only that
// (an agent of 0.1 during a rolling update) or while that is unknown; once no peer does,
// the writer removes the annotation from its Node (docs/keys.md §6). Only the sync worker
// (or a caller of Sync without Run) calls it.
func (a *Agent) publish(r watch.Report) {
	prev := a.previous()
	a.mu.Lock()
	pubAt, pending := a.pubAt, a.slot.Wanted() != nil
	annotated := a.annotated || a.slot.Annotating()
	unannotating := a.slot.Unannotating()
	a.mu.Unlock()
	reason, write := publishDue(prev, pending, pubAt, a.d.Now(), a.cfg.HeartbeatInterval, r)
	objects := a.d.Dynamic != nil
	annotate := !objects || a.legacyPeers != 0
	if objects && annotate && !annotated && !write && prev != nil {
		// A peer that reads only annotations appeared: our unchanged claims go there too.
		reason, write, r = "legacy-peer", true, *prev
	}
	self := a.d.Source.Node(a.cfg.NodeName)
	if objects {
		a.mu.Lock()
		if !a.nodeReportKnown && self != nil {
			// A superseded NodeReport needs no second marker.
			r := self.Report
			a.nodeReportSuperseded, a.nodeReportKnown = self.ObjectReport && !self.FromAnnotation && r != nil && r.Superseded, true
		}
		a.mu.Unlock()
		if want, live := a.nodeReportWanted(); want != live && !write && prev != nil && !pending {
			// Peers start or stop reading NodeReports: our unchanged claims go there
			// again, or a superseded marker replaces them.
			reason, write, r = "node-reports-off", true, *prev
			if want {
				reason = "node-reports-on"
			}
		}
	}
	unannotate := !annotate && self != nil && self.AnnotationReport && !unannotating
	if !write && !unannotate {
		return
	}
	if write && r.LastSync.IsZero() && prev != nil {
		r.LastSync = prev.LastSync
	}
	j := reportJob{report: r, reason: reason, write: write, annotate: annotate, unannotate: unannotate}
	if self != nil {
		j.uid = self.UID
	}
	a.mu.Lock()
	a.slot.Put(j)
	a.mu.Unlock()
	select {
	case a.wake <- struct{}{}:
	default:
	}
}

// writeReport writes r to this node's NodeReport (when the agent has a dynamic client;
// uid is its Node's, the object's owner) and, when annotate, to its Node's annotation.
// The writer calls it.
func (a *Agent) writeReport(ctx context.Context, r watch.Report, uid string, annotate bool) error {
	var objErr error
	if a.d.Dynamic != nil {
		objErr = a.writeObjects(ctx, r, uid)
		if objErr != nil && !annotate {
			return objErr
		}
	}
	a.setAnnotated(false)
	if !annotate {
		return nil
	}
	// Also when the NodeReport write failed (e.g. its CRD is missing: the error then
	// reaches whoever reads annotations).
	if err := patchReport(ctx, a.d.Client, a.cfg.NodeName, r); err != nil {
		return errors.Join(objErr, err)
	}
	a.setAnnotated(true)
	return objErr
}

// writeObjects writes r to this node's NodeStatus and, while a peer reads NodeReports (or
// the NodeStatus was refused), to its NodeReport; otherwise it leaves a superseded
// NodeReport once (docs/keys.md §6). The NodeStatus first: the master reads it.
func (a *Agent) writeObjects(ctx context.Context, r watch.Report, uid string) error {
	raw, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("encode report of node %q: %w", a.cfg.NodeName, err)
	}
	want, live := a.nodeReportWanted()
	statusErr := nodereport.WriteStatus(ctx, a.d.Dynamic, a.cfg.Namespace, a.cfg.NodeName, uid, string(r.Mode), raw)
	refused := statusErr != nil && statusRefusal(statusErr)
	a.mu.Lock()
	was := a.statusRefused
	if statusErr == nil || refused {
		a.statusRefused = refused
	}
	a.mu.Unlock()
	switch {
	case refused && !was:
		a.log.Warn("this node's NodeStatus is refused (the manifest predates it: apply the manifest); the report goes to the NodeReport", "error", statusErr)
	case statusErr == nil && was:
		a.log.Info("this node's NodeStatus is written again")
	}
	if refused {
		statusErr, want = nil, true
	}
	var objErr error
	switch {
	case want:
		if objErr = nodereport.Write(ctx, a.d.Dynamic, a.cfg.Namespace, a.cfg.NodeName, uid, string(r.Mode), raw); objErr == nil {
			a.setNodeReportSuperseded(false)
		}
	case live && statusErr == nil: // never before the NodeStatus holds the report
		sup, err := supersededReport(r)
		if err != nil {
			return fmt.Errorf("encode report of node %q: %w", a.cfg.NodeName, err)
		}
		if objErr = nodereport.Write(ctx, a.d.Dynamic, a.cfg.Namespace, a.cfg.NodeName, uid, string(r.Mode), sup); objErr == nil {
			a.setNodeReportSuperseded(true)
			a.log.Info("this node's NodeReport is superseded: its report goes to its NodeStatus only")
		}
	}
	return errors.Join(statusErr, objErr)
}

func (a *Agent) setNodeReportSuperseded(v bool) {
	a.mu.Lock()
	a.nodeReportSuperseded, a.nodeReportKnown = v, true
	a.mu.Unlock()
}

func (a *Agent) setAnnotated(v bool) {
	a.mu.Lock()
	a.annotated = v
	a.mu.Unlock()
}

// publishDue says whether r must be handed to the writer: its claims changed, or the
// heartbeat is due (see the pure publishDue).
func (a *Agent) publishDue(r watch.Report) (reason string, write bool) {
	prev := a.previous()
	a.mu.Lock()
	pubAt, pending := a.pubAt, a.slot.Wanted() != nil
	a.mu.Unlock()
	return publishDue(prev, pending, pubAt, a.d.Now(), a.cfg.HeartbeatInterval, r)
}

// Status is the agent's health as /healthz and /readyz see it.
type Status struct {
	Synced  bool   // every cache synced
	Ready   bool   // synced, the last sync succeeded, and its report is written or being written
	Healthy bool   // no sync has been running for longer than the wedge timeout
	Error   string // last sync error, else the last report write's error
	Syncs   int    // sync attempts so far
}

// Status reports the agent's health.
func (a *Agent) Status() Status {
	a.mu.Lock()
	s := Status{Ready: a.ready, Error: a.lastErr, Syncs: a.syncs}
	// Not ready while the report cannot be written, nor before the first report handed
	// over in this process is written.
	if a.writeErr != "" {
		s.Ready = false
		if s.Error == "" {
			s.Error = "write report: " + a.writeErr
		}
	}
	if a.published == nil && a.slot.Wanted() != nil {
		s.Ready = false
	}
	if s.Error == "" && a.keysErr != "" {
		s.Error = "write keys: " + a.keysErr // not a readiness condition: nothing reads them yet
	}
	if s.Error == "" && a.rowErr != "" {
		s.Error = "write readiness row: " + a.rowErr // nor is this: the reports' lists still decide too
	}
	a.mu.Unlock()
	s.Synced = a.d.Source.HasSynced()
	s.Ready = s.Ready && s.Synced
	s.Healthy = true
	if start := a.syncStart.Load(); start != 0 && a.d.Now().Sub(time.Unix(0, start)) > a.cfg.WedgeTimeout {
		s.Healthy = false
	}
	return s
}

// Published returns the last report this agent wrote (nil before the first).
func (a *Agent) Published() *watch.Report {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.published
}

// maxReportError bounds the error text a report carries: a report without lists stays
// within 2 KiB at any cluster size (docs/protocol-v2.md §9 step 4; TestReportSizeBound),
// and the agent's log has the whole text.
const maxReportError = 512

// reportError is err's text for the report, cut to maxReportError bytes (on a rune
// boundary) with the length of what was cut. The log has it whole.
func reportError(err error) string {
	s := err.Error()
	if len(s) <= maxReportError {
		return s
	}
	cut := maxReportError
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return fmt.Sprintf("%s … (%d more bytes in the agent's log)", s[:cut], len(s)-cut)
}

// conflictText describes address conflicts for the log and the report ("" when none).
func conflictText(cs []desired.Conflict) string {
	if len(cs) == 0 {
		return ""
	}
	parts := make([]string, len(cs))
	for i, c := range cs {
		parts[i] = c.String()
	}
	return "address conflict: " + strings.Join(parts, "; ")
}
