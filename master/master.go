// Package master is secureoverlay's key manager: the thin client-go shell around the pure
// state machine in package keys.
//
// Inputs: Nodes (Ready condition, bootID, the agents' report annotation), the operator's
// ConfigMap (enabled/mode, rotate request) and the key ring Secret. Outputs: the Secret
// (only the master writes it), the status ConfigMap and Prometheus metrics.
//
// Invariants:
//   - Every decision is computed from the ring read from the API server in the same
//     reconcile (a live GET, not a cache) and written back with that read's
//     resourceVersion, so two replicas (or a deposed leader still running) can never both
//     apply a step: the loser gets a conflict, re-reads and sees the step done. A failover
//     therefore never rotates twice: a handled rotate request is recorded in the ring, and
//     interval rotation compares with the newest generation's creation time in the ring.
//   - The master never writes a ring it did not read and validate: an unparseable Secret
//     is refused (logged, counted, published in the status), the last good ring is kept in
//     memory, and the data is left alone until the operator fixes it or sets
//     api.ResetRingAnnotation on the Secret. A deleted Secret is recreated from the last
//     good ring when there is one.
//   - Key bytes never reach logs, errors, the status or metrics.
//
// Shape: informers on Nodes, the Secret and the ConfigMap enqueue one key; one worker runs
// a full reconcile; a timer re-runs it when a timed transition (interval, grace, node
// timeout) falls due, and a periodic resync repairs anything missed. Only the leader (a
// client-go Lease) runs the controller.
package master

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	listerscorev1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/nodeid"
	"github.com/secureoverlay/secureoverlay/nodekeys"
	"github.com/secureoverlay/secureoverlay/nodereport"
	"github.com/secureoverlay/secureoverlay/noderow"
	"github.com/secureoverlay/secureoverlay/readiness"
)

// Options configure a master replica.
type Options struct {
	// Namespace of the Secret, the ConfigMaps and the Lease (default api.Namespace).
	Namespace string
	// AgentServiceAccount is the agents' ServiceAccount in Namespace, the subject the
	// master grants or revokes read access to the key Secret (default
	// api.AgentServiceAccount; docs/keys.md §11).
	AgentServiceAccount string
	// Identity of this replica in the Lease (required, unique per replica).
	Identity string
	// LeaseName (default "secureoverlay-master") and the leader election timings
	// (defaults 15s / 10s / 2s).
	LeaseName                                 string
	LeaseDuration, RenewDeadline, RetryPeriod time.Duration
	// Resync is the period of the full reconcile that runs without events (default 1m).
	Resync time.Duration
	// NodeSelector is a label selector for the nodes that run an agent (the DaemonSet's
	// node selector); other nodes are ignored. Empty: every node.
	NodeSelector string
	// Policy is the rotation and cutover policy.
	Policy keys.Config
	// Logger (default slog.Default()).
	Logger *slog.Logger
	// Metrics (default: unregistered metrics).
	Metrics *Metrics
	// Dynamic reads the agents' NodeReports (package nodereport). Nil: the master reads
	// only report annotations, as 0.1 did.
	Dynamic dynamic.Interface
	// Rand is the entropy source of root keys (default crypto/rand.Reader).
	Rand io.Reader
	// Now is the clock (default time.Now).
	Now func() time.Time
}

func (o *Options) defaults() error {
	if _, err := labels.Parse(o.NodeSelector); err != nil {
		return fmt.Errorf("master: node selector %q: %w", o.NodeSelector, err)
	}
	if o.Namespace == "" {
		o.Namespace = api.Namespace
	}
	if o.AgentServiceAccount == "" {
		o.AgentServiceAccount = api.AgentServiceAccount
	}
	if o.Identity == "" {
		return errors.New("master: identity is required")
	}
	if o.LeaseName == "" {
		o.LeaseName = "secureoverlay-master"
	}
	if o.LeaseDuration == 0 {
		o.LeaseDuration = 15 * time.Second
	}
	if o.RenewDeadline == 0 {
		o.RenewDeadline = 10 * time.Second
	}
	if o.RetryPeriod == 0 {
		o.RetryPeriod = 2 * time.Second
	}
	if o.Resync == 0 {
		o.Resync = time.Minute
	}
	if o.Policy == (keys.Config{}) {
		o.Policy = keys.DefaultConfig()
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Metrics == nil {
		o.Metrics = NewMetrics()
	}
	if o.Rand == nil {
		o.Rand = rand.Reader
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return nil
}

// Run campaigns for the Lease and runs the controller while leading. It returns when ctx
// is done (nil) or when leadership is lost (an error; the process should exit so that it
// restarts with fresh state).
func Run(ctx context.Context, client kubernetes.Interface, opts Options) error {
	if err := opts.defaults(); err != nil {
		return err
	}
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Namespace: opts.Namespace, Name: opts.LeaseName},
		Client:     client.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: opts.Identity},
	}
	log := opts.Logger.With("identity", opts.Identity)
	var (
		ctrlErr error
		wg      sync.WaitGroup
		mu      sync.Mutex
		ended   bool // le.Run returned: a late OnStartedLeading must not start
	)
	le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
		Lock:            lock,
		Name:            opts.LeaseName,
		LeaseDuration:   opts.LeaseDuration,
		RenewDeadline:   opts.RenewDeadline,
		RetryPeriod:     opts.RetryPeriod,
		ReleaseOnCancel: true,
		Callbacks: leaderelection.LeaderCallbacks{
			OnStartedLeading: func(lctx context.Context) {
				mu.Lock()
				if ended {
					mu.Unlock()
					return
				}
				wg.Add(1)
				mu.Unlock()
				defer wg.Done()
				log.Info("became leader", "lease", opts.Namespace+"/"+opts.LeaseName)
				opts.Metrics.Leader.Set(1)
				defer opts.Metrics.Leader.Set(0)
				ctrlErr = NewController(client, opts).Run(lctx)
			},
			OnStoppedLeading: func() { log.Info("stopped leading") },
			OnNewLeader: func(id string) {
				if id != opts.Identity {
					log.Info("leader is another replica", "leader", id)
				}
			},
		},
	})
	if err != nil {
		return fmt.Errorf("leader election on lease %s/%s: %w", opts.Namespace, opts.LeaseName, err)
	}
	le.Run(ctx)
	mu.Lock()
	ended = true
	mu.Unlock()
	wg.Wait()
	if ctx.Err() != nil {
		return nil
	}
	if ctrlErr != nil {
		return ctrlErr
	}
	return fmt.Errorf("lost leadership of lease %s/%s", opts.Namespace, opts.LeaseName)
}

// Controller reconciles the key ring. Create it with NewController; run it only while
// leading (Run does that).
type Controller struct {
	client kubernetes.Interface
	opts   Options
	log    *slog.Logger

	nodes   listerscorev1.NodeLister
	configs listerscorev1.ConfigMapLister
	queue   workqueue.TypedRateLimitingInterface[string]
	// reports are the agents' NodeReports (nil without Options.Dynamic), statuses their
	// NodeStatuses (the same reports under the kind only the master and the CLI read;
	// nodereport.PickObject). statusesWarn warns once when those cannot be listed: then
	// the NodeReports alone are read (a report that is not current there is behind, which
	// holds steps and makes nothing unsafe).
	reports, statuses *nodereport.Cache[string]
	statusesWarn      sync.Once
	// pubKeys are the agents' NodeKeys (nil without Options.Dynamic). Never waited for:
	// while its CRD is missing (an older manifest) no node counts as publishing, every
	// generation stays v1, and key incarnations come from the reports.
	pubKeys *nodekeys.Cache
	// rows are the agents' readiness rows (docs/keys.md §12), followed under protocol v2:
	// a NodeView a row makes needless is not written. rowsWarn warns once when they cannot
	// be listed.
	rows     *noderow.Cache
	rowsWarn sync.Once
	// ids are the NodeIDs (docs/keys.md §13; nil without Options.Dynamic), kept equal to
	// the live entries of the Secret's node table (writeNodeIDs). idsErr is the last
	// writing error logged (a new one is logged, a repeat is not).
	ids    *nodeid.Cache
	idsErr string
	// idsUnknown: reporting nodes without NodeKeys of their boot, since when
	// (nodeIDsLacking); tableWhy: why the public ring carries its table ("" : it does not;
	// "unset" before the first decision).
	idsUnknown map[string]time.Time
	tableWhy   string
	// lastTable is the last node table seen, with its digest (table); idsSettled is it
	// when the NodeIDs were found equal to it with the NodeID cache at version idsVer
	// (writeNodeIDs skips its plan while both hold).
	lastTable  *nodeTable
	idsSettled *nodeTable
	idsVer     uint64
	idsWarn    sync.Once

	lastGood   *keys.Ring
	lastStatus string
	// hist is the key ring history this controller knows (keys.History): of the rings it
	// accepted, and read back once from the status its predecessors published
	// (histLoaded). A ring older than it is refused (a Secret restored from a backup).
	hist       keys.History
	histLoaded bool
	// refused is the resourceVersion and message of the last InvalidKeyRing Event: a
	// refusal is posted once per version of the Secret, not on every resync (the
	// recorder's spam filter allows 25 Warning Events per object, then one per 5
	// minutes, so repeats would hide the Event of the next bad edit or of a reset).
	refused string
	// recorder posts Events on the Secret (nil outside Run).
	recorder record.EventRecorder
	// lagSince is the last Step's Result.LagSince: since when each lagging node has lagged
	// (the ack timeout counts from it; lost on a leader change, so a new leader's wait
	// starts afresh). excluded are the nodes the last Step excluded, so that a node's
	// exclusion is announced once, when it begins.
	lagSince map[string]time.Time
	// shadow runs protocol v2's readiness on the reports' digests, deciding nothing
	// (docs/protocol-v2.md §9 step 1).
	shadow *shadowReadiness
	// views writes the shadow's views as NodeViews (nil without Options.Dynamic).
	views    *viewWriter
	excluded map[string]bool
	// pubWritten is the public ring last written or read back at pubChecked; access the
	// agents' Secret access last set ("granted", "revoked", "unmanaged") at accessChecked
	// (access.go).
	pubWritten    string
	pubChecked    time.Time
	pubForbidden  bool
	access        string
	accessWhy     string
	accessChecked time.Time
}

const queueKey = "ring"

// NewController builds a controller; opts must have passed through Run's defaults or be
// complete.
func NewController(client kubernetes.Interface, opts Options) *Controller {
	_ = opts.defaults()
	return &Controller{client: client, opts: opts, log: opts.Logger.With("identity", opts.Identity), shadow: newShadowReadiness(),
		idsUnknown: map[string]time.Time{}, tableWhy: "unset"}
}

// Run starts the informers and the worker and blocks until ctx is done.
func (c *Controller) Run(ctx context.Context) error {
	c.queue = workqueue.NewTypedRateLimitingQueueWithConfig(
		workqueue.NewTypedItemExponentialFailureRateLimiter[string](200*time.Millisecond, 30*time.Second),
		workqueue.TypedRateLimitingQueueConfig[string]{Name: "secureoverlay-master"})
	defer c.queue.ShutDown()
	enqueue := func(any) { c.queue.Add(queueKey) }
	handler := cache.ResourceEventHandlerFuncs{AddFunc: enqueue, DeleteFunc: enqueue,
		UpdateFunc: func(_, _ any) { c.queue.Add(queueKey) }}

	nodeFactory := informers.NewSharedInformerFactoryWithOptions(c.client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = c.opts.NodeSelector }))
	nodeInf := nodeFactory.Core().V1().Nodes()
	if err := nodeInf.Informer().SetTransform(trimNode); err != nil {
		return fmt.Errorf("watch nodes: %w", err)
	}
	if _, err := nodeInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: enqueue,
		DeleteFunc: func(obj any) {
			if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = t.Obj
			}
			if n, ok := obj.(*corev1.Node); ok && c.reports != nil {
				c.reports.Forget(n.Name)
				c.statuses.Forget(n.Name)
			}
			c.queue.Add(queueKey)
		},
		UpdateFunc: func(o, n any) {
			if nodeChanged(o, n) {
				c.queue.Add(queueKey)
			}
		},
	}); err != nil {
		return fmt.Errorf("watch nodes: %w", err)
	}
	byName := func(name string) informers.SharedInformerOption {
		return informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", name).String()
		})
	}
	secretFactory := informers.NewSharedInformerFactoryWithOptions(c.client, 0,
		informers.WithNamespace(c.opts.Namespace), byName(api.SecretName))
	secretInf := secretFactory.Core().V1().Secrets()
	if _, err := secretInf.Informer().AddEventHandler(handler); err != nil {
		return fmt.Errorf("watch secret %s/%s: %w", c.opts.Namespace, api.SecretName, err)
	}
	configFactory := informers.NewSharedInformerFactoryWithOptions(c.client, 0,
		informers.WithNamespace(c.opts.Namespace), byName(api.ConfigMapName))
	configInf := configFactory.Core().V1().ConfigMaps()
	if _, err := configInf.Informer().AddEventHandler(handler); err != nil {
		return fmt.Errorf("watch configmap %s/%s: %w", c.opts.Namespace, api.ConfigMapName, err)
	}
	c.nodes, c.configs = nodeInf.Lister(), configInf.Lister()
	synced := []cache.InformerSynced{nodeInf.Informer().HasSynced, secretInf.Informer().HasSynced, configInf.Informer().HasSynced}
	if c.opts.Dynamic != nil {
		// The agents' NodeReports and NodeStatuses, each trimmed like a report annotation
		// (trimNode).
		reportCache := func(gvr schema.GroupVersionResource) *nodereport.Cache[string] {
			return nodereport.NewCache(nodereport.CacheConfig[string]{
				Dynamic: c.opts.Dynamic, Namespace: c.opts.Namespace, GVR: gvr,
				Convert: func(_, raw string) string { return api.TrimReport(raw, "") },
				NodeExists: func(name string) bool {
					_, ok, err := nodeInf.Informer().GetStore().GetByKey(name)
					return err == nil && ok
				},
				OnChange: func(_ string, before, after *nodereport.Entry[string]) {
					if before == nil || after == nil || before.Value != after.Value {
						c.queue.Add(queueKey)
					}
				},
			})
		}
		c.reports, c.statuses = reportCache(nodereport.GVR), reportCache(nodereport.StatusGVR)
		c.reports.Start(ctx.Done())
		c.statuses.Start(ctx.Done())
		synced = append(synced, c.reports.HasSynced, c.statusesSynced)
		c.views = newViewWriter(c.opts.Dynamic, c.opts.Namespace, c.log, c.opts.Metrics)
		go c.views.run(ctx)
		// Read whatever --protocol-v2 says: the key incarnations in the readiness views
		// follow the agents' rule, which reads NodeKeys (docs/keys.md §3).
		c.pubKeys = nodekeys.NewCache(c.opts.Dynamic, c.opts.Namespace, func(string) { c.queue.Add(queueKey) })
		c.pubKeys.Start(ctx.Done())
		c.shadow.keysOf = func(node string) *nodekeys.Keys {
			k, ok, err := c.pubKeys.Get(node)
			if !ok || err != nil {
				return nil
			}
			return &k
		}
		// Never waited for: while its CRD is missing (an older manifest) the ring alone
		// carries the table, as it always does today.
		c.ids = nodeid.NewCache(c.opts.Dynamic, c.opts.Namespace, func(string) { c.queue.Add(queueKey) })
		c.ids.OnMissing(func(err error) {
			c.idsWarn.Do(func() {
				c.log.Warn("the NodeIDs cannot be listed (the manifest predates them, or RBAC lacks nodeids: apply the manifest); the key ring alone carries the node table", "error", err)
			})
		})
		c.ids.Start(ctx.Done())
		if c.opts.Policy.ProtocolV2 {
			c.rows = noderow.NewCache(c.opts.Dynamic, c.opts.Namespace, func(string) { c.queue.Add(queueKey) })
			c.rows.OnMissing(func(err error) {
				c.rowsWarn.Do(func() {
					c.log.Warn("the agents' NodeRows cannot be listed (the manifest predates them, or RBAC lacks noderows: apply the manifest); every NodeView is written", "error", err)
				})
			})
			c.rows.Start(ctx.Done())
		}
	}

	broadcaster := record.NewBroadcaster(record.WithContext(ctx))
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: c.client.CoreV1().Events(c.opts.Namespace)})
	defer broadcaster.Shutdown()
	c.recorder = broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "secureoverlay-master", Host: c.opts.Identity})

	for _, f := range []informers.SharedInformerFactory{nodeFactory, secretFactory, configFactory} {
		f.Start(ctx.Done())
		defer f.Shutdown()
	}
	if !cache.WaitForCacheSync(ctx.Done(), synced...) {
		return nil // ctx done before the caches synced
	}
	c.log.Info("caches synced, reconciling")

	go func() {
		t := time.NewTicker(c.opts.Resync)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				c.queue.ShutDown()
				return
			case <-t.C:
				c.queue.Add(queueKey)
			}
		}
	}()
	c.queue.Add(queueKey)
	for c.processNext(ctx) {
	}
	return nil
}

func (c *Controller) processNext(ctx context.Context) bool {
	key, quit := c.queue.Get()
	if quit {
		return false
	}
	defer c.queue.Done(key)
	if ctx.Err() != nil {
		return false
	}
	wake, err := c.Reconcile(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return false
		}
		c.opts.Metrics.ReconcileErrors.Inc()
		c.log.Error("reconcile failed, retrying", "err", err)
		c.queue.AddRateLimited(key)
		return true
	}
	c.queue.Forget(key)
	if !wake.IsZero() {
		c.queue.AddAfter(key, wake.Sub(c.opts.Now())+10*time.Millisecond)
	}
	return true
}

// trimNode is the Node informer's transform: the master reads no per-peer claim of a
// report (each lists every node: cached whole, 5,000 reports of ≈235 KiB would be ≈1 GiB),
// no managed fields and no image list.
func trimNode(obj any) (any, error) {
	n, ok := obj.(*corev1.Node)
	if !ok {
		return obj, nil // a DeletedFinalStateUnknown tombstone
	}
	n.ManagedFields = nil
	n.Status.Images = nil
	if raw, ok := n.Annotations[api.ReportAnnotation]; ok {
		n.Annotations = maps.Clone(n.Annotations)
		n.Annotations[api.ReportAnnotation] = api.TrimReport(raw, "")
	}
	return n, nil
}

// statusesSynced is whether the NodeStatus cache has synced, or cannot (its CRD is not
// served or RBAC lacks nodestatuses: an older manifest): the master then starts with the
// NodeReports alone, and says so once.
func (c *Controller) statusesSynced() bool {
	if c.statuses.HasSynced() {
		return true
	}
	err := c.statuses.Err()
	if err != nil {
		c.statusesWarn.Do(func() {
			c.log.Warn("the agents' NodeStatuses cannot be listed (the manifest predates them, or RBAC lacks nodestatuses: apply the manifest); reading their NodeReports only", "error", err)
		})
	}
	return err != nil
}

// nodeState is n's state with its report: the later of its NodeReport's and its
// NodeStatus's (nodereport.PickObject), unless the annotation was written later
// (nodereport.Pick), else the annotation's (an agent of 0.1).
func (c *Controller) nodeState(n *corev1.Node) keys.NodeState {
	s := NodeState(n)
	if c.reports != nil {
		rep, okR := c.reports.Get(n.Name)
		st, okS := c.statuses.Get(n.Name)
		if okR || okS {
			kind, obj := nodereport.Kind, nodereport.PickObject(rep.Value, st.Value)
			if okS && obj == st.Value {
				kind = nodereport.StatusKind
			}
			if raw, isObj := nodereport.Pick(n.Annotations[api.ReportAnnotation], obj); isObj {
				s = nodeState(n, raw, true, kind+" "+c.opts.Namespace+"/"+n.Name)
			}
		}
	}
	if c.pubKeys != nil && s.Report != nil {
		s.Published = published(c.pubKeys, n.Name, s.Report)
	}
	return s
}

// published lists the generations node publishes keys for in a NodeKeys of the key
// incarnation of its report rep (nil for none, another incarnation's, or one that does not
// parse).
func published(kc *nodekeys.Cache, node string, rep *api.NodeReport) []uint32 {
	k, ok, err := kc.Get(node)
	if !ok || err != nil || k.Incarnation != (nodekeys.Incarnation{BootID: rep.Incarnation, UID: rep.UID, Epoch: rep.Epoch}) {
		return nil
	}
	out := make([]uint32, 0, len(k.Keys))
	for _, e := range k.Keys {
		out = append(out, e.Generation)
	}
	return out
}

// nodeChanged reports whether an update touches anything the master reads.
func nodeChanged(o, n any) bool {
	on, ok1 := o.(*corev1.Node)
	nn, ok2 := n.(*corev1.Node)
	if !ok1 || !ok2 {
		return true
	}
	if on.Annotations[api.ReportAnnotation] != nn.Annotations[api.ReportAnnotation] ||
		on.Status.NodeInfo.BootID != nn.Status.NodeInfo.BootID {
		return true
	}
	or, ot := readyCondition(on)
	nr, nt := readyCondition(nn)
	return or != nr || !ot.Equal(nt)
}

func readyCondition(n *corev1.Node) (bool, time.Time) {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue, c.LastTransitionTime.Time
		}
	}
	return false, n.CreationTimestamp.Time
}

// NodeState converts a Node into the state machine's view of it, with the report of its
// annotation.
func NodeState(n *corev1.Node) keys.NodeState {
	raw, ok := n.Annotations[api.ReportAnnotation]
	return nodeState(n, raw, ok, "annotation "+api.ReportAnnotation)
}

// nodeState converts a Node with its report raw (has: there is one; where says where it
// was read from) into the state machine's view of it.
func nodeState(n *corev1.Node, raw string, has bool, where string) keys.NodeState {
	ready, since := readyCondition(n)
	s := keys.NodeState{Name: n.Name, Ready: ready, BootID: n.Status.NodeInfo.BootID}
	if !ready {
		s.NotReadySince = since
	}
	if has {
		var rep api.NodeReport
		if err := json.Unmarshal([]byte(raw), &rep); err != nil {
			s.ReportError = where + " is not a JSON NodeReport"
		} else if !rep.Mode.Valid() {
			s.ReportError = fmt.Sprintf("report mode (%d bytes) is not one of off, accept, encrypt, enforce", len(rep.Mode))
		} else {
			s.Report = &rep
		}
	}
	return s
}

// desired reads the operator's ConfigMap: the target mode (cur when the ConfigMap or its
// keys are absent, so deleting it never disables encryption by accident) and the rotate
// request.
func desired(cm *corev1.ConfigMap, cur api.Mode) (api.Mode, string, error) {
	if cm == nil {
		return cur, "", nil
	}
	req := cm.Annotations[api.RotateRequestAnnotation]
	if m, ok := cm.Data[api.ConfigModeKey]; ok && strings.TrimSpace(m) != "" {
		mode := api.Mode(strings.TrimSpace(m))
		if !mode.Valid() {
			// The value is not echoed: whatever an operator pasted there (even a key by
			// mistake) would reach the status ConfigMap that anyone may read.
			return cur, req, fmt.Errorf("configmap %s: %s (%d bytes) is not one of off, accept, encrypt, enforce", cm.Name, api.ConfigModeKey, len(m))
		}
		return mode, req, nil
	}
	if v, ok := cm.Data[api.ConfigEnabledKey]; ok {
		on, err := strconv.ParseBool(strings.TrimSpace(v))
		if err != nil {
			return cur, req, fmt.Errorf("configmap %s: %s (%d bytes) is not true or false", cm.Name, api.ConfigEnabledKey, len(v))
		}
		if on {
			return api.ModeEnforce, req, nil
		}
		return api.ModeOff, req, nil
	}
	return cur, req, nil
}

// Reconcile runs one full reconcile and returns when the next timed transition is due.
func (c *Controller) Reconcile(ctx context.Context) (time.Time, error) {
	ns := c.opts.Namespace
	m := c.opts.Metrics
	secrets := c.client.CoreV1().Secrets(ns)
	secret, err := secrets.Get(ctx, api.SecretName, metav1.GetOptions{})
	exists := true
	switch {
	case apierrors.IsNotFound(err):
		exists, secret = false, nil
	case err != nil:
		return time.Time{}, fmt.Errorf("get secret %s/%s: %w", ns, api.SecretName, err)
	}

	nodeList, err := c.nodes.List(labels.Everything())
	if err != nil {
		return time.Time{}, fmt.Errorf("list nodes: %w", err)
	}
	var nodes []keys.NodeState
	for _, n := range nodeList {
		nodes = append(nodes, c.nodeState(n))
	}
	hist := c.knownHistory(ctx, nodes)

	var ring *keys.Ring
	var problems []string
	reset := false
	hasData := false
	if exists {
		_, hasData = secret.Data[api.SecretDataKey]
	}
	if exists && !hasData {
		// Created without data (e.g. by a manifest, to carry labels): nothing to lose.
		ring, reset = c.lastGood, true
		c.log.Warn("key ring secret has no data key, initializing it", "secret", ns+"/"+api.SecretName, "key", api.SecretDataKey, "ring", keys.Summary(ring))
	} else if exists {
		ring, err = keys.Parse(secret.Data[api.SecretDataKey])
		if err == nil && ring.Sealed() {
			// A sealed generation belongs to the public ring only: the Secret holds roots.
			ring, err = nil, fmt.Errorf("%w: a generation is sealed (the public ring's form; the Secret holds roots)", keys.ErrInvalid)
		}
		backwards := false
		if err == nil {
			if herr := hist.Check(ring); herr != nil {
				err, backwards = herr, true
			}
		}
		if err == nil {
			if _, ok := secret.Annotations[api.ResetRingAnnotation]; ok {
				reset = true // consent is for one reset: drop the annotation from a valid ring
			}
		} else {
			m.RingValid.Set(0)
			reason, what := "InvalidKeyRing", "refusing invalid key ring"
			if backwards {
				reason, what = "KeyRingWentBackwards", "refusing a key ring older than one already used"
			}
			if _, ok := secret.Annotations[api.ResetRingAnnotation]; !ok {
				m.RingErrors.Inc()
				msg := fmt.Sprintf("secret %s/%s key %q: %v; refusing to use or overwrite it (last good ring: %s); fix the data or set annotation %s on the secret to let the master overwrite it",
					ns, api.SecretName, api.SecretDataKey, err, keys.Summary(c.lastGood), api.ResetRingAnnotation)
				c.log.Error(what, "secret", ns+"/"+api.SecretName, "err", err, "lastGood", keys.Summary(c.lastGood))
				if key := secret.ResourceVersion + "\x00" + msg; key != c.refused {
					c.event(secret, corev1.EventTypeWarning, reason, msg)
					c.refused = key
				}
				c.publish(ctx, c.status(c.lastGood, nil, msg))
				return time.Time{}, nil // nothing to retry until the Secret changes
			}
			reset = true
			ring = c.lastGood
			c.log.Warn("overwriting invalid key ring at the operator's request", "secret", ns+"/"+api.SecretName,
				"annotation", api.ResetRingAnnotation, "err", err, "replacement", keys.Summary(ring))
			c.event(secret, corev1.EventTypeWarning, "KeyRingReset", fmt.Sprintf("overwriting invalid key ring as %s asks, with %s", api.ResetRingAnnotation, keys.Summary(ring)))
		}
	} else if c.lastGood != nil {
		ring = c.lastGood
		c.log.Warn("key ring secret is missing, recreating it from the last good ring", "secret", ns+"/"+api.SecretName, "ring", keys.Summary(ring))
	}
	if ring == nil && hist.High > 0 {
		// A new ring (Secret deleted or reset without a last good ring here) continues
		// the numbering: no generation number, and so no SPI generation field of a key
		// already used, comes back; agents would refuse a ring that restarts at 0.
		ring = keys.NewRing()
		ring.LastGeneration = hist.High
		c.log.Warn("starting a new key ring after the generations already used", "lastGeneration", hist.High)
	}
	m.RingValid.Set(1)

	var cm *corev1.ConfigMap
	if got, err := c.configs.ConfigMaps(ns).Get(api.ConfigMapName); err == nil {
		cm = got
	} else if !apierrors.IsNotFound(err) {
		return time.Time{}, fmt.Errorf("read configmap %s/%s: %w", ns, api.ConfigMapName, err)
	}
	cur := api.ModeOff
	if ring != nil {
		cur = ring.Target
	}
	target, req, err := desired(cm, cur)
	if err != nil {
		problems = append(problems, err.Error())
	}

	next := hist.High + 1 // the number the next generation takes (keys.Step's newGen)
	if ring != nil {
		next = ring.LastGeneration + 1
	}
	publishing := 0
	for _, n := range nodes {
		if slices.Contains(n.Published, next) {
			publishing++
		}
	}
	m.NextGenPublishing.Set(float64(publishing))
	res, err := keys.Step(keys.Input{Ring: ring, Nodes: nodes, Target: target, RotateRequest: req,
		Now: c.opts.Now(), Config: c.opts.Policy, Rand: c.opts.Rand, LagSince: c.lagSince})
	if err != nil {
		return time.Time{}, fmt.Errorf("step key ring: %w", err)
	}
	c.lagSince = res.LagSince
	// The agents may read the Secret while the ring has a v1 generation or an agent reads
	// nothing else: granted before such a ring is written, revoked only after the public
	// ring holds every generation (docs/keys.md §11).
	older := c.olderAgents(nodes)
	needSecret := res.Ring.HasRoots() || len(older) > 0
	why := "no v1 generation is live and every agent reads the public ring"
	if needSecret {
		why = "a v1 generation is live"
		if len(older) > 0 {
			why = fmt.Sprintf("agents that read only the Secret: %d (node %s first)", len(older), older[0])
		}
		if err := c.agentKeyAccess(ctx, true, why); err != nil {
			return time.Time{}, fmt.Errorf("grant the agents read access to the key secret: %w", err)
		}
	}
	if res.Changed || !exists || reset {
		written, err := c.write(ctx, secret, res.Ring, reset)
		if err != nil {
			return time.Time{}, err
		}
		secret = written
		for _, a := range res.Actions {
			c.log.Info(a.String(), "action", string(a.Kind))
			switch a.Kind {
			case keys.ActionGenerationCreated, keys.ActionGenerationActive, keys.ActionGenerationRemoved, keys.ActionModeChanged:
				c.event(secret, corev1.EventTypeNormal, eventReason(a.Kind), a.String())
			}
			if a.Kind == keys.ActionGenerationCreated {
				m.Rotations.WithLabelValues(a.Reason).Inc()
			}
		}
	}
	more, idsEqual := c.writeNodeIDs(ctx, res.Ring)
	if more {
		c.queue.AddAfter(queueKey, nodeIDBatchPause)
	}
	digest, keep := c.publicTable(res.Ring, nodes, idsEqual)
	if err := c.writePublic(ctx, res.Ring, digest, keep); err != nil {
		return time.Time{}, err
	}
	if !needSecret {
		if err := c.agentKeyAccess(ctx, false, why); err != nil {
			c.log.Warn("cannot revoke the agents' read access to the key secret; retrying at the next reconcile", "err", err)
		}
	}
	c.lastGood = res.Ring
	c.hist = hist.Observe(res.Ring)
	c.announceExcluded(secret, res.Excluded)
	m.observe(res)
	sh := c.shadow.update(res.Ring, nodeList, nodes)
	m.observeShadow(sh)
	if c.rows != nil {
		m.ShadowNodes.WithLabelValues("row").Set(float64(c.shadow.currentRows(c.rowOf)))
	}
	if c.views != nil {
		for _, g := range sh.Gone {
			c.views.Forget(g)
		}
		// Once every reporting agent publishes its readiness row, a view is written only
		// when it gives its agent a pair neither the view it holds nor the peer's row does
		// (docs/protocol-v2.md §9 step 3).
		rows := c.rows != nil && c.rows.HasSynced() && len(c.agentsLacking(nodes, api.CapabilityReadinessRows)) == 0
		for _, v := range sh.Views {
			var needed func(*readiness.View) bool
			if rows {
				needed = func(held *readiness.View) bool { return c.shadow.needsView(v.ID, held, v.View, c.rowOf) }
			}
			c.views.SetNeeded(v.Node, v.UID, v.View, func(held *readiness.View) int { return c.shadow.gain(v.ID, held, v.View) }, needed)
		}
		if rows {
			ids := c.shadow.ids()
			c.views.Recheck(func(node string, held *readiness.View, want readiness.View) bool {
				id, ok := ids[node]
				return !ok || c.shadow.needsView(id, held, want, c.rowOf)
			})
		}
	}
	c.publish(ctx, c.status(res.Ring, &res, strings.Join(problems, "; ")))
	return res.Wake, nil
}

// rowOf is node's readiness row as the API holds it (nil: none, or it does not parse).
func (c *Controller) rowOf(node string) *readiness.Status {
	if r, ok, err := c.rows.Get(node); ok && err == nil {
		return &r
	}
	return nil
}

// knownHistory is the key ring history to check the Secret against: the rings this
// controller accepted, the watermarks its predecessors published in the status (read back
// once), and the generation more than half of the nodes report having installed
// (keys.ReportedHigh: a Secret and status restored together from one backup are still
// caught while the nodes remember, and no single node can block the cluster).
func (c *Controller) knownHistory(ctx context.Context, nodes []keys.NodeState) keys.History {
	if !c.histLoaded {
		cm, err := c.client.CoreV1().ConfigMaps(c.opts.Namespace).Get(ctx, api.StatusConfigMapName, metav1.GetOptions{})
		switch {
		case err == nil:
			var st api.MasterStatus
			if jerr := json.Unmarshal([]byte(cm.Data[api.StatusDataKey]), &st); jerr == nil {
				c.hist = c.hist.Merge(keys.History{High: st.LastGeneration, Floor: st.GenerationFloor})
			}
			c.histLoaded = true
		case apierrors.IsNotFound(err):
			c.histLoaded = true
		default:
			c.log.Warn("cannot read the published status for the key ring history; retrying", "err", err)
		}
	}
	h := c.hist
	h.High = max(h.High, keys.ReportedHigh(nodes))
	return h
}

// write stores ring in the Secret read as old (nil: create), conditioned on old's
// resourceVersion.
func (c *Controller) write(ctx context.Context, old *corev1.Secret, ring *keys.Ring, reset bool) (*corev1.Secret, error) {
	ns := c.opts.Namespace
	data, err := keys.Marshal(ring)
	if err != nil {
		return nil, fmt.Errorf("encode key ring for secret %s/%s: %w", ns, api.SecretName, err)
	}
	secrets := c.client.CoreV1().Secrets(ns)
	if old == nil {
		s := &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Name: api.SecretName, Namespace: ns,
				Labels: map[string]string{"app.kubernetes.io/name": "secureoverlay", "app.kubernetes.io/component": "keys"}},
			Type: corev1.SecretTypeOpaque,
			Data: map[string][]byte{api.SecretDataKey: data},
		}
		created, err := secrets.Create(ctx, s, metav1.CreateOptions{})
		if err != nil {
			return nil, fmt.Errorf("create secret %s/%s: %w", ns, api.SecretName, err)
		}
		return created, nil
	}
	s := old.DeepCopy()
	if s.Data == nil {
		s.Data = map[string][]byte{}
	}
	s.Data[api.SecretDataKey] = data
	if reset {
		delete(s.Annotations, api.ResetRingAnnotation)
	}
	// s.ResourceVersion is the version we parsed: a concurrent writer makes this fail.
	updated, err := secrets.Update(ctx, s, metav1.UpdateOptions{})
	if err != nil {
		return nil, fmt.Errorf("update secret %s/%s at resourceVersion %s: %w", ns, api.SecretName, old.ResourceVersion, err)
	}
	return updated, nil
}

// announceExcluded logs and posts a Warning Event (NodeExcluded) for every node that
// became excluded since the last Step, and logs every node that is no longer.
func (c *Controller) announceExcluded(secret *corev1.Secret, excluded []keys.Lag) {
	now := make(map[string]bool, len(excluded))
	for _, l := range excluded {
		now[l.Node] = true
		if !c.excluded[l.Node] {
			msg := fmt.Sprintf("node %s no longer holds rotation or cutover: %s", l.Node, l.Reason)
			c.log.Warn(msg, "node", l.Node)
			c.event(secret, corev1.EventTypeWarning, "NodeExcluded", msg)
		}
	}
	for n := range c.excluded {
		if !now[n] {
			c.log.Info("node holds rotation and cutover again (caught up, Ready again or gone)", "node", n)
		}
	}
	c.excluded = now
}

// event posts an Event on the Secret (if it exists and events are enabled). Messages
// never contain key material: they come from keys.Action and sanitized errors.
func (c *Controller) event(secret *corev1.Secret, typ, reason, msg string) {
	if c.recorder == nil || secret == nil {
		return
	}
	c.recorder.Event(secret, typ, reason, msg)
}

func eventReason(k keys.ActionKind) string {
	switch k {
	case keys.ActionGenerationCreated:
		return "GenerationCreated"
	case keys.ActionGenerationActive:
		return "GenerationActivated"
	case keys.ActionGenerationRemoved:
		return "GenerationRemoved"
	case keys.ActionModeChanged:
		return "ModeChanged"
	}
	return string(k)
}

// status builds the published view; res may be nil (when the ring was refused).
func (c *Controller) status(ring *keys.Ring, res *keys.Result, lastError string) api.MasterStatus {
	st := api.MasterStatus{Leader: c.opts.Identity, LastError: lastError, Generations: []api.GenerationStatus{},
		LastGeneration: c.hist.High, GenerationFloor: c.hist.Floor}
	if ring != nil {
		st.Mode, st.Target, st.LastRotateRequest, st.Nodes = ring.Mode, ring.Target, ring.LastRotateRequest, len(ring.Nodes)
		for _, g := range ring.Generations {
			st.Generations = append(st.Generations, api.GenerationStatus{Number: g.Number, State: string(g.State),
				Cipher: string(g.Cipher), Reason: g.Reason, Created: g.Created, Activated: g.Activated, Retiring: g.Retiring})
			switch g.State {
			case keys.StateActive:
				st.ActiveGeneration = g.Number
			case keys.StatePending:
				st.PendingGeneration = g.Number
			}
		}
	}
	st.AgentSecretAccess, st.AgentSecretAccessWhy = c.access, c.accessWhy
	switch c.tableWhy {
	case "unset":
	case "":
		st.NodeTable = api.NodeTableIDs
	default:
		st.NodeTable, st.NodeTableWhy = api.NodeTableRing, c.tableWhy
	}
	if res != nil {
		st.RotationInProgress, st.Waiting, st.Deferred = res.RotationInProgress, res.Waiting, res.Deferred
		for _, l := range res.Lagging {
			st.Lagging = append(st.Lagging, api.NodeLagging{Node: l.Node, Reason: l.Reason})
		}
		for _, l := range res.Excluded {
			st.Excluded = append(st.Excluded, api.NodeLagging{Node: l.Node, Reason: l.Reason})
		}
	}
	return st
}

// publish writes the status ConfigMap when its content changed. Failures are logged, not
// returned: the status is a view, the ring is what matters.
func (c *Controller) publish(ctx context.Context, st api.MasterStatus) {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		c.log.Error("encode status", "err", err)
		return
	}
	if string(b) == c.lastStatus {
		return
	}
	ns := c.opts.Namespace
	cms := c.client.CoreV1().ConfigMaps(ns)
	cm := &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: api.StatusConfigMapName, Namespace: ns,
			Labels: map[string]string{"app.kubernetes.io/name": "secureoverlay", "app.kubernetes.io/component": "master"}},
		Data: map[string]string{api.StatusDataKey: string(b)},
	}
	// An update without resourceVersion is unconditional: only the leader writes here.
	_, err = cms.Update(ctx, cm, metav1.UpdateOptions{})
	if apierrors.IsNotFound(err) {
		_, err = cms.Create(ctx, cm, metav1.CreateOptions{})
	}
	if err != nil {
		c.log.Error("publish status", "configmap", ns+"/"+api.StatusConfigMapName, "err", err)
		return
	}
	c.lastStatus = string(b)
}

// LastGood returns the last ring this controller read or wrote successfully (nil if none).
func (c *Controller) LastGood() *keys.Ring { return c.lastGood }
