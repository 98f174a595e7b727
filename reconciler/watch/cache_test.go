package watch

import (
	"fmt"
	"runtime"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/tools/cache"

	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// realBlock is an IPAMBlock of a /26 as Calico's IPAM leaves it on a busy node: 40 pods
// with handles and pod attributes, the tunnel address, sequence numbers; built from
// Calico's own types as the v1 CRD stores it.
func realBlock(i int) *unstructured.Unstructured {
	node := fmt.Sprintf("node-%d", i)
	b := kube.NewIPAMBlock(fmt.Sprintf("10.%d.%d.0/26", i/256, i%256), "host:"+node)
	for o := range 41 {
		kube.Allocate(b, o, fmt.Sprintf("k8s-pod-network.%064d", o), node, map[string]string{"namespace": "default",
			"pod": fmt.Sprintf("web-7d9f8c6b5-%05d", o), "timestamp": "2026-06-24 10:00:00.123456789 +0000 UTC"})
	}
	b.ResourceVersion, b.UID = "12345", "0b4f5f0e-3a7e-4c39-9a43-1c1e4c7b2f11"
	b.CreationTimestamp = metav1.NewTime(time.Date(2026, 6, 24, 10, 0, 0, 0, time.UTC))
	b.Spec.SequenceNumber, b.Spec.SequenceNumberForAllocation = 41, map[string]uint64{"0": 1}
	return calico(CalicoV1, b)
}

// TestCalicoCacheHoldsParsedObjects: what the IPAMBlock cache keeps is the parsed block
// (CIDR, affinity, other nodes' /32s), not Calico's object; for 2,000 busy /26 blocks the
// retained heap is measured both ways and the parsed form must be under a tenth.
func TestCalicoCacheHoldsParsedObjects(t *testing.T) {
	tr := calicoTransform("ipamblocks")
	out, err := tr(realBlock(1))
	if err != nil {
		t.Fatal(err)
	}
	p, ok := out.(*parsedObject)
	if !ok || p.Err != nil || p.Name != "10-0-1-0-26" || p.ResourceVersion != "12345" {
		t.Fatalf("transform gave %#v", out)
	}
	// What the informer machinery reads of a cached object (meta.Accessor): key and version.
	if key, err := cache.MetaNamespaceKeyFunc(p); err != nil || key != "10-0-1-0-26" {
		t.Errorf("store key %q, %v", key, err)
	}
	if m, err := meta.Accessor(p.DeepCopyObject()); err != nil || m.GetResourceVersion() != "12345" || m.GetName() != "10-0-1-0-26" {
		t.Errorf("meta.Accessor: %v, %v", m, err)
	}
	if b, ok := p.Value.(desired.Block); !ok || b.CIDR.String() != "10.0.1.0/26" || b.Affinity != "host:node-1" || len(b.Borrowed) != 0 {
		t.Fatalf("parsed block %#v", p.Value)
	}
	retained := func(parse bool) uint64 {
		const n = 2000
		keep := make([]any, n)
		var m0, m1 runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&m0)
		for i := range n {
			u := realBlock(i)
			if parse {
				keep[i], _ = tr(u)
			} else {
				keep[i] = u
			}
		}
		runtime.GC()
		runtime.ReadMemStats(&m1)
		runtime.KeepAlive(keep)
		return (m1.HeapAlloc - m0.HeapAlloc) / n
	}
	whole, parsed := retained(false), retained(true)
	t.Logf("per busy /26 IPAMBlock in the cache: %d bytes as an unstructured object, %d bytes parsed", whole, parsed)
	if parsed*10 > whole {
		t.Errorf("parsed blocks retain %d bytes each, unstructured %d: want under a tenth", parsed, whole)
	}
}
