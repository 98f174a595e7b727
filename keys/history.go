package keys

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"maps"
	"slices"
)

// ErrRingWentBackwards is wrapped by History.Check's error when a ring is older than one
// already seen: a key Secret restored from a backup (Velero, GitOps, `kubectl apply` of an
// old copy) or edited by hand. Such a ring is never used: its generations' roots are old
// roots, and a generation that left the ring must never come back.
var ErrRingWentBackwards = errors.New("key ring went backwards")

// History is what a reader of the ring remembers of the rings it accepted: the highest
// lastGeneration, the floor below which no generation may come back (every generation
// below it has left the ring), and a fingerprint of each live generation's root. It is a
// plain value (no key bytes: root fingerprints are SHA-256 of a domain label and the root)
// that agents keep in their ledger and the master derives from its last good ring and its
// status. A zero History accepts any valid ring.
//
// Rules (Check), each monotone in the ring's life as the master writes it:
//   - lastGeneration never decreases;
//   - generations leave oldest first and never come back: every live generation is at
//     least Floor, where Floor is the highest "lowest live generation" seen (or
//     lastGeneration+1 when none was live);
//   - a generation's root never changes.
//
// Together with the SA ledger's "never install a key twice" this makes a restored or
// edited Secret harmless: it is refused before any key is derived from it.
type History struct {
	High  uint32
	Floor uint32
	Roots map[uint32][32]byte
}

// RootFingerprint is the fingerprint History keeps of a generation root.
func RootFingerprint(root Key) [32]byte {
	h := sha256.New()
	h.Write([]byte("secureoverlay root fingerprint v1\x00"))
	h.Write(root)
	var f [32]byte
	copy(f[:], h.Sum(nil))
	return f
}

// Check reports whether r may be used after the rings h has seen. Its errors wrap
// ErrRingWentBackwards and name generation numbers only.
func (h History) Check(r *Ring) error {
	if r.LastGeneration < h.High {
		return fmt.Errorf("%w: lastGeneration %d is below %d, already seen (a Secret restored from an old copy?)", ErrRingWentBackwards, r.LastGeneration, h.High)
	}
	for i, g := range r.Generations {
		if g.Number < h.Floor {
			return fmt.Errorf("%w: generations[%d] (generation %d) left the ring before (every generation below %d did) and may not come back", ErrRingWentBackwards, i, g.Number, h.Floor)
		}
		if f, ok := h.Roots[g.Number]; ok && f != g.Fingerprint() {
			return fmt.Errorf("%w: generations[%d] (generation %d) has another root than when it was first seen", ErrRingWentBackwards, i, g.Number)
		}
	}
	return nil
}

// Observe returns h after accepting r (call it only when Check(r) succeeded). Roots of
// generations below the new floor are forgotten: they can never be used again.
func (h History) Observe(r *Ring) History {
	n := History{High: max(h.High, r.LastGeneration), Floor: h.Floor, Roots: map[uint32][32]byte{}}
	low := r.LastGeneration + 1
	for _, g := range r.Generations {
		low = min(low, g.Number)
	}
	n.Floor = max(n.Floor, low)
	for g, f := range h.Roots {
		if g >= n.Floor {
			n.Roots[g] = f
		}
	}
	for _, g := range r.Generations {
		n.Roots[g.Number] = g.Fingerprint()
	}
	return n
}

// Fingerprint is what History keeps of generation g: its root's fingerprint (protocol v1),
// or its salt's (v2; another domain label, so no salt matches a root).
func (g *Generation) Fingerprint() [32]byte {
	if g.Salt == nil {
		return RootFingerprint(g.Root)
	}
	h := sha256.New()
	h.Write([]byte("secureoverlay salt fingerprint v2\x00"))
	h.Write(g.Salt)
	var f [32]byte
	copy(f[:], h.Sum(nil))
	return f
}

// V2 reports whether g is a protocol v2 generation (a public salt, no root).
func (g *Generation) V2() bool { return g.Salt != nil }

// Merge returns the stronger of two histories (the higher watermarks, the union of the
// roots at or above the new floor; on a conflicting root h's wins — callers merge what
// they trust most first).
func (h History) Merge(o History) History {
	n := History{High: max(h.High, o.High), Floor: max(h.Floor, o.Floor), Roots: map[uint32][32]byte{}}
	for _, src := range []map[uint32][32]byte{o.Roots, h.Roots} {
		for g, f := range src {
			if g >= n.Floor {
				n.Roots[g] = f
			}
		}
	}
	return n
}

// Equal reports whether two histories are the same.
func (h History) Equal(o History) bool {
	return h.High == o.High && h.Floor == o.Floor && maps.Equal(h.Roots, o.Roots)
}

// Generations lists the generations whose roots h remembers, ascending.
func (h History) Generations() []uint32 {
	return slices.Sorted(maps.Keys(h.Roots))
}

// ReportedHigh is the highest generation that more than half of the nodes with a usable
// report list as installed (0 if none): the cluster has used every generation up to it,
// so a ring whose lastGeneration is below it went backwards. A minority of nodes (one
// compromised node reporting a huge number) cannot raise it.
func ReportedHigh(nodes []NodeState) uint32 {
	var highs []uint32
	for _, n := range nodes {
		if n.Report == nil {
			continue
		}
		var h uint32
		for _, g := range n.Report.Generations {
			h = max(h, g)
		}
		highs = append(highs, h)
	}
	if len(highs) == 0 {
		return 0
	}
	slices.Sort(highs)
	slices.Reverse(highs)
	return highs[len(highs)/2]
}
