package watch

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"

	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// Snapshot is one consistent read of every input cache. It holds the parsed key ring
// (with root keys): never log or print it whole; Ring redacts itself.
type Snapshot struct {
	Nodes []NodeInfo // sorted by name
	// NodesSeq numbers the Nodes' state in the watcher's node view (Watcher.Hint); 0:
	// unnumbered (a snapshot not read from a Watcher, or of no event yet).
	NodesSeq uint64
	Blocks   []desired.Block
	Pools    []desired.Pool
	BGPPeers []desired.BGPPeer
	// Ring is the parsed key ring; nil when RingErr is set.
	Ring    *keys.Ring
	RingErr error
	// Calico is the API group the Calico kinds were read from, and why.
	Calico CalicoAPI
	// CalicoSwitching is the group being switched to ("" when none): until its caches
	// sync, the Calico data is the old group's last (frozen) read.
	CalicoSwitching string
	// Felix holds the FelixConfigurations by name (FelixFor merges them for a node).
	Felix map[string]FelixConfig
	// Skipped lists objects that did not parse (they contribute nothing).
	Skipped []desired.Skip
}

// ErrNoSecret is wrapped when the key Secret does not exist (yet). The agent then keeps
// the kernel as it is: a deleted Secret must not silently turn encryption off.
var ErrNoSecret = errors.New("key secret not found")

// Node returns the named node, or nil.
func (s *Snapshot) Node(name string) *NodeInfo {
	i, ok := slices.BinarySearchFunc(s.Nodes, name, func(n NodeInfo, name string) int { return strings.Compare(n.Name, name) })
	if !ok {
		return nil
	}
	return &s.Nodes[i]
}

// Inputs turns a snapshot into desired.Inputs for node self, whose agent derives with SA
// epoch epoch. It fails (and the agent leaves the kernel untouched) when the ring is
// missing or invalid, when self is unknown, or when the ring's generations use another
// ICV length than cfg.
//
// Every node's desired.Node.Incarnation is its key-derivation incarnation
// (KeyIncarnation): self's from its boot ID, UID and epoch; a peer's from its current
// report only (a peer without one, or whose agent publishes no epoch, gets "" and is
// skipped: nothing is derived for it until it reports). Per-pair facts are tags of these.
func Inputs(self string, s Snapshot, cfg desired.Config, epoch string) (desired.Inputs, error) {
	if s.RingErr != nil {
		return desired.Inputs{}, s.RingErr
	}
	if s.Ring == nil {
		return desired.Inputs{}, ErrNoSecret
	}
	me := s.Node(self)
	if me == nil {
		return desired.Inputs{}, fmt.Errorf("node %q: not found in the API", self)
	}
	cfg = cfg.WithDefaults()
	in := desired.Inputs{Self: self, Blocks: s.Blocks, Pools: s.Pools, BGPPeers: s.BGPPeers, Config: cfg,
		Ring: desired.Ring{Mode: s.Ring.Mode}, Felix: FelixFor(self, s.Felix)}
	for _, g := range s.Ring.Generations {
		if g.ICVBytes != cfg.ICVBytes {
			return desired.Inputs{}, fmt.Errorf("key generation %d uses a %d-byte icv but this agent is configured for %d (--icv-bytes)", g.Number, g.ICVBytes, cfg.ICVBytes)
		}
		in.Ring.Generations = append(in.Ring.Generations, desired.Generation{ID: g.Number, State: desired.GenState(g.State)})
	}
	selfInc := KeyIncarnation(me.Incarnation, me.UID, epoch)
	selfTag := IncarnationTag(selfInc)
	ids := nodeIDs(s.Ring)
	in.Nodes = make([]desired.Node, 0, len(s.Nodes))
	for i := range s.Nodes {
		n := &s.Nodes[i]
		dn := desired.Node{Name: n.Name, IPv4Address: n.IPv4Address, NodeID: ids[n.Name]}
		if n.Name == self {
			dn.Incarnation = selfInc
		} else {
			dn.Incarnation = n.KeyIncarnation()
		}
		if r := n.Report; r != nil && n.Name != self {
			dn.Report = &desired.Report{
				// Compute ignores the report unless this equals dn.Incarnation (same
				// boot, same Node object, an epoch).
				Incarnation:     KeyIncarnation(r.Incarnation, r.UID, r.Epoch),
				Mode:            r.Mode,
				Generations:     slices.Clone(r.Generations),
				InboundFromSelf: selfTag != "" && r.InboundFrom[self] == selfTag,
				EncryptsToSelf:  selfTag != "" && r.EncryptingTo[self] == selfTag,
			}
		}
		in.Nodes = append(in.Nodes, dn)
	}
	in.Keys = KeyFunc(s.Ring)
	in.KeysVersion = s.Ring // parsed once per Secret resourceVersion: a new ring, a new pointer
	if s.NodesSeq != 0 {
		in.NodesVersion = NodesVersion{Seq: s.NodesSeq, Ring: s.Ring, Epoch: epoch}
	}
	return in, nil
}

// nodeIDs is r.NodeID for every node, as a map (Ring.NodeID walks the ring's list: once
// per node, O(N²) at 5,000 nodes). The map of the last ring is kept: a watcher parses a
// ring once per Secret resourceVersion and never modifies it.
func nodeIDs(r *keys.Ring) map[string]uint32 {
	idCache.Lock()
	defer idCache.Unlock()
	if idCache.ring == r && idCache.n == len(r.Nodes) {
		return idCache.ids
	}
	ids := make(map[string]uint32, len(r.Nodes))
	for _, n := range r.Nodes {
		if _, ok := ids[n.Name]; !ok && !n.Released {
			ids[n.Name] = n.ID // the first unreleased entry, as Ring.NodeID
		}
	}
	idCache.ring, idCache.n, idCache.ids = r, len(r.Nodes), ids
	return ids
}

var idCache struct {
	sync.Mutex
	ring *keys.Ring
	n    int
	ids  map[string]uint32
}

// KeyFunc adapts the ring's per-pair derivation (keys.Deriver) to desired.KeyFunc. One
// deriver per generation is cached. Errors never contain key bytes.
func KeyFunc(r *keys.Ring) desired.KeyFunc {
	var mu sync.Mutex
	derivers := map[uint32]*keys.Deriver{}
	return func(gen uint32, kind desired.Kind, src, dst desired.Endpoint) (uint32, desired.Key, error) {
		mu.Lock()
		d, ok := derivers[gen]
		if !ok {
			g := r.Generation(gen)
			if g == nil {
				mu.Unlock()
				return 0, desired.Key{}, fmt.Errorf("generation %d: not in the key ring", gen)
			}
			var err error
			if d, err = keys.NewDeriver(g); err != nil {
				mu.Unlock()
				return 0, desired.Key{}, err
			}
			derivers[gen] = d
		}
		mu.Unlock()
		sa, err := d.DeriveKind(kind, keys.Endpoint(src), keys.Endpoint(dst))
		if err != nil {
			return 0, desired.Key{}, err
		}
		k := desired.NewKey(sa.Key)
		clear(sa.Key)
		return sa.SPI, k, nil
	}
}
