package agent

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"k8s.io/client-go/kubernetes"

	"github.com/secureoverlay/secureoverlay/install/owner"
)

// Lifecycle is what Serve needs to end the agent's life the right way (docs/agent.md
// "Uninstall").
type Lifecycle struct {
	// Client asks the API about this agent's pod and its DaemonSet.
	Client kubernetes.Interface
	// PodNamespace and PodName identify this agent's pod; unset, SIGTERM always leaves
	// the data plane as it is.
	PodNamespace, PodName string
	// DecisionTimeout bounds the SIGTERM decision (DefaultDecisionTimeout when 0).
	DecisionTimeout time.Duration
	// UninstallStep is the time between the walk-down steps (DefaultUninstallStep when 0).
	UninstallStep time.Duration
	// SignalsHandled, if set, is called once the agent no longer needs to outlive a
	// second signal (the binary stops catching signals then).
	SignalsHandled func()
	// Following, if set, is called once the tracker's first watch on the pod's DaemonSet is
	// open: from then on its deletion is seen.
	Following func()
}

// Serve runs the agent until sig ends (SIGTERM) or until its DaemonSet's deletion is seen,
// and then ends its life:
//   - the DaemonSet's deletion seen by the watch (owner.Tracker.Cascading), before or
//     after SIGTERM: the loop stops and the walk-down runs at once, on this node's clock
//     from the moment the watch showed the deletion, which every node's watch shows within
//     moments of the others (SIGTERM reaches the pods much less evenly: the garbage
//     collector deletes them at a limited rate and each kubelet adds its own delay). A
//     DaemonSet of the same name created meanwhile stops the walk-down where it is (its
//     agent takes over). Then Serve waits for SIGTERM: an agent that exited before its
//     pod is deleted would be restarted by the kubelet and program the node again;
//   - otherwise, at SIGTERM: UninstallDecision, and the walk-down only when it says the
//     DaemonSet is being deleted (a restart, upgrade or reboot leaves the kernel alone).
//
// The decision is returned (Uninstall: the walk-down ran) with the walk-down's error.
func (a *Agent) Serve(sig context.Context, lc Lifecycle) (owner.Decision, error) {
	handled := func() {
		if lc.SignalsHandled != nil {
			lc.SignalsHandled()
		}
	}
	var tr *owner.Tracker
	trackCtx, stopTracking := context.WithCancel(context.WithoutCancel(sig))
	defer stopTracking()
	if lc.PodName != "" && lc.PodNamespace != "" {
		tr = owner.NewTracker(lc.Client, lc.PodNamespace, lc.PodName)
		tr.OnWatch = func() {
			a.log.Info("following the pod's DaemonSet: its deletion walks the data plane down", "pod", lc.PodNamespace+"/"+lc.PodName)
			if lc.Following != nil {
				lc.Following()
			}
		}
		go tr.Run(trackCtx, func(format string, args ...any) { a.log.Warn(fmt.Sprintf(format, args...)) })
	} else {
		a.log.Warn("pod identity unknown ($POD_NAME/$POD_NAMESPACE unset): SIGTERM will always leave the data plane as it is")
	}

	runCtx, stopRun := context.WithCancel(sig)
	defer stopRun()
	var cascading <-chan struct{}
	var seen atomic.Int64 // when the watch showed the deletion (UnixNano)
	if tr != nil {
		cascading = tr.Cascading()
		go func() {
			select {
			case <-cascading:
				seen.Store(time.Now().UnixNano())
				_, why := tr.Deleted()
				a.log.Info("the DaemonSet is being deleted: stopping the sync loop to walk the data plane down now", "reason", why)
				stopRun()
			case <-runCtx.Done():
			}
		}()
	}
	// The walk-down starts as soon as the sync worker has stopped, not when Run returns:
	// Run waits for the report writers, which would hold the first step back by up to
	// patchTimeout while the peers' walk-downs go on (a node that stops sending ESP while
	// this one still drops plaintext loses packets; the real-node story lost 10 of 3,995
	// so, with one agent's Run taking 16 s to return). Writes are abandoned at once then.
	workerDone, runDone := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(runDone)
		a.run(runCtx, workerDone, cascading)
	}()
	<-workerDone

	if isClosed(cascading) {
		_, why := tr.Deleted()
		d := owner.Decision{Uninstall: true, Reason: why + " (seen by the watch)"}
		if at := seen.Load(); at != 0 {
			a.log.Info("sync worker stopped: the walk-down starts", "afterDeletionSeen", time.Since(time.Unix(0, at)).Round(time.Millisecond))
		}
		wctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() {
			defer close(done)
			select {
			case <-tr.Recreated():
				a.log.Warn("the DaemonSet was re-created: the walk-down stops at the step it reached; the new DaemonSet's agent takes the data plane over")
				cancel()
			case <-wctx.Done():
			}
		}()
		err := a.Uninstall(wctx, lc.UninstallStep)
		recreated := isClosed(tr.Recreated())
		cancel()
		<-done
		<-runDone
		stopTracking()
		if sig.Err() == nil {
			a.log.Info("waiting for SIGTERM (an agent that exits now would be restarted and program the node again)")
			<-sig.Done()
		}
		handled()
		if recreated {
			return owner.Decision{Reason: "the DaemonSet was re-created during the walk-down"}, nil
		}
		return d, err
	}

	<-runDone
	handled()
	d, err := UninstallDecision(context.Background(), lc.Client, tr, lc.PodNamespace, lc.PodName, lc.DecisionTimeout)
	if !d.Uninstall {
		a.log.Info("data plane left as it is", "reason", d.Reason, "error", err)
		return d, err
	}
	a.log.Info("the DaemonSet is being deleted: uninstalling", "reason", d.Reason, "step", lc.UninstallStep)
	stopTracking()
	return d, a.Uninstall(context.Background(), lc.UninstallStep)
}

// isClosed reports whether c (may be nil) is closed.
func isClosed(c <-chan struct{}) bool {
	if c == nil {
		return false
	}
	select {
	case <-c:
		return true
	default:
		return false
	}
}
