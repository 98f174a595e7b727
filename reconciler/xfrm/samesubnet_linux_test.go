//go:build linux

package xfrm

import (
	"os"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"

	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// ssNode is one of the two same-subnet nodes newSameSubnetPair builds: its namespace
// (host) with uplink eth-NAME, and a pod namespace attached Calico-style (veth cali-NAME,
// 169.254.1.1 as the pod's gateway, a /32 route to the pod); the peer's block routed
// directly over the uplink, as Calico routes CrossSubnet pools within a subnet.
type ssNode struct {
	name, cidr, ip, block, pod, peerIP, peerBlock string
	id                                            uint32
	host, podNS                                   ns.NetNS
	xa                                            *Applier
	state                                         desired.State
	published                                     *desired.State
}

// newSameSubnetPair builds nodes a (198.18.0.1, block 10.244.1.0/26, pod .2) and b
// (198.18.0.2, 10.244.2.0/26) in fresh namespaces removed after the test. in runs f in a
// namespace and fails the test on error.
func newSameSubnetPair(t *testing.T) (a, b *ssNode, in func(ns.NetNS, func() error)) {
	t.Helper()
	a = &ssNode{name: "a", cidr: "198.18.0.1/24", ip: "198.18.0.1", block: "10.244.1.0/26", pod: "10.244.1.2", peerIP: "198.18.0.2", peerBlock: "10.244.2.0/26", id: 1}
	b = &ssNode{name: "b", cidr: "198.18.0.2/24", ip: "198.18.0.2", block: "10.244.2.0/26", pod: "10.244.2.2", peerIP: "198.18.0.1", peerBlock: "10.244.1.0/26", id: 2}
	in = func(n ns.NetNS, f func() error) {
		t.Helper()
		if err := n.Do(func(ns.NetNS) error { return f() }); err != nil {
			t.Fatal(err)
		}
	}
	newNS := func() ns.NetNS {
		n, err := testutils.NewNS()
		if err != nil {
			skipOrFail(t, "SECUREOVERLAY_REQUIRE_ALL", "cannot create a network namespace: "+err.Error())
		}
		t.Cleanup(func() { _ = n.Close(); _ = testutils.UnmountNS(n) })
		return n
	}
	for _, n := range []*ssNode{a, b} {
		n.host, n.podNS = newNS(), newNS()
	}
	moveVeth := func(from ns.NetNS, name, peer string, to ns.NetNS) {
		in(from, func() error {
			if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: peer}); err != nil {
				return err
			}
			l, err := netlink.LinkByName(peer)
			if err != nil {
				return err
			}
			return netlink.LinkSetNsFd(l, int(to.Fd()))
		})
	}
	moveVeth(a.host, "eth-a", "eth-b", b.host)
	for _, n := range []*ssNode{a, b} {
		moveVeth(n.host, "cali-"+n.name, "eth0", n.podNS)
		in(n.host, func() error {
			for _, c := range [][]string{
				{"ip", "link", "set", "lo", "up"},
				{"ip", "addr", "add", n.cidr, "dev", "eth-" + n.name},
				{"ip", "link", "set", "eth-" + n.name, "up"},
				{"ip", "link", "set", "cali-" + n.name, "up"},
				{"ip", "addr", "add", "169.254.1.1/32", "dev", "cali-" + n.name},
				{"ip", "route", "add", n.pod + "/32", "dev", "cali-" + n.name},
				{"ip", "route", "add", n.peerBlock, "via", n.peerIP, "dev", "eth-" + n.name},
			} {
				if err := run(c...); err != nil {
					return err
				}
			}
			return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644)
		})
		in(n.podNS, func() error {
			for _, c := range [][]string{
				{"ip", "link", "set", "lo", "up"},
				{"ip", "link", "set", "eth0", "up"},
				{"ip", "addr", "add", n.pod + "/32", "dev", "eth0"},
				{"ip", "route", "add", "default", "via", "169.254.1.1", "dev", "eth0", "onlink"},
			} {
				if err := run(c...); err != nil {
					return err
				}
			}
			return nil
		})
	}
	return a, b, in
}
