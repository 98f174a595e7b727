//go:build linux

package agent_test

import (
	"context"
	"encoding/json"
	"fmt"
	"runtime"
	"slices"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/bench"
	"github.com/secureoverlay/secureoverlay/bench/cluster"
	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/reconciler/agent"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
	"github.com/secureoverlay/secureoverlay/reconciler/xfrm"
)

// steadyReport is node i's report in the steady state, as BuildReport fills it in
// enforce mode: the ring's generation (benchRing's 1), and every other node in both
// InboundFrom and EncryptingTo with the tag of that node's key incarnation (boot ID
// "boot-NAME" as createNode sets it, its Node's UID, epoch "e-NAME" as publishReport
// sets it), so every claim is current for the agent reading it. tags[j] is node j's tag.
func steadyReport(i int, uids, tags []string) ([]byte, error) {
	name := cluster.Name(i)
	r := watch.Report{NodeReport: api.NodeReport{Mode: api.ModeEnforce, Generations: []uint32{1},
		Incarnation: "boot-" + name, UID: uids[i], Epoch: "e-" + name,
		BudgetMTU: 1422, ExternalMTU: 1500, MaxSeqFraction: 0.01, SeqGeneration: 1,
		PeersEncrypted: len(uids) - 1, PeersExpected: len(uids) - 1, LastSync: time.Now().UTC().Truncate(time.Second)},
		InboundFrom: make(map[string]string, len(uids)-1), EncryptingTo: make(map[string]string, len(uids)-1)}
	for j := range uids {
		if j != i {
			r.InboundFrom[cluster.Name(j)], r.EncryptingTo[cluster.Name(j)] = tags[j], tags[j]
		}
	}
	return json.Marshal(r)
}

// reportMemory is one size's figures: the binary's (MiB) and the in-process agent's
// growth (MiB: lowest and highest heap after a forced GC, RSS).
type reportMemory struct {
	bin                          binaryFigures
	inprocHeap, inprocMax, inRSS float64
}

// TestBenchReportMemory: the agent's memory with steady-state reports against the same
// cluster with empty ones, at 1,000 and 2,000 nodes (4 IPAMBlocks each, as in
// TestBenchAgentMemory). Each size gets its own API server: the Nodes are created with an
// empty accept-mode report each (publishReport, what TestBenchAgentMemory writes), the
// agent is measured (the binary, binaryMemoryAs, then in this process), then every peer's
// report (all but node 0's own) is replaced by a steady-state one listing every other
// node twice (steadyReport: ≈48 KB at 1,000 nodes, ≈96 KB at 2,000) and the same two
// measurements are repeated. The ring stays in accept mode in both, so the agent's
// desired state (inbound SAs and policies for every peer) is the same and only the
// informer's Node cache differs: with full reports it holds nodes-1 reports of
// 2 × (nodes-1) claims each. The report part is full - empty; with a quadratic term it
// grows ≈4× from 1,000 to 2,000 nodes, the rest ≈2×. docs/performance.md §6.
func TestBenchReportMemory(t *testing.T) {
	bench.Gate(t, true)
	bin := buildAgent(t)
	sizes := []int{1000, 2000}
	got := map[int][2]reportMemory{} // size → [empty, full]
	for _, nodes := range sizes {
		t.Run(fmt.Sprintf("nodes=%d", nodes), func(t *testing.T) {
			got[nodes] = reportMemoryAt(t, bin, nodes)
		})
		if t.Failed() {
			return
		}
	}
	p := func(n int) string { return fmt.Sprintf("memory.reports.%d.", n) }
	for _, n := range sizes {
		e, f := got[n][0], got[n][1]
		bench.Report(p(n)+"ratio_rss", f.bin.RSS/e.bin.RSS, "x")
		bench.Report(p(n)+"ratio_heap_inuse", f.bin.HeapInuse/e.bin.HeapInuse, "x")
		bench.Report(p(n)+"ratio_next_gc", f.bin.NextGC/e.bin.NextGC, "x")
		bench.Report(p(n)+"ratio_inproc_heap", f.inprocHeap/e.inprocHeap, "x")
		bench.Report(p(n)+"report_rss", f.bin.RSS-e.bin.RSS, "MiB")
		bench.Report(p(n)+"report_heap_inuse", f.bin.HeapInuse-e.bin.HeapInuse, "MiB")
		bench.Report(p(n)+"report_next_gc", f.bin.NextGC-e.bin.NextGC, "MiB")
		bench.Report(p(n)+"report_inproc_heap", f.inprocHeap-e.inprocHeap, "MiB")
		bench.Report(p(n)+"report_inproc_heap_max", f.inprocMax-e.inprocMax, "MiB")
		bench.Report(p(n)+"report_rss_peak", f.bin.RSSPeak-e.bin.RSSPeak, "MiB")
	}
	a, b := sizes[0], sizes[1]
	growth := func(what string, x func(m [2]reportMemory) float64) {
		if v := x(got[a]); v > 0 {
			bench.Report(fmt.Sprintf("memory.reports.growth_%d_%d.%s", a, b, what), x(got[b])/v, "x")
		}
	}
	growth("report_rss", func(m [2]reportMemory) float64 { return m[1].bin.RSS - m[0].bin.RSS })
	growth("report_heap_inuse", func(m [2]reportMemory) float64 { return m[1].bin.HeapInuse - m[0].bin.HeapInuse })
	growth("report_next_gc", func(m [2]reportMemory) float64 { return m[1].bin.NextGC - m[0].bin.NextGC })
	growth("report_inproc_heap", func(m [2]reportMemory) float64 { return m[1].inprocHeap - m[0].inprocHeap })
	growth("report_inproc_heap_max", func(m [2]reportMemory) float64 { return m[1].inprocMax - m[0].inprocMax })
	growth("report_rss_peak", func(m [2]reportMemory) float64 { return m[1].bin.RSSPeak - m[0].bin.RSSPeak })
	growth("rss_empty", func(m [2]reportMemory) float64 { return m[0].bin.RSS })
	growth("rss_full", func(m [2]reportMemory) float64 { return m[1].bin.RSS })
	growth("inproc_heap_empty", func(m [2]reportMemory) float64 { return m[0].inprocHeap })
	growth("inproc_heap_full", func(m [2]reportMemory) float64 { return m[1].inprocHeap })
}

// reportMemoryAt measures one size: [empty reports, steady-state reports].
func reportMemoryAt(t *testing.T, bin string, nodes int) [2]reportMemory {
	p := fmt.Sprintf("memory.reports.%d.", nodes)
	names := make([]string, nodes)
	for i := range names {
		names[i] = cluster.Name(i)
	}
	c, cfg := benchCluster(t, names) // QPS 5,000, burst 10,000
	ctx := context.Background()
	cs := kubernetes.NewForConfigOrDie(cfg)
	dyn := dynamic.NewForConfigOrDie(cfg)
	uids := make([]string, nodes)
	t0 := time.Now()
	if err := kube.Parallel(nodes, 16, func(i int) error {
		uid, err := createNode(ctx, cs, i)
		if err != nil {
			return err
		}
		uids[i] = uid
		return publishReport(ctx, cs, i, uid)
	}); err != nil {
		t.Fatal(err)
	}
	if err := kube.Parallel(nodes*cluster.BlocksPerNode, 16, func(b int) error {
		return createBlock(ctx, dyn, b/cluster.BlocksPerNode, b%cluster.BlocksPerNode)
	}); err != nil {
		t.Fatal(err)
	}
	t.Logf("created %d Nodes (empty reports) and %d IPAMBlocks in %s", nodes, nodes*cluster.BlocksPerNode, time.Since(t0).Round(time.Second))
	bench.Report(p+"nodes", float64(nodes), "count")
	bench.Report(p+"blocks", float64(nodes*cluster.BlocksPerNode), "count")

	var out [2]reportMemory
	// Every agent starts from node 0's own empty report (an earlier agent's report
	// claiming SAs its fresh kernel lacks would make it choose a new SA epoch, "lost").
	resetSelf := func() {
		if err := publishReport(ctx, cs, 0, uids[0]); err != nil {
			t.Fatal(err)
		}
	}
	measure := func(kind string) reportMemory {
		var m reportMemory
		resetSelf()
		t.Run(kind+"/binary", func(t *testing.T) { m.bin = binaryMemoryAs(t, bin, c, nodes, p+kind) })
		if t.Failed() {
			t.FailNow()
		}
		resetSelf()
		m.inprocHeap, m.inprocMax, m.inRSS = inProcessMemory(t, cfg, nodes)
		bench.Report(p+kind+".inproc_heap", m.inprocHeap, "MiB")
		bench.Report(p+kind+".inproc_heap_max", m.inprocMax, "MiB")
		bench.Report(p+kind+".inproc_rss", m.inRSS, "MiB")
		return m
	}
	out[0] = measure("empty")

	tags := make([]string, nodes)
	for i := range tags {
		tags[i] = watch.IncarnationTag(watch.KeyIncarnation("boot-"+cluster.Name(i), uids[i], "e-"+cluster.Name(i)))
	}
	var repBytes int
	if v, err := steadyReport(0, uids, tags); err == nil {
		repBytes = len(api.ReportAnnotation) + len(v)
	}
	t0 = time.Now()
	// Node 0's own report stays empty (resetSelf): with a new SA epoch the agent would
	// wait for the other (static) reports to catch up, which they never do.
	if err := kube.Parallel(nodes-1, 16, func(k int) error {
		i := k + 1
		rep, err := steadyReport(i, uids, tags)
		if err != nil {
			return err
		}
		patch, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]string{api.ReportAnnotation: string(rep)}}})
		if err != nil {
			return err
		}
		_, err = cs.CoreV1().Nodes().Patch(ctx, cluster.Name(i), types.MergePatchType, patch, metav1.PatchOptions{})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	populate := time.Since(t0)
	t.Logf("wrote %d steady-state reports of %d bytes in %s", nodes-1, repBytes, populate.Round(time.Millisecond))
	bench.Report(p+"report_bytes", float64(repBytes), "count")
	bench.Report(p+"populate_full", float64(populate.Milliseconds())/1000, "s")
	// The agent must read them as current: node 1's Node carries a report naming node 0
	// with node 0's tag.
	n1, err := cs.CoreV1().Nodes().Get(ctx, cluster.Name(1), metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if ni := watch.ParseNode(n1); ni.CurrentReport() == nil || ni.Report.InboundFrom[cluster.Name(0)] != tags[0] || len(ni.Report.EncryptingTo) != nodes-1 {
		t.Fatalf("node 1's report is not current or does not name node 0 (%s)", ni.ReportErr)
	}
	out[1] = measure("full")
	if out[0].bin.Policies != out[1].bin.Policies {
		t.Errorf("the binary's policies differ: %d with empty reports, %d with full ones", out[0].bin.Policies, out[1].bin.Policies)
	}
	return out
}

// inProcessMemory runs the agent in this process (xfrm in the fake) until its first full
// sync, then reads the heap after a forced GC 5 times, 1 s apart, and returns the agent's
// share of it (growth from before the agent started; MiB): the lowest sample (what the
// agent keeps between syncs: its caches) and the highest (a sync in flight holds its
// snapshot too), and its RSS growth at the end; then stops it.
func inProcessMemory(t *testing.T, cfg *rest.Config, nodes int) (heapMin, heapMax, rss float64) {
	runtime.GC()
	time.Sleep(time.Second)
	_, alloc0 := heapMiB()
	rss0 := rssKiB(t)
	fk := xfrm.NewFake()
	a, stop := startAgent(t, cfg, fk, agent.DefaultAPIQPS, agent.DefaultAPIBurst)
	defer stop()
	for deadline := time.Now().Add(5 * time.Minute); ; time.Sleep(100 * time.Millisecond) {
		_, ps := fk.Snapshot()
		if a.Status().Ready && len(ps) == nodes-1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent not synced: %+v, %d policies", a.Status(), len(ps))
		}
	}
	var heap []float64
	for range 5 {
		time.Sleep(time.Second)
		_, alloc := heapMiB()
		heap = append(heap, alloc-alloc0)
	}
	t.Logf("in-process agent: heap after GC %.0f MiB (samples, growth), %d syncs", heap, a.Status().Syncs)
	return slices.Min(heap), slices.Max(heap), (rssKiB(t) - rss0) / 1024
}
