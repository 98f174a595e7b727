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

	wire := newICMPCounter(t, b.host, "eth-b")
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
	if n := wire.take(); n != 0 {
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
	if n := wire.take(); n < 6 {
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
	from, err := netlink.LinkByName(dev)
	if err != nil {
		return err
	}
	to, err := netlink.LinkByName(target)
	if err != nil {
		return err
	}
	nh := netip.MustParseAddr(nexthop).As4()
	// struct bpf_redir_neigh { __u32 nh_family; union { __be32 ipv4_nh; __u32 ipv6_nh[4]; }; }
	// on the stack at fp-24 (20 bytes, 8-aligned), then bpf_redirect_neigh(ifindex, &p, 20, 0).
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:    ebpf.SchedCLS,
		License: "Dual MIT/GPL",
		Instructions: asm.Instructions{
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
		},
	})
	if err != nil {
		if errors.Is(err, unix.EPERM) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EINVAL) {
			skipOrFail(t, "SECUREOVERLAY_REQUIRE_ALL", "this kernel cannot load a tc BPF program with bpf_redirect_neigh: "+err.Error())
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

// icmpCounter counts the plaintext ICMP packets between the test's pods (10.244.0.0/16)
// seen on an interface, in both directions, through an AF_PACKET tap, which sees a frame
// before tc ingress and after tc egress, so redirected packets are counted too.
type icmpCounter struct {
	t     *testing.T
	fd    int
	count chan int
}

func newICMPCounter(t *testing.T, n ns.NetNS, dev string) *icmpCounter {
	t.Helper()
	c := &icmpCounter{t: t, count: make(chan int)}
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

// take returns how many pod-to-pod ICMP packets were seen since the last call.
func (c *icmpCounter) take() int {
	_, pods, _ := net.ParseCIDR("10.244.0.0/16")
	buf := make([]byte, 2048)
	n := 0
	for {
		m, _, err := unix.Recvfrom(c.fd, buf, 0)
		if err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				return n
			}
			c.t.Fatalf("packet socket: %v", err)
		}
		ip := buf[14:m] // after the Ethernet header
		if m >= 34 && binary.BigEndian.Uint16(buf[12:14]) == unix.ETH_P_IP && ip[9] == unix.IPPROTO_ICMP &&
			pods.Contains(net.IP(ip[12:16])) && pods.Contains(net.IP(ip[16:20])) {
			n++
		}
	}
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
