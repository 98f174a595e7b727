package desired_test

import (
	"fmt"
	"testing"

	"github.com/secureoverlay/secureoverlay/bench/cluster"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// BenchmarkCompute is the whole desired state of one node in a cluster of N nodes (4
// blocks each, generations 1 active and 2 pending, enforce, every peer ready), for an
// Always pool (transport mode, one policy pair per peer) and a CrossSubnet pool (nodes in
// /24s of 250: tunnel-mode block policies toward same-subnet peers). It reports the SAs
// and policies of one result so the figure can be read per object.
func BenchmarkCompute(b *testing.B) {
	for _, mode := range []string{desired.IPIPAlways, desired.IPIPCrossSubnet} {
		for _, n := range []int{100, 1000, 5000} {
			b.Run(fmt.Sprintf("pool=%s/nodes=%d", mode, n), func(b *testing.B) {
				in := cluster.Inputs(cluster.Options{Nodes: n, IPIPMode: mode})
				st, err := desired.Compute(in)
				if err != nil {
					b.Fatal(err)
				}
				b.ReportAllocs()
				b.ResetTimer()
				for b.Loop() {
					if _, err := desired.Compute(in); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(len(st.SAs)), "SAs")
				b.ReportMetric(float64(len(st.Policies)), "policies")
			})
		}
	}
}
