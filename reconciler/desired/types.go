package desired

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
)

// Endpoint is one end of a directed SA: a node's IP, its key-derivation incarnation (boot
// ID, Node UID and SA epoch together; see docs/keys.md "Incarnations and epochs") and its
// master-assigned node ID. Keys and SPIs are a function of (generation, kind, src, dst).
type Endpoint struct {
	IP          netip.Addr
	Incarnation string
	NodeID      uint32
}

// Kind separates the two SA families: keys.Kind, one type for the SPI layout, the key
// derivation and the kernel objects. They use different reqids and must use different
// SPIs and keys (no two SAs ever share an AEAD key).
type Kind = keys.Kind

const (
	// Transport: ESP transport mode on Calico's IPIP packets (IP proto 4) node to node.
	Transport = keys.KindTransport
	// Tunnel: ESP tunnel mode between node IPs for same-subnet pod traffic of CrossSubnet
	// pools, which Calico routes without IPIP.
	Tunnel = keys.KindTunnel
)

// KeyFunc returns the SPI and AEAD key of generation gen's SA of the given kind and lane
// from src to dst (lane 0: the direction's one SA; docs/keys.md §2). Both ends call it with
// the same arguments (the sender as (self, peer), the receiver as (peer, self)) and must
// get the same answer. It must never return the same key for two different argument
// tuples, and its errors must not contain key bytes. A generation without lanes (protocol
// v1) answers a lane > 0 with an error wrapping ErrNoLanes.
type KeyFunc func(gen uint32, kind Kind, lane uint16, src, dst Endpoint) (spi uint32, key Key, err error)

// ErrNoLanes is wrapped by a KeyFunc's error for a lane > 0 of a generation that has no
// lanes (protocol v1): its pairs send on lane 0 only.
var ErrNoLanes = errors.New("generation has no per-CPU lanes")

// ErrPeerKeyUnknown is wrapped by a KeyFunc's error when generation gen's SAs with the
// peer cannot be derived *yet*: a protocol v2 generation whose pair key needs the peer's
// published X25519 key (docs/keys.md §10), which this node has not seen for the peer's
// current key incarnation. The pair then has no SAs of that generation (and the generation
// is not claimed installed) until the key arrives; it is not a fault of the peer.
var ErrPeerKeyUnknown = errors.New("peer's public key for this generation not known yet")

// GenState is a key generation's place in its life cycle (the ring's states).
type GenState string

const (
	// GenPending: SAs are installed (inbound and outbound); nobody sends with it yet.
	GenPending GenState = "pending"
	// GenActive: senders use it for every peer that reports it installed inbound.
	GenActive GenState = "active"
	// GenRetiring: still installed; used only toward peers that do not list the active one.
	GenRetiring GenState = "retiring"
)

// Generation is one live key generation of the ring.
type Generation struct {
	ID    uint32
	State GenState
}

// Ring is the agent's view of the key ring: the cluster mode and the live generations.
type Ring struct {
	Mode        api.Mode
	Generations []Generation
}

// Report is a peer's published state as this node sees it. The shell fills it from the
// peer's api.NodeReport; the two per-pair facts are what make joins and reboots safe (see
// docs/dataplane.md, "per-pair readiness").
type Report struct {
	// Incarnation is the key-derivation incarnation the peer's report was made with
	// (boot ID, Node UID, SA epoch). A report whose incarnation differs from the node's
	// current one is stale and ignored.
	Incarnation string
	// Mode is the mode the peer's kernel implements.
	Mode api.Mode
	// Generations lists generations whose inbound SAs the peer has installed.
	Generations []uint32
	// InboundFromSelf: the peer has installed inbound SAs from this node's current
	// incarnation (so this node may send ESP to it).
	InboundFromSelf bool
	// EncryptsToSelf: the peer's kernel sends ESP to this node (it has an outbound policy
	// toward this node's current incarnation), so plaintext from it may be dropped.
	EncryptsToSelf bool
	// ListsOmitted: the peer's agent omits its per-pair lists from its report
	// (docs/protocol-v2.md §9 step 4), so InboundFromSelf and EncryptsToSelf come from this
	// node's readiness rule alone. Compute does not read it.
	ListsOmitted bool
}

// Node is a cluster node (a Kubernetes Node that Calico knows).
type Node struct {
	Name string
	// IPv4Address is the raw projectcalico.org/IPv4Address annotation: a CIDR (the node's
	// address and subnet) or a bare IP.
	IPv4Address string
	// Incarnation is the node's key-derivation incarnation: status.nodeInfo.bootID,
	// metadata.uid and the agent's SA epoch (the shell composes it; for a peer it comes
	// from the peer's current report). "" skips the peer.
	Incarnation string
	// NodeID is the master-assigned small ID (0: none assigned yet).
	NodeID uint32
	// Lanes is the number of per-CPU outbound lanes the node sends on in its current
	// incarnation, as its NodeKeys publish it for that incarnation (0: none; at most
	// keys.MaxCPULanes): a peer's are the lanes this node installs inbound states for,
	// self's the ones it installs outbound (docs/dataplane.md §10).
	Lanes uint16
	// TakesLanes: the node's agent installs inbound states for its peers' lanes (its
	// NodeKeys of the current incarnation carry a lane count), so this node may send to it
	// on its own lanes.
	TakesLanes bool
	// Published identifies the public keys the node publishes for its current
	// incarnation (protocol v2; "" for none). Compute does not read it: the KeyFunc holds
	// the keys. It makes a peer whose published keys changed a changed input (Memo).
	Published string
	// Report is nil when the peer has published nothing usable.
	Report *Report
}

// Block is a Calico IPAM block.
type Block struct {
	CIDR netip.Prefix
	// Affinity is the raw spec.affinity: "host:NODE" (the block is NODE's), "" (Calico
	// released the affinity; the allocations still belong to the nodes their attributes
	// name, see Borrowed) or "virtual:NAME" (load-balancer IPAM: not pods, not covered).
	Affinity string
	Deleted  bool
	// Borrowed lists addresses of this block allocated to pods on a node other than the
	// affine one (every allocated address with a node, when the block has no affinity).
	Borrowed []Borrowed
}

// Borrowed is one /32 of a block used by a node other than the block's affine node.
type Borrowed struct {
	IP   netip.Addr
	Node string
}

// IPIP modes of a Calico IP pool.
const (
	IPIPAlways      = "Always"
	IPIPCrossSubnet = "CrossSubnet"
	IPIPNever       = "Never"
)

// VXLAN modes of a Calico IP pool.
const (
	VXLANAlways      = "Always"
	VXLANCrossSubnet = "CrossSubnet"
)

// Pool is a Calico IP pool.
type Pool struct {
	Name      string
	CIDR      netip.Prefix
	IPIPMode  string // Always, CrossSubnet, Never ("" means Never, as in Calico)
	VXLANMode string // Always, CrossSubnet, Never ("" means Never): VXLAN is not covered
	Disabled  bool
}

// Felix is what this node's Felix configuration says about the Calico data-plane modes
// next to ours (FelixConfiguration "node.NAME" over "default", field by field; unset
// fields are Felix's defaults). Compute only reports them (State.Neighbours); see
// docs/dataplane.md §9 for what each means for the encryption.
type Felix struct {
	WireGuard    bool   // wireguardEnabled: Calico encrypts IPv4 pod traffic itself
	BPF          bool   // bpfEnabled: Calico's eBPF data plane
	NFTablesMode string // nftablesMode: Enabled, Disabled, Auto ("" unset)
}

// Neighbour codes (State.Neighbours, the report's "neighbours"): short, from a fixed set,
// so a node's report stays small.
const (
	NeighbourVXLAN     = "vxlan-pool"       // a pool with vxlanMode Always/CrossSubnet: not covered
	NeighbourNever     = "unencapsulated"   // a pool with neither IPIP nor VXLAN: not covered
	NeighbourIPv6      = "ipv6"             // IPv6 pools or blocks: not covered
	NeighbourVirtual   = "virtual-affinity" // load-balancer IPAM blocks: not covered
	NeighbourWireGuard = "wireguard"        // Calico WireGuard on: double encryption, see dataplane.md
	NeighbourBPF       = "ebpf"             // Calico eBPF data plane: CrossSubnet coverage does not hold
	NeighbourNFTables  = "nftables"         // Felix in nftables mode: our iptables raw rules still apply
)

// BGPPeer is a Calico BGPPeer.
type BGPPeer struct {
	Name   string
	PeerIP netip.Addr
}

// Inputs is everything Compute needs. It holds no clock, no client and no kernel handle.
type Inputs struct {
	Self     string // this node's name; must be in Nodes
	Nodes    []Node
	Blocks   []Block
	Pools    []Pool
	BGPPeers []BGPPeer
	Ring     Ring
	Config   Config
	Keys     KeyFunc
	// KeysVersion identifies Keys for a Memo: two Inputs with the same non-nil (and
	// comparable) KeysVersion must have Keys that give the same answers. nil: a Memo
	// recomputes everything. Compute ignores it.
	KeysVersion any
	// NodesVersion identifies Nodes for a Memo: two Inputs with the same non-nil (and
	// comparable) NodesVersion must have equal Nodes, and a Hint relates two of them
	// (Hint.Since). nil: a Memo compares every Node. Compute ignores it.
	NodesVersion any
	// Felix is this node's Felix configuration (neighbour modes, reported only).
	Felix Felix
	// HoldPlaintext names peers this node must not send plaintext IPIP to in enforce mode
	// even while it has no outbound policy toward them: after a new SA epoch (lost state)
	// the agent re-keys the peers it was encrypting to and keeps their outbound drop rule
	// until they report ready for the new keys (fail closed; docs/dataplane.md §5).
	HoldPlaintext []string
	// Previous is the state this node's kernel was last brought to in the current SA
	// epoch (nil after a restart or a new epoch). When two nodes claim one IP, the peer
	// that held the address in Previous keeps exactly its previous SAs, policies and
	// rules (frozen) and the other claimant gets nothing (docs/dataplane.md, "Address
	// conflicts").
	Previous *State
}

// Conflict is an IPv4 address claimed by more than one Node.
type Conflict struct {
	IP    netip.Addr
	Nodes []string // sorted
	// Holder is the claimant that held the address before the conflict (frozen); "" if
	// none did (then no claimant gets anything).
	Holder string
}

func (c Conflict) String() string {
	s := fmt.Sprintf("address %s claimed by nodes %s", c.IP, strings.Join(c.Nodes, ", "))
	if c.Holder != "" {
		return s + fmt.Sprintf(": %s, which held it, is kept as it was (no new SAs, no relaxed rules); the others get nothing", c.Holder)
	}
	return s + ": none of them gets SAs or policies"
}

// Dir is the direction of an SA or a policy.
type Dir uint8

const (
	In  Dir = 0 // the kernel's XFRM_POLICY_IN
	Out Dir = 1 // XFRM_POLICY_OUT
	Fwd Dir = 2 // XFRM_POLICY_FWD
)

func (d Dir) String() string {
	switch d {
	case In:
		return "in"
	case Out:
		return "out"
	case Fwd:
		return "fwd"
	}
	return fmt.Sprintf("dir(%d)", uint8(d))
}

// SA is one xfrm state (ESP, AEAD rfc4106(gcm(aes))). Its kernel identity is (Dst, SPI).
type SA struct {
	// Kernel fields.
	Src, Dst     netip.Addr
	SPI          uint32
	Kind         Kind // mode transport or tunnel
	ReqID        uint32
	Key          Key
	ICVBytes     int
	ReplayWindow uint32
	ESN          bool
	SoftPackets  uint64
	HardPackets  uint64
	// Selector restricts what the SA may carry (transport: src/32 dst/32 proto 4; tunnel:
	// unset, the policies select). Zero prefixes mean "any".
	SelSrc, SelDst netip.Prefix
	SelProto       uint8
	// Lane is the kernel's CPU number plus one: 0 for a state without one (a direction's
	// one SA, the lanes' fallback, every inbound state), n ≥ 1 for the per-CPU outbound
	// state of CPU n−1 (XFRMA_SA_PCPU with XFRMA_SA_DIR out, Linux ≥ 6.13; issue 18,
	// docs/dataplane.md §10). The derivation's lane is in the SPI (keys.LaneSPI): CPU c's
	// state is derivation lane keys.FallbackLane+1+c.
	Lane uint16

	// Bookkeeping, not in the kernel.
	Dir        Dir // In: src is the peer; Out: dst is the peer
	Peer       string
	Generation uint32
}

// ID is the SA's kernel identity as text: "esp dst=D spi=0xS".
func (s SA) ID() string { return fmt.Sprintf("esp dst=%s spi=0x%08x", s.Dst, s.SPI) }

// String names the SA without its key.
func (s SA) String() string {
	lane := ""
	if s.Lane > 0 {
		lane = fmt.Sprintf(" lane=%d", s.Lane)
	}
	return fmt.Sprintf("%s sa src=%s dst=%s spi=0x%08x reqid=0x%x gen=%d peer=%s%s", s.Kind, s.Src, s.Dst, s.SPI, s.ReqID, s.Generation, s.Peer, lane)
}

// SameKernelObject reports whether o (as listed from the kernel) is exactly s: same
// identity, addresses, mode, reqid, key, ICV, replay window, ESN, limits, selector and lane.
// Bookkeeping fields are ignored.
func (s SA) SameKernelObject(o SA) bool {
	return s.Src == o.Src && s.Dst == o.Dst && s.SPI == o.SPI && s.Kind == o.Kind &&
		s.ReqID == o.ReqID && s.Key.Equal(o.Key) && s.ICVBytes == o.ICVBytes &&
		s.ReplayWindow == o.ReplayWindow && s.ESN == o.ESN &&
		s.SoftPackets == o.SoftPackets && s.HardPackets == o.HardPackets &&
		s.SelSrc == o.SelSrc && s.SelDst == o.SelDst && s.SelProto == o.SelProto && s.Lane == o.Lane
}

// Template is an xfrm policy template (one ESP transformation).
type Template struct {
	Src, Dst netip.Addr
	SPI      uint32 // 0: any SA matching the rest (inbound templates)
	Kind     Kind
	ReqID    uint32
	Optional bool // "level use": plaintext passes the policy check too
}

// IsZero reports whether t is absent (a bypass policy).
func (t Template) IsZero() bool { return t == Template{} }

// Policy is one xfrm policy. Its kernel identity is (Dir, Src, Dst, Proto); Priority and
// Tmpl are its content, changed in place with XFRM_MSG_UPDPOLICY. A policy without a
// template is a bypass: matching packets pass unencrypted (used for borrowed /32s that are
// reached through IPIP inside block CIDRs that are otherwise tunnelled).
type Policy struct {
	Dir      Dir
	Src, Dst netip.Prefix
	Proto    uint8 // 4 (IPIP) or 0 (any)
	Priority uint32
	Tmpl     Template

	// Bookkeeping, not in the kernel.
	Peer string
	// Fallback is, for an outbound policy that sends on lanes (a template with the lanes'
	// reqid and no SPI), the SPI of the lanes' fallback state, which carries every CPU
	// without a state of its own: the policy is written only once it exists, and it is
	// not deleted while the policy names its reqid (docs/dataplane.md §10).
	Fallback uint32
}

// ID is the policy's kernel identity as text.
func (p Policy) ID() string {
	return fmt.Sprintf("policy src=%s dst=%s proto=%d dir=%s", p.Src, p.Dst, p.Proto, p.Dir)
}

func (p Policy) String() string {
	if p.Tmpl.IsZero() {
		return fmt.Sprintf("%s priority=%d bypass", p.ID(), p.Priority)
	}
	level := "required"
	if p.Tmpl.Optional {
		level = "use"
	}
	return fmt.Sprintf("%s priority=%d tmpl %s src=%s dst=%s spi=0x%08x reqid=0x%x level=%s",
		p.ID(), p.Priority, p.Tmpl.Kind, p.Tmpl.Src, p.Tmpl.Dst, p.Tmpl.SPI, p.Tmpl.ReqID, level)
}

// SameKernelObject reports whether o is exactly p in the kernel.
func (p Policy) SameKernelObject(o Policy) bool {
	return p.Dir == o.Dir && p.Src == o.Src && p.Dst == o.Dst && p.Proto == o.Proto &&
		p.Priority == o.Priority && p.Tmpl == o.Tmpl
}

// Hook is where an iptables rule sits: our chain in raw PREROUTING or raw OUTPUT.
type Hook uint8

const (
	HookIn  Hook = 1 // raw PREROUTING
	HookOut Hook = 2 // raw OUTPUT
)

func (h Hook) String() string {
	switch h {
	case HookIn:
		return "in"
	case HookOut:
		return "out"
	}
	return fmt.Sprintf("hook(%d)", uint8(h))
}

// Action of a rule.
type Action uint8

const (
	// Count only counts plaintext IPIP that enforce would drop (no target).
	Count Action = 1
	// Drop drops plaintext IPIP.
	Drop Action = 2
)

func (a Action) String() string {
	switch a {
	case Count:
		return "count"
	case Drop:
		return "drop"
	}
	return fmt.Sprintf("action(%d)", uint8(a))
}

// Rule is one plaintext-IPIP rule for one peer: HookIn matches `-p 4 -s PeerIP -m policy
// --dir in --pol none`, HookOut matches `-p 4 -d PeerIP -m policy --dir out --pol none`.
type Rule struct {
	Hook   Hook
	PeerIP netip.Addr
	Peer   string
	Action Action
}

// ID is the rule's identity as text.
func (r Rule) ID() string { return fmt.Sprintf("%s %s %s", r.Hook, r.Action, r.PeerIP) }

// Skip records an input object that produced nothing, and why.
type Skip struct {
	Object string // "node/NAME", "bgppeer/NAME", "block/CIDR", "pool/NAME"
	Reason string
}

// PeerStatus summarises what is programmed toward one peer.
type PeerStatus struct {
	Name string
	IP   netip.Addr
	// SendGeneration is the generation our outbound policy uses (0: none, plaintext).
	SendGeneration uint32
	// Inbound: our inbound SAs for the peer are in the state.
	Inbound bool
	// DropsPlaintext: we drop plaintext IPIP from the peer (enforce).
	DropsPlaintext bool
	// SameSubnet: CrossSubnet tunnel-mode coverage is programmed for the peer.
	SameSubnet bool
	// Reason explains why SendGeneration is 0 (empty when sending ESP).
	Reason string
	// KeysUnknown lists the generations with no SAs with the peer yet: protocol v2
	// generations whose pair key needs the peer's public key, not known for its current
	// key incarnation (ErrPeerKeyUnknown). Inbound is false while it holds a generation
	// anyone may send with; a pending one keeps the generation out of State.Generations.
	KeysUnknown []uint32
}

// State is the complete desired kernel state of one node. Every slice is sorted and
// free of duplicates, so two States compare with reflect.DeepEqual / slices.Equal.
type State struct {
	Mode     api.Mode
	SAs      []SA     // sorted by (Dst, SPI)
	Policies []Policy // sorted by (Dir, Src, Dst, Proto)
	Rules    []Rule   // sorted by (Hook, PeerIP, Action)
	Peers    []PeerStatus
	Skipped  []Skip
	// NotCovered lists pod traffic this state leaves in plaintext (Never pools,
	// same-subnet traffic without usable IPAM data, BGP peers outside the cluster).
	NotCovered []string
	// Generations are the live generations whose inbound SAs exist for every peer.
	Generations []uint32
	// Conflicts are addresses claimed by more than one Node (sorted by IP).
	Conflicts []Conflict
	// Neighbours lists, as Neighbour* codes (sorted, unique), the Calico modes found that
	// this state does not cover or that change what it means (the report's short form of
	// NotCovered; docs/dataplane.md §9).
	Neighbours []string
}
