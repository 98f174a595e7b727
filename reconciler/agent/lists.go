package agent

import (
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
)

// Report lists (docs/protocol-v2.md §9 step 4). An agent's report lists, per peer, whether
// it holds inbound SAs from the peer and sends it ESP (inboundFrom, encryptingTo): v1's
// per-pair readiness, O(N) bytes per report. Agents that declare
// api.CapabilityReadinessDecide decide from their NodeView, the peers' NodeRows and their
// saved confirmations instead (§9 step 3), so once every live agent declares it the
// lists go and the report's size no longer grows with the cluster. An agent that does not
// declare it reads the lists only: while one is live, every agent keeps writing them.
const (
	// ListsAuto omits the lists once every live peer declares readiness-decide.
	ListsAuto = "auto"
	// ListsAlways keeps them (an operator about to roll agents back further than one
	// version; docs/deploy.md).
	ListsAlways = "always"
)

// ListsUnknownGrace is how long a live peer whose agent has not said what it is (no
// NodeKeys for its current boot yet) is taken to decide from views before the lists come
// back for it. A restarted or rebooted agent writes its NodeKeys before its first report,
// but watchers may see the two in either order: without the grace every reboot would
// bring every report's lists back for a moment (N writes of O(N) bytes).
const ListsUnknownGrace = 30 * time.Second

// Peer kinds for the lists gate.
const (
	listsPeerDecides = iota // declares readiness-decide for its current boot
	listsPeerOld            // reads the lists: reports as an annotation only (0.1), or its NodeKeys for this boot lack the capability
	listsPeerUnknown        // no NodeKeys for its current boot (yet)
	listsPeerGone           // no current report: no agent to read anything
)

// listsPeerKind is what peer n's agent is, for a gate on capability c (the lists gate's is
// api.CapabilityReadinessDecide, the NodeReport gate's api.CapabilityNodeStatus).
func listsPeerKind(n *watch.NodeInfo, c string) int {
	r := n.CurrentReport()
	switch {
	case r == nil:
		return listsPeerGone
	case n.Legacy():
		return listsPeerOld
	case n.Keys == nil || n.Keys.Incarnation.BootID != r.Incarnation || n.Keys.Incarnation.UID != r.UID:
		return listsPeerUnknown
	case !n.Keys.Has(c):
		return listsPeerOld
	}
	return listsPeerDecides
}

// listsGate decides, at each sync, whether this node's report lists its claims (or, for
// the NodeReport gate, whether it writes its NodeReport besides its NodeStatus): whether
// a live peer's agent lacks capability (api.CapabilityReadinessDecide when empty). Its
// state is the time each unknown peer was first seen so (sync worker only).
type listsGate struct {
	capability   string
	unknownSince map[string]time.Time
	// on is the last decision and known whether there was one (a change is logged).
	on, known bool
}

// decide is whether the report made at now from snap, for node self, must list its
// claims (mode: Config.ReportLists), the peers that need them (sorted), and when to look
// again (0: no unknown peer is waiting out its grace).
func (g *listsGate) decide(snap *watch.Snapshot, self, mode string, now time.Time) (need bool, needers []string, again time.Duration) {
	if mode == ListsAlways {
		return true, nil, 0
	}
	since := make(map[string]time.Time, len(g.unknownSince))
	for i := range snap.Nodes {
		n := &snap.Nodes[i]
		if n.Name == self {
			continue
		}
		c := g.capability
		if c == "" {
			c = api.CapabilityReadinessDecide
		}
		switch listsPeerKind(n, c) {
		case listsPeerOld:
			needers = append(needers, n.Name)
		case listsPeerUnknown:
			t, ok := g.unknownSince[n.Name]
			if !ok {
				t = now
			}
			since[n.Name] = t
			if left := ListsUnknownGrace - now.Sub(t); left <= 0 {
				needers = append(needers, n.Name)
			} else if again == 0 || left < again {
				again = left
			}
		}
	}
	g.unknownSince = since
	slices.Sort(needers)
	return len(needers) > 0, needers, again
}

// record keeps need as the last decision and exports it to gauge (1 or 0); it reports
// whether the decision changed (the first one counts as a change), for the caller to log.
func (g *listsGate) record(need bool, gauge prometheus.Gauge) bool {
	if g.known && g.on == need {
		return false
	}
	g.on, g.known = need, true
	if need {
		gauge.Set(1)
	} else {
		gauge.Set(0)
	}
	return true
}

// gateLists omits rep's lists unless a live peer needs them (listsGate), and logs and
// exports each change of that decision.
func (a *Agent) gateLists(rep *watch.Report, snap *watch.Snapshot, now time.Time) {
	need, needers, again := a.lists.decide(snap, a.cfg.NodeName, a.cfg.ReportLists, now)
	if again > 0 {
		a.q.AddAfter(queueKey, again) // an unknown peer's grace ends
	}
	if !need {
		rep.OmitLists()
	}
	if !a.lists.record(need, a.d.Metrics.ReportLists) {
		return
	}
	switch {
	case need && a.cfg.ReportLists == ListsAlways:
		a.log.Info("the report lists its per-pair claims (--report-lists=always)")
	case need:
		a.log.Info("the report lists its per-pair claims: live peers' agents read them (they do not declare "+api.CapabilityReadinessDecide+")",
			"peers", len(needers), "first", firstNames(needers, 8))
	default:
		a.log.Info("the report no longer lists its per-pair claims: every live peer's agent decides from NodeViews and NodeRows (docs/protocol-v2.md §9 step 4)")
	}
}
