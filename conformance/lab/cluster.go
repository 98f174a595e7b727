package lab

import (
	"context"
	"fmt"
	"strings"
)

// Cluster is a Calico-style IPIP cluster made of network namespaces inside the
// guest, the shape every data-plane test starts from:
//
//	netns ul     bridge br0 (MTU UnderlayMTU): the underlay "switch"; capture here
//	netns nodeN  eth0 198.18.0.N/24 on br0, ip_forward=1,
//	             tunl0 up, MTU TunnelMTU, 10.244.N.1/32 (Calico's IPv4IPIPTunnelAddr),
//	             blackhole 10.244.N.0/26 (the local IPAM block),
//	             169.254.1.1 dev eth0 (for proxy ARP toward Calico's pods),
//	             10.244.M.0/26 via 198.18.0.M dev tunl0 onlink for every other node M
//	             (when ControlPlane) mgmt0 198.19.0.N/24 on the guest's bridge
//	             ctl0 (198.19.0.254), route to GuestForwardAddr via ctl0: the
//	             path to host services (the test API server), separate from the
//	             underlay and so never encrypted; the guest masquerades it to
//	             QEMU's user network
//	netns podN   (when Pods) eth0 10.244.N.5/32, MTU TunnelMTU, default via
//	             169.254.1.1 — Calico's veth layout: host side caliN with a /32
//	             route and proxy_arp (plus a permanent neighbour entry for
//	             169.254.1.1, since the node namespaces have no default route
//	             for proxy ARP to answer from)
//
// Nodes are numbered from 1. Addresses come from 198.18.0.0/15 (underlay) and
// 10.244.0.0/16 (pods); no namespace has a default route out of the guest.
type Cluster struct {
	Nodes       int
	UnderlayMTU int
	TunnelMTU   int
	Pods        bool
	// ControlPlane gives every node a management link through which it
	// reaches the guest forwards (GuestForwardAddr), e.g. the API server.
	ControlPlane bool
}

// Namespace and interface names used by Cluster.
const (
	UnderlayNS     = "ul"
	UnderlayBridge = "br0"
	// ControlBridge lives in the guest's root namespace; ControlGateway is its address.
	ControlBridge  = "ctl0"
	ControlGateway = "198.19.0.254"
)

// ControlIP is node i's management address (Cluster.ControlPlane).
func ControlIP(i int) string { return fmt.Sprintf("198.19.0.%d", i) }

// masqueradeRule is the guest root namespace's NAT rule for the control plane.
var masqueradeRule = "POSTROUTING -s 198.19.0.0/24 -d " + GuestForwardAddr + "/32 -m comment --comment lab-control-plane -j MASQUERADE"

// NodeNS is node i's namespace.
func NodeNS(i int) string { return fmt.Sprintf("node%d", i) }

// PodNS is the namespace of node i's pod.
func PodNS(i int) string { return fmt.Sprintf("pod%d", i) }

// NodeIP is node i's underlay address.
func NodeIP(i int) string { return fmt.Sprintf("198.18.0.%d", i) }

// TunnelIP is node i's tunl0 address.
func TunnelIP(i int) string { return fmt.Sprintf("10.244.%d.1", i) }

// Block is node i's pod CIDR (its IPAM block).
func Block(i int) string { return fmt.Sprintf("10.244.%d.0/26", i) }

// PodIP is the address of node i's pod.
func PodIP(i int) string { return fmt.Sprintf("10.244.%d.5", i) }

func (c Cluster) validate() error {
	if c.Nodes < 1 || c.Nodes > 250 {
		return fmt.Errorf("cluster: %d nodes, want 1..250", c.Nodes)
	}
	if c.UnderlayMTU < 576 || c.UnderlayMTU > 9000 {
		return fmt.Errorf("cluster: underlay mtu %d out of range", c.UnderlayMTU)
	}
	if c.TunnelMTU < 552 || c.TunnelMTU > c.UnderlayMTU-20 {
		return fmt.Errorf("cluster: tunnel mtu %d out of range for underlay mtu %d", c.TunnelMTU, c.UnderlayMTU)
	}
	return nil
}

// SetupScript is the shell script (for the guest's /bin/sh) that builds c.
func (c Cluster) SetupScript() (string, error) {
	if err := c.validate(); err != nil {
		return "", err
	}
	var b strings.Builder
	w := func(format string, a ...any) { fmt.Fprintf(&b, format+"\n", a...) }
	w("set -eu")
	w("ip netns add %s", UnderlayNS)
	w("ip -n %s link set lo up", UnderlayNS)
	w("ip -n %s link add %s mtu %d type bridge", UnderlayNS, UnderlayBridge, c.UnderlayMTU)
	w("ip -n %s link set %s up", UnderlayNS, UnderlayBridge)
	if c.ControlPlane {
		w("ip link add %s type bridge", ControlBridge)
		w("ip addr add %s/24 dev %s", ControlGateway, ControlBridge)
		w("ip link set %s up", ControlBridge)
		w("sysctl -qw net.ipv4.ip_forward=1")
		w("iptables -w -t nat -A %s", masqueradeRule)
	}
	for i := 1; i <= c.Nodes; i++ {
		n := NodeNS(i)
		w("# node %d", i)
		w("ip netns add %s", n)
		w("ip -n %s link set lo up", n)
		w("ip -n %s link add eth0 mtu %d type veth peer name ul%d netns %s mtu %d", n, c.UnderlayMTU, i, UnderlayNS, c.UnderlayMTU)
		w("ip -n %s link set ul%d master %s up", UnderlayNS, i, UnderlayBridge)
		w("ip -n %s addr add %s/24 dev eth0", n, NodeIP(i))
		w("ip -n %s link set eth0 up", n)
		w("ip netns exec %s sysctl -qw net.ipv4.ip_forward=1", n)
		w("ip -n %s link set tunl0 mtu %d up", n, c.TunnelMTU)
		w("ip -n %s addr add %s/32 dev tunl0", n, TunnelIP(i))
		w("ip -n %s route add blackhole %s", n, Block(i))
		// Calico's pods reach the node through 169.254.1.1, answered by proxy ARP on the
		// host-side veth, which the kernel does only for an address it routes out of
		// another interface: real nodes have a default route; the lab, which has none,
		// routes just this address to the uplink.
		w("ip -n %s route add 169.254.1.1 dev eth0 scope link", n)
		if c.ControlPlane {
			w("ip -n %s link add mgmt0 type veth peer name ctl%d netns 1", n, i)
			w("ip link set ctl%d master %s up", i, ControlBridge)
			w("ip -n %s addr add %s/24 dev mgmt0", n, ControlIP(i))
			w("ip -n %s link set mgmt0 up", n)
			w("ip -n %s route add %s/32 via %s dev mgmt0", n, GuestForwardAddr, ControlGateway)
		}
		if c.Pods {
			p := PodNS(i)
			w("ip netns add %s", p)
			w("ip -n %s link set lo up", p)
			w("ip -n %s link add eth0 mtu %d type veth peer name cali%d netns %s mtu %d", p, c.TunnelMTU, i, n, c.TunnelMTU)
			w("ip -n %s addr add %s/32 dev eth0", p, PodIP(i))
			w("ip -n %s link set eth0 up", p)
			w("ip -n %s route add 169.254.1.1 dev eth0 scope link", p)
			w("ip -n %s route add default via 169.254.1.1 dev eth0", p)
			w("ip -n %s link set cali%d up", n, i)
			w("ip netns exec %s sysctl -qw net.ipv4.conf.cali%d.proxy_arp=1", n, i)
			w("ip -n %s route add %s/32 dev cali%d scope link", n, PodIP(i), i)
			w("mac=$(ip -n %s -br link show cali%d | awk '{print $3}')", n, i)
			w("ip -n %s neigh add 169.254.1.1 lladdr \"$mac\" dev eth0 nud permanent", p)
		}
	}
	for i := 1; i <= c.Nodes; i++ {
		for j := 1; j <= c.Nodes; j++ {
			if i != j {
				w("ip -n %s route add %s via %s dev tunl0 onlink", NodeNS(i), Block(j), NodeIP(j))
			}
		}
	}
	return b.String(), nil
}

// Setup builds c in the guest. It fails if any of its namespaces exist.
func (c Cluster) Setup(ctx context.Context, vm *VM) error {
	script, err := c.SetupScript()
	if err != nil {
		return err
	}
	if _, _, err := vm.RunInput(ctx, "sh -s", []byte(script)); err != nil {
		return fmt.Errorf("set up lab cluster of %d nodes: %w", c.Nodes, err)
	}
	return nil
}

// TeardownScript deletes every namespace c creates; missing ones are ignored.
func (c Cluster) TeardownScript() string {
	var b strings.Builder
	for i := 1; i <= c.Nodes; i++ {
		if c.Pods {
			fmt.Fprintf(&b, "ip netns del %s 2>/dev/null\n", PodNS(i))
		}
		fmt.Fprintf(&b, "ip netns del %s 2>/dev/null\n", NodeNS(i))
	}
	fmt.Fprintf(&b, "ip netns del %s 2>/dev/null\n", UnderlayNS)
	if c.ControlPlane {
		fmt.Fprintf(&b, "ip link del %s 2>/dev/null\n", ControlBridge)
		fmt.Fprintf(&b, "while iptables -w -t nat -D %s 2>/dev/null; do :; done\n", masqueradeRule)
	}
	b.WriteString("true\n")
	return b.String()
}

// Teardown removes c from the guest.
func (c Cluster) Teardown(ctx context.Context, vm *VM) error {
	if _, _, err := vm.RunInput(ctx, "sh -s", []byte(c.TeardownScript())); err != nil {
		return fmt.Errorf("tear down lab cluster: %w", err)
	}
	return nil
}
