package kube

import (
	"context"
	"crypto/sha3"
	"encoding/base32"
	"encoding/json"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	v3 "github.com/projectcalico/api/pkg/apis/projectcalico/v3"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
)

// Fixtures. Calico objects in tests are built from projectcalico/api's v3 types (Calico's
// own Go shapes, not ours) and written with server-side strict field validation, so a
// fixture the real schema would prune or reject fails instead of silently changing.

// StrictCreate and StrictUpdate make the API server reject unknown or duplicate fields
// (fieldValidation=Strict) instead of pruning them.
var (
	StrictCreate = metav1.CreateOptions{FieldValidation: metav1.FieldValidationStrict}
	StrictUpdate = metav1.UpdateOptions{FieldValidation: metav1.FieldValidationStrict}
)

// calicoResources maps the v3 kinds tests write to their resource names.
var calicoResources = map[string]string{
	v3.KindIPPool:             "ippools",
	"IPAMBlock":               "ipamblocks",
	v3.KindBlockAffinity:      "blockaffinities",
	v3.KindBGPPeer:            "bgppeers",
	v3.KindFelixConfiguration: "felixconfigurations",
	v3.KindClusterInformation: "clusterinformations",
}

// CalicoObject converts a typed projectcalico/api v3 object (*v3.IPPool, *v3.IPAMBlock,
// *v3.BlockAffinity, *v3.BGPPeer, *v3.FelixConfiguration) into the object gv serves, and
// returns its resource. For crd.projectcalico.org/v1 the one field whose type differs is
// converted as Calico's v1 backend stores it: BlockAffinity spec.deleted, a boolean in v3,
// is the string "true"/"false" in v1.
func CalicoObject(gv schema.GroupVersion, obj runtime.Object) (*unstructured.Unstructured, schema.GroupVersionResource, error) {
	kind := ""
	switch obj.(type) {
	case *v3.IPPool:
		kind = v3.KindIPPool
	case *v3.IPAMBlock:
		kind = "IPAMBlock"
	case *v3.BlockAffinity:
		kind = v3.KindBlockAffinity
	case *v3.BGPPeer:
		kind = v3.KindBGPPeer
	case *v3.FelixConfiguration:
		kind = v3.KindFelixConfiguration
	case *v3.ClusterInformation:
		kind = v3.KindClusterInformation
	default:
		return nil, schema.GroupVersionResource{}, fmt.Errorf("calico fixture: unsupported type %T", obj)
	}
	// Through JSON, as a client sends it (the typed fields' json tags decide the shape).
	obj = obj.DeepCopyObject()
	obj.GetObjectKind().SetGroupVersionKind(gv.WithKind(kind))
	b, err := json.Marshal(obj)
	if err != nil {
		return nil, schema.GroupVersionResource{}, fmt.Errorf("calico fixture %s: %w", kind, err)
	}
	u := &unstructured.Unstructured{}
	if err := u.UnmarshalJSON(b); err != nil {
		return nil, schema.GroupVersionResource{}, fmt.Errorf("calico fixture %s: %w", kind, err)
	}
	dropNulls(u.Object)
	u.SetAPIVersion(gv.String())
	u.SetKind(kind)
	if gv.Group == CalicoGroup && kind == v3.KindBlockAffinity {
		d, _, _ := unstructured.NestedBool(u.Object, "spec", "deleted")
		_ = unstructured.SetNestedField(u.Object, strconv.FormatBool(d), "spec", "deleted")
	}
	return u, gv.WithResource(calicoResources[kind]), nil
}

// dropNulls removes null map values (encoding/json writes nil maps and slices without
// omitempty as null, e.g. metadata.creationTimestamp).
func dropNulls(m map[string]any) {
	for k, v := range m {
		switch x := v.(type) {
		case nil:
			delete(m, k)
		case map[string]any:
			dropNulls(x)
		case []any:
			for _, e := range x {
				if mm, ok := e.(map[string]any); ok {
					dropNulls(mm)
				}
			}
		}
	}
}

// CreateCalico writes obj (see CalicoObject) to group-version gv with strict field
// validation and returns what the server stored.
func CreateCalico(ctx context.Context, dc dynamic.Interface, gv schema.GroupVersion, obj runtime.Object) (*unstructured.Unstructured, error) {
	u, gvr, err := CalicoObject(gv, obj)
	if err != nil {
		return nil, err
	}
	got, err := dc.Resource(gvr).Create(ctx, u, StrictCreate)
	if err != nil {
		return nil, fmt.Errorf("create %s %s: %w", u.GetKind(), u.GetName(), err)
	}
	return got, nil
}

// NewIPPool is an IPPool as calicoctl or the operator writes it.
func NewIPPool(name, cidr string, ipip v3.IPIPMode) *v3.IPPool {
	p := v3.NewIPPool()
	p.Name = name
	p.Spec = v3.IPPoolSpec{CIDR: cidr, IPIPMode: ipip, VXLANMode: v3.VXLANModeNever, NATOutgoing: true,
		NodeSelector: "all()", BlockSize: 26}
	return p
}

// BlockName is the name Calico gives the IPAMBlock of cidr ("10.65.1.0/26" →
// "10-65-1-0-26").
func BlockName(cidr string) string {
	return strings.NewReplacer(".", "-", ":", "-", "/", "-").Replace(cidr)
}

// NewIPAMBlock is an empty block of cidr as Calico's IPAM creates it: every ordinal
// unallocated, affinity "host:NODE" ("" for none, e.g. after Calico released it).
func NewIPAMBlock(cidr, affinity string) *v3.IPAMBlock {
	p := netip.MustParsePrefix(cidr)
	size := 1 << (p.Addr().BitLen() - p.Bits())
	b := &v3.IPAMBlock{ObjectMeta: metav1.ObjectMeta{Name: BlockName(cidr)}}
	b.Spec = v3.IPAMBlockSpec{CIDR: p.Masked().String(), Allocations: make([]*int, size),
		Unallocated: make([]int, 0, size), Attributes: []v3.AllocationAttribute{}}
	for i := range size {
		b.Spec.Unallocated = append(b.Spec.Unallocated, i)
	}
	if affinity != "" {
		b.Spec.Affinity = &affinity
	}
	return b
}

// Allocate assigns the ordinal-th address of b to handle on node, as Calico's IPAM does
// for a pod (attrs are added to the secondary attributes, e.g. namespace and pod).
func Allocate(b *v3.IPAMBlock, ordinal int, handle, node string, attrs map[string]string) {
	sec := map[string]string{"node": node}
	for k, v := range attrs {
		sec[k] = v
	}
	h := handle
	b.Spec.Attributes = append(b.Spec.Attributes, v3.AllocationAttribute{HandleID: &h, ActiveOwnerAttrs: sec})
	idx := len(b.Spec.Attributes) - 1
	b.Spec.Allocations[ordinal] = &idx
	for i, u := range b.Spec.Unallocated {
		if u == ordinal {
			b.Spec.Unallocated = append(b.Spec.Unallocated[:i], b.Spec.Unallocated[i+1:]...)
			break
		}
	}
}

// NewBlockAffinity is a confirmed BlockAffinity of cidr to node ("<node>-<block name>"),
// labelled as Calico 3.32's IPAM labels the ones it writes. Its IPAM finds a host's
// affinities by these labels only: an affinity without them is never used for the host's
// pods (calico-ipam then claims a block of its own, observed with the real plugin).
func NewBlockAffinity(node, cidr string) *v3.BlockAffinity {
	a := v3.NewBlockAffinity()
	a.Name = node + "-" + BlockName(cidr)
	ver := "4"
	if netip.MustParsePrefix(cidr).Addr().Is6() {
		ver = "6"
	}
	a.Labels = map[string]string{
		"projectcalico.org/affinity-type": "host",
		"projectcalico.org/hostname-hash": HostnameHash(node),
		"projectcalico.org/ip-version":    ver,
	}
	a.Spec = v3.BlockAffinitySpec{State: v3.StateConfirmed, Node: node, Type: "host", CIDR: cidr}
	return a
}

// HostnameHash is the value of Calico's projectcalico.org/hostname-hash label for node:
// SHA3-256 of the name, base32 without padding (libcalico-go's block affinity model).
func HostnameHash(node string) string {
	h := sha3.Sum256([]byte(node))
	return base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(h[:])
}

// NewClusterInformation is the ClusterInformation "default" as calico-node leaves it on a
// running cluster: datastoreReady, which Calico's CNI plugin requires before any ADD.
func NewClusterInformation(calicoVersion string) *v3.ClusterInformation {
	c := v3.NewClusterInformation()
	c.Name = "default"
	ready := true
	c.Spec = v3.ClusterInformationSpec{DatastoreReady: &ready, CalicoVersion: calicoVersion, ClusterType: "k8s,bgp"}
	return c
}

// NewBGPPeer is a global BGPPeer to peerIP (e.g. a ToR switch outside the cluster).
func NewBGPPeer(name, peerIP string) *v3.BGPPeer {
	p := v3.NewBGPPeer()
	p.Name = name
	p.Spec = v3.BGPPeerSpec{PeerIP: peerIP, ASNumber: 64512}
	return p
}

// NewFelixConfiguration is an empty FelixConfiguration ("default", or "node.NAME").
func NewFelixConfiguration(name string) *v3.FelixConfiguration {
	f := v3.NewFelixConfiguration()
	f.Name = name
	return f
}
