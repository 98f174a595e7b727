//go:build linux

package xfrm

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// TestCalicoEBPFForwardingBypassesXfrm measures, on this kernel, what Calico's eBPF data
// plane (FelixConfiguration bpfEnabled) does to our CrossSubnet coverage (docs/dataplane.md
// §9). Calico's tc programs forward same-subnet workload traffic themselves: a FIB lookup in
// BPF, then bpf_redirect_neigh with the next hop to the uplink (from the workload veth) or to
// the workload veth (from the uplink), so the packet never takes the IP stack's forwarding
// path (felix/bpf-gpl/fib_co_re.h). The test builds two same-subnet nodes with a pod each,
// programs our enforce-mode policies for them as the agent computes them (tunnel-mode
// block policies, desired.Compute), and installs no SA (this host kernel has no ESP; none
// is needed to see whether a policy is consulted):
//
//   - kernel forwarding (Calico's iptables data plane): a's out policy catches the pod's
//     packet and, with no SA, drops it (XfrmOutNoStates); nothing crosses the wire;
//   - the same packets forwarded by Calico-style tc programs on both nodes (bpf_redirect_neigh
//     with an explicit next hop, as Calico calls it): the pods talk, every echo request and
//     reply crosses the wire as plaintext ICMP, and no xfrm counter moves on either node —
//     neither the out policy nor enforce's required fwd policy was consulted.
func TestCalicoEBPFForwardingBypassesXfrm(t *testing.T) {
	if os.Geteuid() != 0 {
		skipOrFail(t, "SECUREOVERLAY_REQUIRE_ALL", "needs root")
	}
	a, b, in := newSameSubnetPair(t)
	nodes := []*ssNode{a, b}
	ping := func() error {
		var err error
		in(a.podNS, func() error { err = run("ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "1", b.pod); return nil })
		return err
	}
	if err := ping(); err != nil {
		t.Fatalf("same-subnet pod routing does not work: %v", err)
	}

	// Our enforce-mode policies, as the agent computes them once both nodes report ready:
	// out to the peer's block with an ESP tunnel template, a required fwd from it. Only
	// the policies are programmed: the kernel consults them whether or not an SA exists.
	for range 2 {
		for _, n := range nodes {
			inp := desired.Inputs{Self: n.name, Ring: desired.Ring{Mode: api.ModeEnforce, Generations: []desired.Generation{active(1)}}, Keys: testKeys,
				Pools: []desired.Pool{{Name: "cs", CIDR: mustPrefix("10.244.0.0/16"), IPIPMode: desired.IPIPCrossSubnet}}}
			for _, m := range nodes {
				nd := desired.Node{Name: m.name, IPv4Address: m.cidr, Incarnation: "boot-" + m.name, NodeID: m.id}
				if m != n && m.state.Mode != "" {
					nd.Report = &desired.Report{Incarnation: nd.Incarnation, Mode: m.state.Mode, Generations: m.state.Generations,
						InboundFromSelf: slices.Contains(m.state.InboundPeers(), n.name), EncryptsToSelf: slices.Contains(m.state.EncryptingPeers(), n.name)}
				}
				inp.Nodes = append(inp.Nodes, nd)
				inp.Blocks = append(inp.Blocks, desired.Block{CIDR: mustPrefix(m.block), Affinity: "host:" + m.name})
			}
			st, err := desired.Compute(inp)
			if err != nil {
				t.Fatal(err)
			}
			n.state = st
		}
	}
	for _, n := range nodes {
		var out, fwd bool
		in(n.host, func() error {
			for _, p := range n.state.Policies {
				if p.Src != mustPrefix(n.block) && p.Dst != mustPrefix(n.block) {
					continue // only the block policies of this pair matter here
				}
				if err := (Netlink{}).AddPolicy(p); err != nil {
					return err
				}
				out = out || p.Dir == desired.Out && p.Tmpl.Kind == desired.Tunnel
				fwd = fwd || p.Dir == desired.Fwd && p.Tmpl.Kind == desired.Tunnel && !p.Tmpl.Optional
			}
			return nil
		})
		if !out || !fwd {
			t.Fatalf("node %s: desired.Compute gave no tunnel out/fwd block policies in enforce: %+v", n.name, n.state.Policies)
		}
	}

	wire := newWireTap(t, b.host, "eth-b")
	xfrmTotal := func(n *ssNode) uint64 {
		var sum uint64
		for _, c := range []string{"XfrmOutNoStates", "XfrmOutPolBlock", "XfrmInNoPols", "XfrmInTmplMismatch", "XfrmFwdHdrError", "XfrmInNoStates"} {
			sum += xfrmStat(t, in, n.host, c)
		}
		return sum
	}

	// 1. Kernel forwarding: our out policy catches the pod's traffic (no SA: dropped).
	noStates := xfrmStat(t, in, a.host, "XfrmOutNoStates")
	if err := ping(); err == nil {
		t.Fatal("kernel forwarding: the pods talked past a tunnel-mode out policy that has no SA")
	}
	if got := xfrmStat(t, in, a.host, "XfrmOutNoStates"); got < noStates+3 {
		t.Fatalf("kernel forwarding: a's XfrmOutNoStates %d -> %d, want +3 (the out policy caught each request)", noStates, got)
	}
	if n := wire.take().PodICMP; n != 0 {
		t.Fatalf("kernel forwarding: %d plaintext ICMP packets between the pods on the wire, want 0", n)
	}

	// 2. Calico-style eBPF forwarding on both nodes: workload veth ingress → uplink with the
	// peer node as next hop, uplink ingress → workload veth with the pod as next hop.
	for _, n := range nodes {
		in(n.host, func() error {
			if err := attachRedirectNeigh(t, "cali-"+n.name, "eth-"+n.name, n.peerIP); err != nil {
				return err
			}
			return attachRedirectNeigh(t, "eth-"+n.name, "cali-"+n.name, n.pod)
		})
	}
	xa, xb := xfrmTotal(a), xfrmTotal(b)
	if err := ping(); err != nil {
		t.Fatalf("eBPF forwarding: the pods do not talk (%v): the redirect did not happen", err)
	}
	if n := wire.take().PodICMP; n < 6 {
		t.Errorf("eBPF forwarding: %d plaintext ICMP packets between the pods on the wire, want ≥ 6 (3 requests, 3 replies)", n)
	} else {
		t.Logf("eBPF forwarding: %d plaintext ICMP packets between the pods crossed the wire; our enforce-mode policies were in place", n)
	}
	if ga, gb := xfrmTotal(a), xfrmTotal(b); ga != xa || gb != xb {
		t.Errorf("eBPF forwarding: xfrm counters moved (a %d -> %d, b %d -> %d): a policy was consulted", xa, ga, xb, gb)
	}
}

// attachRedirectNeigh attaches to dev's tc ingress (clsact) a program that redirects every
// packet to the egress of target through bpf_redirect_neigh with nexthop as the next hop:
// what Calico's tc programs do after their own FIB lookup. In the calling thread's netns.
func attachRedirectNeigh(t *testing.T, dev, target, nexthop string) error {
	t.Helper()
	to, err := netlink.LinkByName(target)
	if err != nil {
		return err
	}
	nh := netip.MustParseAddr(nexthop).As4()
	// struct bpf_redir_neigh { __u32 nh_family; union { __be32 ipv4_nh; __u32 ipv6_nh[4]; }; }
	// on the stack at fp-24 (20 bytes, 8-aligned), then bpf_redirect_neigh(ifindex, &p, 20, 0).
	return attachIngress(t, dev, asm.Instructions{
		asm.StoreImm(asm.RFP, -24, unix.AF_INET, asm.Word),
		asm.StoreImm(asm.RFP, -20, int64(int32(binary.NativeEndian.Uint32(nh[:]))), asm.Word),
		asm.StoreImm(asm.RFP, -16, 0, asm.Word),
		asm.StoreImm(asm.RFP, -12, 0, asm.Word),
		asm.StoreImm(asm.RFP, -8, 0, asm.Word),
		asm.Mov.Imm(asm.R1, int32(to.Attrs().Index)),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -24),
		asm.Mov.Imm(asm.R3, 20),
		asm.Mov.Imm(asm.R4, 0),
		asm.FnRedirectNeigh.Call(),
		asm.Return(),
	})
}

// attachIngress loads insns as a tc (SchedCLS, direct-action) program and attaches it to
// dev's ingress through a clsact qdisc, in the calling thread's netns. A kernel that cannot
// load it skips the test (fails it under SECUREOVERLAY_REQUIRE_ALL=1).
func attachIngress(t *testing.T, dev string, insns asm.Instructions) error {
	t.Helper()
	from, err := netlink.LinkByName(dev)
	if err != nil {
		return err
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "Dual MIT/GPL", Instructions: insns})
	if err != nil {
		if errors.Is(err, unix.EPERM) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EINVAL) {
			skipOrFail(t, "SECUREOVERLAY_REQUIRE_ALL", "this kernel cannot load the tc BPF program: "+err.Error())
		}
		return err
	}
	t.Cleanup(func() { _ = prog.Close() })
	if err := netlink.QdiscAdd(&netlink.GenericQdisc{QdiscType: "clsact", QdiscAttrs: netlink.QdiscAttrs{
		LinkIndex: from.Attrs().Index, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}}); err != nil {
		return err
	}
	return netlink.FilterAdd(&netlink.BpfFilter{FilterAttrs: netlink.FilterAttrs{LinkIndex: from.Attrs().Index,
		Parent: netlink.HANDLE_MIN_INGRESS, Handle: netlink.MakeHandle(0, 1), Protocol: unix.ETH_P_ALL, Priority: 1},
		Fd: prog.FD(), Name: "calico-like-fwd", DirectAction: true})
}

// wireTap counts, on one interface and in both directions, the packets that matter here,
// through an AF_PACKET tap, which sees a frame before tc ingress and after tc egress, so
// redirected packets are counted too.
type wireTap struct {
	t  *testing.T
	fd int
}

// wireCount is what a wireTap saw: plaintext ICMP between pod addresses (10.244.0.0/16),
// IPIP and ESP packets.
type wireCount struct{ PodICMP, IPIP, ESP int }

func newWireTap(t *testing.T, n ns.NetNS, dev string) *wireTap {
	t.Helper()
	c := &wireTap{t: t}
	err := n.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		// ETH_P_ALL: a tap, which sees a frame before tc ingress (a protocol handler such
		// as ETH_P_IP's would run after it, and never see a redirected packet).
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return err
		}
		c.fd = fd
		tv := unix.NsecToTimeval((200 * time.Millisecond).Nanoseconds())
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			return err
		}
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: l.Attrs().Index})
	})
	if err != nil {
		t.Fatalf("packet socket on %s: %v", dev, err)
	}
	t.Cleanup(func() { _ = unix.Close(c.fd) })
	return c
}

// take returns what was seen since the last call.
func (c *wireTap) take() wireCount {
	_, pods, _ := net.ParseCIDR("10.244.0.0/16")
	buf := make([]byte, 2048)
	var w wireCount
	for {
		m, _, err := unix.Recvfrom(c.fd, buf, 0)
		if err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				return w
			}
			c.t.Fatalf("packet socket: %v", err)
		}
		if m < 34 || binary.BigEndian.Uint16(buf[12:14]) != unix.ETH_P_IP {
			continue
		}
		ip := buf[14:m] // after the Ethernet header
		switch ip[9] {
		case unix.IPPROTO_ICMP:
			if pods.Contains(net.IP(ip[12:16])) && pods.Contains(net.IP(ip[16:20])) {
				w.PodICMP++
			}
		case unix.IPPROTO_IPIP:
			w.IPIP++
		case unix.IPPROTO_ESP:
			w.ESP++
		}
	}
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// TestCalicoEBPFTunnelledRouteStaysESP measures the other half of Calico's eBPF forwarding
// (felix/bpf-gpl/fib_co_re.h): a workload's packet to a *tunnelled* route (a node in another
// subnet, ipipMode Always or CrossSubnet) gets a tunnel key (bpf_skb_set_tunnel_key, remote
// = the route's next hop) and is bpf_redirect'ed to the IPIP device, which encapsulates it
// and routes the outer packet itself (ip_md_tunnel_xmit → ip_route_output_key with protocol
// IPIP): the xfrm lookup runs there, so our transport SA should encrypt it. Run in the VM lab
// (ESP): with our enforce-mode SAs and policies and such a program on a's workload veth, the
// pods talk, the collect_md IPIP device sent every request, a's outbound SA counted them,
// and the wire carries ESP and no IPIP.
func TestCalicoEBPFTunnelledRouteStaysESP(t *testing.T) {
	if os.Geteuid() != 0 {
		skipOrFail(t, "SECUREOVERLAY_REQUIRE_ALL", "needs root")
	}
	if reason := espMissing(t); reason != "" {
		skipOrFail(t, "SECUREOVERLAY_REQUIRE_ESP", reason)
	}
	a, b, in := newSameSubnetPair(t)
	nodes := []*ssNode{a, b}
	// IPIP instead of the direct routes, as Calico routes an ipipMode Always pool; on a, the
	// collect_md IPIP device that takes its destination from the BPF tunnel key.
	for _, n := range nodes {
		in(n.host, func() error {
			for _, c := range [][]string{
				{"ip", "link", "set", "tunl0", "up"},
				{"ip", "route", "replace", n.peerBlock, "via", n.peerIP, "dev", "tunl0", "onlink"},
			} {
				if err := run(c...); err != nil {
					return err
				}
			}
			n.xa = NewApplier(Netlink{}, desired.Config{})
			return nil
		})
	}
	in(a.host, func() error {
		if err := run("ip", "link", "add", "ipipmd", "type", "ipip", "external"); err != nil {
			return err
		}
		return run("ip", "link", "set", "ipipmd", "up")
	})
	for range 2 {
		for _, n := range nodes {
			inp := desired.Inputs{Self: n.name, Ring: desired.Ring{Mode: api.ModeEnforce, Generations: []desired.Generation{active(1)}}, Keys: testKeys,
				Pools: []desired.Pool{{Name: "default", CIDR: mustPrefix("10.244.0.0/16"), IPIPMode: desired.IPIPAlways}}}
			for _, m := range nodes {
				nd := desired.Node{Name: m.name, IPv4Address: m.cidr, Incarnation: "boot-" + m.name, NodeID: m.id}
				if m != n && m.published != nil {
					p := m.published
					nd.Report = &desired.Report{Incarnation: nd.Incarnation, Mode: p.Mode, Generations: p.Generations,
						InboundFromSelf: slices.Contains(p.InboundPeers(), n.name), EncryptsToSelf: slices.Contains(p.EncryptingPeers(), n.name)}
				}
				inp.Nodes = append(inp.Nodes, nd)
			}
			st, err := desired.Compute(inp)
			if err != nil {
				t.Fatal(err)
			}
			in(n.host, func() error { _, err := n.xa.Apply(st); return err })
			n.state = st
		}
		for _, n := range nodes {
			st := n.state
			n.published = &st
		}
	}
	ping := func() error {
		var err error
		in(a.podNS, func() error { err = run("ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "2", b.pod); return nil })
		return err
	}
	outPackets := func() uint64 {
		var total uint64
		in(a.host, func() error {
			sts, err := Netlink{}.ListStates()
			for _, s := range sts {
				if s.SA.Kind == desired.Transport && s.SA.Src == netip.MustParseAddr(a.ip) {
					total += s.Packets
				}
			}
			return err
		})
		return total
	}
	txPackets := func(dev string) uint64 {
		var v uint64
		in(a.host, func() error {
			l, err := netlink.LinkByName(dev)
			if err == nil && l.Attrs().Statistics != nil {
				v = l.Attrs().Statistics.TxPackets
			}
			return err
		})
		return v
	}
	wire := newWireTap(t, b.host, "eth-b")

	// Kernel forwarding through tunl0 first: ESP, as every lab test shows.
	if err := ping(); err != nil {
		t.Fatalf("kernel forwarding over IPIP with our SAs: %v", err)
	}
	if w := wire.take(); w.IPIP != 0 || w.ESP < 6 || w.PodICMP != 0 {
		t.Fatalf("kernel forwarding: wire %+v, want ESP only", w)
	}

	// Calico-style: set the tunnel key and redirect to the collect_md IPIP device.
	in(a.host, func() error { return attachTunnelRedirect(t, "cali-a", "ipipmd", a.ip, b.ip) })
	out0, md0 := outPackets(), txPackets("ipipmd")
	if err := ping(); err != nil {
		t.Fatalf("eBPF forwarding to the IPIP device: the pods do not talk: %v", err)
	}
	if md := txPackets("ipipmd") - md0; md < 3 {
		t.Fatalf("the collect_md IPIP device sent %d packets, want ≥ 3: the program did not redirect", md)
	}
	if out := outPackets() - out0; out < 3 {
		t.Errorf("a's outbound SAs counted %d packets, want ≥ 3", out)
	}
	w := wire.take()
	if w.IPIP != 0 || w.PodICMP != 0 || w.ESP < 6 {
		t.Errorf("eBPF forwarding to the IPIP device: wire %+v, want ESP only (≥ 6)", w)
	}
	t.Logf("eBPF forwarding to the IPIP device: the wire carried %d ESP, %d IPIP, %d plaintext pod ICMP packets", w.ESP, w.IPIP, w.PodICMP)
}

// attachTunnelRedirect attaches to dev's tc ingress a program that does what Calico's does
// for a workload packet to a tunnelled route: bpf_skb_set_tunnel_key (remote, local, as
// Calico fills them, BPF_F_ZERO_CSUM_TX) and bpf_redirect to the tunnel device target.
func attachTunnelRedirect(t *testing.T, dev, target, local, remote string) error {
	t.Helper()
	to, err := netlink.LinkByName(target)
	if err != nil {
		return err
	}
	// struct bpf_tunnel_key (44 bytes) at fp-48: tunnel_id 0, remote_ipv4 at +4, local_ipv4
	// at +28, both in host byte order (the kernel converts), everything else zero.
	hostOrder := func(s string) int64 {
		b := netip.MustParseAddr(s).As4()
		return int64(int32(binary.BigEndian.Uint32(b[:])))
	}
	insns := asm.Instructions{asm.Mov.Reg(asm.R6, asm.R1)}
	for off := int16(-48); off < 0; off += 4 {
		insns = append(insns, asm.StoreImm(asm.RFP, off, 0, asm.Word))
	}
	insns = append(insns,
		asm.StoreImm(asm.RFP, -44, hostOrder(remote), asm.Word),
		asm.StoreImm(asm.RFP, -20, hostOrder(local), asm.Word),
		asm.Mov.Reg(asm.R1, asm.R6),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -48),
		asm.Mov.Imm(asm.R3, 44),
		asm.Mov.Imm(asm.R4, 2), // BPF_F_ZERO_CSUM_TX
		asm.FnSkbSetTunnelKey.Call(),
		asm.Mov.Imm(asm.R1, int32(to.Attrs().Index)),
		asm.Mov.Imm(asm.R2, 0),
		asm.FnRedirect.Call(),
		asm.Return(),
	)
	return attachIngress(t, dev, insns)
}
