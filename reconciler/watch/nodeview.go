package watch

import (
	"slices"
	"strings"
	"sync"

	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/nodekeys"
	"github.com/secureoverlay/secureoverlay/nodereport"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// nodeView is the Nodes and NodeReports as the informers' event handlers delivered them,
// with a numbered log of the names whose inputs changed. Snapshot reads its nodes from
// here, not from the informers' stores: a store is updated before its handlers run, so a
// snapshot of the stores could hold a change the log does not have yet. Under one lock
// the view and the log agree, so a snapshot's sequence number (Snapshot.NodesSeq) says
// exactly which changes it holds, and the names changed between two snapshots are the
// log's entries between their numbers (Watcher.Hint).
type nodeView struct {
	mu      sync.Mutex
	nodes   map[string]NodeInfo                      // CacheNode of each Node (no NodeReport merged)
	reports map[string]nodereport.Entry[reportEntry] // each node's NodeReport entry (nodereport.Cache.Get)
	keys    map[string]*nodekeys.Keys                // each node's published keys (NodeKeys, parsed)
	held    map[string]reportEntry                   // a peer's removed report annotation's last report (setNode)
	seq     uint64                                   // changes logged so far
	log     []nodeChange                             // the changes after logFrom, in order
	logFrom uint64

	// sorted is the last snapshot's nodes (shared with it: never modified), touched the
	// names set or deleted since (logged or not): the next snapshot patches sorted.
	sorted  []NodeInfo
	built   bool
	touched map[string]bool
}

type nodeChange struct {
	seq  uint64
	name string
}

// maxNodeLog bounds the log: past it the older half is dropped, and a hint from before
// the kept part is refused (the sync compares every Node instead).
const maxNodeLog = 8192

func newNodeView() *nodeView {
	return &nodeView{nodes: map[string]NodeInfo{}, reports: map[string]nodereport.Entry[reportEntry]{}, keys: map[string]*nodekeys.Keys{},
		held: map[string]reportEntry{}, touched: map[string]bool{}}
}

// logLocked records that name's inputs changed.
func (v *nodeView) logLocked(name string) {
	v.seq++
	if len(v.log) >= maxNodeLog {
		drop := len(v.log) / 2
		v.logFrom = v.log[drop-1].seq
		v.log = append(v.log[:0], v.log[drop:]...)
	}
	v.log = append(v.log, nodeChange{v.seq, name})
}

// setNode records a Node added or updated; logged when its inputs may have changed.
func (v *nodeView) setNode(ni NodeInfo, self string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	old, had := v.nodes[ni.Name]
	v.nodes[ni.Name] = ni
	v.touched[ni.Name] = true
	// A peer's report annotation that goes is kept (mergedLocked) until a NodeReport at
	// least as recent replaces it: its new agent creates the NodeReport before it removes
	// the annotation, but the Node's update and the NodeReport's ADD come through two
	// watches in no guaranteed order, and a peer seen without a report in between would
	// lose its SAs (docs/keys.md §6, "Hand-over").
	switch {
	case ni.Name == self:
	case ni.AnnotationReport:
		delete(v.held, ni.Name)
	case had && old.AnnotationReport && old.Report != nil:
		v.held[ni.Name] = reportEntry{Raw: old.RawReport, Report: old.Report, Err: old.ReportErr}
	}
	// self's own report is not an input of its desired state; every other difference
	// (down to a peer's report annotation's lastSync, which picks between annotation and
	// NodeReport) is logged.
	if !had || relevantChange(old, ni, self) || (ni.Name != self && old.RawReport != ni.RawReport) ||
		old.AnnotationReport != ni.AnnotationReport {
		v.logLocked(ni.Name)
	}
}

// deleteNode records a Node deleted, and drops what is kept of its deleted NodeReport.
func (v *nodeView) deleteNode(name string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	delete(v.nodes, name)
	delete(v.held, name)
	v.touched[name] = true
	if e, ok := v.reports[name]; ok && e.Deleted {
		delete(v.reports, name)
	}
	v.logLocked(name)
}

// setReport records a NodeReport entry change (after nil: none left).
func (v *nodeView) setReport(node string, after *nodereport.Entry[reportEntry], self string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	before, had := v.reports[node]
	v.touched[node] = true
	if after == nil {
		delete(v.reports, node)
	} else {
		v.reports[node] = *after
		if h, ok := v.held[node]; ok && after.Value.Report != nil && !h.Report.LastSync.After(after.Value.Report.LastSync) {
			delete(v.held, node) // replaced for good (withObject would pick the NodeReport)
		}
	}
	if node == self && had && after != nil {
		return // self's own report: not an input
	}
	if !had || after == nil || before.Value.Raw != after.Value.Raw || before.Value.Err != after.Value.Err {
		v.logLocked(node)
	}
}

// setKeys records node's published keys (nil: none, or its NodeKeys does not parse);
// logged when they changed.
func (v *nodeView) setKeys(node string, k *nodekeys.Keys) {
	v.mu.Lock()
	defer v.mu.Unlock()
	old := v.keys[node]
	if k == nil {
		delete(v.keys, node)
	} else {
		v.keys[node] = k
	}
	if (old == nil) != (k == nil) || (k != nil && !old.Equal(*k)) {
		v.touched[node] = true
		v.logLocked(node)
	}
}

// snapshot returns every node with its report merged (withObject), sorted by name, and
// the sequence number they are at. The slice is shared with the view and with other
// snapshots: read it, never modify it. When few names changed since the last snapshot it
// is that one's with their entries replaced (a copy, no sort, no walk over the maps).
func (v *nodeView) snapshot() ([]NodeInfo, uint64) {
	v.mu.Lock()
	defer v.mu.Unlock()
	switch {
	case !v.built || len(v.touched) > len(v.nodes)/8+8:
		v.sorted, v.built = v.fullLocked(), true
	case len(v.touched) > 0:
		v.sorted = v.patchedLocked()
	}
	clear(v.touched)
	return v.sorted, v.seq
}

// merged is the named node with its report, and whether the node exists.
func (v *nodeView) mergedLocked(name string) (NodeInfo, bool) {
	ni, ok := v.nodes[name]
	if !ok {
		return NodeInfo{}, false
	}
	if h, ok := v.held[name]; ok && !ni.AnnotationReport {
		ni.RawReport, ni.Report, ni.ReportErr = h.Raw, h.Report, h.Err
		ni.FromAnnotation, ni.KeptAnnotation = true, true
	}
	e, has := v.reports[name]
	ni = withObject(ni, e.Value, has)
	ni.Keys = v.keys[name]
	return ni, true
}

// fullLocked builds the sorted nodes from the maps: O(N log N).
func (v *nodeView) fullLocked() []NodeInfo {
	out := make([]NodeInfo, 0, len(v.nodes))
	for name := range v.nodes {
		ni, _ := v.mergedLocked(name)
		out = append(out, ni)
	}
	slices.SortFunc(out, func(a, b NodeInfo) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// patchedLocked is v.sorted with the touched names' entries replaced, added or removed.
func (v *nodeView) patchedLocked() []NodeInfo {
	names := make([]string, 0, len(v.touched))
	for name := range v.touched {
		names = append(names, name)
	}
	slices.Sort(names)
	old := v.sorted
	out := make([]NodeInfo, 0, len(v.nodes))
	i := 0
	for _, name := range names {
		p, found := slices.BinarySearchFunc(old, name, func(n NodeInfo, name string) int { return strings.Compare(n.Name, name) })
		out = append(out, old[i:p]...)
		i = p
		if found {
			i++
		}
		if ni, ok := v.mergedLocked(name); ok {
			out = append(out, ni)
		}
	}
	return append(out, old[i:]...)
}

// changed returns the names logged after from up to to (each once), false when the log
// no longer reaches back to from.
func (v *nodeView) changed(from, to uint64) ([]string, bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if from < v.logFrom || to > v.seq || from > to {
		return nil, false
	}
	i, _ := slices.BinarySearchFunc(v.log, from+1, func(c nodeChange, s uint64) int {
		switch {
		case c.seq < s:
			return -1
		case c.seq > s:
			return 1
		}
		return 0
	})
	names := []string{}
	seen := map[string]bool{}
	for _, c := range v.log[i:] {
		if c.seq > to {
			break
		}
		if !seen[c.name] {
			seen[c.name] = true
			names = append(names, c.name)
		}
	}
	return names, true
}

// NodesVersion identifies the desired.Nodes that Inputs derives from one snapshot for one
// SA epoch: they are a function of the node view at Seq, of the ring (node IDs) and of
// the epoch (this node's incarnation, and through it the peers' per-pair facts). It is
// desired.Inputs.NodesVersion.
type NodesVersion struct {
	Seq   uint64
	Ring  *keys.Ring
	Epoch string
}

// Hint is the desired.Hint of an Update from the Inputs of version since to those of cur
// (both NodesVersions, as Inputs sets them): the Nodes and NodeReports whose events the
// watcher logged in between. The zero Hint (compare every Node) when either is not a
// NodesVersion, when the ring or the epoch differ, or when the log no longer reaches back
// to since. The memo uses it only when since is its own version (desired.Hint).
func (w *Watcher) Hint(since, cur any) desired.Hint {
	p, ok1 := since.(NodesVersion)
	c, ok2 := cur.(NodesVersion)
	if !ok1 || !ok2 || p.Ring != c.Ring || p.Epoch != c.Epoch {
		return desired.Hint{}
	}
	names, ok := w.view.changed(p.Seq, c.Seq)
	if !ok {
		return desired.Hint{}
	}
	return desired.Hint{Known: true, Nodes: names, Since: since}
}
