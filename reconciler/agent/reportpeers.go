package agent

// The per-peer part of the report, maintained incrementally (docs/performance.md §4b):
// BuildReport walks every peer of the state and hashes every peer's key incarnation, O(N)
// per sync, which at 5,000 nodes was most of a Node event's sync. peerClaims keeps
// InboundFrom, EncryptingTo, the encrypting count and the sending generations between
// syncs and updates only the peers the memo recomputed (desired.Change.Peers), so a sync
// that changed k peers costs O(k log N) here. What it builds is exactly what BuildReport
// builds from the same state and snapshot (TestPeerClaimsMatchBuildReport); anything the
// memo cannot name (a full Update, a failed one, a Reset) makes the next build walk
// every peer.

import (
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
)

// peerClaim is what one peer contributes to the report.
type peerClaim struct {
	inbound bool
	sendGen uint32
	tag     string // watch.IncarnationTag of the peer's key incarnation
	inc     string // the key incarnation tag was computed from
	present bool   // the peer's Node is in the snapshot (BuildReport skips it otherwise)
}

// peerClaims is the report's per-peer part for the memo's state. Only the sync worker
// uses it.
type peerClaims struct {
	valid bool                // claims reflect the state of the last build plus dirty
	dirty map[string]struct{} // peers changed by Updates since the last build
	all   bool                // an Update since the last build changed what it cannot name

	claims              map[string]peerClaim
	inbound, encrypting map[string]string // as in the report; nil when empty
	shared              bool              // the maps are in a report handed out: copy before writing
	encrypted           int               // peers with a send generation (PeersEncrypted)
	sending             map[uint32]int    // peers per send generation
}

// Note records one memo Update's change (err: the Update failed).
func (c *peerClaims) Note(ch desired.Change, err error) {
	if err != nil || ch.Full || ch.Peers == nil {
		c.all = true
		return
	}
	if c.dirty == nil {
		c.dirty = map[string]struct{}{}
	}
	for _, name := range ch.Peers {
		c.dirty[name] = struct{}{}
	}
}

// Invalidate makes the next build walk every peer.
func (c *peerClaims) Invalidate() { c.all = true }

// Report is BuildReport(st, snap, ...) for st, the memo's state after the Updates noted
// since the last call: the peers noted are looked up again, the others are taken as the
// last call left them.
func (c *peerClaims) Report(st desired.State, snap *watch.Snapshot, incarnation string, b Budget, seq, inSeq SeqUse, now time.Time) watch.Report {
	if !c.valid || c.all {
		c.rebuild(st, snap)
	} else {
		for name := range c.dirty {
			c.update(name, st, snap)
		}
	}
	clear(c.dirty)
	c.all, c.valid = false, true
	r := reportHeader(st, snap, incarnation, b, seq, inSeq, now, c.encrypted, c.sendingGenerations())
	if len(c.inbound) > 0 {
		r.InboundFrom = c.inbound
		c.shared = true
	}
	if len(c.encrypting) > 0 {
		r.EncryptingTo = c.encrypting
		c.shared = true
	}
	return r
}

func (c *peerClaims) rebuild(st desired.State, snap *watch.Snapshot) {
	c.claims = make(map[string]peerClaim, len(st.Peers))
	c.inbound, c.encrypting, c.shared = nil, nil, false
	c.encrypted, c.sending = 0, map[uint32]int{}
	for i := range st.Peers {
		c.set(st.Peers[i].Name, claimOf(&st.Peers[i], snap, peerClaim{}))
	}
}

// update looks peer name up in st and snap again.
func (c *peerClaims) update(name string, st desired.State, snap *watch.Snapshot) {
	old, had := c.claims[name]
	i, ok := slices.BinarySearchFunc(st.Peers, name, func(p desired.PeerStatus, name string) int { return strings.Compare(p.Name, name) })
	if !ok {
		if had {
			c.unset(name, old)
			delete(c.claims, name)
		}
		return
	}
	// BuildReport's maps keep the last of several entries of one name (sorted: adjacent).
	for i+1 < len(st.Peers) && st.Peers[i+1].Name == name {
		i++
	}
	n := claimOf(&st.Peers[i], snap, old)
	if had {
		if n == old {
			return
		}
		c.unset(name, old)
	}
	c.set(name, n)
}

// claimOf is p's claim; prev's tag is reused when the key incarnation is the same.
func claimOf(p *desired.PeerStatus, snap *watch.Snapshot, prev peerClaim) peerClaim {
	c := peerClaim{inbound: p.Inbound, sendGen: p.SendGeneration}
	if n := snap.Node(p.Name); n != nil {
		c.present, c.inc = true, n.KeyIncarnation()
		if prev.present && prev.inc == c.inc {
			c.tag = prev.tag
		} else {
			c.tag = watch.IncarnationTag(c.inc)
		}
	}
	return c
}

func (c *peerClaims) set(name string, n peerClaim) {
	c.claims[name] = n
	if n.sendGen != 0 {
		c.encrypted++
		c.sending[n.sendGen]++
	}
	if !n.present {
		return
	}
	if n.inbound {
		c.own()
		if c.inbound == nil {
			c.inbound = map[string]string{}
		}
		c.inbound[name] = n.tag
	}
	if n.sendGen != 0 {
		c.own()
		if c.encrypting == nil {
			c.encrypting = map[string]string{}
		}
		c.encrypting[name] = n.tag
	}
}

func (c *peerClaims) unset(name string, o peerClaim) {
	if o.sendGen != 0 {
		c.encrypted--
		if c.sending[o.sendGen]--; c.sending[o.sendGen] == 0 {
			delete(c.sending, o.sendGen)
		}
	}
	if !o.present {
		return
	}
	if o.inbound {
		c.own()
		delete(c.inbound, name)
		if len(c.inbound) == 0 {
			c.inbound = nil
		}
	}
	if o.sendGen != 0 {
		c.own()
		delete(c.encrypting, name)
		if len(c.encrypting) == 0 {
			c.encrypting = nil
		}
	}
}

// own copies the maps a report handed out holds before they change (a report is never
// modified once built).
func (c *peerClaims) own() {
	if !c.shared {
		return
	}
	c.inbound, c.encrypting, c.shared = maps.Clone(c.inbound), maps.Clone(c.encrypting), false
}

// sendingGenerations is State.SendingGenerations from the counts.
func (c *peerClaims) sendingGenerations() []uint32 {
	if len(c.sending) == 0 {
		return nil
	}
	return slices.Sorted(maps.Keys(c.sending))
}
