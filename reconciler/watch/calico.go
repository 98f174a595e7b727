package watch

import (
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	v3 "github.com/projectcalico/api/pkg/apis/projectcalico/v3"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// The parsers below read Calico objects with projectcalico/api's v3 types (Calico's own
// Go shapes). crd.projectcalico.org/v1 objects have the same shapes except
// BlockAffinity.spec.deleted, a string in v1 (a boolean in v3): toV3 converts it as
// Calico's v1 backend does. Unknown fields are ignored. They are pure: tested with literal
// objects.

// toV3 converts u into the typed v3 object out. A string spec.deleted ("true"/"false",
// v1 BlockAffinity) becomes a boolean; u is not modified.
func toV3(u *unstructured.Unstructured, out any) error {
	obj := u.Object
	if spec, ok := obj["spec"].(map[string]any); ok {
		if d, isStr := spec["deleted"].(string); isStr {
			spec = maps.Clone(spec)
			spec["deleted"] = truthy(d)
			obj = maps.Clone(obj)
			obj["spec"] = spec
		}
	}
	return runtime.DefaultUnstructuredConverter.FromUnstructured(obj, out)
}

// ParseIPAMBlock reads an IPAMBlock: spec.cidr, spec.affinity ("host:NODE", "" when Calico
// released it, or "virtual:NAME"), spec.deleted and the addresses used by other nodes: the
// allocations whose attribute names a node (attributes[i].secondary.node) other than the
// affine one — every allocation with a node when the block has no host affinity.
func ParseIPAMBlock(u *unstructured.Unstructured) (desired.Block, error) {
	var b v3.IPAMBlock
	if err := toV3(u, &b); err != nil {
		return desired.Block{}, fmt.Errorf("ipamblock %q: %w", u.GetName(), err)
	}
	return BlockFromV3(u.GetName(), &b.Spec)
}

// BlockFromV3 is ParseIPAMBlock of a typed block spec.
func BlockFromV3(name string, spec *v3.IPAMBlockSpec) (desired.Block, error) {
	attrNodes := make([]string, len(spec.Attributes))
	for i, a := range spec.Attributes {
		attrNodes[i] = a.ActiveOwnerAttrs["node"]
	}
	return blockFrom(name, spec.CIDR, spec.Affinity, spec.Deleted, spec.Allocations, attrNodes)
}

// blockFrom is ParseIPAMBlock of the fields it reads: the CIDR, affinity and deleted
// flag, and per address its attribute's index (allocations) and per attribute the node
// that holds it (attrNodes: ActiveOwnerAttrs["node"]).
func blockFrom(name, cidrText string, affinity *string, deleted bool, allocations []*int, attrNodes []string) (desired.Block, error) {
	cidr, err := netip.ParsePrefix(strings.TrimSpace(cidrText))
	if err != nil {
		return desired.Block{}, fmt.Errorf("ipamblock %q: spec.cidr %q: %w", name, cidrText, err)
	}
	cidr = cidr.Masked()
	b := desired.Block{CIDR: cidr, Deleted: deleted}
	if affinity != nil {
		b.Affinity = *affinity
	}
	owner, hasOwner := desired.ParseAffinity(b.Affinity)
	if !cidr.Addr().Is4() || len(allocations) == 0 || len(attrNodes) == 0 {
		return b, nil
	}
	for ordinal, a := range allocations {
		if a == nil || *a < 0 || *a >= len(attrNodes) {
			continue
		}
		node := attrNodes[*a]
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

// ParseBlockAffinity reads a BlockAffinity: spec.node, spec.cidr and spec.deleted (a
// STRING "true"/"false" in crd.projectcalico.org/v1, a boolean in projectcalico.org/v3);
// state pendingDeletion counts as deleted.
func ParseBlockAffinity(u *unstructured.Unstructured) (BlockAffinity, error) {
	var a v3.BlockAffinity
	if err := toV3(u, &a); err != nil {
		return BlockAffinity{}, fmt.Errorf("blockaffinity %q: %w", u.GetName(), err)
	}
	cidr, err := netip.ParsePrefix(strings.TrimSpace(a.Spec.CIDR))
	if err != nil {
		return BlockAffinity{}, fmt.Errorf("blockaffinity %q: spec.cidr %q: %w", u.GetName(), a.Spec.CIDR, err)
	}
	if a.Spec.Node == "" {
		return BlockAffinity{}, fmt.Errorf("blockaffinity %q: no spec.node", u.GetName())
	}
	return BlockAffinity{Node: a.Spec.Node, CIDR: cidr.Masked(),
		Deleted: a.Spec.Deleted || a.Spec.State == v3.StatePendingDeletion}, nil
}

// ParseIPPool reads an IPPool: spec.cidr, spec.ipipMode and spec.vxlanMode (Always,
// CrossSubnet, Never) and spec.disabled. (The pre-3.0 spec.ipip form is pruned by Calico's
// CRDs: it never reaches a reader.)
func ParseIPPool(u *unstructured.Unstructured) (desired.Pool, error) {
	var p v3.IPPool
	if err := toV3(u, &p); err != nil {
		return desired.Pool{}, fmt.Errorf("ippool %q: %w", u.GetName(), err)
	}
	cidr, err := netip.ParsePrefix(strings.TrimSpace(p.Spec.CIDR))
	if err != nil {
		return desired.Pool{}, fmt.Errorf("ippool %q: spec.cidr %q: %w", u.GetName(), p.Spec.CIDR, err)
	}
	return desired.Pool{Name: u.GetName(), CIDR: cidr.Masked(), Disabled: p.Spec.Disabled,
		IPIPMode: string(p.Spec.IPIPMode), VXLANMode: string(p.Spec.VXLANMode)}, nil
}

// FelixConfig is the part of a FelixConfiguration the agent reads (nil: unset).
type FelixConfig struct {
	WireguardEnabled *bool
	BPFEnabled       *bool
	NFTablesMode     string
}

// ParseFelixConfiguration reads a FelixConfiguration's wireguardEnabled, bpfEnabled and
// nftablesMode.
func ParseFelixConfiguration(u *unstructured.Unstructured) (FelixConfig, error) {
	var f v3.FelixConfiguration
	if err := toV3(u, &f); err != nil {
		return FelixConfig{}, fmt.Errorf("felixconfiguration %q: %w", u.GetName(), err)
	}
	fc := FelixConfig{WireguardEnabled: f.Spec.WireguardEnabled, BPFEnabled: f.Spec.BPFEnabled}
	if f.Spec.NFTablesMode != nil {
		fc.NFTablesMode = string(*f.Spec.NFTablesMode)
	}
	return fc, nil
}

// FelixFor merges node's FelixConfiguration ("node.NODE") over "default", field by field,
// as Felix does.
func FelixFor(node string, byName map[string]FelixConfig) desired.Felix {
	var f desired.Felix
	for _, name := range []string{"default", "node." + node} {
		c, ok := byName[name]
		if !ok {
			continue
		}
		if c.WireguardEnabled != nil {
			f.WireGuard = *c.WireguardEnabled
		}
		if c.BPFEnabled != nil {
			f.BPF = *c.BPFEnabled
		}
		if c.NFTablesMode != "" {
			f.NFTablesMode = c.NFTablesMode
		}
	}
	return f
}

// ParseBGPPeer reads a BGPPeer's spec.peerIP, which may carry a port ("IP:PORT" or
// "[IP]:PORT"). Peers selected only by spec.peerSelector (other cluster nodes) have no
// peerIP; ok is false for them and they are not reported.
func ParseBGPPeer(u *unstructured.Unstructured) (peer desired.BGPPeer, ok bool, err error) {
	var p v3.BGPPeer
	if err := toV3(u, &p); err != nil {
		return desired.BGPPeer{}, false, fmt.Errorf("bgppeer %q: %w", u.GetName(), err)
	}
	s := strings.TrimSpace(p.Spec.PeerIP)
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

// sortBlocks orders blocks by CIDR (deterministic snapshots).
func sortBlocks(bs []desired.Block) {
	slices.SortFunc(bs, func(a, b desired.Block) int {
		if c := a.CIDR.Addr().Compare(b.CIDR.Addr()); c != 0 {
			return c
		}
		return a.CIDR.Bits() - b.CIDR.Bits()
	})
}
