package agent

import (
	"encoding/json"
	"slices"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
)

// NodeReports and NodeStatuses (docs/protocol-v2.md §9 step 5; docs/keys.md §6). Every
// agent watches every NodeReport, so each report write goes to every agent: N² events per
// cluster-wide step. The master and the CLI read the same report as a NodeStatus, which
// agents do not watch. An agent writes its NodeStatus always and its NodeReport only while
// a live peer's agent reads NodeReports (it does not declare api.CapabilityNodeStatus, or
// is 0.1); when it stops, it leaves a last NodeReport marked superseded, which the master and
// the CLI take as none and agents as a report without lists (the node's NodeKeys decide). A NodeStatus the API refuses (an older manifest: no CRD, no RBAC) brings the
// NodeReport back for that write.
const (
	// NodeReportsAuto writes the NodeReport only while a live peer reads NodeReports.
	NodeReportsAuto = ListsAuto // the same words as Config.ReportLists
	// NodeReportsAlways writes it at every write (before rolling agents back further than
	// one version; docs/deploy.md).
	NodeReportsAlways = ListsAlways
)

// gateNodeReports decides, at the end of a sync, whether this node's next report writes go
// to its NodeReport too — while a live peer's agent reads NodeReports (listsGate on
// api.CapabilityNodeStatus), or the master does not say it reads NodeStatuses (an older
// master, or no public ring read: snap.MasterReads) — and logs and exports each change of
// that decision and of its reason.
func (a *Agent) gateNodeReports(snap *watch.Snapshot, now time.Time) {
	mode := a.cfg.NodeReports
	if a.cfg.ReportLists == ListsAlways {
		mode = NodeReportsAlways // lists are for peers to read, in NodeReports
	}
	need, needers, again := a.nodeReportsGate.decide(snap, a.cfg.NodeName, mode, now)
	if again > 0 {
		a.q.AddAfter(queueKey, again)
	}
	why := "peers"
	switch {
	case need && mode == NodeReportsAlways:
		why = "always"
	case need:
	case !slices.Contains(snap.MasterReads, api.MasterReadsNodeStatuses):
		need, why = true, "master"
	default:
		why = "status"
	}
	a.mu.Lock()
	a.nodeReportsOn = need
	a.mu.Unlock()
	a.nodeReportsGate.record(need, a.d.Metrics.NodeReport)
	if why == a.nodeReportsWhy {
		return
	}
	a.nodeReportsWhy = why
	switch why {
	case "always":
		a.log.Info("the report goes to the NodeReport as well as the NodeStatus (--node-reports=always or --report-lists=always)")
	case "peers":
		a.log.Info("the report goes to the NodeReport as well as the NodeStatus: live peers' agents read NodeReports (they do not declare "+api.CapabilityNodeStatus+")",
			"peers", len(needers), "first", firstNames(needers, 8))
	case "master":
		a.log.Info("the report goes to the NodeReport as well as the NodeStatus: the master does not say it reads NodeStatuses (an older master, or the public ring is not read; docs/keys.md §6)")
	default:
		a.log.Info("the report goes to the NodeStatus only: no live peer's agent reads NodeReports and the master reads NodeStatuses (docs/protocol-v2.md §9 step 5)")
	}
}

// nodeReportWanted is whether the report written next goes to the NodeReport too: the gate
// says a peer reads NodeReports, or the NodeStatus was refused at the last write, or the
// agent has no dynamic client (it writes no objects). live is whether the NodeReport holds
// a report readers take (not superseded; true until a write says otherwise).
func (a *Agent) nodeReportWanted() (want, live bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.nodeReportsOn || a.statusRefused || a.d.Dynamic == nil, !a.nodeReportSuperseded
}

// statusRefusal is whether err, from writing the NodeStatus, says the API does not take
// NodeStatuses from this agent (no CRD, no RBAC: an older manifest), rather than a failure
// worth retrying.
func statusRefusal(err error) bool {
	return apierrors.IsNotFound(err) || apierrors.IsForbidden(err)
}

// supersededReport is the NodeReport left behind when an agent stops writing it: r marked
// superseded, without lists (docs/keys.md §6).
func supersededReport(r watch.Report) ([]byte, error) {
	r.OmitLists()
	r.Superseded = true
	return json.Marshal(r)
}
