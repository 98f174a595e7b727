package agent

// The row writer (docs/keys.md §12): after a sync that read the kernel back, the agent
// hands its readiness status to the row writer while the last row of its current key
// incarnation was incomplete; one writer goroutine writes the newest, at most once per
// RowInterval, retrying with backoff, off the sync path. Peers take rows beside their
// NodeView (viewshadow.go), and both decide beside the reports' lists (viewdecide.go).

import (
	"context"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/noderow"
	"github.com/secureoverlay/secureoverlay/readiness"
)

// publishRow hands the row for status w to the writer when this node has no row for its
// key digest yet, or the last one handed over for it was incomplete (readiness.Complete
// over mine, this node's key view) and w differs from it. Once a complete row of the
// current key digest was handed over, other nodes' re-keys change nothing here: their own
// views carry this node's side of their pairs. Sync worker only.
func (a *Agent) publishRow(w *api.ReadinessStatus, mine readiness.Keys, nodeUID string) {
	if w == nil {
		return
	}
	s, err := readiness.Decode(w, readiness.DefaultBuckets)
	if err != nil {
		a.log.Warn("this node's readiness status does not decode; no row published", "error", err)
		return
	}
	complete := readiness.Complete(s, mine, readiness.DefaultBuckets)
	row := noderow.Normal(s)
	a.mu.Lock()
	prev := a.rowWant
	hand := prev == nil || prev.Self != row.Self || (!a.rowComplete && !noderow.Equal(*prev, row))
	if hand {
		a.rowWant, a.rowUID, a.rowComplete = &row, nodeUID, complete
	}
	a.mu.Unlock()
	if !hand {
		return
	}
	if prev == nil || prev.Self != row.Self {
		a.log.Info("publishing this node's readiness row", "self", w.Self, "complete", complete)
	} else if complete {
		a.log.Info("this node's readiness row is complete", "self", w.Self)
	}
	select {
	case a.rowWake <- struct{}{}:
	default:
	}
}

// writeRows is the row writer (writeLoop, at most one write per RowInterval).
func (a *Agent) writeRows(ctx context.Context, stopped <-chan struct{}) {
	a.writeLoop(ctx, stopped, a.rowWake, a.cfg.RowInterval, a.writeRowOnce)
}

// writeRowOnce writes the row handed over if it is not written yet.
func (a *Agent) writeRowOnce(ctx context.Context) error {
	if a.d.Dynamic == nil {
		return nil // no NodeRow API client (unit tests of v1 behaviour)
	}
	a.rmu.Lock()
	defer a.rmu.Unlock()
	a.mu.Lock()
	want, have, uid := a.rowWant, a.rowHave, a.rowUID
	a.mu.Unlock()
	if want == nil || (have != nil && noderow.Equal(*have, *want)) {
		return nil
	}
	err := noderow.Write(ctx, a.d.Dynamic, a.cfg.Namespace, a.cfg.NodeName, uid, *want)
	a.mu.Lock()
	if err == nil {
		a.rowHave, a.rowErr = want, ""
	} else {
		a.rowErr = err.Error()
	}
	a.mu.Unlock()
	if err != nil {
		a.d.Metrics.ReportWrites.WithLabelValues("row", "error").Inc()
		a.log.Warn("cannot publish this node's readiness row (the peers' reports still give them their pairs with this node)", "error", err)
		return err
	}
	a.d.Metrics.ReportWrites.WithLabelValues("row", "ok").Inc()
	return nil
}

// PublishedRow returns the row last written to this node's NodeRow in this process (nil
// if none).
func (a *Agent) PublishedRow() *readiness.Status {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.rowHave
}
