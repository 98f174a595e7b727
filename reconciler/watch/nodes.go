package watch

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/tools/cache"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/nodekeys"
)

// Report is what an agent publishes in api.ReportAnnotation: the shared api.NodeReport
// plus the per-pair facts desired.Report needs (see docs/agent.md). Peers are keyed by
// node name; the value is the IncarnationTag of the peer incarnation the fact was made
// with (of its KeyIncarnation: boot ID, Node UID and SA epoch), so a rebooted, re-created
// or re-keyed peer is never mistaken for ready. Tags keep the annotation small
// (about 35 bytes per peer and list, 70 KB for 1,000 nodes, under the 256 KB limit).
type Report struct {
	api.NodeReport
	// InboundFrom lists peers whose inbound SAs (every live generation) this node holds.
	InboundFrom map[string]string `json:"inboundFrom,omitempty"`
	// EncryptingTo lists peers this node's kernel sends ESP to (outbound policy programmed).
	EncryptingTo map[string]string `json:"encryptingTo,omitempty"`
	// Whether it writes them at all is api.NodeReport.ListsOmitted.
}

// OmitLists drops r's per-peer lists and says so (ListsOmitted).
func (r *Report) OmitLists() {
	r.InboundFrom, r.EncryptingTo, r.ListsOmitted = nil, nil, true
}

// IncarnationTag is a short, stable tag of a key-derivation incarnation (KeyIncarnation;
// 8 hex digits of its SHA-256).
func IncarnationTag(incarnation string) string {
	if incarnation == "" {
		return ""
	}
	s := sha256.Sum256([]byte(incarnation))
	return hex.EncodeToString(s[:4])
}

// KeyIncarnation is the incarnation a node's SAs are derived with: its boot ID, its Node
// object's UID and its agent's SA epoch, "bootID/uid/epoch" ("" when bootID or epoch is
// unknown). A reboot, a re-created Node object or a new epoch (the agent lost an SA)
// each change every key of every pair the node is in (docs/keys.md, "Incarnations and
// epochs").
func KeyIncarnation(bootID, uid, epoch string) string {
	if bootID == "" || epoch == "" {
		return ""
	}
	return bootID + "/" + uid + "/" + epoch
}

// NewEpoch returns a fresh random SA epoch: 16 hex digits from crypto/rand.
func NewEpoch() string {
	var b [8]byte
	_, _ = rand.Read(b[:]) // never fails (crypto/rand panics on broken systems)
	return hex.EncodeToString(b[:])
}

// CurrentReport returns n's report if it was made for n's current boot and Node object,
// else nil (a stale report: the node rebooted or its Node object was re-created since).
func (n *NodeInfo) CurrentReport() *Report {
	if r := n.Report; r != nil && r.Incarnation != "" && r.Incarnation == n.Incarnation && r.UID == n.UID {
		return r
	}
	return nil
}

// KeyIncarnation is the incarnation peers derive n's SAs with (NodeKeyIncarnation: from
// its current report when that lists its claims, else from its NodeKeys when they declare
// installed, else from its current report), "" when there is none.
func (n *NodeInfo) KeyIncarnation() string {
	inc, _ := n.keyIncarnation()
	return inc
}

// keyIncarnation is KeyIncarnation and whether n's NodeKeys gave it.
func (n *NodeInfo) keyIncarnation() (string, bool) {
	var rep *api.NodeReport
	if n.Report != nil {
		rep = &n.Report.NodeReport
	}
	return nodeKeyIncarnation(n.Incarnation, n.UID, n.Keys, rep)
}

// KeysDecide reports whether the NodeKeys k of the node of boot ID bootID and Node UID
// uid may give its key incarnation (docs/keys.md §3, rule 2, unless a report that lists
// decides): k is for that boot and Node object and declares api.CapabilityInstalled.
func KeysDecide(bootID, uid string, k *nodekeys.Keys) bool {
	return k != nil && bootID != "" && k.Incarnation.BootID == bootID && k.Incarnation.UID == uid && k.Has(api.CapabilityInstalled)
}

// NodeKeyIncarnation is the one rule by which agents and the master take the key
// incarnation of the node of boot ID bootID and Node UID uid (docs/keys.md §3): from its
// report rep when that is current (same boot and UID, with an epoch) and lists its
// per-pair claims — the incarnation and the claims made for it come in one object, as in
// v1 —, else from its NodeKeys k when KeysDecide, else from its current report; "" for
// none. Agents and the master must agree on it, or their key views differ and no
// NodeView is consistent.
func NodeKeyIncarnation(bootID, uid string, k *nodekeys.Keys, rep *api.NodeReport) string {
	inc, _ := nodeKeyIncarnation(bootID, uid, k, rep)
	return inc
}

// nodeKeyIncarnation is NodeKeyIncarnation and whether the NodeKeys gave it.
func nodeKeyIncarnation(bootID, uid string, k *nodekeys.Keys, rep *api.NodeReport) (inc string, fromKeys bool) {
	var repInc string
	if rep != nil && rep.Incarnation != "" && rep.Incarnation == bootID && rep.UID == uid {
		repInc = KeyIncarnation(bootID, uid, rep.Epoch)
	}
	if repInc != "" && !rep.ListsOmitted {
		return repInc, false
	}
	if KeysDecide(bootID, uid, k) {
		return KeyIncarnation(bootID, uid, k.Incarnation.Epoch), true
	}
	return repInc, false
}

// ParseReport decodes a report annotation. Unknown fields are tolerated (newer agents).
func ParseReport(s string) (*Report, error) {
	var r Report
	if err := json.Unmarshal([]byte(s), &r); err != nil {
		return nil, fmt.Errorf("report annotation: %w", err)
	}
	if !r.Mode.Valid() {
		return nil, fmt.Errorf("report annotation: mode %q is not a mode", r.Mode)
	}
	return &r, nil
}

// NodeInfo is what the agent reads from one Node.
type NodeInfo struct {
	Name string
	// IPv4Address is the raw projectcalico.org/IPv4Address (CIDR or bare IP).
	IPv4Address string
	// TunnelAddr is projectcalico.org/IPv4IPIPTunnelAddr (informational: tunl0's address).
	TunnelAddr string
	// Incarnation is status.nodeInfo.bootID.
	Incarnation string
	// UID is the Node object's metadata.uid.
	UID string
	// Ready is the Ready condition (true only when its status is True).
	Ready bool
	// RawReport is the report annotation as published; Report its parsed form (nil if
	// absent or unparsable, with ReportErr saying why).
	RawReport string
	Report    *Report
	ReportErr string
	// AnnotationReport: the Node carries the report annotation (written by an agent of
	// 0.1, or by ours while a peer still reads annotations). ObjectReport: a NodeReport
	// object of this node exists (or existed: nodereport.Cache). When both exist the
	// report above is the one with the later lastSync (nodereport.Pick).
	AnnotationReport bool
	ObjectReport     bool
	// FromAnnotation: Report is the annotation's (no NodeReport, or the annotation was
	// written later).
	FromAnnotation bool
	// KeptAnnotation: the Node no longer carries the annotation and Report is its last,
	// kept until a NodeReport at least as recent arrives (the hand-over from an agent of
	// 0.1: nodeView.setNode). Its agent removed the annotation, so it is not Legacy.
	KeptAnnotation bool
	// Keys are the node's published protocol v2 keys (its NodeKeys; nil when it has none
	// or one that does not parse). Shared with the cache: never modify.
	Keys *nodekeys.Keys
}

// Legacy reports whether n's agent reads and writes reports only as the Node annotation
// (an agent of 0.1): its current report is its annotation's — it has no NodeReport, or
// one older than the annotation (left by a newer agent before a downgrade). While any
// peer is such a node, agents write their report both ways (docs/keys.md §6).
func (n *NodeInfo) Legacy() bool {
	return n.FromAnnotation && !n.KeptAnnotation && n.CurrentReport() != nil
}

// ParseNode extracts NodeInfo from a Node, its report whole (CacheNode with no self).
func ParseNode(n *corev1.Node) NodeInfo { return CacheNode(n, "") }

// CacheNode is what the agent's Node cache keeps of n, for the agent on node self: its
// NodeInfo with the report parsed once, and of a peer's report only the claims about
// self (api.TrimReport: mode, incarnation, UID, epoch, generations and self's two tags,
// every field the agent reads, RawReport trimmed alike); self's own report whole. A
// peer's report lists every node of the cluster and every agent caches every Node:
// cached whole, the reports cost each agent O(nodes²) memory. With self "" every report
// is kept whole.
func CacheNode(n *corev1.Node, self string) NodeInfo {
	ni := NodeInfo{
		Name:        n.Name,
		IPv4Address: n.Annotations[api.CalicoIPv4AddressAnnotation],
		TunnelAddr:  n.Annotations[api.CalicoIPIPTunnelAnnotation],
		Incarnation: n.Status.NodeInfo.BootID,
		UID:         string(n.UID),
		RawReport:   n.Annotations[api.ReportAnnotation],
	}
	ni.AnnotationReport = ni.RawReport != ""
	ni.FromAnnotation = ni.AnnotationReport
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			ni.Ready = c.Status == corev1.ConditionTrue
		}
	}
	ni.RawReport, ni.Report, ni.ReportErr = cacheReport(n.Name, ni.RawReport, self)
	return ni
}

// cacheReport is what a cache keeps of node's raw report for the agent on node self:
// trimmed to the claims about self (a peer's, self != ""), and parsed.
func cacheReport(node, raw, self string) (string, *Report, string) {
	if raw == "" {
		return "", nil, ""
	}
	if self != "" && node != self {
		raw = api.TrimReport(raw, self)
	}
	r, err := ParseReport(raw)
	if err != nil {
		return raw, nil, err.Error()
	}
	return raw, r, ""
}

// WithReportObject returns ni (ParseNode's) with the report of its NodeReport, raw JSON,
// read as the agents read it (nodereport.Pick's rule), whole.
func WithReportObject(ni NodeInfo, raw string) NodeInfo {
	var e reportEntry
	e.Raw, e.Report, e.Err = cacheReport(ni.Name, raw, "")
	return withObject(ni, e, true)
}

// reportEntry is what the NodeReport cache keeps of one report (cacheReport).
type reportEntry struct {
	Raw    string
	Report *Report
	Err    string
}

// withObject returns ni with its report taken from its NodeReport entry e (when ok),
// unless the annotation was written later (nodereport.Pick's rule, on the parsed forms).
// A superseded NodeReport (api.NodeReport.Superseded: its agent writes its report as a
// NodeStatus, which agents do not read) is kept as it is: it omits the lists, so the
// node's NodeKeys decide its key incarnation, mode and generations as soon as they are
// here (NodeKeyIncarnation, rule 2), and until then the report still says what it said
// when its agent left it (docs/keys.md §6).
func withObject(ni NodeInfo, e reportEntry, ok bool) NodeInfo {
	if !ok {
		return ni
	}
	ni.ObjectReport = true
	if ni.Report != nil && (e.Report == nil || ni.Report.LastSync.After(e.Report.LastSync)) {
		return ni
	}
	ni.RawReport, ni.Report, ni.ReportErr = e.Raw, e.Report, e.Err
	ni.FromAnnotation, ni.KeptAnnotation = false, false
	return ni
}

// relevantChange reports whether a Node update (from x to y, both as CacheNode made them
// for self) changes anything the agent on node self reads: kubelet status heartbeats,
// unrelated label edits, self's own report and the parts of a peer's report that do not
// concern self (its lastSync heartbeat, its facts about other peers) do not trigger a
// sync. This keeps a large cluster's report heartbeats from fanning out into a sync on
// every node.
func relevantChange(x, y NodeInfo, self string) bool {
	if x.IPv4Address != y.IPv4Address || x.TunnelAddr != y.TunnelAddr ||
		x.Incarnation != y.Incarnation || x.UID != y.UID || x.Ready != y.Ready {
		return true
	}
	if y.Name == self || self == "" {
		return y.Name != self && x.RawReport != y.RawReport
	}
	return reportView(x, self) != reportView(y, self)
}

// reportView is the part of a node's report that node self's desired state depends on.
func reportView(n NodeInfo, self string) string {
	r := n.Report
	if r == nil {
		return "unparsed:" + n.RawReport
	}
	return fmt.Sprintf("%s|%s|%s|%s|%v|%s|%s", r.Mode, r.Incarnation, r.UID, r.Epoch, r.Generations, r.InboundFrom[self], r.EncryptingTo[self])
}

// cachedNode is what the agent's Node informer caches instead of the Node: its name and
// resourceVersion (all the informer machinery needs) and its NodeInfo (CacheNode). A Node
// as the API serves it is a few KiB (labels, conditions with messages, capacity,
// addresses, images, managed fields); its NodeInfo is six short strings and the trimmed
// report, parsed once when the Node changes instead of on every sync.
type cachedNode struct {
	objectName
	Info NodeInfo
}

func (c *cachedNode) GetObjectKind() schema.ObjectKind { return schema.EmptyObjectKind }

// DeepCopyObject copies c; Info's Report is shared (never modified).
func (c *cachedNode) DeepCopyObject() runtime.Object {
	d := *c
	return &d
}

// NodeTransform is the agent's Node informer transform: it replaces each Node with a
// cachedNode holding CacheNode(n, self).
func NodeTransform(self string) cache.TransformFunc {
	return func(obj any) (any, error) {
		n, ok := obj.(*corev1.Node)
		if !ok {
			return obj, nil // a DeletedFinalStateUnknown tombstone, or already transformed
		}
		return &cachedNode{objectName: objectName{Name: n.Name, ResourceVersion: n.ResourceVersion}, Info: CacheNode(n, self)}, nil
	}
}

// cachedInfo is the NodeInfo of an object of the Node cache: a cachedNode's, or a whole
// Node's (a cache without the transform: SetTransform failed) made by CacheNode.
func cachedInfo(obj any, self string) (NodeInfo, bool) {
	switch n := obj.(type) {
	case *cachedNode:
		return n.Info, true
	case *corev1.Node:
		return CacheNode(n, self), true
	}
	return NodeInfo{}, false
}
