package watch

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// The parsers below read Calico objects as unstructured maps, so fields they do not know
// are ignored and both API groups (crd.projectcalico.org/v1 and projectcalico.org/v3)
// parse with the same code. They are pure: tested with literal objects.

// ParseIPAMBlock reads an IPAMBlock: spec.cidr, spec.affinity ("host:NODE"), spec.deleted
// (a boolean; a string "true" is tolerated) and the borrowed /32s: allocations whose
// attribute names a node (attributes[i].secondary.node) other than the affine one.
func ParseIPAMBlock(u *unstructured.Unstructured) (desired.Block, error) {
	spec, _, _ := unstructured.NestedMap(u.Object, "spec")
	cidrS, _ := spec["cidr"].(string)
	cidr, err := netip.ParsePrefix(strings.TrimSpace(cidrS))
	if err != nil {
		return desired.Block{}, fmt.Errorf("ipamblock %q: spec.cidr %q: %w", u.GetName(), cidrS, err)
	}
	cidr = cidr.Masked()
	b := desired.Block{CIDR: cidr, Deleted: truthy(spec["deleted"])}
	b.Affinity, _ = spec["affinity"].(string)
	owner, hasOwner := desired.ParseAffinity(b.Affinity)
	attrs, _ := spec["attributes"].([]any)
	allocs, _ := spec["allocations"].([]any)
	if !cidr.Addr().Is4() || len(allocs) == 0 || len(attrs) == 0 {
		return b, nil
	}
	for ordinal, a := range allocs {
		idx, ok := toInt(a)
		if !ok || idx < 0 || idx >= len(attrs) {
			continue
		}
		attr, _ := attrs[idx].(map[string]any)
		sec, _ := attr["secondary"].(map[string]any)
		node, _ := sec["node"].(string)
		if node == "" || (hasOwner && node == owner) {
			continue
		}
		ip, ok := nthAddr(cidr, ordinal)
		if !ok {
			continue
		}
		b.Borrowed = append(b.Borrowed, desired.Borrowed{IP: ip, Node: node})
	}
	return b, nil
}

// nthAddr is the ordinal-th address of an IPv4 prefix.
func nthAddr(p netip.Prefix, ordinal int) (netip.Addr, bool) {
	size := uint64(1) << (32 - p.Bits())
	if ordinal < 0 || uint64(ordinal) >= size {
		return netip.Addr{}, false
	}
	a := p.Addr().As4()
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	v += uint32(ordinal)
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), true
}

// BlockAffinity is the part of a BlockAffinity the agent uses.
type BlockAffinity struct {
	Node    string
	CIDR    netip.Prefix
	Deleted bool
}

// ParseBlockAffinity reads a BlockAffinity: spec.node, spec.cidr and spec.deleted, which
// is a STRING ("true"/"false") in crd.projectcalico.org/v1; a boolean is tolerated.
func ParseBlockAffinity(u *unstructured.Unstructured) (BlockAffinity, error) {
	spec, _, _ := unstructured.NestedMap(u.Object, "spec")
	cidrS, _ := spec["cidr"].(string)
	cidr, err := netip.ParsePrefix(strings.TrimSpace(cidrS))
	if err != nil {
		return BlockAffinity{}, fmt.Errorf("blockaffinity %q: spec.cidr %q: %w", u.GetName(), cidrS, err)
	}
	node, _ := spec["node"].(string)
	if node == "" {
		return BlockAffinity{}, fmt.Errorf("blockaffinity %q: no spec.node", u.GetName())
	}
	state, _ := spec["state"].(string)
	return BlockAffinity{Node: node, CIDR: cidr.Masked(),
		Deleted: truthy(spec["deleted"]) || state == "pendingDeletion"}, nil
}

// ParseIPPool reads an IPPool: spec.cidr, spec.ipipMode (Always, CrossSubnet, Never; the
// pre-3.0 spec.ipip {enabled, mode: always|cross-subnet} is understood too) and
// spec.disabled.
func ParseIPPool(u *unstructured.Unstructured) (desired.Pool, error) {
	spec, _, _ := unstructured.NestedMap(u.Object, "spec")
	cidrS, _ := spec["cidr"].(string)
	cidr, err := netip.ParsePrefix(strings.TrimSpace(cidrS))
	if err != nil {
		return desired.Pool{}, fmt.Errorf("ippool %q: spec.cidr %q: %w", u.GetName(), cidrS, err)
	}
	p := desired.Pool{Name: u.GetName(), CIDR: cidr.Masked(), Disabled: truthy(spec["disabled"])}
	p.IPIPMode, _ = spec["ipipMode"].(string)
	if old, ok := spec["ipip"].(map[string]any); ok && p.IPIPMode == "" {
		enabled := true
		if v, set := old["enabled"]; set {
			enabled = truthy(v)
		}
		mode, _ := old["mode"].(string)
		switch {
		case !enabled:
			p.IPIPMode = desired.IPIPNever
		case strings.EqualFold(mode, "cross-subnet") || strings.EqualFold(mode, "crosssubnet"):
			p.IPIPMode = desired.IPIPCrossSubnet
		default:
			p.IPIPMode = desired.IPIPAlways
		}
	}
	return p, nil
}

// ParseBGPPeer reads a BGPPeer's spec.peerIP, which may carry a port ("IP:PORT" or
// "[IP]:PORT"). Peers selected only by spec.peerSelector (other cluster nodes) have no
// peerIP; ok is false for them and they are not reported.
func ParseBGPPeer(u *unstructured.Unstructured) (peer desired.BGPPeer, ok bool, err error) {
	spec, _, _ := unstructured.NestedMap(u.Object, "spec")
	s, _ := spec["peerIP"].(string)
	s = strings.TrimSpace(s)
	if s == "" {
		return desired.BGPPeer{}, false, nil
	}
	ip, perr := netip.ParseAddr(s)
	if perr != nil {
		host, _, serr := net.SplitHostPort(s)
		if serr != nil {
			return desired.BGPPeer{}, false, fmt.Errorf("bgppeer %q: spec.peerIP %q is not an address", u.GetName(), s)
		}
		if ip, perr = netip.ParseAddr(host); perr != nil {
			return desired.BGPPeer{}, false, fmt.Errorf("bgppeer %q: spec.peerIP %q is not an address", u.GetName(), s)
		}
	}
	return desired.BGPPeer{Name: u.GetName(), PeerIP: ip.Unmap()}, true, nil
}

// ApplyAffinities marks a block deleted when the BlockAffinity claiming it for its affine
// node is being released, so a block in the middle of being handed back is not tunnelled.
func ApplyAffinities(blocks []desired.Block, affs []BlockAffinity) {
	released := map[string]bool{}
	for _, a := range affs {
		if a.Deleted {
			released[a.Node+"|"+a.CIDR.String()] = true
		}
	}
	for i := range blocks {
		if n, ok := desired.ParseAffinity(blocks[i].Affinity); ok && released[n+"|"+blocks[i].CIDR.String()] {
			blocks[i].Deleted = true
		}
	}
}

func truthy(v any) bool {
	switch x := v.(type) {
	case bool:
		return x
	case string:
		b, err := strconv.ParseBool(strings.TrimSpace(x))
		return err == nil && b
	}
	return false
}

func toInt(v any) (int, bool) {
	switch x := v.(type) {
	case int64:
		return int(x), true
	case int:
		return x, true
	case float64:
		if x == float64(int(x)) {
			return int(x), true
		}
	}
	return 0, false
}

// sortBlocks orders blocks by CIDR (deterministic snapshots).
func sortBlocks(bs []desired.Block) {
	slices.SortFunc(bs, func(a, b desired.Block) int {
		if c := a.CIDR.Addr().Compare(b.CIDR.Addr()); c != 0 {
			return c
		}
		return a.CIDR.Bits() - b.CIDR.Bits()
	})
}
