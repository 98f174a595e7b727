package agent

// The uninstall walk-down (docs/agent.md, "Uninstall").
//
// `kubectl delete -f manifests/secureoverlay.yaml` deletes the master, the agents' DaemonSet
// and our RBAC at once; no master will walk the cluster back through the disable cutover.
// Nodes that removed everything at SIGTERM would send plaintext to nodes still enforcing
// (dropped), and nodes that keep their state would enforce forever. So an agent that learns
// at SIGTERM that its DaemonSet is being deleted (install/owner, the same decision as the
// installer's) walks its own kernel down through the cutover modes on a local timer,
// without the API (the master and our RBAC may be gone already):
//
//	t = 0    enforce → encrypt: plaintext drop rules removed, inbound policies optional
//	         (ESP and plaintext both accepted); ESP still sent
//	t = T    → accept: outbound policies removed (plaintext sent); inbound SAs kept
//	t = 2T   → off: SAs, policies, our iptables jumps and chains removed (= cleanup)
//
// Each step is due T after the previous one is in place (so t = T and t = 2T above are
// the earliest times). Every node runs the same schedule from the moment its watch shows
// the DaemonSet's deletion (or its SIGTERM). If those starts spread by S and the nodes'
// apply times differ by less than T - S, then whenever a node starts sending plaintext
// every peer already accepts it, and whenever a node removes its inbound SAs no peer
// sends it ESP any more. So no packet is dropped. The states of the first two steps are desired.Compute of the inputs
// of the last successful sync with the ring mode capped (WalkDownInputs): the pure
// machinery, not ad-hoc kernel edits.

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
	"github.com/secureoverlay/secureoverlay/reconciler/xfrm"
)

// DefaultUninstallStep is the default time between the walk-down steps (--uninstall-step).
// It must exceed the spread of the walk-downs' starts plus the difference of two nodes'
// apply times (docs/agent.md "Uninstall"): 10 s lost 66 echo requests in a starved
// real-node run whose slower agent reached its first step 18 s after the deletion.
const DefaultUninstallStep = 20 * time.Second

// WalkDownModes are the modes the walk-down caps the ring mode at, in order; the last
// step is mode off followed by a cleanup of our iptables chains.
var WalkDownModes = []api.Mode{api.ModeEncrypt, api.ModeAccept, api.ModeOff}

// WalkDownInputs returns in with the ring mode capped at m (a mode never rises). Mode off
// also drops the generations, as the master does when it reaches off. It is pure: the
// result shares in's slices, which Compute does not modify.
func WalkDownInputs(in desired.Inputs, m api.Mode) desired.Inputs {
	if in.Ring.Mode.Rank() > m.Rank() {
		in.Ring.Mode = m
	}
	if in.Ring.Mode == api.ModeOff {
		in.Ring.Generations = nil
	}
	return in
}

// WalkDownStates computes the desired state of each walk-down step (WalkDownModes) from
// the inputs the kernel's state was computed from.
func WalkDownStates(in desired.Inputs) ([]desired.State, error) {
	out := make([]desired.State, 0, len(WalkDownModes))
	for _, m := range WalkDownModes {
		st, err := desired.Compute(WalkDownInputs(in, m))
		if err != nil {
			return nil, fmt.Errorf("compute the %s step of the walk-down: %w", m, err)
		}
		out = append(out, st)
	}
	return out, nil
}

// uninstallInputs returns the inputs of the state the kernel holds: those of the last
// successful sync, else (no sync succeeded in this process, e.g. a fresh restart) the
// informer caches as they are, which outlive the API server.
func (a *Agent) uninstallInputs() (desired.Inputs, string, error) {
	a.mu.Lock()
	last := a.lastIn
	a.mu.Unlock()
	if last != nil {
		return *last, "the last successful sync", nil
	}
	if !a.d.Source.HasSynced() {
		return desired.Inputs{}, "", errors.New("no sync succeeded and the caches never synced: the state the kernel holds is unknown")
	}
	snap := a.d.Source.Snapshot()
	// The ledger's epoch (adopted in this boot) derives the SAs the kernel holds; its keys
	// are never re-created by the walk-down either.
	if err := a.openLedger(&snap); err != nil {
		return desired.Inputs{}, "", fmt.Errorf("no sync succeeded and the ledger is unusable: %w", err)
	}
	if err := a.checkRing(&snap); err != nil {
		return desired.Inputs{}, "", fmt.Errorf("no sync succeeded and the cached ring is refused: %w", err)
	}
	in, err := watch.Inputs(a.cfg.NodeName, snap, a.cfg.Dataplane, a.Epoch())
	if err != nil {
		return desired.Inputs{}, "", fmt.Errorf("no sync succeeded and the cached inputs are unusable: %w", err)
	}
	return in, "the cached inputs (no sync succeeded in this process)", nil
}

// Uninstall walks this node's kernel state down to nothing in timed local steps (see the
// comment at the top of this file): immediately to at most encrypt, at start+step to at
// most accept, at start+2*step to off followed by the removal of our iptables chains. It
// uses no API. Call it only after Run has returned (one writer at a time), and only when
// the DaemonSet is being deleted; a restart or an upgrade must leave the kernel alone.
//
// When the state the kernel holds cannot be known it changes nothing and returns an error
// (the kernel keeps working; `secureoverlay-agent cleanup` removes it by hand). When the
// kernel's mode is off already (no SAs, nobody can send us ESP) it cleans up at once. A
// failed step is logged and the walk-down goes on: the final step removes everything we
// own regardless of what the earlier ones left.
func (a *Agent) Uninstall(ctx context.Context, step time.Duration) error {
	if step <= 0 {
		step = DefaultUninstallStep
	}
	in, from, err := a.uninstallInputs()
	if err != nil {
		a.log.Error("uninstall: data plane left as it is", "error", err)
		return fmt.Errorf("uninstall: %w", err)
	}
	states, err := WalkDownStates(in)
	if err != nil {
		a.log.Error("uninstall: data plane left as it is", "error", err)
		return fmt.Errorf("uninstall: %w", err)
	}
	a.d.Xfrm.QueueResync()
	a.d.Rules.QueueResync()

	start := a.d.Now()
	a.log.Info("uninstall: walking the data plane down", "from", in.Ring.Mode, "inputs", from, "step", step,
		"accept", "one step after encrypt is in place", "off", "one step after accept is in place")
	var errs []error
	for i, st := range states {
		last := i == len(states)-1
		if i > 0 && in.Ring.Mode != api.ModeOff {
			// Step i is due one step after step i-1 is in place, however long applying
			// it took: the peers apply theirs as slowly when their nodes are as busy, so
			// only the difference of apply times counts against the step (docs/agent.md
			// "Uninstall"; the real-node story once took 13 and 18 s for step 1).
			if err := a.d.Sleep(ctx, step); err != nil {
				a.log.Error("uninstall: interrupted; data plane left at the last step", "step", WalkDownModes[i-1], "error", err)
				return errors.Join(append(errs, fmt.Errorf("uninstall interrupted before the %s step: %w", WalkDownModes[i], err))...)
			}
		}
		if in.Ring.Mode == api.ModeOff && !last {
			continue // nothing sends us ESP: straight to the cleanup
		}
		serr := a.applyStep(st)
		if last {
			serr = errors.Join(serr, a.cleanupChains())
		}
		if serr != nil {
			serr = fmt.Errorf("walk-down step %s: %w", WalkDownModes[i], serr)
			a.log.Error("uninstall step failed; continuing", "step", WalkDownModes[i], "error", serr)
			errs = append(errs, serr)
			continue
		}
		a.recordGate(string(st.Mode))
		a.log.Info("uninstall step done", "step", WalkDownModes[i], "states", len(st.SAs), "policies", len(st.Policies),
			"rules", len(st.Rules), "after", a.d.Now().Sub(start))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("uninstall: %w", err)
	}
	if a.led != nil {
		// Nothing of ours is in the kernel: the node keeps no record either. A later
		// install starts a new epoch.
		if err := a.led.Remove(); err != nil {
			a.log.Warn("uninstall: cannot remove the sa key ledger", "error", err)
		}
	}
	a.forgetGate()
	a.log.Info("uninstall: nothing of ours is left in the kernel")
	return nil
}

// applyStep applies one walk-down state: its rules first, then xfrm. No walk-down state
// drops anything (its mode is at most encrypt), so removing the drop rules before the
// xfrm change is always the safe order: the plaintext a peer may already send is accepted
// at once, and an outbound count rule never backs a drop.
func (a *Agent) applyStep(st desired.State) error {
	for _, r := range st.Rules {
		if r.Action == desired.Drop {
			return fmt.Errorf("walk-down state in mode %s has a drop rule (%s)", st.Mode, r.ID())
		}
	}
	if _, err := a.d.Rules.Apply(st.Rules); err != nil {
		return fmt.Errorf("apply iptables rules: %w", err)
	}
	res, err := a.d.Xfrm.Apply(st)
	a.countWrites(res)
	if err != nil {
		return fmt.Errorf("apply xfrm: %w", err)
	}
	return nil
}

// cleanupChains removes whatever of ours the appliers' views missed (xfrm objects by
// reqid and priority band) and our iptables jumps and chains, like `cleanup`.
func (a *Agent) cleanupChains() error {
	var errs []error
	if c, ok := a.d.Xfrm.(interface{ Cleanup() (xfrm.Result, error) }); ok {
		res, err := c.Cleanup()
		a.countWrites(res)
		errs = append(errs, wrapNonNil("remove xfrm objects", err))
	}
	if c, ok := a.d.Rules.(interface{ Cleanup() error }); ok {
		errs = append(errs, wrapNonNil("remove iptables chains", c.Cleanup()))
	}
	return errors.Join(errs...)
}

// sleepCtx waits d or until ctx ends.
func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
