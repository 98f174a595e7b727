//go:build linux

package xfrm

import (
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// TestDataPathCrossSubnetTunnel proves the CrossSubnet coverage on a real kernel (the VM
// lab): two same-subnet nodes route pod traffic directly (no IPIP, as Calico does for
// CrossSubnet pools), each with a pod namespace attached Calico-style. Our tunnel-mode SAs
// and block policies encrypt it (tunnel SA counters move) in encrypt and enforce; in
// enforce, pod plaintext from the peer fails the required fwd policy; and without a fwd
// policy the kernel drops tunnel-mode traffic (why fwd policies exist from accept on).
func TestDataPathCrossSubnetTunnel(t *testing.T) {
	if os.Geteuid() != 0 {
		skipOrFail(t, "SECUREOVERLAY_REQUIRE_ALL", "needs root")
	}
	if reason := espMissing(t); reason != "" {
		skipOrFail(t, "SECUREOVERLAY_REQUIRE_ESP", reason)
	}
	a, b, in := newSameSubnetPair(t)
	nodes := []*ssNode{a, b}
	for _, n := range nodes {
		n.xa = NewApplier(Netlink{}, desired.Config{})
	}
	ringNow := desired.Ring{Mode: api.ModeOff}
	sync := func() {
		for range 2 {
			for _, n := range nodes {
				inp := desired.Inputs{Self: n.name, Ring: ringNow, Keys: testKeys,
					Pools: []desired.Pool{{Name: "cs", CIDR: mustPrefix("10.244.0.0/16"), IPIPMode: desired.IPIPCrossSubnet}}}
				for _, m := range nodes {
					nd := desired.Node{Name: m.name, IPv4Address: m.cidr, Incarnation: "boot-" + m.name, NodeID: m.id}
					if m != n && m.published != nil {
						p := m.published
						nd.Report = &desired.Report{Incarnation: nd.Incarnation, Mode: p.Mode, Generations: p.Generations,
							InboundFromSelf: slices.Contains(p.InboundPeers(), n.name), EncryptsToSelf: slices.Contains(p.EncryptingPeers(), n.name)}
					}
					inp.Nodes = append(inp.Nodes, nd)
					inp.Blocks = append(inp.Blocks, desired.Block{CIDR: mustPrefix(m.block), Affinity: "host:" + m.name})
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
	}
	ping := func() error {
		var err error
		in(a.podNS, func() error { err = run("ping", "-n", "-q", "-c", "2", "-W", "2", b.pod); return nil })
		return err
	}
	tunnelPackets := func(n *ssNode) uint64 {
		var total uint64
		in(n.host, func() error {
			sts, err := Netlink{}.ListStates()
			for _, s := range sts {
				if s.SA.Kind == desired.Tunnel {
					total += s.Packets
				}
			}
			return err
		})
		return total
	}
	mode := func(m api.Mode, gens ...desired.Generation) {
		ringNow = desired.Ring{Mode: m, Generations: gens}
		sync()
	}

	mode(api.ModeOff)
	if err := ping(); err != nil {
		t.Fatalf("same-subnet pod routing does not work in the lab: %v", err)
	}
	mode(api.ModeAccept, active(1))
	if err := ping(); err != nil {
		t.Fatalf("accept: %v", err)
	}
	if n := tunnelPackets(a); n != 0 {
		t.Fatalf("accept used tunnel SAs (%d packets)", n)
	}
	mode(api.ModeEncrypt, active(1))
	if err := ping(); err != nil {
		t.Fatalf("encrypt: %v", err)
	}
	if n := tunnelPackets(a); n < 4 {
		t.Fatalf("encrypt: tunnel SA packets %d, want >= 4 (2 out, 2 in)", n)
	}
	mode(api.ModeEnforce, active(1))
	if err := ping(); err != nil {
		t.Fatalf("enforce: %v", err)
	}
	// a's outbound tunnel policy vanishes: a's pod sends plaintext; b's required fwd policy
	// refuses it.
	in(a.host, func() error {
		return run("ip", "xfrm", "policy", "delete", "src", a.block, "dst", b.block, "dir", "out")
	})
	if err := ping(); err == nil {
		t.Fatal("plaintext pod traffic passed b's required fwd policy")
	}
	if v := xfrmStat(t, in, b.host, "XfrmInTmplMismatch"); v == 0 {
		t.Error("b's XfrmInTmplMismatch did not count the refused plaintext")
	}
	a.xa.QueueResync()
	sync()
	if err := ping(); err != nil {
		t.Fatalf("after resync: %v", err)
	}
	// b's fwd policy vanishes: tunnel-mode ESP from a now fails b's policy check.
	in(b.host, func() error {
		return run("ip", "xfrm", "policy", "delete", "src", a.block, "dst", b.block, "dir", "fwd")
	})
	before := xfrmStat(t, in, b.host, "XfrmInNoPols")
	if err := ping(); err == nil {
		t.Fatal("tunnel-mode traffic accepted without a fwd policy")
	}
	if after := xfrmStat(t, in, b.host, "XfrmInNoPols"); after <= before {
		t.Errorf("XfrmInNoPols %d -> %d: the drop was not the missing fwd policy", before, after)
	}
	b.xa.QueueResync()
	mode(api.ModeOff)
	if err := ping(); err != nil {
		t.Fatalf("after disable: %v", err)
	}
}

// xfrmStat reads one /proc/net/xfrm_stat counter of the namespace (thread-self: the
// calling thread's namespace, not the process's).
func xfrmStat(t *testing.T, in func(ns.NetNS, func() error), n ns.NetNS, name string) uint64 {
	t.Helper()
	var v uint64
	in(n, func() error {
		b, err := os.ReadFile("/proc/thread-self/net/xfrm_stat")
		if err != nil {
			return err
		}
		for _, l := range strings.Split(string(b), "\n") {
			if f := strings.Fields(l); len(f) == 2 && f[0] == name {
				_, err = fmt.Sscan(f[1], &v)
				return err
			}
		}
		return fmt.Errorf("xfrm_stat has no %s", name)
	})
	return v
}
