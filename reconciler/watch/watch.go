// Package watch is the agent's input side: client-go shared informers (list+watch, no
// polling) over everything the desired state depends on, and a Snapshot of their caches.
//
// Inputs:
//   - Nodes: Calico's projectcalico.org/IPv4Address (CIDR or bare IP) and
//     IPv4IPIPTunnelAddr annotations, status.nodeInfo.bootID (the incarnation), the Ready
//     condition and the other agents' secureoverlay.io/report annotations. The cache holds
//     each Node's NodeInfo (NodeTransform: CacheNode, a peer's report trimmed to what
//     concerns this node and parsed once), not the Node.
//   - NodeReports (nodereport.Cache, in Namespace): each agent's report, trimmed and parsed
//     like the annotation's; a node's report is its NodeReport's, else its annotation's
//     (an agent of 0.1), the later of the two when both exist. A deleted NodeReport of an
//     existing Node is kept (the namespace goes before the agents on `kubectl delete -f`).
//   - The key Secret: a namespace-scoped informer with a field selector on its name, so
//     RBAC can grant get/list/watch on that one Secret (resourceNames) and nothing else.
//   - Calico IPAMBlock, BlockAffinity, IPPool, BGPPeer and FelixConfiguration through
//     dynamic informers, from the API group Calico itself uses (SelectCalico: an explicit
//     CALICO_API_GROUP, else a converged DatastoreMigration, else discovery; retried until
//     one is served, the error is visible through Err). The caches hold each object's
//     parsed form (calicoTransform), not the object: an IPAMBlock is a few dozen bytes.
//   - Calico's DatastoreMigration objects (when served), whose phase changes trigger a new
//     selection; the selection is also re-run every Recheck.
//
// Invariants:
//   - HasSynced is true only when every informer has synced; the agent writes nothing to
//     the kernel before that.
//   - A switch of Calico group while running (a migration converging) never exposes a
//     half-synced cache: the old group's last parsed data is kept (frozen) and served by
//     Snapshot until every informer of the new group has synced, then the new group's
//     caches are served and the old informers stopped.
//   - OnChange is called for every add/update/delete that can change the desired state
//     (Node updates that touch none of the fields above are filtered out); it must be
//     cheap and non-blocking (the agent enqueues one work-queue key).
//   - Unknown fields are tolerated; objects that do not parse are listed in
//     Snapshot.Skipped and contribute nothing; key bytes never leave through errors.
package watch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/nodeid"
	"github.com/secureoverlay/secureoverlay/nodekeys"
	"github.com/secureoverlay/secureoverlay/nodereport"
	"github.com/secureoverlay/secureoverlay/noderow"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// Config wires a Watcher.
type Config struct {
	Client    kubernetes.Interface
	Dynamic   dynamic.Interface
	Discovery discovery.DiscoveryInterface // default Client.Discovery()
	// Namespace and SecretName locate the key Secret, RingConfigMap the public ring
	// (defaults api.Namespace, api.SecretName, api.RingConfigMapName; docs/keys.md §11).
	Namespace     string
	SecretName    string
	RingConfigMap string
	// Self is this node's name: a change of only its own report annotation (the agent's
	// output) does not trigger a sync.
	Self string
	// OnChange is called (with the kind of object) for every relevant event.
	OnChange func(kind string)
	// DiscoveryRetry is the pause between Calico discovery attempts (default 15s).
	DiscoveryRetry time.Duration
	// APIGroup is an explicit CALICO_API_GROUP (ParseAPIGroup); zero follows Calico's own
	// choice (SelectCalico).
	APIGroup schema.GroupVersion
	// Recheck is the period of the Calico group re-selection (default 2m, plus up to 20%
	// jitter); DatastoreMigration events trigger one at once.
	Recheck time.Duration
	Logger  *slog.Logger
	// IgnoreNodeIDs reads the node table only from the ring, as an agent that predates the
	// NodeIDs does (the agent's --node-ids=off): the NodeIDs are not watched, a ring that
	// leaves its table out gives this node no ID, and the agent does not declare
	// api.CapabilityNodeIDs, so the master keeps the table in the public ring.
	IgnoreNodeIDs bool
	// REST, when set, is the configuration Dynamic was made from: IPAMBlocks are then
	// listed and watched through the lean decoder (leanlist.go), not as unstructured
	// objects. Fake clients leave it nil.
	REST *rest.Config
}

// Watcher owns the informers.
type Watcher struct {
	cfg       Config
	nodes     cache.SharedIndexInformer
	ringCMs   cache.SharedIndexInformer // the public ring ConfigMap (one object)
	reports   *nodereport.Cache[reportEntry]
	pubKeys   *nodekeys.Cache
	ownView   *ownView       // this node's NodeView (readinessview.go)
	rows      *noderow.Cache // the peers' readiness rows (rows.go)
	ids       *nodeid.Cache  // the node table outside the ring (docs/keys.md §13)
	coreStart func(<-chan struct{})

	mu        sync.Mutex
	calicoErr error
	cur       *calicoSet // the group read now (nil before the first selection)
	next      *calicoSet // a group being switched to, until its informers sync
	frozen    *calicoData
	migration cache.SharedIndexInformer
	leanREST  rest.Interface // IPAMBlocks' lean list and watch (nil: through Dynamic)
	recheck   chan struct{}
	// sawConverged: a selection saw a converged DatastoreMigration (DecideCalico).
	sawConverged bool

	onChange atomic.Pointer[func(string)]

	// view is the Nodes and NodeReports as their handlers delivered them (Snapshot's
	// nodes), nodesReg the Node handler's registration (synced once it has seen the list).
	view     *nodeView
	nodesReg cache.ResourceEventHandlerRegistration

	// The last Inputs' nodes, what they were built from, and for which node (Inputs).
	inMu    sync.Mutex
	inNodes []desired.Node
	inVer   NodesVersion
	inSelf  string
	// inPatched counts the Inputs built by patching (tests).
	inPatched int

	// ringForbidden: the public ring ConfigMap cannot be listed (RBAC of an older
	// manifest): the agent reads the Secret as before, until the list succeeds.
	ringForbidden atomic.Bool
	// The Secret's informer runs only while the public ring needs it (secretWatch).
	secMu   sync.Mutex
	secStop <-chan struct{} // the watcher's stop (Run's context), set by coreStart
	sec     *secretInformer

	ringMu  sync.Mutex
	ringRV  string // the Secret's resourceVersion ring and ringErr were parsed at
	ring    *keys.Ring
	ringErr error
	pub     publicState // the public ring ConfigMap, as publicRing last read it
	openPub *keys.Ring  // the public ring and
	openRV  string      // the Secret's resourceVersion that open and openErr were unsealed from
	open    *keys.Ring
	openErr error
}

// secretInformer is the key Secret's informer with its own stop (secretWatch).
type secretInformer struct {
	inf  cache.SharedIndexInformer
	stop chan struct{}
	once sync.Once
}

// halt stops the informer (once; its store stays as it was).
func (si *secretInformer) halt() { si.once.Do(func() { close(si.stop) }) }

// New builds the informers (nothing runs until Run).
func New(cfg Config) *Watcher {
	if cfg.Namespace == "" {
		cfg.Namespace = api.Namespace
	}
	if cfg.SecretName == "" {
		cfg.SecretName = api.SecretName
	}
	if cfg.RingConfigMap == "" {
		cfg.RingConfigMap = api.RingConfigMapName
	}
	if cfg.Discovery == nil {
		cfg.Discovery = cfg.Client.Discovery()
	}
	if cfg.DiscoveryRetry == 0 {
		cfg.DiscoveryRetry = 15 * time.Second
	}
	if cfg.Recheck == 0 {
		cfg.Recheck = 2 * time.Minute
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	w := &Watcher{cfg: cfg, recheck: make(chan struct{}, 1), view: newNodeView()}
	if cfg.REST != nil {
		c, err := newLeanRESTClient(cfg.REST)
		if err != nil {
			// Not fatal: IPAMBlocks are then read through Dynamic as before.
			cfg.Logger.Error("lean IPAMBlock client not made; reading IPAMBlocks as unstructured objects", "error", err)
		} else {
			w.leanREST = c
		}
	}
	if cfg.OnChange != nil {
		w.SetOnChange(cfg.OnChange)
	}
	nf := informers.NewSharedInformerFactory(cfg.Client, 0)
	cf := informers.NewSharedInformerFactoryWithOptions(cfg.Client, 0, informers.WithNamespace(cfg.Namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", cfg.RingConfigMap).String()
		}))
	w.nodes = nf.Core().V1().Nodes().Informer()
	if err := w.nodes.SetTransform(NodeTransform(cfg.Self)); err != nil {
		cfg.Logger.Error("node cache transform not set: Nodes are cached whole", "error", err)
	}
	w.ringCMs = cf.Core().V1().ConfigMaps().Informer()
	_ = w.ringCMs.SetWatchErrorHandler(func(r *cache.Reflector, err error) {
		if apierrors.IsForbidden(err) && !w.ringForbidden.Swap(true) {
			cfg.Logger.Warn("the public ring ConfigMap cannot be read (the agent's RBAC predates it: apply the manifest); reading the key Secret instead",
				"configmap", cfg.Namespace+"/"+cfg.RingConfigMap, "error", err)
			w.secretWatch()
			w.notify("ring")
		}
		cache.DefaultWatchErrorHandler(context.Background(), r, err)
	})
	w.nodesReg, _ = w.nodes.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) {
			if n, ok := cachedInfo(obj, cfg.Self); ok {
				w.view.setNode(n, cfg.Self)
			}
			w.notify("node")
		},
		UpdateFunc: func(o, n any) {
			a, ok1 := cachedInfo(o, cfg.Self)
			b, ok2 := cachedInfo(n, cfg.Self)
			if ok2 {
				w.view.setNode(b, cfg.Self)
			}
			if !ok1 || !ok2 || relevantChange(a, b, cfg.Self) {
				w.notify("node")
			}
		},
		DeleteFunc: func(obj any) {
			if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = t.Obj
			}
			if n, ok := cachedInfo(obj, cfg.Self); ok {
				w.reports.Forget(n.Name)
				w.view.deleteNode(n.Name)
			}
			w.notify("node")
		},
	})
	w.reports = nodereport.NewCache(nodereport.CacheConfig[reportEntry]{
		Dynamic: cfg.Dynamic, Namespace: cfg.Namespace,
		Convert: func(node, raw string) reportEntry {
			var e reportEntry
			e.Raw, e.Report, e.Err = cacheReport(node, raw, cfg.Self)
			return e
		},
		NodeExists: func(node string) bool {
			_, ok, err := w.nodes.GetStore().GetByKey(node)
			return err == nil && ok
		},
		OnChange: func(node string, before, after *nodereport.Entry[reportEntry]) {
			w.view.setReport(node, after, cfg.Self)
			// A report appearing or going (a peer's agent of 0.1 replaced, an object
			// deleted) changes whose reports are read from where; an update matters when
			// it changes what self reads of it. Self's own report is the agent's output.
			if node == cfg.Self && before != nil && after != nil {
				return
			}
			if before == nil || after == nil || reportView(NodeInfo{Report: before.Value.Report, RawReport: before.Value.Raw}, cfg.Self) !=
				reportView(NodeInfo{Report: after.Value.Report, RawReport: after.Value.Raw}, cfg.Self) {
				w.notify("nodereport")
			}
		},
	})
	_, _ = w.ringCMs.AddEventHandler(changeHandler(func() {
		w.secretWatch()
		w.notify("ring")
	}))
	// The peers' published keys (protocol v2). Not required to sync while the ring has
	// no v2 generation (HasSynced): with an older manifest the CRD is missing.
	w.pubKeys = nodekeys.NewCache(cfg.Dynamic, cfg.Namespace, func(node string) {
		k, ok, err := w.pubKeys.Get(node)
		switch {
		case ok && err == nil:
			w.view.setKeys(node, &k)
		case !ok && w.nodeExists(node):
			// Deleted while its Node exists — `kubectl delete -f` deletes our namespace
			// before the agents' walk-down — keep the keys: a deleted object changes
			// nothing in that node's kernel, and forgetting them would drop the pair's
			// v2 SAs mid-uninstall (as nodereport.Cache keeps reports). A re-created Node
			// has another incarnation, which these keys do not match.
			return
		default:
			w.view.setKeys(node, nil)
		}
		w.notify("nodekeys")
	})
	w.ownView = w.newOwnView(func() { w.notify("nodeview") })
	w.rows = w.newRows(func() { w.notify("noderow") })
	// The node table outside the ring: read while the public ring names one (publicRing).
	w.ids = nodeid.NewCache(cfg.Dynamic, cfg.Namespace, func(string) {
		if w.ringNamesTable() {
			w.notify("nodeid")
		}
	})
	var idsMissing atomic.Bool
	w.ids.OnMissing(func(err error) {
		if !idsMissing.Swap(true) {
			cfg.Logger.Warn("the NodeIDs cannot be listed (the CRD or the agent's RBAC predates them: apply the manifest); this agent does not declare "+api.CapabilityNodeIDs+", so the master keeps the node table in the public ring",
				"error", err)
		}
	})
	if cfg.IgnoreNodeIDs {
		cfg.Logger.Info("reading the node table only from the key ring (--node-ids=off): this agent does not declare " + api.CapabilityNodeIDs + ", so the master keeps the table in the public ring")
	}
	w.coreStart = func(stop <-chan struct{}) {
		w.secMu.Lock()
		w.secStop = stop
		w.secMu.Unlock()
		nf.Start(stop)
		cf.Start(stop)
		go func() {
			// An absent ConfigMap sends no event: decide once the list is in.
			if cache.WaitForCacheSync(stop, w.ringCMs.HasSynced) {
				w.secretWatch()
				w.notify("ring")
			}
		}()
		w.reports.Start(stop)
		w.pubKeys.Start(stop)
		w.ownView.factory.Start(stop)
		w.rows.Start(stop)
		if cfg.IgnoreNodeIDs {
			return
		}
		w.ids.Start(stop)
		go func() {
			// The NodeIDs' list is in: the agent's next sync declares that it reads them.
			if cache.WaitForCacheSync(stop, w.ids.HasSynced) {
				w.notify("nodeid")
			}
		}()
	}
	return w
}

// SetOnChange sets the event callback (call it before Run).
func (w *Watcher) SetOnChange(f func(kind string)) { w.onChange.Store(&f) }

func (w *Watcher) notify(kind string) {
	if f := w.onChange.Load(); f != nil {
		(*f)(kind)
	}
}

func changeHandler(f func()) cache.ResourceEventHandlerFuncs {
	return cache.ResourceEventHandlerFuncs{AddFunc: func(any) { f() }, UpdateFunc: func(any, any) { f() }, DeleteFunc: func(any) { f() }}
}

// Run starts the informers, selects the Calico group (retrying until one is served) and
// re-selects it every Recheck and on DatastoreMigration events; it returns when ctx is
// done.
func (w *Watcher) Run(ctx context.Context) {
	w.coreStart(ctx.Done())
	for {
		err := w.selectCalico(ctx)
		wait := w.cfg.Recheck + time.Duration(rand.Int64N(int64(w.cfg.Recheck)/5+1))
		if err != nil {
			w.cfg.Logger.Warn("calico resources not usable; retrying", "error", err, "retry", w.cfg.DiscoveryRetry)
			wait = w.cfg.DiscoveryRetry
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			w.stopCalico()
			return
		case <-w.recheck:
			t.Stop()
		case <-t.C:
		}
	}
}

// selectCalico runs SelectCalico and starts, keeps or switches the group's informers.
func (w *Watcher) selectCalico(ctx context.Context) error {
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	w.mu.Lock()
	saw := w.sawConverged
	w.mu.Unlock()
	api, err := selectCalico(sctx, w.cfg.Discovery, w.cfg.Dynamic, w.cfg.APIGroup, saw)
	cancel()
	w.mu.Lock()
	w.sawConverged = w.sawConverged || api.Decision.Converged
	prevErr := w.calicoErr
	w.calicoErr = err
	cur, next := w.cur, w.next
	w.mu.Unlock()
	if err != nil {
		// Nothing is synced without a usable group (the agent leaves the kernel as it is
		// and reports why); the last caches stay for the uninstall walk-down.
		w.notify("discovery")
		return err
	}
	if prevErr != nil {
		w.notify("discovery")
	}
	w.watchMigrations(ctx, api.Migration)
	switch {
	case cur == nil:
		set := w.newCalicoSet(ctx, api)
		w.mu.Lock()
		w.cur = set
		w.mu.Unlock()
		w.cfg.Logger.Info("watching calico resources", "groupVersion", api.GroupVersion, "reason", api.Decision.Reason)
		set.start()
		w.notify("discovery")
	case sameResources(cur.api, api):
		w.mu.Lock()
		w.cur.api.Decision = api.Decision // the reason may change (a migration's phase)
		if next != nil {                  // a switch that is no longer wanted
			next.stopAll()
			w.next, w.frozen = nil, nil
		}
		w.mu.Unlock()
	case next != nil && sameResources(next.api, api):
		// Already switching there.
	default:
		w.switchCalico(ctx, cur, api)
	}
	return nil
}

// switchCalico starts api's informers while the old group's last data (frozen) is served,
// and makes api current once all of them have synced.
func (w *Watcher) switchCalico(ctx context.Context, old *calicoSet, api CalicoAPI) {
	set := w.newCalicoSet(ctx, api)
	w.mu.Lock()
	if w.next != nil {
		w.next.stopAll()
	}
	w.next = set
	if w.frozen == nil && old.synced() {
		d := old.read()
		w.frozen = &d
	}
	w.mu.Unlock()
	w.cfg.Logger.Warn("calico switched api group: reading the new group once its caches sync; the last data of the old group is used until then",
		"from", old.api.GroupVersion, "to", api.GroupVersion, "reason", api.Decision.Reason)
	set.start()
	go func() {
		if !cache.WaitForCacheSync(set.stop, set.hasSynced) {
			return // stopped: superseded or shutting down
		}
		w.mu.Lock()
		if w.next != set {
			w.mu.Unlock()
			return
		}
		prev := w.cur
		w.cur, w.next, w.frozen = set, nil, nil
		w.mu.Unlock()
		prev.stopAll()
		w.cfg.Logger.Info("watching calico resources", "groupVersion", api.GroupVersion, "reason", api.Decision.Reason, "previous", prev.api.GroupVersion)
		w.notify("discovery")
	}()
}

// watchMigrations starts an informer on the DatastoreMigration objects (once): any change
// of theirs triggers a re-selection.
func (w *Watcher) watchMigrations(ctx context.Context, gvr schema.GroupVersionResource) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if gvr.Resource == "" || w.migration != nil {
		return
	}
	f := dynamicinformer.NewDynamicSharedInformerFactory(w.cfg.Dynamic, 0)
	inf := f.ForResource(gvr).Informer()
	_, _ = inf.AddEventHandler(changeHandler(func() {
		select {
		case w.recheck <- struct{}{}:
		default:
		}
	}))
	w.migration = inf
	f.Start(ctx.Done())
}

func (w *Watcher) stopCalico() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.next != nil {
		w.next.stopAll()
	}
}

// sameResources reports whether a and b read the same resources.
func sameResources(a, b CalicoAPI) bool {
	return a.GroupVersion == b.GroupVersion && a.IPAMBlocks == b.IPAMBlocks && a.BlockAffinities == b.BlockAffinities &&
		a.IPPools == b.IPPools && a.BGPPeers == b.BGPPeers && a.FelixConfigurations == b.FelixConfigurations
}

// calicoSet is one group's informers.
type calicoSet struct {
	api     CalicoAPI
	factory dynamicinformer.DynamicSharedInformerFactory
	inf     map[string]cache.SharedIndexInformer // by resource name
	lean    []cache.SharedIndexInformer          // those not from the factory (leanlist.go)
	stop    chan struct{}
	once    sync.Once
}

func (w *Watcher) newCalicoSet(ctx context.Context, api CalicoAPI) *calicoSet {
	set := &calicoSet{api: api, inf: map[string]cache.SharedIndexInformer{}, stop: make(chan struct{}),
		factory: dynamicinformer.NewDynamicSharedInformerFactory(w.cfg.Dynamic, 0)}
	go func() {
		select {
		case <-ctx.Done():
			set.stopAll()
		case <-set.stop:
		}
	}()
	for _, r := range []struct {
		kind string
		gvr  schema.GroupVersionResource
	}{{"ipamblocks", api.IPAMBlocks}, {"blockaffinities", api.BlockAffinities}, {"ippools", api.IPPools},
		{"bgppeers", api.BGPPeers}, {"felixconfigurations", api.FelixConfigurations}} {
		if r.gvr.Resource == "" {
			continue
		}
		var inf cache.SharedIndexInformer
		if r.kind == "ipamblocks" && w.leanREST != nil {
			inf = cache.NewSharedIndexInformer(&leanBlocksLW{c: w.leanREST, gvr: r.gvr}, &parsedObject{}, 0, cache.Indexers{})
			set.lean = append(set.lean, inf)
		} else {
			inf = set.factory.ForResource(r.gvr).Informer()
		}
		if err := inf.SetTransform(calicoTransform(r.kind)); err != nil {
			w.cfg.Logger.Error("calico cache transform not set", "resource", r.kind, "error", err)
		}
		kind := r.kind
		_, _ = inf.AddEventHandler(changeHandler(func() {
			// Events of a group being switched to or away from change nothing the
			// agent computes until the switch completes (it notifies then).
			w.mu.Lock()
			current := w.cur == set && w.next == nil
			w.mu.Unlock()
			if current {
				w.notify(kind)
			}
		}))
		set.inf[r.kind] = inf
	}
	return set
}

func (s *calicoSet) start() {
	s.factory.Start(s.stop)
	for _, inf := range s.lean {
		go inf.Run(s.stop)
	}
}

func (s *calicoSet) stopAll() { s.once.Do(func() { close(s.stop) }) }

func (s *calicoSet) hasSynced() bool {
	for _, inf := range s.inf {
		if !inf.HasSynced() {
			return false
		}
	}
	return len(s.inf) > 0
}

func (s *calicoSet) synced() bool { return s != nil && s.hasSynced() }

// HasSynced reports whether every informer has synced.
func (w *Watcher) HasSynced() bool {
	if !w.nodes.HasSynced() || !w.nodesReg.HasSynced() || !w.ringListed() || !w.reports.HasSynced() {
		return false
	}
	if w.needSecret() && !w.secretSynced() {
		return false
	}
	if !w.ids.HasSynced() && w.ringNamesTable() {
		// The ring's table is in the NodeIDs: without their list no node has an ID.
		return false
	}
	if !w.pubKeys.HasSynced() && w.ringHasV2() {
		// A v2 generation's pairs need the peers' keys: a sync before the list would
		// withdraw every pair's claims for a moment (an agent restart must be hitless).
		return false
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.calicoErr != nil || w.cur == nil {
		return false
	}
	return w.frozen != nil || w.cur.hasSynced()
}

// Err is why the watcher cannot sync (the NodeReports cannot be listed, Calico discovery
// failed), or nil (also while the first discovery is still running).
func (w *Watcher) Err() error {
	if err := w.reports.Err(); err != nil {
		return err
	}
	if err := w.pubKeys.Err(); err != nil && w.ringHasV2() {
		return fmt.Errorf("the key ring has protocol v2 generations but the peers' NodeKeys cannot be listed (is the CRD nodekeys.secureoverlay.io installed? apply the manifest): %w", err)
	}
	if err := w.ids.Err(); err != nil && w.ringNamesTable() {
		return fmt.Errorf("the public ring leaves its node table to the NodeIDs, which cannot be listed (is the CRD nodeids.secureoverlay.io installed and the agent's Role up to date? apply the manifest): %w", err)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.calicoErr
}

// ReadsNodeIDs reports whether this agent reads the node table from the NodeIDs (their
// list is in): the agent then declares api.CapabilityNodeIDs, and the master may write the
// public ring without its table (docs/keys.md §13).
func (w *Watcher) ReadsNodeIDs() bool { return !w.cfg.IgnoreNodeIDs && w.ids.HasSynced() }

// nodeExists reports whether the Node cache holds node.
func (w *Watcher) nodeExists(node string) bool {
	_, ok, err := w.nodes.GetStore().GetByKey(node)
	return err == nil && ok
}

// ringHasV2 reports whether the current ring has a protocol v2 generation.
func (w *Watcher) ringHasV2() bool {
	r, err := w.currentRing()
	if err != nil || r == nil {
		return false
	}
	for i := range r.Generations {
		if r.Generations[i].V2() {
			return true
		}
	}
	return false
}

// NodeCacheSynced reports whether the Node cache has synced (enough to publish an error
// report on this node while the other inputs are missing).
func (w *Watcher) NodeCacheSynced() bool { return w.nodes.HasSynced() }

// Node returns what the cache holds of the named Node (CacheNode), or nil. Its Report is
// shared with the cache: read it, never modify it.
func (w *Watcher) Node(name string) *NodeInfo {
	obj, ok, err := w.nodes.GetStore().GetByKey(name)
	if err != nil || !ok {
		return nil
	}
	ni, ok := cachedInfo(obj, w.cfg.Self)
	if !ok {
		return nil
	}
	ni = w.withReport(ni)
	return &ni
}

// withReport merges ni's NodeReport into it (withObject).
func (w *Watcher) withReport(ni NodeInfo) NodeInfo {
	e, ok := w.reports.Get(ni.Name)
	return withObject(ni, e.Value, ok)
}

// Snapshot reads every cache. Call it only after HasSynced. The nodes come from the node
// view (nodeView), numbered by NodesSeq; the Nodes slice and the nodes' Reports are shared
// with the view and with other snapshots: read them, never modify them.
func (w *Watcher) Snapshot() Snapshot {
	var s Snapshot
	s.Nodes, s.NodesSeq = w.view.snapshot()
	s.Ring, s.RingErr = w.currentRing()
	s.MasterReads = w.masterReads()

	w.mu.Lock()
	var d calicoData
	switch {
	case w.frozen != nil:
		d = *w.frozen
	case w.cur != nil:
		d = w.cur.read()
	}
	if w.cur != nil {
		s.Calico = w.cur.api
	}
	if w.next != nil {
		s.CalicoSwitching = w.next.api.GroupVersion
	}
	w.mu.Unlock()
	s.Blocks = slices.Clone(d.blocks)
	s.Pools = slices.Clone(d.pools)
	s.BGPPeers = slices.Clone(d.peers)
	s.Felix = d.felix
	s.Skipped = append(s.Skipped, d.skipped...)
	affs := d.affs
	ApplyAffinities(s.Blocks, affs)
	sortBlocks(s.Blocks)
	s.Pools = slices.DeleteFunc(s.Pools, func(p desired.Pool) bool { return p.Disabled })
	slices.SortFunc(s.Pools, func(a, b desired.Pool) int { return strings.Compare(a.Name, b.Name) })
	slices.SortFunc(s.BGPPeers, func(a, b desired.BGPPeer) int { return strings.Compare(a.Name, b.Name) })
	slices.SortFunc(s.Skipped, func(a, b desired.Skip) int { return strings.Compare(a.Object, b.Object) })
	return s
}

// currentRing is the ring the agent acts on (docs/keys.md §11): the public ring
// ConfigMap's (with its node table: publicRing), its sealed generations' roots taken from
// the Secret; the Secret's ring when there is no ConfigMap (a master that predates it).
// Results are cached per resourceVersion: the same versions give the same pointer
// (Inputs.KeysVersion).
func (w *Watcher) currentRing() (*keys.Ring, error) {
	pub, ok, err := w.publicRing()
	if !ok {
		return w.secretRing()
	}
	if err != nil || !pub.Sealed() {
		return pub, err
	}
	sec, err := w.secretRing()
	if err != nil {
		return nil, err
	}
	w.ringMu.Lock()
	defer w.ringMu.Unlock()
	if w.ringRV != "" && pub == w.openPub && w.ringRV == w.openRV {
		return w.open, w.openErr
	}
	r, err := keys.Unseal(pub, sec)
	if err != nil {
		err = fmt.Errorf("configmap %s/%s and secret %s/%s: %w", w.cfg.Namespace, w.cfg.RingConfigMap, w.cfg.Namespace, w.cfg.SecretName, err)
	}
	w.openPub, w.openRV, w.open, w.openErr = pub, w.ringRV, r, err
	return r, err
}

// masterReads is what the public ring ConfigMap says its master reads
// (api.RingMasterDataKey), nil without one.
func (w *Watcher) masterReads() []string {
	obj, ok, err := w.ringCMs.GetStore().GetByKey(w.cfg.Namespace + "/" + w.cfg.RingConfigMap)
	if err != nil || !ok {
		return nil
	}
	return strings.Fields(obj.(*corev1.ConfigMap).Data[api.RingMasterDataKey])
}

// errNoTable: the public ring leaves its node table to the NodeIDs, they do not match the
// digest it names, and no earlier ring had its table (an agent starting between the
// master's two writes, or before the NodeIDs' events): not ready, the kernel is kept.
var errNoTable = errors.New("its ring leaves the node table to the NodeIDs, which do not match the table it names yet (the master writes them first: waiting for them)")

// publicRing is the public ring ConfigMap's ring with its node table (ok false: there is
// no ConfigMap). A ring that leaves its table out is filled from the NodeIDs when they
// are exactly the table the ConfigMap names (nodeid.Fill); until they are, it is the
// last ring publicRing had with its table — the NodeIDs and the ring are two watches,
// seen in either order, and an ID must never be taken from a table another ring goes
// with (docs/keys.md §13) — or, before any, errNoTable.
func (w *Watcher) publicRing() (r *keys.Ring, ok bool, err error) {
	obj, ok, err := w.ringCMs.GetStore().GetByKey(w.cfg.Namespace + "/" + w.cfg.RingConfigMap)
	if err != nil || !ok {
		return nil, false, nil
	}
	cm := obj.(*corev1.ConfigMap)
	w.ringMu.Lock()
	defer w.ringMu.Unlock()
	p := &w.pub
	if cm.ResourceVersion == "" || cm.ResourceVersion != p.rv {
		var r *keys.Ring
		data, has := cm.Data[api.RingDataKey]
		if !has {
			err = fmt.Errorf("configmap %s/%s: no data key %q", w.cfg.Namespace, w.cfg.RingConfigMap, api.RingDataKey)
		} else if r, err = keys.Parse([]byte(data)); err != nil {
			err = fmt.Errorf("configmap %s/%s: %w", w.cfg.Namespace, w.cfg.RingConfigMap, err)
		}
		p.rv, p.ring, p.err, p.want = cm.ResourceVersion, r, err, cm.Data[api.RingNodesDataKey]
		if w.cfg.IgnoreNodeIDs {
			p.want = "" // as an agent that predates the NodeIDs: the ring's own table
		}
		p.decided, p.filled = false, false
	}
	if p.err != nil {
		return nil, true, p.err
	}
	ver := w.ids.Version() // before the entries: a change after it is seen again
	if p.filled || (p.decided && ver == p.idsVer) {
		return p.out, true, p.outErr
	}
	var entries []nodeid.Entry
	if p.namesTable() {
		w.ids.Each(func(_ string, e nodeid.Entry) { entries = append(entries, e) })
	}
	filled, ok := nodeid.Fill(p.ring, entries, p.want)
	switch {
	case ok:
		if p.waiting != "" {
			w.cfg.Logger.Info("the NodeIDs match the public ring's node table: acting on it", "configmap", w.cfg.Namespace+"/"+w.cfg.RingConfigMap, "nodes", len(filled.Nodes))
			p.waiting = ""
		}
		p.out, p.outErr, p.good, p.filled = filled, nil, filled, true
	case p.good != nil:
		p.out, p.outErr = p.good, nil
	default:
		p.out, p.outErr = nil, fmt.Errorf("configmap %s/%s: %w", w.cfg.Namespace, w.cfg.RingConfigMap, errNoTable)
	}
	if !ok && p.waiting != p.rv {
		p.waiting = p.rv
		w.cfg.Logger.Info("the public ring's node table is not in the NodeIDs yet: acting on the last ring with its table until it is",
			"configmap", w.cfg.Namespace+"/"+w.cfg.RingConfigMap, "nodeIDs", len(entries), "haveEarlierRing", p.good != nil)
	}
	p.decided, p.idsVer = true, ver
	return p.out, true, p.outErr
}

// publicState is the public ring ConfigMap as publicRing last parsed it, and the ring with
// its table publicRing made of it.
type publicState struct {
	rv   string // the ConfigMap's resourceVersion ring, err and want were parsed at
	ring *keys.Ring
	err  error
	want string // its api.RingNodesDataKey: the digest of the table ring leaves out ("": none)
	// out (or outErr) is the ring with its table publicRing gives for rv: decided at the
	// NodeID cache's version idsVer while ring waits for its NodeIDs, or for good (filled:
	// it has its table, from itself or from the NodeIDs).
	decided, filled bool
	idsVer          uint64
	out             *keys.Ring
	outErr          error
	// good is the last ring publicRing had with its table: acted on while a newer one
	// waits for its NodeIDs (docs/keys.md §13).
	good *keys.Ring
	// waiting: the wait for the NodeIDs of this rv has been logged.
	waiting string
}

// namesTable reports whether the ring leaves its table to the NodeIDs.
func (p *publicState) namesTable() bool {
	return p.ring != nil && len(p.ring.Nodes) == 0 && p.want != ""
}

// ringNamesTable reports whether the public ring leaves its table to the NodeIDs (its
// ConfigMap, as last parsed, names one).
func (w *Watcher) ringNamesTable() bool {
	if _, ok, err := w.publicRing(); !ok || (err != nil && !errors.Is(err, errNoTable)) {
		return false
	}
	w.ringMu.Lock()
	defer w.ringMu.Unlock()
	return w.pub.namesTable()
}

// ringListed reports whether the public ring's list is in, or cannot be had (forbidden).
func (w *Watcher) ringListed() bool { return w.ringCMs.HasSynced() || w.ringForbidden.Load() }

// needSecret reports whether the Secret must be read: the public ring's list is in and
// there is no ConfigMap, or it has a sealed generation; or the list is forbidden.
func (w *Watcher) needSecret() bool {
	if !w.ringCMs.HasSynced() {
		return w.ringForbidden.Load()
	}
	pub, ok, err := w.publicRing()
	return !ok || (err == nil && pub.Sealed())
}

// secretWatch starts the Secret's informer when needSecret, and stops it when not (an
// agent of a v2-only cluster has no access to it: docs/keys.md §11).
func (w *Watcher) secretWatch() {
	need := w.needSecret()
	w.secMu.Lock()
	defer w.secMu.Unlock()
	switch {
	case need && w.sec == nil && w.secStop != nil:
		si := &secretInformer{stop: make(chan struct{})}
		si.inf = informers.NewSharedInformerFactoryWithOptions(w.cfg.Client, 0, informers.WithNamespace(w.cfg.Namespace),
			informers.WithTweakListOptions(func(o *metav1.ListOptions) {
				o.FieldSelector = fields.OneTermEqualSelector("metadata.name", w.cfg.SecretName).String()
			})).Core().V1().Secrets().Informer()
		_, _ = si.inf.AddEventHandler(changeHandler(func() { w.notify("secret") }))
		parent := w.secStop
		go func() {
			// The watcher stops: so does the informer, but it stays w.sec — its cache, as
			// every other, outlives the watch for the uninstall walk-down (HasSynced).
			select {
			case <-parent:
				si.halt()
			case <-si.stop:
			}
		}()
		go si.inf.Run(si.stop)
		w.sec = si
		w.cfg.Logger.Info("watching the key Secret (the public ring withholds a v1 root, or there is none)", "secret", w.cfg.Namespace+"/"+w.cfg.SecretName)
	case !need && w.sec != nil:
		w.sec.halt()
		w.sec = nil
		w.cfg.Logger.Info("no longer watching the key Secret (the public ring holds every generation)", "configmap", w.cfg.Namespace+"/"+w.cfg.RingConfigMap)
	}
}

// secretSynced reports whether the Secret's informer runs and has synced.
func (w *Watcher) secretSynced() bool {
	w.secMu.Lock()
	defer w.secMu.Unlock()
	return w.sec != nil && w.sec.inf.HasSynced()
}

// secretRing parses the Secret, caching the result per resourceVersion.
func (w *Watcher) secretRing() (*keys.Ring, error) {
	w.secMu.Lock()
	si := w.sec
	w.secMu.Unlock()
	if si == nil || !si.inf.HasSynced() {
		return nil, fmt.Errorf("secret %s/%s: not read yet: %w", w.cfg.Namespace, w.cfg.SecretName, ErrNoSecret)
	}
	obj, ok, err := si.inf.GetStore().GetByKey(w.cfg.Namespace + "/" + w.cfg.SecretName)
	if err != nil {
		return nil, fmt.Errorf("secret %s/%s: %w", w.cfg.Namespace, w.cfg.SecretName, err)
	}
	if !ok {
		return nil, fmt.Errorf("secret %s/%s: %w", w.cfg.Namespace, w.cfg.SecretName, ErrNoSecret)
	}
	sec := obj.(*corev1.Secret)
	w.ringMu.Lock()
	defer w.ringMu.Unlock()
	if sec.ResourceVersion != "" && sec.ResourceVersion == w.ringRV {
		return w.ring, w.ringErr
	}
	data, has := sec.Data[api.SecretDataKey]
	var r *keys.Ring
	if !has {
		err = fmt.Errorf("secret %s/%s: no data key %q", w.cfg.Namespace, w.cfg.SecretName, api.SecretDataKey)
	} else if r, err = keys.Parse(data); err != nil {
		err = fmt.Errorf("secret %s/%s: %w", w.cfg.Namespace, w.cfg.SecretName, err)
	}
	w.ringRV, w.ring, w.ringErr = sec.ResourceVersion, r, err
	return r, err
}
