package desired

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
)

// ParseNodeAddress parses the projectcalico.org/IPv4Address annotation: a CIDR such as
// "10.0.0.5/24" (address and subnet) or a bare IPv4 address (returned as a /32, i.e. the
// subnet is unknown).
func ParseNodeAddress(s string) (netip.Prefix, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return netip.Prefix{}, errors.New("no IPv4 address annotation")
	}
	var p netip.Prefix
	if strings.Contains(s, "/") {
		var err error
		if p, err = netip.ParsePrefix(s); err != nil {
			return netip.Prefix{}, fmt.Errorf("ipv4 address annotation %q: %w", s, err)
		}
	} else {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("ipv4 address annotation %q: %w", s, err)
		}
		a = a.Unmap()
		p = netip.PrefixFrom(a, a.BitLen())
	}
	if !p.Addr().Unmap().Is4() {
		return netip.Prefix{}, fmt.Errorf("ipv4 address annotation %q is not IPv4", s)
	}
	a := p.Addr().Unmap()
	if a.IsUnspecified() || a.IsLoopback() || a.IsMulticast() {
		return netip.Prefix{}, fmt.Errorf("ipv4 address annotation %q is not a unicast node address", s)
	}
	return netip.PrefixFrom(a, p.Bits()), nil
}

// ParseAffinity returns NODE from a block affinity "host:NODE".
func ParseAffinity(s string) (string, bool) {
	n, ok := strings.CutPrefix(s, "host:")
	return n, ok && n != ""
}

type peer struct {
	node    Node
	addr    netip.Prefix
	ep      Endpoint
	rep     *Report // nil unless current
	sendGen uint32
	reason  string
	dropIn  bool // enforce: plaintext from it is dropped, inbound policy required
	same    bool // same subnet with tunnel coverage (policies)
	tunnel  bool // same subnet under a CrossSubnet pool: tunnel SAs (independent of blocks)
	skipped bool // key derivation failed
	// missing lists the generations with no SAs toward the peer because its public key for
	// them is not known yet (protocol v2: ErrPeerKeyUnknown).
	missing []uint32
}

// Compute returns the complete desired state of node in.Self. It is pure: the same Inputs
// give the same State, and it never touches the kernel, the clock or the network.
//
// Invariants it keeps (tested in compute_test.go and sequence_test.go):
//   - an outbound policy toward a peer points at a generation the peer reports installed
//     inbound from this node, and this node holds that outbound SA (make before break);
//   - plaintext from a peer is dropped (rule or required policy) only if the peer reports
//     that it sends ESP to this node;
//   - nothing is programmed for BGP peers that are not cluster nodes, and only IPIP
//     (proto 4) between node IPs and CrossSubnet pod blocks is selected, so control-plane
//     traffic (API server, BGP, kubelet) never depends on ESP.
func Compute(in Inputs) (State, error) {
	cfg := in.Config.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return State{}, err
	}
	mode := in.Ring.Mode
	if !mode.Valid() {
		return State{}, fmt.Errorf("ring mode %q is not a mode", mode)
	}
	st := State{Mode: mode}

	// Self.
	var self *Node
	for i := range in.Nodes {
		if in.Nodes[i].Name == in.Self {
			self = &in.Nodes[i]
			break
		}
	}
	if self == nil {
		if mode == api.ModeOff {
			return finish(st) // nothing to program, and nothing needed to prune
		}
		return State{}, fmt.Errorf("node %q: not among the cluster nodes", in.Self)
	}
	selfAddr, err := ParseNodeAddress(self.IPv4Address)
	if err != nil {
		if mode == api.ModeOff {
			return finish(st)
		}
		// Keep the kernel as it is (the caller does not apply on error) rather than
		// tear down encryption on a transient annotation change.
		return State{}, fmt.Errorf("node %q: %w", self.Name, err)
	}
	selfEP := Endpoint{IP: selfAddr.Addr(), Incarnation: self.Incarnation, NodeID: self.NodeID}
	if mode != api.ModeOff {
		if self.Incarnation == "" {
			return State{}, fmt.Errorf("node %q: no incarnation (boot ID and SA epoch)", self.Name)
		}
		if self.NodeID == 0 {
			return State{}, fmt.Errorf("node %q: no node ID assigned in the ring", self.Name)
		}
		if in.Keys == nil {
			return State{}, errors.New("no key function")
		}
	}

	// Generations.
	gens := slices.Clone(in.Ring.Generations)
	slices.SortFunc(gens, func(a, b Generation) int { return cmp.Compare(a.ID, b.ID) })
	for i, g := range gens {
		if i > 0 && gens[i-1].ID == g.ID {
			return State{}, fmt.Errorf("ring: generation %d listed twice", g.ID)
		}
		if g.State != GenPending && g.State != GenActive && g.State != GenRetiring {
			return State{}, fmt.Errorf("ring: generation %d has unknown state %q", g.ID, g.State)
		}
	}
	if mode != api.ModeOff && len(gens) == 0 {
		return State{}, fmt.Errorf("ring: mode %s without live generations", mode)
	}

	// Pools: coverage notes. Only IPv4 pools are covered (the SAs and policies are IPv4);
	// a VXLAN pool's traffic is not IPIP.
	neighbours := map[string]bool{}
	notCovered := func(code, format string, args ...any) {
		neighbours[code] = true
		st.NotCovered = append(st.NotCovered, fmt.Sprintf(format, args...))
	}
	var crossSubnet []Pool
	for _, p := range in.Pools {
		switch {
		case !p.CIDR.Addr().Is4():
			notCovered(NeighbourIPv6, "pool %s (%s) is IPv6: not covered (IPv4 only), its pod traffic is not encrypted", p.Name, p.CIDR)
			continue
		case p.VXLANMode == VXLANAlways || p.VXLANMode == VXLANCrossSubnet:
			notCovered(NeighbourVXLAN, "pool %s (%s) vxlanMode %s: pod traffic between nodes is VXLAN, not IPIP, and is not encrypted", p.Name, p.CIDR, p.VXLANMode)
			continue
		}
		switch p.IPIPMode {
		case IPIPAlways:
		case IPIPCrossSubnet:
			crossSubnet = append(crossSubnet, p)
		case IPIPNever, "":
			notCovered(NeighbourNever, "pool %s (%s) ipipMode Never: pod traffic between nodes is not IPIP and is not encrypted", p.Name, p.CIDR)
		default:
			notCovered(NeighbourNever, "pool %s (%s) unknown ipipMode %q: treated as Never, not encrypted", p.Name, p.CIDR, p.IPIPMode)
		}
	}
	// Felix modes next to ours (reported; docs/dataplane.md §9).
	if in.Felix.WireGuard {
		notCovered(NeighbourWireGuard, "calico wireguard is enabled (wireguardEnabled): pod traffic between nodes goes through wireguard.cali, not IPIP; it is Calico's encryption, not ours")
	}
	if in.Felix.BPF {
		notCovered(NeighbourBPF, "calico eBPF data plane (bpfEnabled): same-subnet pod traffic of CrossSubnet pools bypasses the xfrm policies and is not encrypted; IPIP through the tunnel device still is")
	}
	if in.Felix.NFTablesMode == "Enabled" {
		neighbours[NeighbourNFTables] = true // no coverage lost: our raw-table rules still run (docs/dataplane.md §9)
	}

	// Peers. An address claimed by two Nodes (any node can write its own Calico address
	// annotation) must not let one node take over another's pair: the claimant that held
	// it keeps its previous kernel state unchanged, the others get nothing.
	nodes := slices.Clone(in.Nodes)
	slices.SortFunc(nodes, func(a, b Node) int { return strings.Compare(a.Name, b.Name) })
	claims := map[netip.Addr][]string{selfAddr.Addr(): {self.Name}}
	for i, n := range nodes {
		if i > 0 && nodes[i-1].Name == n.Name {
			return State{}, fmt.Errorf("node %q listed twice", n.Name)
		}
		if a, err := ParseNodeAddress(n.IPv4Address); err == nil && n.Name != self.Name {
			claims[a.Addr()] = append(claims[a.Addr()], n.Name)
		}
	}
	frozen := map[string]bool{} // peers kept exactly as in Previous
	conflicted := map[netip.Addr]Conflict{}
	for ip, names := range claims {
		if len(names) < 2 {
			continue
		}
		c := Conflict{IP: ip, Nodes: slices.Sorted(slices.Values(names))}
		switch {
		case ip == selfAddr.Addr():
			c.Holder = self.Name
		case in.Previous != nil:
			for _, p := range in.Previous.Peers {
				if p.IP == ip && slices.Contains(names, p.Name) {
					c.Holder = p.Name
				}
			}
		}
		if c.Holder != "" && c.Holder != self.Name {
			frozen[c.Holder] = true
		}
		conflicted[ip] = c
		st.Conflicts = append(st.Conflicts, c)
	}
	slices.SortFunc(st.Conflicts, func(a, b Conflict) int { return a.IP.Compare(b.IP) })
	byIP := map[netip.Addr]string{selfAddr.Addr(): self.Name}
	var peers []*peer
	for _, n := range nodes {
		if n.Name == self.Name {
			continue
		}
		skip := func(reason string) { st.Skipped = append(st.Skipped, Skip{Object: "node/" + n.Name, Reason: reason}) }
		a, err := ParseNodeAddress(n.IPv4Address)
		if err != nil {
			skip(err.Error())
			continue
		}
		if c, ok := conflicted[a.Addr()]; ok {
			if frozen[n.Name] {
				byIP[a.Addr()] = n.Name
			} else {
				skip(c.String())
			}
			continue
		}
		if n.Incarnation == "" {
			skip("no incarnation yet (no current report with an SA epoch)")
			continue
		}
		if n.NodeID == 0 {
			skip("no node ID assigned in the ring yet")
			continue
		}
		if n.NodeID == self.NodeID {
			skip(fmt.Sprintf("node ID %d equals this node's", n.NodeID))
			continue
		}
		byIP[a.Addr()] = n.Name
		p := &peer{node: n, addr: a, ep: Endpoint{IP: a.Addr(), Incarnation: n.Incarnation, NodeID: n.NodeID}}
		if r := n.Report; r != nil && r.Incarnation == n.Incarnation && r.Mode.Valid() {
			p.rep = r
		}
		peers = append(peers, p)
	}
	for _, b := range in.BGPPeers {
		if _, isNode := byIP[b.PeerIP.Unmap()]; isNode {
			continue
		}
		st.NotCovered = append(st.NotCovered, bgpNote(b))
	}

	if mode == api.ModeOff {
		for _, p := range peers {
			st.Peers = append(st.Peers, PeerStatus{Name: p.node.Name, IP: p.addr.Addr(), Reason: "mode off"})
		}
		st.Neighbours = neighbourList(neighbours)
		return finish(st)
	}

	// Keys.
	type saKey struct {
		peer string
		gen  uint32
		kind Kind
		dir  Dir
		lane uint16 // the derivation's lane (keys.LaneSPI)
	}
	sas := map[saKey]SA{}
	derive := func(p *peer, g uint32, kind Kind, dir Dir, lane uint16) error {
		src, dst := selfEP, p.ep
		if dir == In {
			src, dst = p.ep, selfEP
		}
		spi, key, err := in.Keys(g, kind, lane, src, dst)
		what := func() string {
			if lane == 0 {
				return fmt.Sprintf("derive %s sa generation %d %s->%s (peer %q)", kind, g, src.IP, dst.IP, p.node.Name)
			}
			return fmt.Sprintf("derive %s sa generation %d lane %d %s->%s (peer %q)", kind, g, lane, src.IP, dst.IP, p.node.Name)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", what(), err)
		}
		if key.Len() != 20 && key.Len() != 36 {
			return fmt.Errorf("%s: key is %d bytes, want 20 or 36", what(), key.Len())
		}
		if spi < 256 {
			return fmt.Errorf("%s: spi 0x%x is reserved", what(), spi)
		}
		sa := SA{Src: src.IP, Dst: dst.IP, SPI: spi, Kind: kind, ReqID: cfg.ReqID, Key: key,
			ICVBytes: cfg.ICVBytes, ReplayWindow: cfg.ReplayWindow, ESN: true,
			SoftPackets: cfg.SoftPackets, HardPackets: cfg.HardPackets,
			Dir: dir, Peer: p.node.Name, Generation: g}
		if kind == Transport {
			sa.SelSrc = netip.PrefixFrom(src.IP, 32)
			sa.SelDst = netip.PrefixFrom(dst.IP, 32)
			sa.SelProto = 4
		} else {
			sa.ReqID = cfg.TunnelReqID
		}
		if dir == Out && lane >= keys.FallbackLane {
			// The lanes' outbound states: under their generation's reqid, each CPU's
			// with its CPU number, the fallback without one.
			sa.ReqID = cfg.LaneReqIDFor(kind, g)
			if lane > keys.FallbackLane {
				// A per-CPU state is an output state to the kernel (XFRMA_SA_DIR out):
				// no replay window (xfrm.Netlink.AddState).
				sa.Lane, sa.ReplayWindow = lane-keys.FallbackLane, 0
			}
		}
		sas[saKey{p.node.Name, g, kind, dir, lane}] = sa
		return nil
	}
	// deriveLanes derives the lanes of generation g with p in direction dir: n lanes
	// (n > 0) are the fallback and n per-CPU ones. A generation without lanes (v1) gets none.
	deriveLanes := func(p *peer, g uint32, kind Kind, dir Dir, n uint16) error {
		if n == 0 {
			return nil
		}
		if n > keys.MaxCPULanes {
			return fmt.Errorf("%d per-CPU lanes, at most %d", n, keys.MaxCPULanes)
		}
		for lane := uint16(keys.FallbackLane); lane <= keys.FallbackLane+n; lane++ {
			if err := derive(p, g, kind, dir, lane); errors.Is(err, ErrNoLanes) {
				return nil
			} else if err != nil {
				return err
			}
		}
		return nil
	}
	// Self's lanes, published for its incarnation (docs/dataplane.md §10); none at once
	// when turned off, before the published count follows.
	selfLanes := self.Lanes
	if cfg.LanesOff {
		selfLanes = 0
	}

	// Same-subnet (CrossSubnet) coverage data.
	podSets := map[string][]netip.Prefix{}
	type exception struct {
		ip          netip.Addr
		owner, user string
	}
	var exceptions []exception
	if len(crossSubnet) > 0 {
		if selfAddr.Bits() == 32 {
			st.NotCovered = append(st.NotCovered, fmt.Sprintf("node %s has a bare IPv4Address (no subnet): same-subnet pod traffic of CrossSubnet pools is not encrypted", self.Name))
		}
		for _, b := range in.Blocks {
			obj := "block/" + b.CIDR.String()
			if b.Deleted {
				continue
			}
			if !b.CIDR.Addr().Is4() {
				// Never mixed into the IPv4 policies (a v6 block of a v6 CrossSubnet pool
				// would give policies with a v4 source and a v6 destination).
				neighbours[NeighbourIPv6] = true
				st.Skipped = append(st.Skipped, Skip{Object: obj, Reason: "IPv6 block: not covered (IPv4 only)"})
				continue
			}
			var pool *Pool
			for i := range crossSubnet {
				if crossSubnet[i].CIDR.Bits() <= b.CIDR.Bits() && crossSubnet[i].CIDR.Contains(b.CIDR.Addr()) {
					pool = &crossSubnet[i]
				}
			}
			if pool == nil {
				continue
			}
			owner, ok := ParseAffinity(b.Affinity)
			switch {
			case ok:
				podSets[owner] = append(podSets[owner], b.CIDR.Masked())
			case b.Affinity == "":
				// Calico released the block's affinity but the block keeps its
				// allocations: each allocated address stays its node's, as a /32 (below).
			case strings.HasPrefix(b.Affinity, "virtual:"):
				neighbours[NeighbourVirtual] = true
				st.Skipped = append(st.Skipped, Skip{Object: obj, Reason: fmt.Sprintf("affinity %q is a load-balancer (virtual) block, not a node's pods: not covered", b.Affinity)})
				continue
			default:
				st.Skipped = append(st.Skipped, Skip{Object: obj, Reason: fmt.Sprintf("affinity %q is neither host:NODE nor virtual:NAME", b.Affinity)})
				continue
			}
			for _, x := range b.Borrowed {
				ip := x.IP.Unmap()
				if !ip.Is4() || !b.CIDR.Contains(ip) || x.Node == "" || x.Node == owner {
					continue
				}
				podSets[x.Node] = append(podSets[x.Node], netip.PrefixFrom(ip, 32))
				if ok {
					// Inside the owner's tunnelled block: the /32 needs its own
					// policies (or a bypass) to leave the block's policy.
					exceptions = append(exceptions, exception{ip: ip, owner: owner, user: x.Node})
				}
			}
		}
		for n := range podSets {
			slices.SortFunc(podSets[n], comparePrefix)
			podSets[n] = slices.Compact(podSets[n])
		}
	}

	var policies []Policy
	prio := func(src, dst netip.Prefix) uint32 {
		return cfg.Priority + uint32(32-src.Bits()) + uint32(32-dst.Bits())
	}
	// outPolicy completes pol, the outbound policy toward p of kind k, with its template for
	// p.sendGen: on this node's lanes when it has them for that generation and p installs
	// inbound states for them — an SPI-less template under
	// the generation's lane reqid, which the kernel resolves to the state of the sending
	// CPU or the fallback (docs/dataplane.md §10) — else naming lane 0's SPI.
	outPolicy := func(p *peer, k Kind, pol Policy) Policy {
		reqid := cfg.ReqID
		if k == Tunnel {
			reqid = cfg.TunnelReqID
		}
		pol.Tmpl = Template{Src: selfAddr.Addr(), Dst: p.addr.Addr(), SPI: sas[saKey{p.node.Name, p.sendGen, k, Out, 0}].SPI, Kind: k, ReqID: reqid}
		if fb, ok := sas[saKey{p.node.Name, p.sendGen, k, Out, keys.FallbackLane}]; ok && p.node.TakesLanes {
			pol.Tmpl.SPI, pol.Tmpl.ReqID, pol.Fallback = 0, fb.ReqID, fb.SPI
		}
		return pol
	}
	peerByName := map[string]*peer{}
	for _, p := range peers {
		peerByName[p.node.Name] = p
		// Tunnel SAs do not depend on IPAM blocks, so a peer that reports our inbound SAs
		// installed has the tunnel ones too, even before it has seen our newest block.
		p.tunnel = len(crossSubnet) > 0 && selfAddr.Bits() < 32 && selfAddr.Masked().Contains(p.addr.Addr())
		p.same = p.tunnel && len(podSets[self.Name]) > 0 && len(podSets[p.node.Name]) > 0
		dropSAs := func(all bool, kind Kind) {
			for k := range sas {
				if k.peer == p.node.Name && (all || k.kind == kind) {
					delete(sas, k)
				}
			}
		}
		var derr, terr error
		for _, g := range gens {
			var gerr, gterr error
			for _, dir := range []Dir{In, Out} {
				// Lane 0, then the lanes: the peer's inbound, this node's outbound.
				lanes := selfLanes
				if dir == In {
					lanes = p.node.Lanes
				}
				gerr = errors.Join(gerr, derive(p, g.ID, Transport, dir, 0))
				if gerr == nil {
					gerr = deriveLanes(p, g.ID, Transport, dir, lanes)
				}
				if p.tunnel {
					gterr = errors.Join(gterr, derive(p, g.ID, Tunnel, dir, 0))
					if gterr == nil {
						gterr = deriveLanes(p, g.ID, Tunnel, dir, lanes)
					}
				}
			}
			if errors.Is(gerr, ErrPeerKeyUnknown) || errors.Is(gterr, ErrPeerKeyUnknown) {
				// Not yet: no SA of g with this peer (both directions and kinds come from
				// the same two key pairs), the rest of the pair unaffected.
				p.missing = append(p.missing, g.ID)
				for k := range sas {
					if k.peer == p.node.Name && k.gen == g.ID {
						delete(sas, k)
					}
				}
				continue
			}
			derr, terr = errors.Join(derr, gerr), errors.Join(terr, gterr)
		}
		if derr != nil {
			// One peer's bad key material must not stop the rest of the cluster: the
			// peer gets nothing (plaintext both ways, never dropped) and is reported.
			dropSAs(true, 0)
			p.skipped = true
			st.Skipped = append(st.Skipped, Skip{Object: "node/" + p.node.Name, Reason: derr.Error()})
			continue
		}
		if terr != nil {
			// No tunnel keys: IPIP to the peer is still encrypted; same-subnet pod
			// traffic is reported as not covered. Both ends fail alike (same KeyFunc).
			dropSAs(false, Tunnel)
			p.tunnel, p.same = false, false
			st.NotCovered = append(st.NotCovered, fmt.Sprintf("same-subnet pod traffic with node %s (CrossSubnet) is not encrypted: %v", p.node.Name, terr))
		}
		// Which generation to send with.
		switch {
		case mode.Rank() < api.ModeEncrypt.Rank():
			p.reason = "mode " + string(mode)
		case p.rep == nil:
			p.reason = "no current report from peer"
		case p.rep.Mode.Rank() < api.ModeAccept.Rank():
			p.reason = "peer mode " + string(p.rep.Mode)
		case !p.rep.InboundFromSelf:
			p.reason = "peer has not installed inbound SAs from this node"
		default:
			usable := slices.DeleteFunc(slices.Clone(p.rep.Generations), func(g uint32) bool { return slices.Contains(p.missing, g) })
			p.sendGen = chooseGeneration(gens, usable)
			if p.sendGen == 0 && len(usable) < len(p.rep.Generations) {
				p.reason = fmt.Sprintf("peer's public key for generation %v not known yet", p.missing)
			} else if p.sendGen == 0 {
				p.reason = "no usable generation in common with peer"
			}
		}
		p.dropIn = mode == api.ModeEnforce && p.rep != nil && p.rep.EncryptsToSelf

		// Transport policies.
		a32, b32 := netip.PrefixFrom(selfAddr.Addr(), 32), netip.PrefixFrom(p.addr.Addr(), 32)
		policies = append(policies, Policy{Dir: In, Src: b32, Dst: a32, Proto: 4, Priority: cfg.Priority, Peer: p.node.Name,
			Tmpl: Template{Src: p.addr.Addr(), Dst: selfAddr.Addr(), Kind: Transport, ReqID: cfg.ReqID, Optional: !p.dropIn}})
		if p.sendGen != 0 {
			policies = append(policies, outPolicy(p, Transport, Policy{Dir: Out, Src: a32, Dst: b32, Proto: 4, Priority: cfg.Priority, Peer: p.node.Name}))
		}
		// Tunnel policies for same-subnet pod blocks.
		if p.same {
			for _, pb := range podSets[p.node.Name] {
				for _, pa := range podSets[self.Name] {
					policies = append(policies, Policy{Dir: Fwd, Src: pb, Dst: pa, Priority: prio(pb, pa), Peer: p.node.Name,
						Tmpl: Template{Src: p.addr.Addr(), Dst: selfAddr.Addr(), Kind: Tunnel, ReqID: cfg.TunnelReqID, Optional: !p.dropIn}})
					if p.sendGen != 0 {
						policies = append(policies, outPolicy(p, Tunnel, Policy{Dir: Out, Src: pa, Dst: pb, Priority: prio(pa, pb), Peer: p.node.Name}))
					}
				}
			}
		}
		// Rules.
		switch mode {
		case api.ModeEncrypt:
			if p.rep != nil && p.rep.EncryptsToSelf {
				st.Rules = append(st.Rules, Rule{Hook: HookIn, PeerIP: p.addr.Addr(), Peer: p.node.Name, Action: Count})
			}
			if p.sendGen != 0 {
				st.Rules = append(st.Rules, Rule{Hook: HookOut, PeerIP: p.addr.Addr(), Peer: p.node.Name, Action: Count})
			}
		case api.ModeEnforce:
			if p.dropIn {
				st.Rules = append(st.Rules, Rule{Hook: HookIn, PeerIP: p.addr.Addr(), Peer: p.node.Name, Action: Drop})
			}
			if p.sendGen != 0 || slices.Contains(in.HoldPlaintext, p.node.Name) {
				st.Rules = append(st.Rules, Rule{Hook: HookOut, PeerIP: p.addr.Addr(), Peer: p.node.Name, Action: Drop})
			}
		}
	}

	// Borrowed /32s inside a tunnelled block whose pods live on a node we do not tunnel
	// to (or on this node): they must bypass the block's tunnel policy.
	for _, x := range exceptions {
		owner := peerByName[x.owner]
		if owner == nil || !owner.same || owner.skipped {
			continue
		}
		if u := peerByName[x.user]; u != nil && u.same && !u.skipped {
			continue // x/32 is in the user's pod set: its own, more specific tunnel policies
		}
		x32 := netip.PrefixFrom(x.ip, 32)
		for _, pa := range podSets[self.Name] {
			if pa == x32 {
				continue
			}
			if owner.sendGen != 0 {
				policies = append(policies, Policy{Dir: Out, Src: pa, Dst: x32, Priority: prio(pa, x32), Peer: x.user})
			}
			if x.user != self.Name {
				policies = append(policies, Policy{Dir: Fwd, Src: x32, Dst: pa, Priority: prio(x32, pa), Peer: x.user})
			}
		}
	}
	for _, sa := range sas {
		st.SAs = append(st.SAs, sa)
	}
	// Frozen peers: exactly what the kernel held for them before the conflict. The
	// generations listed as installed for every peer are only those their inbound SAs
	// have too (a rotation does not complete toward a frozen peer).
	frozenGens := map[uint32]int{}
	if len(frozen) > 0 {
		for _, sa := range in.Previous.SAs {
			if frozen[sa.Peer] {
				st.SAs = append(st.SAs, sa)
			}
		}
		for _, p := range in.Previous.Policies {
			if frozen[p.Peer] {
				policies = append(policies, p)
			}
		}
		for _, r := range in.Previous.Rules {
			if frozen[r.Peer] {
				st.Rules = append(st.Rules, r)
			}
		}
		for _, ps := range in.Previous.Peers {
			if frozen[ps.Name] {
				ps.Reason = "address conflict: kept as it was"
				st.Peers = append(st.Peers, ps)
			}
		}
		for name := range frozen {
			seen := map[uint32]bool{}
			for _, sa := range in.Previous.SAs {
				if sa.Peer == name && sa.Dir == In && !seen[sa.Generation] {
					seen[sa.Generation] = true
					frozenGens[sa.Generation]++
				}
			}
		}
	}
	st.Policies = policies
	for _, p := range peers {
		if p.skipped {
			continue
		}
		// Inbound (the per-pair claim peers send on) needs every generation anyone may send
		// with; a pending one (nobody sends with it) only keeps the node-level claim below.
		inbound := true
		for _, g := range gens {
			if g.State != GenPending && slices.Contains(p.missing, g.ID) {
				inbound = false
			}
		}
		st.Peers = append(st.Peers, PeerStatus{Name: p.node.Name, IP: p.addr.Addr(), SendGeneration: p.sendGen,
			Inbound: inbound, DropsPlaintext: p.dropIn, SameSubnet: p.same, Reason: p.reason, KeysUnknown: p.missing})
	}
	for _, g := range gens {
		if frozenGens[g.ID] == len(frozen) && !(g.State == GenPending && keysUnknown(st.Peers, g.ID)) {
			st.Generations = append(st.Generations, g.ID)
		}
	}
	slices.SortFunc(st.Peers, func(a, b PeerStatus) int { return strings.Compare(a.Name, b.Name) })
	st.Neighbours = neighbourList(neighbours)
	return finish(st)
}

func bgpNote(b BGPPeer) string {
	return fmt.Sprintf("bgp peer %s (%s) is not a cluster node: never encrypted to nor dropped", b.Name, b.PeerIP)
}

// chooseGeneration picks the generation to send with: the active generation if the peer
// lists it, else the newest retiring one it lists; pending generations are never used.
// keysUnknown reports whether generation g lacks a peer's SAs for want of its public key.
// A pending generation is then not installed for every peer and not claimed (the master
// activates it only once every node claims it). A generation others send with stays
// claimed: it is installed for every peer this node claims inbound from (PeerStatus.Inbound
// is false for the others), so one peer's reboot does not withdraw it cluster-wide.
func keysUnknown(peers []PeerStatus, g uint32) bool {
	for _, p := range peers {
		if slices.Contains(p.KeysUnknown, g) {
			return true
		}
	}
	return false
}

func chooseGeneration(gens []Generation, listed []uint32) uint32 {
	var best uint32
	for _, g := range gens {
		if !slices.Contains(listed, g.ID) {
			continue
		}
		switch g.State {
		case GenActive:
			return g.ID
		case GenRetiring:
			best = max(best, g.ID)
		}
	}
	return best
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return cmp.Compare(a.Bits(), b.Bits())
}

// finish sorts every slice and rejects duplicate identities (a bug or colliding SPIs).
func finish(st State) (State, error) {
	slices.SortFunc(st.SAs, func(a, b SA) int {
		if c := a.Dst.Compare(b.Dst); c != 0 {
			return c
		}
		return cmp.Compare(a.SPI, b.SPI)
	})
	for i := 1; i < len(st.SAs); i++ {
		if st.SAs[i].Dst == st.SAs[i-1].Dst && st.SAs[i].SPI == st.SAs[i-1].SPI {
			return State{}, fmt.Errorf("spi collision: %s and %s share %s", st.SAs[i-1], st.SAs[i], st.SAs[i].ID())
		}
	}
	slices.SortFunc(st.Policies, comparePolicy)
	for i := 1; i < len(st.Policies); i++ {
		if comparePolicy(st.Policies[i], st.Policies[i-1]) == 0 {
			return State{}, fmt.Errorf("duplicate %s (peers %q and %q)", st.Policies[i].ID(), st.Policies[i-1].Peer, st.Policies[i].Peer)
		}
	}
	slices.SortFunc(st.Rules, compareRule)
	slices.SortFunc(st.Skipped, func(a, b Skip) int { return strings.Compare(a.Object, b.Object) })
	slices.Sort(st.NotCovered)
	return st, nil
}

// neighbourList is the sorted set of neighbour codes.
func neighbourList(m map[string]bool) []string {
	if len(m) == 0 {
		return nil
	}
	return slices.Sorted(maps.Keys(m))
}

func comparePolicy(a, b Policy) int {
	if c := cmp.Compare(a.Dir, b.Dir); c != 0 {
		return c
	}
	if c := comparePrefix(a.Src, b.Src); c != 0 {
		return c
	}
	if c := comparePrefix(a.Dst, b.Dst); c != 0 {
		return c
	}
	return cmp.Compare(a.Proto, b.Proto)
}

func compareRule(a, b Rule) int {
	if c := cmp.Compare(a.Hook, b.Hook); c != 0 {
		return c
	}
	if c := a.PeerIP.Compare(b.PeerIP); c != 0 {
		return c
	}
	return cmp.Compare(a.Action, b.Action)
}

// SendingGenerations lists the generations any outbound policy uses (for the report: the
// master removes a retiring generation only when no node sends with it).
func (s State) SendingGenerations() []uint32 {
	var out []uint32
	for _, p := range s.Peers {
		if p.SendGeneration != 0 && !slices.Contains(out, p.SendGeneration) {
			out = append(out, p.SendGeneration)
		}
	}
	slices.Sort(out)
	return out
}

// InboundPeers lists peers whose inbound SAs are in the state (per-pair readiness).
func (s State) InboundPeers() []string {
	var out []string
	for _, p := range s.Peers {
		if p.Inbound {
			out = append(out, p.Name)
		}
	}
	return out
}

// EncryptingPeers lists peers this state sends ESP to (per-pair readiness).
func (s State) EncryptingPeers() []string {
	var out []string
	for _, p := range s.Peers {
		if p.SendGeneration != 0 {
			out = append(out, p.Name)
		}
	}
	return out
}

// TransitionRules returns the rules of old that are also in next. The agent applies them
// before the xfrm change and next's rules after it, so an outbound drop rule never outlives
// the outbound policy it backs (which would drop our own traffic for the instant between
// the two applies) and new drop rules appear only once the policies they back exist.
func TransitionRules(old, next []Rule) []Rule {
	var out []Rule
	for _, r := range old {
		if slices.Contains(next, r) {
			out = append(out, r)
		}
	}
	return out
}
