// Package nodereport is where an agent publishes its report: a NodeReport object
// (secureoverlay.io/v1alpha1, namespaced in the agents' namespace, named after the Node)
// instead of an annotation on the Node (docs/keys.md §6; docs/protocol-v2.md
// §8). The object lives and dies with the installation: `kubectl delete -f` deletes the
// namespace and the CRD, and with them every report, so no Node keeps a stale one (issue
// 15's second defect). An ownerReference to the Node lets the garbage collector delete
// the report of a Node that is deleted.
//
// The report is kept as one JSON string (field Field), the same JSON api.NodeReport
// annotation readers parse: one parser, and one managed-fields entry per object instead
// of one per peer (the report lists every peer; as a structured field, server-side field
// tracking would double its size). Field "mode" repeats the report's mode for `kubectl get
// nodereports`' MODE column only; readers use the report.
//
// Annotation SummaryAnnotation repeats the report without its per-peer claims
// (api.TrimReport(report, "")), written in the same request as the report. The claims list
// every peer (≈0.5 MB per report at 5,000 nodes with long names); a reader that needs no
// claims (`secureoverlayctl status`, doctor, mtu, --wait) lists the objects' metadata only
// and reads the summaries: kilobytes per node instead of the whole reports (docs/cli.md,
// docs/performance.md §8). A NodeReport without it (written by an agent predating it) is
// read whole.
//
// Readers (agents, master, CLI) take a node's report from its NodeReport when there is
// one, else from the Node's annotation (an agent of the previous version, during a rolling
// update); when both exist the one with the later lastSync wins (Pick). An agent writes
// the annotation too while any live node still reads only annotations (Legacy), and
// removes it from its own Node once none does.
//
// NodeStatus (StatusGVR) is the same object under another kind, for the readers that are
// not agents: the master and the CLI read it beside the NodeReport and take the later of
// the two (PickObject), agents do not watch it. It exists so that agents can stop writing
// the NodeReport every agent watches (docs/protocol-v2.md §9 step 5: every report write
// goes to every agent, N² per cluster-wide step): once no live peer reads NodeReports, an
// agent writes its NodeStatus only and leaves a NodeReport marked superseded
// (api.NodeReport.Superseded, SupersededAnnotation), which PickObject takes as none.
package nodereport

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/internal/upsert"
)

// The NodeReport API (manifests/secureoverlay.yaml, CRD nodereports.secureoverlay.io).
const (
	Group    = "secureoverlay.io"
	Version  = "v1alpha1"
	Resource = "nodereports"
	Kind     = "NodeReport"
	// Field holds the report: the JSON of the agent's report (watch.Report).
	Field = "report"
	// ModeField repeats the report's mode for kubectl's MODE column.
	ModeField = "mode"
	// FieldManager is the agents' field manager.
	FieldManager = "secureoverlay-agent"
	// SummaryAnnotation holds the report without its per-peer claims (Summary).
	SummaryAnnotation = "secureoverlay.io/report-summary"
	// SupersededAnnotation ("true") marks a NodeReport whose report is superseded
	// (api.NodeReport.Superseded), so that readers listing metadata only (the CLI) skip it
	// without reading it whole.
	SupersededAnnotation = "secureoverlay.io/superseded"
)

// GVR is the NodeReport resource.
var GVR = schema.GroupVersionResource{Group: Group, Version: Version, Resource: Resource}

// ListKind is NodeReport's list kind (for fake dynamic clients in unit tests).
const ListKind = "NodeReportList"

// The NodeStatus API (CRD nodestatuses.secureoverlay.io): a NodeReport's fields under a
// kind only the master and the CLI read.
const (
	StatusResource = "nodestatuses"
	StatusKind     = "NodeStatus"
	StatusListKind = "NodeStatusList"
)

// StatusGVR is the NodeStatus resource.
var StatusGVR = schema.GroupVersionResource{Group: Group, Version: Version, Resource: StatusResource}

// Object is node's NodeReport in namespace ns holding report raw (JSON) of mode mode,
// owned by the Node (uid nodeUID: the garbage collector deletes it with the Node; "" for no
// owner).
//
// A report without per-peer claims (its agent omits the lists, docs/protocol-v2.md §9
// step 4) is its own summary: the object carries no summary annotation (null in the
// merge patch, so an earlier one goes) and readers read it whole, ≈ 2 KiB.
func Object(ns, node, nodeUID, mode string, raw []byte) *unstructured.Unstructured {
	return object(Kind, ns, node, nodeUID, mode, raw)
}

// StatusObject is Object as a NodeStatus.
func StatusObject(ns, node, nodeUID, mode string, raw []byte) *unstructured.Unstructured {
	return object(StatusKind, ns, node, nodeUID, mode, raw)
}

func object(kind, ns, node, nodeUID, mode string, raw []byte) *unstructured.Unstructured {
	u := upsert.NodeObject(Group+"/"+Version, kind, ns, node, nodeUID, map[string]any{Field: string(raw), ModeField: mode})
	var summary any = Summary(string(raw))
	if !hasClaims(raw) {
		summary = nil
	}
	var sup any
	if superseded(string(raw)) {
		sup = "true"
	}
	// nil values remove an earlier annotation in the merge patch.
	u.Object["metadata"].(map[string]any)["annotations"] = map[string]any{SummaryAnnotation: summary, SupersededAnnotation: sup}
	return u
}

// hasClaims reports whether report raw has a per-peer list (or does not parse: then the
// summary, raw itself, is kept as before).
func hasClaims(raw []byte) bool {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil {
		return true
	}
	_, in := fields["inboundFrom"]
	_, out := fields["encryptingTo"]
	return in || out
}

// Raw is the report JSON a NodeReport object holds ("" when it has none).
func Raw(u *unstructured.Unstructured) string {
	s, _, _ := unstructured.NestedString(u.Object, Field)
	return s
}

// Summary is what SummaryAnnotation holds for report raw: raw without its per-peer
// claims (api.TrimReport with no peer kept).
func Summary(raw string) string {
	return api.TrimReport(raw, "")
}

// writeTimeout bounds one write. The caller's context bounds it too: the agent's report
// writer passes one that outlives the agent's own shutdown (a sync that changed the kernel
// finishes advertising it) and ends a bounded time after it.
const writeTimeout = 10 * time.Second

// Write stores node's report: a JSON merge patch of the report, its summary, its mode and
// its owner in one request (no resourceVersion: the agent on node is the object's only
// writer — the admission policy holds every other agent off it — so the last write is the
// truth), or a create when there is no object yet.
func Write(ctx context.Context, dc dynamic.Interface, ns, node, nodeUID, mode string, raw []byte) error {
	return upsert.WriteNodeObject(ctx, dc, GVR, Object(ns, node, nodeUID, mode, raw), FieldManager, writeTimeout)
}

// WriteStatus is Write to node's NodeStatus.
func WriteStatus(ctx context.Context, dc dynamic.Interface, ns, node, nodeUID, mode string, raw []byte) error {
	return upsert.WriteNodeObject(ctx, dc, StatusGVR, StatusObject(ns, node, nodeUID, mode, raw), FieldManager, writeTimeout)
}

// PickObject chooses between a node's NodeReport and its NodeStatus (raw JSON each, ""
// when absent): the NodeStatus, unless the NodeReport was written later (an agent rolled
// back to a version that writes only NodeReports leaves a NodeStatus behind). The same
// lastSync (an agent writing both) takes the NodeStatus; the two then hold the same
// report. Reports that do not parse as far as lastSync count as oldest. Readers pick the
// result against the annotation with Pick.
//
// A superseded NodeReport (api.NodeReport.Superseded: its agent writes NodeStatuses now) is
// none: the NodeStatus, or "" when there is none (a NodeStatus deleted by hand must not
// bring the report its agent left behind back).
func PickObject(report, status string) string {
	if superseded(report) {
		return status
	}
	switch {
	case status == "":
		return report
	case report == "":
		return status
	}
	if lastSync(report).After(lastSync(status)) {
		return report
	}
	return status
}

func superseded(raw string) bool {
	var r struct {
		Superseded bool `json:"superseded"`
	}
	return raw != "" && json.Unmarshal([]byte(raw), &r) == nil && r.Superseded
}

// Pick chooses between a node's annotation report and its NodeReport (raw JSON each, ""
// when absent): the object, unless the annotation was written later (by an agent of the
// previous version after a downgrade: its lastSync is newer). Reports that do not parse
// as far as lastSync count as oldest. It returns the chosen raw report and whether it is
// the object's.
func Pick(annotation, object string) (string, bool) {
	switch {
	case object == "":
		return annotation, false
	case annotation == "":
		return object, true
	}
	if lastSync(annotation).After(lastSync(object)) {
		return annotation, false
	}
	return object, true
}

func lastSync(raw string) time.Time {
	var r struct {
		LastSync time.Time `json:"lastSync"`
	}
	if json.Unmarshal([]byte(raw), &r) != nil {
		return time.Time{}
	}
	return r.LastSync
}

// Entry is what a Cache holds of one node's report.
type Entry[T any] struct {
	// Value is Convert of the report's raw JSON.
	Value T
	// Deleted: the object is gone while its Node still exists; Value is its last content.
	Deleted bool
}

// CacheConfig wires a Cache.
type CacheConfig[T any] struct {
	Dynamic   dynamic.Interface
	Namespace string
	// GVR is the kind cached: GVR (the default) or StatusGVR.
	GVR schema.GroupVersionResource
	// Convert turns a node's raw report JSON into what the cache keeps (e.g. trimmed and
	// parsed once per change instead of on every read).
	Convert func(node, raw string) T
	// NodeExists says whether the named Node exists: a deleted report of an existing Node
	// is kept (see Cache).
	NodeExists func(node string) bool
	// OnChange is called after every change with the node's entries before and after
	// (nil when absent). It must be cheap and must not block.
	OnChange func(node string, before, after *Entry[T])
}

// Cache is an informer over the NodeReports (or NodeStatuses) of one namespace, keeping
// each one's Convert.
//
// A report whose object is deleted while its Node exists is kept, marked Deleted, until
// the object returns or Forget: a deleted object changes nothing in the kernel of the node
// that wrote it, and `kubectl delete -f` deletes the namespace (and with it the reports)
// before the agents' SIGTERM starts their walk-down — agents that treated the peers as
// report-less in that window would fail closed and drop traffic (docs/agent.md,
// "Uninstall"). Keeping a claim is never less safe than the claim itself was.
type Cache[T any] struct {
	cfg CacheConfig[T]
	inf cache.SharedIndexInformer
	reg cache.ResourceEventHandlerRegistration // OnChange's: synced once it has seen the list
	f   dynamicinformer.DynamicSharedInformerFactory

	mu      sync.Mutex
	gone    map[string]T
	listErr error // the informer's last list/watch error
}

// cached is what the informer stores instead of the object (a NodeReport is a few hundred
// bytes of metadata around the report).
type cached[T any] struct {
	Namespace, Name, ResourceVersion string
	Value                            T
}

func (c *cached[T]) GetObjectKind() schema.ObjectKind { return schema.EmptyObjectKind }

// DeepCopyObject copies c; Value is shared (never modified).
func (c *cached[T]) DeepCopyObject() runtime.Object { d := *c; return &d }

// GetObjectMeta makes cached a metav1.ObjectMetaAccessor, which the informer's key
// function accepts.
func (c *cached[T]) GetObjectMeta() metav1.Object {
	return &metav1.ObjectMeta{Namespace: c.Namespace, Name: c.Name, ResourceVersion: c.ResourceVersion}
}

// NewCache builds the informer (nothing runs until Start).
func NewCache[T any](cfg CacheConfig[T]) *Cache[T] {
	if cfg.GVR.Empty() {
		cfg.GVR = GVR
	}
	c := &Cache[T]{cfg: cfg, gone: map[string]T{}}
	c.f = dynamicinformer.NewFilteredDynamicSharedInformerFactory(cfg.Dynamic, 0, cfg.Namespace, nil)
	c.inf = c.f.ForResource(cfg.GVR).Informer()
	_ = c.inf.SetTransform(func(obj any) (any, error) {
		u, ok := obj.(*unstructured.Unstructured)
		if !ok {
			return obj, nil
		}
		return &cached[T]{Namespace: u.GetNamespace(), Name: u.GetName(), ResourceVersion: u.GetResourceVersion(), Value: cfg.Convert(u.GetName(), Raw(u))}, nil
	})
	_ = c.inf.SetWatchErrorHandlerWithContext(func(ctx context.Context, r *cache.Reflector, err error) {
		c.mu.Lock()
		c.listErr = err
		c.mu.Unlock()
		cache.DefaultWatchErrorHandler(ctx, r, err)
	})
	c.reg, _ = c.inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) {
			n, ok := obj.(*cached[T])
			if !ok {
				return
			}
			c.mu.Lock()
			old, had := c.gone[n.Name]
			delete(c.gone, n.Name)
			c.mu.Unlock()
			var before *Entry[T]
			if had {
				before = &Entry[T]{Value: old, Deleted: true}
			}
			c.changed(n.Name, before, &Entry[T]{Value: n.Value})
		},
		UpdateFunc: func(o, n any) {
			a, ok1 := o.(*cached[T])
			b, ok2 := n.(*cached[T])
			if ok1 && ok2 {
				c.changed(b.Name, &Entry[T]{Value: a.Value}, &Entry[T]{Value: b.Value})
			}
		},
		DeleteFunc: func(obj any) {
			if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = t.Obj
			}
			n, ok := obj.(*cached[T])
			if !ok {
				return
			}
			var after *Entry[T]
			if cfg.NodeExists == nil || cfg.NodeExists(n.Name) {
				c.mu.Lock()
				c.gone[n.Name] = n.Value
				c.mu.Unlock()
				after = &Entry[T]{Value: n.Value, Deleted: true}
			}
			c.changed(n.Name, &Entry[T]{Value: n.Value}, after)
		},
	})
	return c
}

func (c *Cache[T]) changed(node string, before, after *Entry[T]) {
	if c.cfg.OnChange != nil {
		c.cfg.OnChange(node, before, after)
	}
}

// Start runs the informer until stop is closed.
func (c *Cache[T]) Start(stop <-chan struct{}) { c.f.Start(stop) }

// HasSynced reports whether the first list has been read and handed to OnChange. While
// the CRD is not served it stays false (the informer retries): readers must not act on a
// partial view.
func (c *Cache[T]) HasSynced() bool {
	return c.inf.HasSynced() && (c.reg == nil || c.reg.HasSynced())
}

// Err says why the cache has not synced (its last list error, e.g. the CRD is not
// installed), nil once synced or before the first attempt failed.
func (c *Cache[T]) Err() error {
	if c.HasSynced() {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.listErr == nil {
		return nil
	}
	r := c.cfg.GVR.Resource
	return fmt.Errorf("%s in %s not readable (is the CRD %s.%s installed? apply the manifest): %w", r, c.cfg.Namespace, r, Group, c.listErr)
}

// Get returns node's entry: its object's, or the last one of a deleted object of an
// existing Node.
func (c *Cache[T]) Get(node string) (Entry[T], bool) {
	if obj, ok, err := c.inf.GetStore().GetByKey(c.cfg.Namespace + "/" + node); err == nil && ok {
		if n, ok := obj.(*cached[T]); ok {
			return Entry[T]{Value: n.Value}, true
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if v, ok := c.gone[node]; ok {
		return Entry[T]{Value: v, Deleted: true}, true
	}
	return Entry[T]{}, false
}

// Forget drops what is kept of a deleted report of node (call it when the Node is deleted).
func (c *Cache[T]) Forget(node string) {
	c.mu.Lock()
	delete(c.gone, node)
	c.mu.Unlock()
}

// Read returns node's report as readers take it (Pick between its Node's annotation and
// PickObject of its NodeReport and NodeStatus in ns; "" when it has none). A cluster
// without a kind's CRD reads the others. For tools and tests that read one node at a time;
// agents and master use a Cache.
func Read(ctx context.Context, cs kubernetes.Interface, dc dynamic.Interface, ns, node string) (string, error) {
	n, err := cs.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("get node %s: %w", node, err)
	}
	var objs [2]string
	for i, gvr := range []schema.GroupVersionResource{GVR, StatusGVR} {
		u, err := dc.Resource(gvr).Namespace(ns).Get(ctx, node, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
		case err != nil:
			return "", fmt.Errorf("get %s %s/%s: %w", gvr.Resource, ns, node, err)
		default:
			objs[i] = Raw(u)
		}
	}
	raw, _ := Pick(n.Annotations[api.ReportAnnotation], PickObject(objs[0], objs[1]))
	return raw, nil
}

// ReadStatus returns node's NodeStatus in ns, its raw report ("" when there is none or its
// CRD is not installed).
func ReadStatus(ctx context.Context, dc dynamic.Interface, ns, node string) (string, error) {
	u, err := dc.Resource(StatusGVR).Namespace(ns).Get(ctx, node, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return "", nil
	case err != nil:
		return "", fmt.Errorf("get %s %s/%s: %w", StatusKind, ns, node, err)
	}
	return Raw(u), nil
}

// ReadAll returns every Node's report (Read), by node name ("" for none).
func ReadAll(ctx context.Context, cs kubernetes.Interface, dc dynamic.Interface, ns string) (map[string]string, error) {
	nodes, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("list nodes: %w", err)
	}
	var objs [2]map[string]string
	for i, gvr := range []schema.GroupVersionResource{GVR, StatusGVR} {
		objs[i] = map[string]string{}
		list, err := dc.Resource(gvr).Namespace(ns).List(ctx, metav1.ListOptions{})
		switch {
		case apierrors.IsNotFound(err):
		case err != nil:
			return nil, fmt.Errorf("list %s in %s: %w", gvr.Resource, ns, err)
		default:
			for j := range list.Items {
				objs[i][list.Items[j].GetName()] = Raw(&list.Items[j])
			}
		}
	}
	out := map[string]string{}
	for _, n := range nodes.Items {
		out[n.Name], _ = Pick(n.Annotations[api.ReportAnnotation], PickObject(objs[0][n.Name], objs[1][n.Name]))
	}
	return out, nil
}
