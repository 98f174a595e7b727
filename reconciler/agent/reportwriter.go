package agent

// The report writer (docs/agent.md, "The report"): the write of this node's report leaves
// the sync path. A sync that brought the kernel to a state builds the report of that state
// (program before advertise) and hands it over; one writer per agent writes the newest
// report handed over — to this node's NodeReport and, while a peer reads only annotations,
// to its Node's annotation, or removes that annotation once none does — so a stream of
// events never waits on the API server, and the kernel is never behind what the report
// claims.
//
// The pure part is reportSlot: what is handed over, what is being written, what was
// written, and how long to back off. The shell (Agent.writeReports, Agent.writeNext) holds
// it under Agent.mu and does the I/O.

import (
	"context"
	"time"

	"github.com/secureoverlay/secureoverlay/reconciler/watch"
)

// reportJob is one hand-over to the writer, numbered in the order handed over.
type reportJob struct {
	seq    uint64
	report watch.Report
	reason string // "changed", "heartbeat", "legacy-peer" (the report_writes_total label)
	// write: write report (to the NodeReport, and to the annotation when annotate). A job
	// with write false only removes the annotation (unannotate).
	write, annotate, unannotate bool
	uid                         string // this node's Node UID (the NodeReport's owner)
}

// reportSlot is the writer's state. Latest wins: a job handed over replaces any that is not
// yet written, so however many syncs finish during a write, only the newest is written
// next. A report is never written after a newer one: Take hands out only the newest, and a
// successful write drops everything older. A failed write leaves its job pending (unless a
// newer one replaced it) and counts towards the backoff. A job that only removes the
// annotation never drops an unwritten report: it takes that report over.
type reportSlot struct {
	last     uint64     // seq of the last job handed over
	pending  *reportJob // newest job not yet done (also while it is being written)
	inflight uint64     // seq being written, 0 when none
	written  uint64     // seq of the newest job done
	failures int        // failed writes in a row
}

// Put hands j over and returns its number.
func (s *reportSlot) Put(j reportJob) uint64 {
	if !j.write && s.pending != nil && s.pending.write {
		j.write, j.report, j.reason = true, s.pending.report, s.pending.reason
	}
	s.last++
	j.seq = s.last
	s.pending = &j
	return s.last
}

// Take returns the job to do now: the newest one not yet done, unless a write is in
// flight (one at a time).
func (s *reportSlot) Take() (reportJob, bool) {
	if s.inflight != 0 || s.pending == nil {
		return reportJob{}, false
	}
	s.inflight = s.pending.seq
	return *s.pending, true
}

// Done records the end of job seq (taken with Take).
func (s *reportSlot) Done(seq uint64, ok bool) {
	if s.inflight == seq {
		s.inflight = 0
	}
	if !ok {
		s.failures++
		return
	}
	s.failures = 0
	s.written = max(s.written, seq)
	if s.pending != nil && s.pending.seq <= s.written {
		s.pending = nil
	}
}

// Wanted returns the newest report handed over and not yet written (nil when every report
// handed over is written).
func (s *reportSlot) Wanted() *watch.Report {
	if s.pending == nil || !s.pending.write {
		return nil
	}
	return &s.pending.report
}

// Annotating reports whether the job pending writes the annotation; Unannotating whether
// it removes it.
func (s *reportSlot) Annotating() bool {
	return s.pending != nil && s.pending.write && s.pending.annotate
}
func (s *reportSlot) Unannotating() bool { return s.pending != nil && s.pending.unannotate }

// Backoff is the wait before the next write: none after a success, then lo doubling with
// each failure in a row, at most hi.
func (s *reportSlot) Backoff(lo, hi time.Duration) time.Duration {
	return backoff(s.failures, lo, hi)
}

// backoff is the wait after failures failed writes in a row: none after a success, then
// lo doubling with each failure, at most hi.
func backoff(failures int, lo, hi time.Duration) time.Duration {
	if failures == 0 {
		return 0
	}
	d := lo
	for i := 1; i < failures && d < hi; i++ {
		d *= 2
	}
	return min(d, hi)
}

// publishDue says whether report r must be handed to the writer, given prev, the newest
// report handed over (nil if none, in this process or on our Node in this boot), whether
// it is still to be written (pending), and when a report was last written (pubAt, zero
// when none in this process): its claims changed, or the heartbeat is due. While prev is
// pending with the same claims nothing is due: its write refreshes LastSync anyway.
func publishDue(prev *watch.Report, pending bool, pubAt, now time.Time, heartbeat time.Duration, r watch.Report) (reason string, write bool) {
	if prev == nil || !sameClaims(*prev, r) {
		return "changed", true
	}
	if pending {
		return "", false
	}
	if !pubAt.IsZero() && now.Sub(pubAt) < heartbeat {
		return "", false
	}
	if pubAt.IsZero() && now.Sub(prev.LastSync) < heartbeat {
		return "", false
	}
	return "heartbeat", true
}

// writeReports is the writer: it does what is handed over until stopped is closed, backs
// off after a failed write (RetryMin doubling to RetryMax), then makes one last attempt at
// whatever is still not done. ctx bounds every write (Run cancels it patchTimeout after
// stopped is closed, so the last write is bounded).
func (a *Agent) writeReports(ctx context.Context, stopped <-chan struct{}) {
	for {
		wrote, err := a.writeNext(ctx)
		if wrote && err == nil {
			continue
		}
		if err != nil {
			a.mu.Lock()
			d := a.slot.Backoff(a.cfg.RetryMin, a.cfg.RetryMax)
			a.mu.Unlock()
			t := time.NewTimer(d)
			select {
			case <-t.C:
				continue
			case <-stopped:
				t.Stop()
			}
		} else {
			select {
			case <-a.wake:
				continue
			case <-stopped:
			}
		}
		// Stopped: the sync worker has handed over its last report.
		if _, err := a.writeNext(ctx); err != nil {
			a.log.Warn("exiting with this node's report not written: peers and the master keep seeing the previous one", "error", err)
		}
		return
	}
}

// writeNext does the newest job not yet done, if there is one. Writes are one at a time
// (the writer, and Sync's flush when called without Run).
func (a *Agent) writeNext(ctx context.Context) (wrote bool, err error) {
	a.wmu.Lock()
	defer a.wmu.Unlock()
	a.mu.Lock()
	j, ok := a.slot.Take()
	a.mu.Unlock()
	if !ok {
		return false, nil
	}
	err = a.doJob(ctx, j)
	a.mu.Lock()
	a.slot.Done(j.seq, err == nil)
	if err == nil {
		if j.write {
			a.published, a.pubAt = &j.report, a.d.Now()
		}
		a.writeErr = ""
	} else {
		a.writeErr = err.Error()
	}
	a.mu.Unlock()
	return true, err
}

// doJob writes j's report (metrics and log per write) and removes the annotation if j
// says so.
func (a *Agent) doJob(ctx context.Context, j reportJob) error {
	if j.write {
		if err := a.writeReport(ctx, j.report, j.uid, j.annotate); err != nil {
			a.d.Metrics.ReportWrites.WithLabelValues(j.reason, "error").Inc()
			// The kernel holds the new state; peers and the master see the old claims
			// until a retry lands.
			a.log.Warn("cannot write this node's report", "reason", j.reason, "error", err)
			return err
		}
		a.d.Metrics.ReportWrites.WithLabelValues(j.reason, "ok").Inc()
	}
	if j.unannotate {
		if err := removeReportAnnotation(ctx, a.d.Client, a.cfg.NodeName); err != nil {
			a.log.Warn("cannot remove the report annotation from this node", "error", err)
			return err
		}
		a.mu.Lock()
		a.annotated = false
		a.mu.Unlock()
		a.log.Info("report annotation removed from this node: every peer reads NodeReports")
	}
	return nil
}

// flushReports does what is handed over and not yet done, now (no backoff), and returns
// the first failure. Each write is bounded by patchTimeout, not by ctx's cancellation:
// claims handed over match what the kernel holds and are worth finishing.
func (a *Agent) flushReports(ctx context.Context) error {
	for {
		wrote, err := a.writeNext(context.WithoutCancel(ctx))
		if !wrote || err != nil {
			return err
		}
	}
}
