package agent

import (
	"errors"
	"os"

	"github.com/secureoverlay/secureoverlay/readiness"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/ledger"
)

// The view and rows rule's confirmations across the agent's own restarts
// (docs/protocol-v2.md §9 step 4, readiness.Saved): written beside the ledger whenever
// they change, before the sync that uses them programs the kernel, and read back at the
// first sync that knows this node's keys. While the peers' lists decide too (step 3) a
// lost write costs nothing but a later confirmation; once the lists go it is what keeps a
// restarted agent from dropping pairs its peers still count on.

// confirmationsState is the sync worker's record of the saved confirmations.
type confirmationsState struct {
	restored bool            // the first sync with keys read the file (or there was none)
	saved    uint64          // readiness.Agent.Changes() when last written
	onDisk   readiness.Saved // what the file holds (last written or restored)
	warned   string          // the last write error logged
}

// restoreConfirmations reads the saved confirmations once, at the first sync that knows
// this node's key view (mine), and takes them when they were made with this node's
// current keys.
func (a *Agent) restoreConfirmations(mine readiness.Keys) {
	st := &a.confirmations
	if st.restored || mine == nil {
		return
	}
	st.restored = true
	ra := &a.viewShadow.agent
	defer func() { st.saved = ra.Changes() + a.listed.Changes() }() // what was read need not be written again
	b, err := ledger.ReadSide(a.cfg.LedgerDir, ledger.SideReadiness)
	if errors.Is(err, os.ErrNotExist) {
		return
	}
	var s readiness.Saved
	if err == nil {
		err = s.UnmarshalBinary(b)
	}
	if err != nil {
		a.log.Warn("cannot read the saved readiness confirmations; pairs wait for the NodeView, the peers' rows or their reports", "error", err)
		return
	}
	st.onDisk = s
	if !ra.Restore(s, mine) {
		a.log.Info("saved readiness confirmations are of this node's earlier keys: not used")
		return
	}
	held := ra.Save(mine) // those that hold for the peers' keys as this sync has them
	a.log.Info("readiness confirmations restored from before this agent's restart", "inbound", len(held.In), "encrypts", len(held.Out),
		"saved", len(s.In)+len(s.Out))
}

// saveConfirmations writes the confirmations that hold in mine when they changed since
// the last write, and returns the rule the sync may decide with: the agent's own when its
// confirmations are on disk, else those on disk (write-ahead: the kernel never follows a
// confirmation a restart would forget). A failure is logged (once per distinct error)
// and retried at the next sync.
//
// The confirmations of peers' lists (a.listed, confirmListed) are saved with the rule's
// and decide for the peers whose reports omit their lists only: while a peer lists, its
// current lists decide as in v1.
func (a *Agent) saveConfirmations(mine readiness.Keys, omits map[uint32]bool) (send, drop func(id uint32) bool) {
	st := &a.confirmations
	ra, rl := &a.viewShadow.agent, &a.listed
	send = func(id uint32) bool {
		return mine != nil && (ra.SendESP(id, mine) || omits[id] && rl.SendESP(id, mine))
	}
	drop = func(id uint32) bool {
		return mine != nil && (ra.DropPlaintext(id, mine) || omits[id] && rl.DropPlaintext(id, mine))
	}
	if mine == nil || ra.Changes()+rl.Changes() == st.saved {
		return send, drop
	}
	s, l := ra.Save(mine), rl.Save(mine)
	for id, k := range l.In {
		s.In[id] = k
	}
	for id, k := range l.Out {
		s.Out[id] = k
	}
	b, _ := s.MarshalBinary()
	if err := ledger.WriteSide(a.cfg.LedgerDir, ledger.SideReadiness, b); err != nil {
		if err.Error() != st.warned {
			a.log.Warn("cannot save the readiness confirmations; pairs wait for them to be saved (retried at every sync)", "error", err)
			st.warned = err.Error()
		}
		disk, self := st.onDisk, ra.ID
		return func(id uint32) bool { return disk.SendESP(self, id, mine) },
			func(id uint32) bool { return disk.DropPlaintext(self, id, mine) }
	}
	if st.warned != "" {
		a.log.Info("readiness confirmations saved again")
	}
	st.saved, st.onDisk, st.warned = ra.Changes()+rl.Changes(), s, ""
	return send, drop
}

// confirmListed records, for each peer whose current report lists its claims, what they
// confirm about this node for the K of both ends in mine (a.listed; readiness.Agent.Confirm),
// and returns the peers whose current reports omit their lists. A peer's switch from lists
// to none (docs/protocol-v2.md §9 step 4) may reach this node before the row or the view
// that confirms the same pair does; the lists' last confirmation bridges it (sticky, for
// those keys only, and saved with the rule's). in holds the peers' lists as they are,
// before the rule's additions.
func (a *Agent) confirmListed(in *desired.Inputs, mine readiness.Keys) map[uint32]bool {
	a.listed.ID = a.viewShadow.agent.ID
	omits := map[uint32]bool{}
	for i := range in.Nodes {
		n := &in.Nodes[i]
		if n.Name == in.Self || n.NodeID == 0 || n.Report == nil || n.Report.Incarnation != n.Incarnation {
			continue
		}
		if n.Report.ListsOmitted {
			omits[n.NodeID] = true
			continue
		}
		a.listed.Confirm(n.NodeID, n.Report.InboundFromSelf, n.Report.EncryptsToSelf, mine)
	}
	return omits
}
