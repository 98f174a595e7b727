package desired_test

import (
	"fmt"
	"testing"

	"github.com/secureoverlay/secureoverlay/api"
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

// BenchmarkComputeJoin is the Memo.Update that absorbs one node joining, the joining node
// named (what the agent's event-driven sync costs in the pure core; Always pool, enforce),
// and, as scan, the same Update left to find the change by comparing every Node. Each
// iteration joins a node with a fresh key incarnation (timed) and removes it (untimed).
func BenchmarkComputeJoin(b *testing.B) {
	for _, hinted := range []bool{true, false} {
		for _, n := range []int{100, 1000, 5000} {
			name := fmt.Sprintf("hint=named/nodes=%d", n)
			if !hinted {
				name = fmt.Sprintf("hint=scan/nodes=%d", n)
			}
			b.Run(name, func(b *testing.B) {
				before := cluster.Inputs(cluster.Options{Nodes: n, Mode: api.ModeEnforce})
				before.NodesVersion = 0 // the joins' Inputs are versions 1, 2, ...
				joined := func(r int) desired.Hint { return desired.Hint{} }
				left := joined
				if hinted {
					joiner := []string{cluster.Name(n)}
					joined = func(int) desired.Hint { return desired.Hint{Known: true, Nodes: joiner, Since: 0} }
					left = func(r int) desired.Hint { return desired.Hint{Known: true, Nodes: joiner, Since: r} }
				}
				m := desired.NewMemo()
				if _, err := m.Update(before, desired.Hint{}); err != nil {
					b.Fatal(err)
				}
				b.ReportAllocs()
				r := 0
				for b.Loop() {
					b.StopTimer()
					r++
					in := cluster.Join(before, r)
					in.NodesVersion = r
					b.StartTimer()
					ch, err := m.Update(in, joined(r))
					if err != nil || ch.Full || len(ch.SAs) != 4 {
						b.Fatalf("join full=%v SAs=%d %v", ch.Full, len(ch.SAs), err)
					}
					b.StopTimer()
					if _, err := m.Update(before, left(r)); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
				}
			})
		}
	}
}
