package agent

import (
	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/readiness"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// ViewSource is what a Source may add (watch.Watcher): this node's NodeView as the master
// last wrote it (docs/protocol-v2.md §9 step 2).
type ViewSource interface {
	ReadinessView() (api.ReadinessView, bool)
}

// Verdicts of the view shadow, per direction: how protocol v2's rule (the master's view)
// and v1's (the peers' lists) answer one pair's question.
const (
	VerdictAgree  = iota // both say ready, or both not
	VerdictAhead         // the view says ready, the lists do not
	VerdictBehind        // the lists say ready, the view does not
	numVerdicts
)

// VerdictNames are the metric's labels, by verdict.
var VerdictNames = [numVerdicts]string{"agree", "ahead", "behind"}

// ViewShadowResult is one comparison.
type ViewShadowResult struct {
	// View: a view was read; Consistent: its key digest equals this node's (it was used).
	View, Consistent bool
	// In counts the peers by verdict on "may this node send ESP to the peer" (the peer
	// holds inbound SAs for both ends' current keys), Out on "may this node drop the
	// peer's plaintext" (the peer sends ESP to this node).
	In, Out [numVerdicts]int
}

// viewShadow applies protocol v2's agent rule (readiness.Agent) to this node's NodeView
// and compares its answers with the per-peer lists the sync decided from. It decides
// nothing (§9 step 2): ahead and behind are 0 in a steady state; an ahead that stays is a
// pair the view would open before its peer is ready. Its confirmations are sticky across
// syncs, as the rule is.
type viewShadow struct {
	agent readiness.Agent
	kd    map[string]readiness.K // key digests by incarnation, of the last comparison
}

// compare takes the sync's inputs (in: its nodes carry the ring IDs, key incarnations and
// the peers' v1 claims about this node) and the view.
func (s *viewShadow) compare(in *desired.Inputs, w api.ReadinessView, haveView bool) ViewShadowResult {
	var r ViewShadowResult
	var self *desired.Node
	for i := range in.Nodes {
		if in.Nodes[i].Name == in.Self {
			self = &in.Nodes[i]
		}
	}
	if self == nil || self.NodeID == 0 || self.Incarnation == "" {
		return r
	}
	s.agent.ID = self.NodeID
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
	if haveView {
		r.View = true
		if v, err := readiness.DecodeView(&w); err == nil {
			r.Consistent = s.agent.Consider(v, mine)
		}
	}
	verdict := func(v2, v1 bool) int {
		switch {
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
		r.In[verdict(s.agent.SendESP(n.NodeID, mine), cur && n.Report.InboundFromSelf)]++
		r.Out[verdict(s.agent.DropPlaintext(n.NodeID, mine), cur && n.Report.EncryptsToSelf)]++
	}
	return r
}
