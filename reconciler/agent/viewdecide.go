package agent

import (
	"slices"
	"strconv"

	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// Protocol v2, step 3 (docs/protocol-v2.md §9): the agent's NodeView and its peers' rows
// decide too. A pair is ready in a direction when the peer's report lists it (v1) or when
// readiness.Agent confirms it from the view and the rows. Each is a claim by the peer about
// its own kernel for the current keys of both ends, checked against this node's keys, so
// their union is as safe as either; the lists stay until every agent decides this way
// (api.CapabilityReadinessDecide), which step 4 needs before it stops writing them.

// added is what the view and the rows add to the lists for one peer: the facts they
// confirm that its current report does not state.
type added struct{ inbound, encrypts bool }

// addDecisions returns in with every peer's report extended by what send and drop (the
// view and rows rule, by ring node ID) confirm and the report does not, and those
// additions by peer name (nil when none). A peer without a current report is left as it is
// (Compute needs its mode and generations). in's nodes and reports are shared with the
// watcher's cache and the memo, so they are never modified: the nodes are copied once, on
// the first addition, and each changed report is a new one.
func addDecisions(in desired.Inputs, send, drop func(id uint32) bool) (desired.Inputs, map[string]added) {
	var out map[string]added
	copied := false
	for i := range in.Nodes {
		n := &in.Nodes[i]
		r := n.Report
		if n.Name == in.Self || n.NodeID == 0 || n.Incarnation == "" || r == nil || r.Incarnation != n.Incarnation {
			continue
		}
		ad := added{inbound: !r.InboundFromSelf && send(n.NodeID), encrypts: !r.EncryptsToSelf && drop(n.NodeID)}
		if ad == (added{}) {
			continue
		}
		if !copied {
			in.Nodes, copied = slices.Clone(in.Nodes), true
			n = &in.Nodes[i]
		}
		nr := *r
		nr.InboundFromSelf = r.InboundFromSelf || ad.inbound
		nr.EncryptsToSelf = r.EncryptsToSelf || ad.encrypts
		n.Report = &nr
		if out == nil {
			out = map[string]added{}
		}
		out[n.Name] = ad
	}
	return in, out
}

// changedAdditions names the peers whose additions differ between prev and cur (sorted).
func changedAdditions(prev, cur map[string]added) []string {
	var names []string
	for name, a := range cur {
		if p, ok := prev[name]; !ok || p != a {
			names = append(names, name)
		}
	}
	for name := range prev {
		if _, ok := cur[name]; !ok {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	return names
}

// decidedVersion is the NodesVersion the memo is given when additions may change a peer
// without any event of the watcher's: the watcher's version and a count of the additions'
// changes. Two inputs with the same decidedVersion have the same Nodes, additions
// included, which is what the memo's "same version" path takes for granted.
type decidedVersion struct {
	Nodes any // the watcher's NodesVersion (comparable)
	Seq   uint64
}

// decisions is the agent's record of the additions the memo was last given.
type decisions struct {
	added map[string]added
	seq   uint64
}

// apply adds the view and rows' decisions to in (addDecisions) and versions the result for
// the memo: it returns the inputs, the peers whose additions changed since the inputs the
// memo holds, and the version of the additions to record with commit once the memo took
// them.
func (d *decisions) apply(in desired.Inputs, send, drop func(id uint32) bool) (desired.Inputs, []string, decisions) {
	in, cur := addDecisions(in, send, drop)
	changed := changedAdditions(d.added, cur)
	next := decisions{added: cur, seq: d.seq}
	if len(changed) > 0 {
		next.seq++
	}
	if in.NodesVersion != nil {
		in.NodesVersion = decidedVersion{Nodes: in.NodesVersion, Seq: next.seq}
	}
	return in, changed, next
}

// decidedHint is the watcher's hint for an Update from the memo's version (since) to
// in's (cur), both as decisions.apply made them, with the peers whose additions changed
// named too.
func decidedHint(h NodeHinter, since, cur any, changed []string) desired.Hint {
	s, ok1 := since.(decidedVersion)
	c, ok2 := cur.(decidedVersion)
	if !ok1 || !ok2 {
		return desired.Hint{}
	}
	hint := h.Hint(s.Nodes, c.Nodes)
	if !hint.Known {
		return desired.Hint{}
	}
	hint.Since = since
	if len(changed) > 0 {
		hint.Nodes = append(slices.Clip(hint.Nodes), changed...)
	}
	return hint
}

// firstNames is names, at most n of them, with a count of the rest (for logs that must
// stay short at any cluster size).
func firstNames(names []string, n int) []string {
	if len(names) <= n {
		return names
	}
	return append(slices.Clip(names[:n]), "and "+strconv.Itoa(len(names)-n)+" more")
}
