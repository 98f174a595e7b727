package readiness

import (
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"slices"
)

// Saved is what an agent keeps of its confirmations across its own restarts
// (docs/protocol-v2.md §9 step 4): those that hold for this node's K Self, by peer: the
// peer's K. Confirmations are sticky for the K of both ends (their truth cannot change
// without a K changing), so confirmations saved before a restart with the same keys are
// as true after it; without them a restarted agent would know no pair until its next
// consistent view, while its peers, whose confirmations of its ESP stayed, drop its
// plaintext in enforce.
type Saved struct {
	Self    K
	In, Out map[uint32]K
}

// Changes counts the times a confirmation was set to a new value: while it stays the same,
// so do the confirmations (what Save returns for the same key view).
func (a *Agent) Changes() uint64 { return a.changes }

// Save returns the agent's confirmations that hold in the key view mine: made with this
// node's K in mine, for each peer's K in mine.
func (a *Agent) Save(mine Keys) Saved {
	s := Saved{Self: mine[a.ID], In: map[uint32]K{}, Out: map[uint32]K{}}
	if _, ok := mine[a.ID]; !ok {
		return s
	}
	for _, d := range []struct {
		c   map[uint32][2]K
		dst map[uint32]K
	}{{a.in, s.In}, {a.out, s.Out}} {
		for peer, pair := range d.c {
			if k, ok := mine[peer]; ok && pair == [2]K{k, s.Self} {
				d.dst[peer] = k
			}
		}
	}
	return s
}

// Restore adds s's confirmations when s.Self is this node's K in mine (they were made with
// the keys this node still has), each for the peer's K that s holds: a peer whose K
// changed since is not confirmed by it (SendESP and DropPlaintext compare with mine). It
// reports whether s was taken. Confirmations the agent already has are kept.
func (a *Agent) Restore(s Saved, mine Keys) bool {
	self, ok := mine[a.ID]
	if !ok || s.Self != self {
		return false
	}
	if a.in == nil {
		a.in, a.out = map[uint32][2]K{}, map[uint32][2]K{}
	}
	for _, d := range []struct {
		src map[uint32]K
		c   map[uint32][2]K
	}{{s.In, a.in}, {s.Out, a.out}} {
		for peer, k := range d.src {
			if _, have := d.c[peer]; !have && peer != a.ID {
				a.set(d.c, peer, [2]K{k, self})
			}
		}
	}
	return true
}

// SendESP reports whether s confirms that peer b holds inbound SAs from node self for
// the K of both in mine (Agent.SendESP's answer, from the saved confirmations alone).
func (s Saved) SendESP(self, b uint32, mine Keys) bool { return s.confirms(s.In, self, b, mine) }

// DropPlaintext reports whether s confirms that peer b sends node self ESP for the K of
// both in mine (Agent.DropPlaintext's answer, from the saved confirmations alone).
func (s Saved) DropPlaintext(self, b uint32, mine Keys) bool { return s.confirms(s.Out, self, b, mine) }

func (s Saved) confirms(c map[uint32]K, self, b uint32, mine Keys) bool {
	ka, ok1 := mine[self]
	kb, ok2 := mine[b]
	k, ok3 := c[b]
	return ok1 && ok2 && ok3 && ka == s.Self && kb == k
}

// savedMagic starts the encoding of a Saved (version 1).
const savedMagic = "secureoverlay-readiness-saved v1\n"

// MaxSavedPeers bounds the peers of each direction a Saved decodes with (more than a
// ring's node IDs).
const MaxSavedPeers = 1 << 20

// MarshalBinary encodes s: the magic line, Self (8 bytes, big-endian), then for In and
// Out the number of peers and, by ascending ID, the ID (uvarint) and the peer's K.
func (s Saved) MarshalBinary() ([]byte, error) {
	b := make([]byte, 0, len(savedMagic)+8+2*binary.MaxVarintLen32+12*(len(s.In)+len(s.Out)))
	b = append(b, savedMagic...)
	b = binary.BigEndian.AppendUint64(b, uint64(s.Self))
	for _, m := range []map[uint32]K{s.In, s.Out} {
		b = binary.AppendUvarint(b, uint64(len(m)))
		for _, id := range slices.Sorted(maps.Keys(m)) {
			b = binary.AppendUvarint(b, uint64(id))
			b = binary.BigEndian.AppendUint64(b, uint64(m[id]))
		}
	}
	return b, nil
}

var errSavedShort = errors.New("saved confirmations: cut short")

// UnmarshalBinary decodes what MarshalBinary made; anything else (another version, a
// file cut short or with bytes after its end, IDs out of order) is an error.
func (s *Saved) UnmarshalBinary(b []byte) error {
	if len(b) < len(savedMagic) || string(b[:len(savedMagic)]) != savedMagic {
		return errors.New("saved confirmations: not version 1")
	}
	b = b[len(savedMagic):]
	if len(b) < 8 {
		return errSavedShort
	}
	out := Saved{Self: K(binary.BigEndian.Uint64(b)), In: map[uint32]K{}, Out: map[uint32]K{}}
	b = b[8:]
	for _, m := range []map[uint32]K{out.In, out.Out} {
		n, w := binary.Uvarint(b)
		if w <= 0 {
			return errSavedShort
		}
		if n > MaxSavedPeers {
			return fmt.Errorf("saved confirmations: %d peers, at most %d", n, MaxSavedPeers)
		}
		b = b[w:]
		last := int64(-1)
		for range n {
			id, w := binary.Uvarint(b)
			if w <= 0 || len(b) < w+8 {
				return errSavedShort
			}
			if id > 1<<32-1 || int64(id) <= last {
				return fmt.Errorf("saved confirmations: peer ID %d out of order or range", id)
			}
			last = int64(id)
			m[uint32(id)] = K(binary.BigEndian.Uint64(b[w:]))
			b = b[w+8:]
		}
	}
	if len(b) != 0 {
		return fmt.Errorf("saved confirmations: %d bytes after the end", len(b))
	}
	*s = out
	return nil
}
