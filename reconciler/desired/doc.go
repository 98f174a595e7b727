// Package desired computes the complete kernel state one node must hold: xfrm states (SAs),
// xfrm policies and plaintext-IPIP iptables rules, from the cluster's nodes, Calico IPAM
// blocks, IP pools and BGP peers, the key ring's mode and generations, and the peers'
// reports. It is the pure core of the agent: no netlink, no client-go, no clock.
//
// Invariants (see docs/dataplane.md for the kernel concepts):
//   - Compute is deterministic: every slice of State is sorted and duplicate-free, so two
//     States compare with reflect.DeepEqual regardless of input order.
//   - Make before break: an outbound policy toward a peer carries the SPI of a generation
//     the peer's own report lists as installed inbound from this node; pending generations
//     are never sent with.
//   - Plaintext from a peer is dropped (iptables) or refused (required inbound template)
//     only in enforce and only if the peer reports that its kernel sends ESP to this node.
//   - No two SAs share an AEAD key: keys come from KeyFunc per (generation, kind, src, dst)
//     and SPIs are checked for collisions at each receiver.
//   - Only IPIP (proto 4) between node IPs and CrossSubnet pod blocks are selected;
//     control-plane traffic never matches. BGP peers outside the cluster get nothing.
//   - Key bytes never appear in fmt, slog, JSON or errors (Key redacts itself).
package desired
