package e2e

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/bench"
	"github.com/secureoverlay/secureoverlay/conformance/lab"
)

// TestBenchRotationCutover measures, in the VM lab with 3 and with 8 node namespaces,
// the packets lost and the wall time of one enable (off → enforce) and one rotation, both
// under sequence-numbered streams on every ordered pod pair (10/s each). It runs only with
// SECUREOVERLAY_BENCH=1 (hack/bench.sh); SECUREOVERLAY_BENCH_LAB_NODES (default "3,8")
// picks the sizes. Prints "BENCH name value unit" lines for bench/cmd/benchreport.
func TestBenchRotationCutover(t *testing.T) {
	bench.Gate(t, false)
	if r := Unavailable(); r != "" {
		t.Skip(r)
	}
	sizes := os.Getenv("SECUREOVERLAY_BENCH_LAB_NODES")
	if sizes == "" {
		sizes = "3,8"
	}
	for _, s := range strings.Split(sizes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 2 {
			t.Fatalf("SECUREOVERLAY_BENCH_LAB_NODES: bad size %q", s)
		}
		t.Run(fmt.Sprintf("nodes=%d", n), func(t *testing.T) { benchRotationCutover(t, n) })
	}
}

func benchRotationCutover(t *testing.T, nodes int) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	t0 := time.Now()
	l, err := Up(ctx, Config{Nodes: nodes, Progress: func(s string) { fmt.Fprintf(os.Stderr, "bench lab: %s\n", s) }})
	if err != nil {
		t.Fatalf("lab with %d nodes: %v", nodes, err)
	}
	defer func() { _ = l.Close() }()
	defer diagnose(t, l)
	up := time.Since(t0)
	p := fmt.Sprintf("lab.%d.", nodes)
	rep := func(name string, v float64, unit string) { fmt.Printf("BENCH %s%s %g %s\n", p, name, v, unit) }
	rep("up", up.Seconds(), "s")

	ensureMode(ctx, t, l, api.ModeOff)
	pods := standardPods(l)
	const interval = 100 * time.Millisecond

	// Enable under traffic.
	ev := startEvidence(ctx, t, l, pods, "streams starting")
	streams, err := l.StartStreamsAll(ctx, pods, interval)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	mark(ctx, t, ev, "enable requested")
	if err := l.Enable(ctx); err != nil {
		t.Fatal(err)
	}
	dOn, err := l.WaitMode(ctx, string(api.ModeEnforce), 8*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	mark(ctx, t, ev, "settled in enforce")
	time.Sleep(2 * time.Second)
	mark(ctx, t, ev, "stopping streams")
	stats, sent, lost, err := StopStreams(ctx, streams)
	if err != nil {
		t.Fatal(err)
	}
	lr := lossOK(ctx, t, ev, "enable", stats, sent, lost)
	rep("enable.streams", float64(len(stats)), "count")
	rep("enable.sent", float64(sent), "count")
	rep("enable.lost", float64(lost), "count")
	rep("enable.xfrm_errors", float64(lr.XfrmErrors), "count")
	rep("enable.local_drops", float64(lr.LocalDrops), "count")
	rep("enable.wall", dOn.Seconds(), "s")

	// Rotation under traffic.
	st, err := l.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	prev := st.ActiveGeneration
	ev = startEvidence(ctx, t, l, pods, "streams starting")
	streams, err = l.StartStreamsAll(ctx, pods, interval)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	mark(ctx, t, ev, "rotation requested")
	_, took, removed := rotate(ctx, t, l, ev, prev, 8*time.Minute, 8*time.Minute)
	time.Sleep(time.Second)
	mark(ctx, t, ev, "stopping streams")
	stats, sent, lost, err = StopStreams(ctx, streams)
	if err != nil {
		t.Fatal(err)
	}
	lr = lossOK(ctx, t, ev, "rotation", stats, sent, lost)
	if w := lab.Total(lr.Wire); w.IPIP != 0 {
		t.Errorf("rotation: %d plaintext IPIP on the underlay, want 0", w.IPIP)
	}
	makeBeforeBreakOK(t, l, lr, prev, prev+1)
	rep("rotation.sent", float64(sent), "count")
	rep("rotation.lost", float64(lost), "count")
	rep("rotation.xfrm_errors", float64(lr.XfrmErrors), "count")
	rep("rotation.local_drops", float64(lr.LocalDrops), "count")
	rep("rotation.active", took.Seconds(), "s")
	rep("rotation.removed", removed.Seconds(), "s")
	rep("grace", l.Config().Grace.Seconds(), "s")
}
