// Package xfrm applies the desired xfrm states (SAs) and policies to the kernel.
//
// Kernel concepts. An xfrm state (SA) is identified by (destination, SPI, protocol) and
// holds the AEAD key; an xfrm policy is identified by (direction, selector) where the
// selector is source/destination prefixes and an IP protocol, and holds templates: "apply
// ESP from A to B, SPI s, reqid r". On output the kernel finds the policy for a flow, then
// for each template the SA whose addresses, reqid and (if the template's SPI is not 0) SPI
// match. On input it decrypts by SPI, then checks the packet against the inbound (or
// forward) policy: a "required" template demands an SA of that kind, a "use" (optional)
// template also lets plaintext pass. `ip xfrm state` / `ip xfrm policy` show both tables.
//
// Invariants of the applier:
//   - it owns only objects carrying our reqids (and template-less policies in our priority
//     band); everything else is never modified or deleted, and a foreign object in the way
//     of ours is reported, not overwritten;
//   - it writes only the difference: an SA that already matches (same SPI, addresses, key
//     and parameters) is adopted, never recreated; an SA whose key differs is replaced;
//   - a policy whose template changed (a generation switch) is changed in place with
//     XFRM_MSG_UPDPOLICY, never deleted and re-added;
//   - order: new SAs, then new/updated policies, then stale policies, then stale SAs, so a
//     policy never points at an SA that is not there yet or any more;
//   - it keeps going past failures (errors.Join) and the next Apply after a failure (or
//     after QueueResync) re-reads the kernel instead of trusting its cache.
package xfrm

import (
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// Kernel is the seam to the kernel's xfrm tables. Netlink implements it for real; Fake in
// memory. Listings return every object, ours or not.
type Kernel interface {
	ListStates() ([]KernelSA, error)
	AddState(sa desired.SA) error
	DeleteState(sa desired.SA) error
	ListPolicies() ([]KernelPolicy, error)
	AddPolicy(p desired.Policy) error
	UpdatePolicy(p desired.Policy) error
	DeletePolicy(p desired.Policy) error
}

// KernelSA is a listed xfrm state. SA holds only kernel fields.
type KernelSA struct {
	SA desired.SA
	// Foreign is set when the state cannot be one of ours whatever its reqid (not ESP,
	// not AEAD rfc4106, carries a mark, if_id or encapsulation, not IPv4).
	Foreign bool
	// OutSeq is the highest sequence number sent (64-bit with ESN); InSeq the highest
	// received and authenticated (an inbound SA's replay state); Packets and Bytes the
	// lifetime counters. Used for metrics and early rotation.
	OutSeq  uint64
	InSeq   uint64
	Packets uint64
	Bytes   uint64
}

// KernelPolicy is a listed xfrm policy. Foreign is set when it cannot be one of ours
// (several templates, a mark, if_id, ifindex, ports, block action, not IPv4).
type KernelPolicy struct {
	Policy  desired.Policy
	Foreign bool
}
