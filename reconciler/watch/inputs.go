package watch

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/nodeid"
	"github.com/secureoverlay/secureoverlay/nodekeys"
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
	// MasterReads is what the master says it reads, beside the public ring
	// (api.RingMasterDataKey; nil: no public ring, or a master that says nothing).
	MasterReads []string
	// Calico is the API group the Calico kinds were read from, and why.
	Calico CalicoAPI
	// CalicoSwitching is the group being switched to ("" when none): until its caches
	// sync, the Calico data is the old group's last (frozen) read.
	CalicoSwitching string
	// Felix holds the FelixConfigurations by name (FelixFor merges them for a node).
	Felix map[string]FelixConfig
	// Skipped lists objects that did not parse (they contribute nothing).
	Skipped []desired.Skip
	// Private returns this node's X25519 private key of a generation (protocol v2). The
	// agent sets it (its ledger holds the keys) before Inputs; nil: v1 derivation only.
	Private func(gen uint32) (*keys.PrivateKey, bool)
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
	return inputs(self, s, cfg, epoch, func(conv func(*NodeInfo) desired.Node) []desired.Node {
		out := make([]desired.Node, 0, len(s.Nodes))
		for i := range s.Nodes {
			out = append(out, conv(&s.Nodes[i]))
		}
		return out
	})
}

// inputs is Inputs with the conversion of the nodes left to nodes.
func inputs(self string, s Snapshot, cfg desired.Config, epoch string, nodes func(conv func(*NodeInfo) desired.Node) []desired.Node) (desired.Inputs, error) {
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
	in.Nodes = nodes(nodeConverter(self, me, s.Ring, epoch))
	in.Keys = KeyFuncWith(s.Ring, v2Keys(&s, KeyIncarnation(me.Incarnation, me.UID, epoch)))
	in.KeysVersion = s.Ring // parsed once per Secret resourceVersion: a new ring, a new pointer
	if s.NodesSeq != 0 {
		in.NodesVersion = NodesVersion{Seq: s.NodesSeq, Ring: s.Ring, Epoch: epoch}
	}
	return in, nil
}

// Inputs is the package's Inputs for a snapshot s of this watcher, built from the last
// Inputs it built when it can: with the same node self, ring and epoch, and a node log
// that reaches back to that snapshot, only the nodes the view logged in between are
// converted again and the others' desired.Nodes are copied from the last Inputs (no
// conversion, no allocation per node). Otherwise, and for snapshots not numbered by
// this watcher, every node is converted. The result equals Inputs(self, s, cfg, epoch)
// (TestWatcherInputsEqualsInputs). The Nodes slice is shared with the next call's work:
// read it, never modify it.
func (w *Watcher) Inputs(self string, s Snapshot, cfg desired.Config, epoch string) (desired.Inputs, error) {
	w.inMu.Lock()
	defer w.inMu.Unlock()
	var ver NodesVersion
	if s.NodesSeq != 0 {
		ver = NodesVersion{Seq: s.NodesSeq, Ring: s.Ring, Epoch: epoch}
	}
	in, err := inputs(self, s, cfg, epoch, func(conv func(*NodeInfo) desired.Node) []desired.Node {
		last, lastVer := w.inNodes, w.inVer
		if ver.Seq != 0 && w.inSelf == self && lastVer.Seq != 0 && lastVer.Ring == ver.Ring && lastVer.Epoch == ver.Epoch {
			if names, ok := w.view.changed(lastVer.Seq, ver.Seq); ok && !slices.Contains(names, self) && len(names) <= len(last)/8+8 {
				w.inPatched++
				return patchNodes(last, names, &s, conv)
			}
		}
		out := make([]desired.Node, 0, len(s.Nodes))
		for i := range s.Nodes {
			out = append(out, conv(&s.Nodes[i]))
		}
		return out
	})
	if err != nil {
		w.inNodes, w.inVer = nil, NodesVersion{}
		return in, err
	}
	w.inNodes, w.inVer, w.inSelf = in.Nodes, ver, self
	return in, nil
}

// patchNodes is last (sorted by name) with the named nodes converted again from s
// (added, replaced, or dropped when s no longer has them), in a new slice.
func patchNodes(last []desired.Node, names []string, s *Snapshot, conv func(*NodeInfo) desired.Node) []desired.Node {
	names = slices.Sorted(slices.Values(names))
	out := make([]desired.Node, 0, len(s.Nodes))
	i := 0
	for _, name := range names {
		p, found := slices.BinarySearchFunc(last, name, func(n desired.Node, name string) int { return strings.Compare(n.Name, name) })
		out = append(out, last[i:p]...)
		i = p
		if found {
			i++
		}
		if n := s.Node(name); n != nil {
			out = append(out, conv(n))
		}
	}
	return append(out, last[i:]...)
}

// nodeConverter returns the function that turns one snapshot node into its desired.Node
// for node self (whose NodeInfo is me) in epoch epoch.
func nodeConverter(self string, me *NodeInfo, ring *keys.Ring, epoch string) func(*NodeInfo) desired.Node {
	selfInc := KeyIncarnation(me.Incarnation, me.UID, epoch)
	selfTag := IncarnationTag(selfInc)
	ids := nodeIDs(ring)
	return func(n *NodeInfo) desired.Node {
		dn := desired.Node{Name: n.Name, IPv4Address: n.IPv4Address, NodeID: ids[n.Name]}
		fromKeys := false
		if n.Name == self {
			dn.Incarnation = selfInc
		} else {
			dn.Incarnation, fromKeys = n.keyIncarnation()
			dn.Published = publishedID(n, dn.Incarnation)
		}
		dn.Lanes, dn.TakesLanes = lanesOf(n, dn.Incarnation)
		if n.Name == self {
			return dn
		}
		if r := n.Report; r != nil {
			dn.Report = &desired.Report{
				// Compute ignores the report unless this equals dn.Incarnation (same
				// boot, same Node object, an epoch).
				Incarnation:     KeyIncarnation(r.Incarnation, r.UID, r.Epoch),
				Mode:            r.Mode,
				Generations:     slices.Clone(r.Generations),
				InboundFromSelf: selfTag != "" && r.InboundFrom[self] == selfTag,
				EncryptsToSelf:  selfTag != "" && r.EncryptingTo[self] == selfTag,
				ListsOmitted:    r.ListsOmitted,
			}
		}
		if fromKeys {
			dn.Report = keysReport(dn.Incarnation, n.Keys)
		}
		return dn
	}
}

// keysReport is what Compute takes of a peer whose key incarnation inc comes from its
// NodeKeys k (docs/keys.md §3, rule 2): the mode and generations its installed stands
// for — none installed reads as off, some as accept, the rank Compute asks of a peer
// before it sends (a peer holds inbound SAs only from accept on) — and no lists, as from
// a report that omits them (the rule's confirmations decide; a report that lists
// decides itself, rule 1).
func keysReport(inc string, k *nodekeys.Keys) *desired.Report {
	r := &desired.Report{Incarnation: inc, Mode: api.ModeOff, Generations: slices.Clone(k.Installed), ListsOmitted: true}
	if len(k.Installed) > 0 {
		r.Mode = api.ModeAccept
	}
	return r
}

// v2Keys is what KeyFuncWith needs of snapshot s for a node of key incarnation self: its
// private keys (Snapshot.Private) and its peers' published keys, looked up by ring node ID
// (nil without private keys: a snapshot not made by an agent derives v1 only).
func v2Keys(s *Snapshot, self string) *V2Keys {
	if s.Private == nil {
		return nil
	}
	names := nodeNames(s.Ring)
	return &V2Keys{Self: self, Private: s.Private, Peer: func(id uint32) (nodekeys.Keys, bool) {
		n := s.Node(names[id])
		if n == nil || n.Keys == nil {
			return nodekeys.Keys{}, false
		}
		return *n.Keys, true
	}}
}

// lanesOf is what node n's NodeKeys say of per-CPU lanes for its key incarnation inc
// (docs/dataplane.md §10): the count it sends on and whether it takes its peers'. Keys of
// another incarnation, or without api.CapabilityLanes (an agent before lanes, or rolled
// back to one: its whole capabilities list replaces ours, the count may stay), say none.
func lanesOf(n *NodeInfo, inc string) (uint16, bool) {
	k := n.Keys
	if k == nil || inc == "" || !k.Has(api.CapabilityLanes) ||
		KeyIncarnation(k.Incarnation.BootID, k.Incarnation.UID, k.Incarnation.Epoch) != inc {
		return 0, false
	}
	return k.Lanes, true
}

// publishedID identifies the keys node n publishes for its key incarnation inc
// (desired.Node.Published; "" for none or another incarnation's).
func publishedID(n *NodeInfo, inc string) string {
	k := n.Keys
	if k == nil || inc == "" || KeyIncarnation(k.Incarnation.BootID, k.Incarnation.UID, k.Incarnation.Epoch) != inc {
		return ""
	}
	var b strings.Builder
	for _, e := range k.Keys {
		fmt.Fprintf(&b, "%d:%s ", e.Generation, e.X25519)
	}
	return b.String()
}

// NodeIDs is r.NodeID for every node, as a map (shared: do not modify it).
func NodeIDs(r *keys.Ring) map[string]uint32 { return nodeIDs(r) }

// nodeIDs is r.NodeID for every node, as a map (Ring.NodeID walks the ring's list: once
// per node, O(N²) at 5,000 nodes). The map of the last ring is kept: a watcher parses a
// ring once per Secret resourceVersion and never modifies it.
func nodeIDs(r *keys.Ring) map[string]uint32 {
	idCache.Lock()
	defer idCache.Unlock()
	if idCache.ring == r && idCache.n == len(r.Nodes) {
		return idCache.ids
	}
	ids, _ := nodeid.IDs(r, nil, "") // the ring's table (NodeIDs are not read yet: docs/keys.md §13)
	names := make(map[uint32]string, len(ids))
	for name, id := range ids {
		names[id] = name
	}
	idCache.ring, idCache.n, idCache.ids, idCache.names = r, len(r.Nodes), ids, names
	return ids
}

// nodeNames is the inverse of nodeIDs.
func nodeNames(r *keys.Ring) map[uint32]string {
	nodeIDs(r)
	idCache.Lock()
	defer idCache.Unlock()
	return idCache.names
}

var idCache struct {
	sync.Mutex
	ring  *keys.Ring
	n     int
	ids   map[string]uint32
	names map[uint32]string
}

// KeyFunc adapts the ring's per-pair derivation (keys.Deriver) to desired.KeyFunc. One
// deriver per generation is cached. Errors never contain key bytes. Protocol v1 has no
// lanes: a lane > 0 is refused with desired.ErrNoLanes.
func KeyFunc(r *keys.Ring) desired.KeyFunc {
	var mu sync.Mutex
	derivers := map[uint32]*keys.Deriver{}
	return func(gen uint32, kind desired.Kind, lane uint16, src, dst desired.Endpoint) (uint32, desired.Key, error) {
		if lane != 0 {
			return 0, desired.Key{}, fmt.Errorf("generation %d is a protocol v1 generation: %w", gen, desired.ErrNoLanes)
		}
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
