package agent

import (
	"cmp"
	"slices"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/readiness"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// ViewSource is what a Source may add (watch.Watcher): this node's NodeView as the master
// last wrote it (docs/protocol-v2.md §9 step 2).
type ViewSource interface {
	ReadinessView() (api.ReadinessView, bool)
}

// RowSource is what a Source may add (watch.Watcher): the peers' readiness rows by node
// name, as last seen (docs/keys.md §12).
type RowSource interface {
	ReadinessRows(f func(node string, row readiness.Status))
}

// peerRows are the rows of src that may speak for their node: the row's ID is the node's
// ID in the ring as in holds it (a row claiming another node's ID, or this node's, would
// speak for another kernel), in ascending ID order.
func peerRows(src RowSource, in *desired.Inputs) []readiness.Status {
	ids := make(map[string]uint32, len(in.Nodes))
	for i := range in.Nodes {
		if n := &in.Nodes[i]; n.NodeID != 0 && n.Name != in.Self {
			ids[n.Name] = n.NodeID
		}
	}
	var rows []readiness.Status
	src.ReadinessRows(func(node string, row readiness.Status) {
		if id, ok := ids[node]; ok && row.ID == id {
			rows = append(rows, row)
		}
	})
	slices.SortFunc(rows, func(a, b readiness.Status) int { return cmp.Compare(a.ID, b.ID) })
	return rows
}

// Verdicts of the view shadow, per direction: how protocol v2's rule (the master's view)
// and v1's (the peers' lists) answer one pair's question; for a peer whose report omits
// the lists (§9 step 4), the rule's answer alone.
const (
	VerdictAgree       = iota // both say ready, or both not
	VerdictAhead              // the view says ready, the lists do not
	VerdictBehind             // the lists say ready, the view does not
	VerdictConfirmed          // no lists: the view says ready
	VerdictUnconfirmed        // no lists: the view does not say ready
	numVerdicts
)

// VerdictNames are the metric's labels, by verdict.
var VerdictNames = [numVerdicts]string{"agree", "ahead", "behind", "confirmed", "unconfirmed"}

// ViewShadowResult is one comparison.
type ViewShadowResult struct {
	// View: a view was read; Consistent: its key digest equals this node's (it was used).
	View, Consistent bool
	// In counts the peers by verdict on "may this node send ESP to the peer" (the peer
	// holds inbound SAs for both ends' current keys), Out on "may this node drop the
	// peer's plaintext" (the peer sends ESP to this node): the view and the peers' rows
	// together, as protocol v2's agent will decide (§9 step 3).
	In, Out [numVerdicts]int
	// Rows counts the peers' rows taken (for the peer's current keys); RowIn and RowOut
	// are In and Out from the rows alone (their ahead must be 0; behind is expected for a
	// peer whose row was complete before this node re-keyed).
	Rows          int
	RowIn, RowOut [numVerdicts]int
}

// viewShadow applies protocol v2's agent rule (readiness.Agent) to this node's NodeView
// and its peers' rows, and compares its answers with the per-peer lists the sync decided
// from. It decides nothing (§9 steps 2 and 3): ahead and behind are 0 in a steady state;
// an ahead that stays is a pair the view or a row would open before its peer is ready.
// Its confirmations are sticky across syncs, as the rule is. A second rule takes the rows
// alone, to show what they confirm by themselves.
type viewShadow struct {
	agent readiness.Agent        // views and rows
	rows  readiness.Agent        // rows alone
	kd    map[string]readiness.K // key digests by incarnation, of the last key view
}

// keys is this node's key view in the sync's inputs (their nodes carry the ring IDs and
// key incarnations): the K of every node with both, this node's included; nil when this
// node has neither.
func (s *viewShadow) keys(in *desired.Inputs) readiness.Keys {
	var self *desired.Node
	for i := range in.Nodes {
		if in.Nodes[i].Name == in.Self {
			self = &in.Nodes[i]
		}
	}
	if self == nil || self.NodeID == 0 || self.Incarnation == "" {
		return nil
	}
	s.agent.ID, s.rows.ID = self.NodeID, self.NodeID
	kd := make(map[string]readiness.K, len(in.Nodes))
	digest := func(inc string) readiness.K {
		k, ok := s.kd[inc]
		if !ok {
			k = readiness.KeyDigest(inc)
		}
		kd[inc] = k
		return k
	}
	mine := readiness.Keys{}
	for i := range in.Nodes {
		if n := &in.Nodes[i]; n.NodeID != 0 && n.Incarnation != "" {
			mine[n.NodeID] = digest(n.Incarnation)
		}
	}
	s.kd = kd
	return mine
}

// compare takes the sync's inputs (in: its nodes carry the peers' v1 claims about this
// node), this node's key view (keys), the view and the peers' rows (peerRows).
func (s *viewShadow) compare(in *desired.Inputs, mine readiness.Keys, w api.ReadinessView, haveView bool, rows []readiness.Status) ViewShadowResult {
	var r ViewShadowResult
	if mine == nil {
		return r
	}
	for _, row := range rows {
		if k, ok := mine[row.ID]; ok && row.Self == k {
			r.Rows++
		}
	}
	s.agent.ConsiderRows(rows, mine, readiness.DefaultBuckets)
	s.rows.ConsiderRows(rows, mine, readiness.DefaultBuckets)
	if haveView {
		r.View = true
		if v, err := readiness.DecodeView(&w); err == nil {
			r.Consistent = s.agent.Consider(v, mine)
		}
	}
	var listed bool
	verdict := func(v2, v1 bool) int {
		switch {
		case !listed && v2:
			return VerdictConfirmed
		case !listed:
			return VerdictUnconfirmed
		case v2 == v1:
			return VerdictAgree
		case v2:
			return VerdictAhead
		default:
			return VerdictBehind
		}
	}
	for i := range in.Nodes {
		n := &in.Nodes[i]
		if n.Name == in.Self || n.NodeID == 0 || n.Incarnation == "" {
			continue
		}
		cur := n.Report != nil && n.Report.Incarnation == n.Incarnation
		listed = !cur || !n.Report.ListsOmitted // no current report: nothing listed, nothing ready
		inFrom, encTo := cur && n.Report.InboundFromSelf, cur && n.Report.EncryptsToSelf
		r.In[verdict(s.agent.SendESP(n.NodeID, mine), inFrom)]++
		r.Out[verdict(s.agent.DropPlaintext(n.NodeID, mine), encTo)]++
		r.RowIn[verdict(s.rows.SendESP(n.NodeID, mine), inFrom)]++
		r.RowOut[verdict(s.rows.DropPlaintext(n.NodeID, mine), encTo)]++
	}
	return r
}
