package watch

import (
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/tools/cache"

	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// parsedObject is what the Calico informers cache instead of the object: its name and
// resourceVersion (all the informer machinery needs) and its parsed form. A real IPAMBlock
// of a /26 is a few KiB as an unstructured map (64 allocations, attributes with handles,
// pod names, timestamps); parsed it is its CIDR, affinity and the /32s used by other nodes.
// At 5,000 nodes with several blocks each that is the difference that matters.
type parsedObject struct {
	objectName
	// Value is a desired.Block, BlockAffinity, desired.Pool, bgpPeer or FelixConfig; Err
	// is set instead when the object did not parse.
	Value any
	Err   error
}

// bgpPeer is a parsed BGPPeer (ok: it has a peerIP).
type bgpPeer struct {
	peer desired.BGPPeer
	ok   bool
}

func (p *parsedObject) GetObjectKind() schema.ObjectKind { return schema.EmptyObjectKind }

// DeepCopyObject copies p; Value is shared (never modified).
func (p *parsedObject) DeepCopyObject() runtime.Object {
	c := *p
	return &c
}

// objectName is all the informer machinery reads of a cached object: its namespace and
// name (the store's key) and its resourceVersion, through meta.Accessor. It stands in for
// a metav1.ObjectMeta, which is ≈250 bytes even with only these fields set: with 20,000
// IPAMBlocks and 5,000 Nodes cached, ≈5 MiB of empty fields.
type objectName struct {
	Namespace, Name, ResourceVersion string
}

// GetObjectMeta makes objectName a metav1.ObjectMetaAccessor, which meta.Accessor accepts;
// the ObjectMeta is built on each call (key computations, a few per event).
func (o *objectName) GetObjectMeta() metav1.Object {
	return &metav1.ObjectMeta{Namespace: o.Namespace, Name: o.Name, ResourceVersion: o.ResourceVersion}
}

// calicoTransform parses the objects of resource kind as they enter the cache.
func calicoTransform(kind string) cache.TransformFunc {
	return func(obj any) (any, error) {
		u, ok := obj.(*unstructured.Unstructured)
		if !ok {
			return obj, nil // a DeletedFinalStateUnknown tombstone, or already parsed
		}
		p := &parsedObject{objectName: objectName{Namespace: u.GetNamespace(), Name: u.GetName(), ResourceVersion: u.GetResourceVersion()}}
		switch kind {
		case "ipamblocks":
			p.Value, p.Err = ParseIPAMBlock(u)
		case "blockaffinities":
			p.Value, p.Err = ParseBlockAffinity(u)
		case "ippools":
			p.Value, p.Err = ParseIPPool(u)
		case "bgppeers":
			var b bgpPeer
			b.peer, b.ok, p.Err = ParseBGPPeer(u)
			p.Value = b
		case "felixconfigurations":
			p.Value, p.Err = ParseFelixConfiguration(u)
		}
		return p, nil
	}
}

// calicoData is one read of a group's caches, parsed.
type calicoData struct {
	blocks  []desired.Block
	affs    []BlockAffinity
	pools   []desired.Pool // disabled ones included
	peers   []desired.BGPPeer
	felix   map[string]FelixConfig
	skipped []desired.Skip
}

// read collects the parsed objects of every cache of s.
func (s *calicoSet) read() calicoData {
	var d calicoData
	for kind, inf := range s.inf {
		for _, obj := range inf.GetStore().List() {
			p, ok := obj.(*parsedObject)
			if !ok {
				continue
			}
			if p.Err != nil {
				d.skipped = append(d.skipped, desired.Skip{Object: strings.TrimSuffix(kind, "s") + "/" + p.Name, Reason: p.Err.Error()})
				continue
			}
			switch v := p.Value.(type) {
			case desired.Block:
				d.blocks = append(d.blocks, v)
			case BlockAffinity:
				d.affs = append(d.affs, v)
			case desired.Pool:
				d.pools = append(d.pools, v)
			case bgpPeer:
				if v.ok {
					d.peers = append(d.peers, v.peer)
				}
			case FelixConfig:
				if d.felix == nil {
					d.felix = map[string]FelixConfig{}
				}
				d.felix[p.Name] = v
			}
		}
	}
	return d
}
