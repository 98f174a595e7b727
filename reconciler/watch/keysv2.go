package watch

// Protocol v2 SA keys (docs/keys.md §10): a v2 generation's pair keys come from the two
// nodes' X25519 keys — this node's private key (its ledger) and the peer's public key (its
// NodeKeys, for the peer's current key incarnation) — and the generation's public salt.

import (
	"fmt"
	"sync"

	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/nodekeys"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// V2Keys is what the v2 derivation needs besides the ring.
type V2Keys struct {
	// Self is this node's key incarnation (KeyIncarnation of its boot ID, UID, epoch).
	Self string
	// Private returns this node's private key for a generation (the ledger's).
	Private func(gen uint32) (*keys.PrivateKey, bool)
	// Peer returns the published keys of the peer with a ring node ID (false: none).
	Peer func(nodeID uint32) (nodekeys.Keys, bool)
}

// KeyFuncWith is KeyFunc for a ring that may hold protocol v2 generations: v1 generations
// derive from their root as KeyFunc does; a v2 generation's SA between this node and a
// peer derives from the pair's X25519 keys. When the peer's key for the generation is not
// known for its current incarnation (no NodeKeys, another incarnation's, no key for the
// generation), or v is nil, the error wraps desired.ErrPeerKeyUnknown. Errors never
// contain key bytes (public keys at most).
func KeyFuncWith(r *keys.Ring, v *V2Keys) desired.KeyFunc {
	v1 := KeyFunc(r)
	var mu sync.Mutex
	type pairKey struct {
		gen  uint32
		peer keys.PublicKey
	}
	pairs := map[pairKey]*keys.PairDeriver{}
	return func(gen uint32, kind desired.Kind, lane uint16, src, dst desired.Endpoint) (uint32, desired.Key, error) {
		g := r.Generation(gen)
		if g == nil || !g.V2() {
			return v1(gen, kind, lane, src, dst)
		}
		if v == nil {
			return 0, desired.Key{}, fmt.Errorf("generation %d is a protocol v2 generation and this node has no v2 keys: %w", gen, desired.ErrPeerKeyUnknown)
		}
		var peer desired.Endpoint
		switch {
		case src.Incarnation == v.Self && dst.Incarnation != v.Self:
			peer = dst
		case dst.Incarnation == v.Self && src.Incarnation != v.Self:
			peer = src
		default:
			return 0, desired.Key{}, fmt.Errorf("generation %d: sa %s->%s is not between this node and a peer", gen, src.IP, dst.IP)
		}
		nk, ok := v.Peer(peer.NodeID)
		if !ok {
			return 0, desired.Key{}, fmt.Errorf("generation %d: node id %d publishes no keys: %w", gen, peer.NodeID, desired.ErrPeerKeyUnknown)
		}
		if KeyIncarnation(nk.Incarnation.BootID, nk.Incarnation.UID, nk.Incarnation.Epoch) != peer.Incarnation {
			return 0, desired.Key{}, fmt.Errorf("generation %d: node id %d publishes keys of another key incarnation: %w", gen, peer.NodeID, desired.ErrPeerKeyUnknown)
		}
		peerPub, ok := nk.Key(gen)
		if !ok {
			return 0, desired.Key{}, fmt.Errorf("generation %d: node id %d publishes no key for it: %w", gen, peer.NodeID, desired.ErrPeerKeyUnknown)
		}
		priv, ok := v.Private(gen)
		if !ok {
			return 0, desired.Key{}, fmt.Errorf("generation %d: this node holds no private key for it: %w", gen, desired.ErrPeerKeyUnknown)
		}
		mu.Lock()
		d, ok := pairs[pairKey{gen, peerPub}]
		if !ok {
			var err error
			d, err = keys.NewPairDeriver(keys.GenerationV2{Number: gen, Cipher: g.Cipher, ICVBytes: g.ICVBytes, Salt: g.Salt}, priv, peerPub)
			if err != nil {
				mu.Unlock()
				return 0, desired.Key{}, fmt.Errorf("node id %d: %w", peer.NodeID, err)
			}
			pairs[pairKey{gen, peerPub}] = d
		}
		mu.Unlock()
		pub := func(e desired.Endpoint) keys.PublicKey {
			if e == peer {
				return peerPub
			}
			return priv.Public()
		}
		sa, err := d.Derive(kind, lane, keys.EndpointV2{Endpoint: keys.Endpoint(src), Public: pub(src)}, keys.EndpointV2{Endpoint: keys.Endpoint(dst), Public: pub(dst)})
		if err != nil {
			return 0, desired.Key{}, err
		}
		k := desired.NewKey(sa.Key)
		clear(sa.Key)
		return sa.SPI, k, nil
	}
}
