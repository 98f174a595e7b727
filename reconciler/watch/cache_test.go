package watch

import (
	"fmt"
	"runtime"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// realBlock is an IPAMBlock of a /26 as Calico's IPAM leaves it on a busy node: 40 pods
// with handles and pod attributes, the tunnel address, sequence numbers.
func realBlock(i int) *unstructured.Unstructured {
	allocs := make([]any, 64)
	var unalloc, attrs []any
	for o := range 64 {
		if o <= 40 {
			allocs[o] = int64(o)
			attrs = append(attrs, map[string]any{"handle_id": fmt.Sprintf("k8s-pod-network.%064d", o),
				"secondary": map[string]any{"namespace": "default", "node": fmt.Sprintf("node-%d", i), "pod": fmt.Sprintf("web-7d9f8c6b5-%05d", o),
					"timestamp": "2026-06-24 10:00:00.123456789 +0000 UTC"}})
		} else {
			unalloc = append(unalloc, int64(o))
		}
	}
	return &unstructured.Unstructured{Object: map[string]any{"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock",
		"metadata": map[string]any{"name": fmt.Sprintf("10-%d-%d-0-26", i/256, i%256), "resourceVersion": "12345", "uid": "0b4f5f0e-3a7e-4c39-9a43-1c1e4c7b2f11",
			"creationTimestamp": "2026-06-24T10:00:00Z"},
		"spec": map[string]any{"cidr": fmt.Sprintf("10.%d.%d.0/26", i/256, i%256), "affinity": fmt.Sprintf("host:node-%d", i),
			"allocations": allocs, "unallocated": unalloc, "attributes": attrs, "strictAffinity": false, "deleted": false,
			"sequenceNumber": int64(41), "sequenceNumberForAllocation": map[string]any{"0": int64(1)}}}}
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
