package master

import (
	"fmt"
	"slices"

	corev1 "k8s.io/api/core/v1"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/nodekeys"
	"github.com/secureoverlay/secureoverlay/readiness"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
)

// shadowReadiness runs protocol v2's per-pair readiness (package readiness) on the
// digests the agents' reports carry, as the master will once it decides with them
// (docs/protocol-v2.md §9 step 1), and counts the ordered pairs of live nodes it has not
// confirmed. It decides nothing yet: the count is what shows, on real clusters, that the
// agents and the master compute key digests, node IDs and buckets alike (0 in a steady
// state; any other value means a pair the digests cannot confirm).
type shadowReadiness struct {
	m     *readiness.Master
	seen  map[uint32]string     // the status last observed, per node ID
	nodes map[uint32]nodeHandle // the live nodes' names and UIDs, per node ID
	// observeAll observes every status wholly after any key change (tests: the reference
	// the narrowed re-observation must equal).
	observeAll bool
	// keysOf returns a node's NodeKeys (nil: none, or none that parse; a nil keysOf: no
	// NodeKeys client), for the rule both sides take key incarnations by
	// (watch.NodeKeyIncarnation).
	keysOf func(node string) *nodekeys.Keys
}

// nodeHandle names a live node's Node object.
type nodeHandle struct{ name, uid string }

func newShadowReadiness() *shadowReadiness {
	return &shadowReadiness{m: readiness.NewMaster(readiness.DefaultBuckets), seen: map[uint32]string{}, nodes: map[uint32]nodeHandle{}}
}

// shadowCounts is what one update found.
type shadowCounts struct {
	Nodes       int // live nodes in the view: a key incarnation (watch.NodeKeyIncarnation) and a ring ID
	Statuses    int // of those, with a readiness status that decodes
	Unconfirmed [2]int
	// Views are the live nodes' views that may have changed (§9 step 2: written as
	// NodeViews), Gone the nodes that left the view.
	Views []shadowView
	Gone  []string
}

// shadowView is one node's view, for its NodeView.
type shadowView struct {
	Node, UID string
	ID        uint32
	View      readiness.View
}

// gain is how many peers view v of node id lets its agent use that the view it holds
// (nil: none) does not (readiness.Master.Gain), for the view writer's priority.
func (s *shadowReadiness) gain(id uint32, held *readiness.View, v readiness.View) int {
	return s.m.Gain(id, held, v)
}

// ids returns the live nodes' IDs by name.
func (s *shadowReadiness) ids() map[string]uint32 {
	out := make(map[string]uint32, len(s.nodes))
	for id, h := range s.nodes {
		out[h.name] = id
	}
	return out
}

// currentRows counts the live nodes whose row (rows, by name) is for their current K and
// their ID.
func (s *shadowReadiness) currentRows(rows func(node string) *readiness.Status) int {
	n := 0
	for id, h := range s.nodes {
		k, ok := s.m.KeyOf(id)
		if r := rows(h.name); ok && r != nil && r.ID == id && r.Self == k {
			n++
		}
	}
	return n
}

// needsView is whether node id's view v gives its agent a pair that neither the view it
// holds (held) nor the peer's row does (readiness.Master.NeedsView); rows looks a node's
// row up by name.
func (s *shadowReadiness) needsView(id uint32, held *readiness.View, v readiness.View, rows func(node string) *readiness.Status) bool {
	return s.m.NeedsView(id, held, v, func(p uint32) *readiness.Status {
		if h, ok := s.nodes[p]; ok {
			return rows(h.name)
		}
		return nil
	})
}

// update feeds the view from the Nodes (nodes[i] is states[i]'s Node) and the ring's node
// IDs, then observes every status that changed, or every status when a key changed.
func (s *shadowReadiness) update(ring *keys.Ring, nodes []*corev1.Node, states []keys.NodeState) shadowCounts {
	var ids map[string]uint32
	if ring != nil {
		ids = watch.NodeIDs(ring)
	}
	type live struct {
		k  readiness.K
		st *api.ReadinessStatus
		h  nodeHandle
	}
	view := map[uint32]live{}
	for i, n := range nodes {
		rep := states[i].Report
		id, ok := ids[n.Name]
		if !ok {
			continue
		}
		var k *nodekeys.Keys
		if s.keysOf != nil {
			k = s.keysOf(n.Name)
		}
		// The agents' rule (docs/keys.md §3): from the current report when it lists
		// its claims, else from the NodeKeys when they declare installed, else from the
		// current report.
		inc := watch.NodeKeyIncarnation(n.Status.NodeInfo.BootID, string(n.UID), k, rep)
		if inc == "" {
			continue // no current key incarnation: not a node anyone derives SAs with
		}
		var st *api.ReadinessStatus
		if rep != nil && watch.KeyIncarnation(rep.Incarnation, rep.UID, rep.Epoch) == inc {
			st = rep.Readiness // a status of another incarnation confirms nothing
		}
		view[id] = live{k: readiness.KeyDigest(inc), st: st, h: nodeHandle{n.Name, string(n.UID)}}
	}
	c := shadowCounts{Nodes: len(view)}
	// The buckets whose key view changed, and the nodes whose own keys did: an unchanged
	// status is observed again in those buckets only (ObserveBuckets); a re-keyed node's
	// status, whose confirmations the change cleared, wholly.
	changed := map[int]bool{}
	rekeyed := map[uint32]bool{}
	for _, id := range s.m.IDs() {
		if _, ok := view[id]; !ok {
			s.m.Remove(id)
			delete(s.seen, id)
			changed[readiness.Bucket(id, readiness.DefaultBuckets)] = true
		}
	}
	for id, h := range s.nodes {
		if l, ok := view[id]; !ok || l.h != h {
			c.Gone = append(c.Gone, h.name)
			delete(s.nodes, id)
		}
	}
	for id, l := range view {
		s.nodes[id] = l.h
		if k, ok := s.m.KeyOf(id); !ok || k != l.k {
			s.m.SetKeys(id, l.k)
			changed[readiness.Bucket(id, readiness.DefaultBuckets)] = true
			rekeyed[id] = true
		}
	}
	for id, l := range view {
		if l.st == nil || l.st.ID != id {
			delete(s.seen, id)
			continue
		}
		st, err := readiness.Decode(l.st, readiness.DefaultBuckets)
		if err != nil {
			delete(s.seen, id)
			continue
		}
		if l.st.Used != "" { // an agent that says which view it used (docs/keys.md §12)
			if u, ok, err := readiness.DecodeUsed(l.st.Used); err == nil {
				s.m.ObserveUsed(id, u, ok)
			}
		}
		c.Statuses++
		key := fmt.Sprintf("%s/%s/%s/%v/%d", l.st.Self, l.st.In, l.st.Out, l.st.Refused, l.st.RefusedMore)
		switch {
		case s.seen[id] != key || rekeyed[id] || (s.observeAll && len(changed) > 0):
			s.m.Observe(st)
		case len(changed) > 0:
			s.m.ObserveBuckets(st, func(j int) bool { return changed[j] })
		}
		s.seen[id] = key
	}
	for _, id := range s.m.TakeDirty() {
		h := s.nodes[id]
		c.Views = append(c.Views, shadowView{Node: h.name, UID: h.uid, ID: id, View: s.m.ViewFor(id)})
	}
	slices.Sort(c.Gone)
	in, out := s.m.Confirmed()
	all := c.Nodes * (c.Nodes - 1)
	c.Unconfirmed = [2]int{all - in, all - out}
	return c
}
