package e2e

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/bench"
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
	ev := newDropEvidence(ctx, t, l, pods)
	streams, err := l.StartStreamsAll(ctx, pods, interval)
	if err != nil {
		t.Fatal(err)
	}
	ev.mark(ctx, "streams started")
	time.Sleep(2 * time.Second)
	ev.mark(ctx, "enable requested")
	if err := l.Enable(ctx); err != nil {
		t.Fatal(err)
	}
	dOn, err := l.WaitMode(ctx, string(api.ModeEnforce), 8*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	ev.mark(ctx, "settled in enforce")
	time.Sleep(2 * time.Second)
	ev.sockets(ctx) // ping's sockets, before the pings exit
	ev.mark(ctx, "stopping streams")
	stats, sent, lost, unanswered, err := StopStreams(ctx, streams)
	if err != nil {
		t.Fatal(err)
	}
	ev.mark(ctx, "streams stopped")
	streamsOK(t, "enable", stats, sent, lost, unanswered)
	xerr, ldrops := ev.report(ctx, "enable", stats)
	rep("enable.streams", float64(len(stats)), "count")
	rep("enable.sent", float64(sent), "count")
	rep("enable.lost", float64(lost), "count")
	rep("enable.xfrm_errors", float64(xerr), "count")
	rep("enable.local_drops", float64(ldrops), "count")
	rep("enable.wall", dOn.Seconds(), "s")

	// Rotation under traffic.
	st, err := l.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	prev := st.ActiveGeneration
	ev = newDropEvidence(ctx, t, l, pods)
	streams, err = l.StartStreamsAll(ctx, pods, interval)
	if err != nil {
		t.Fatal(err)
	}
	ev.mark(ctx, "streams started")
	time.Sleep(2 * time.Second)
	ev.mark(ctx, "rotation requested")
	if _, err := l.RequestRotation(ctx); err != nil {
		t.Fatal(err)
	}
	_, took, err := l.WaitRotation(ctx, prev, 8*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	ev.mark(ctx, "new generation active everywhere")
	removed, err := l.WaitGenerationRemoved(ctx, prev, 8*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	ev.mark(ctx, "old generation removed")
	time.Sleep(time.Second)
	ev.sockets(ctx)
	ev.mark(ctx, "stopping streams")
	stats, sent, lost, unanswered, err = StopStreams(ctx, streams)
	if err != nil {
		t.Fatal(err)
	}
	ev.mark(ctx, "streams stopped")
	streamsOK(t, "rotation", stats, sent, lost, unanswered)
	xerr, ldrops = ev.report(ctx, "rotation", stats)
	rep("rotation.sent", float64(sent), "count")
	rep("rotation.lost", float64(lost), "count")
	rep("rotation.xfrm_errors", float64(xerr), "count")
	rep("rotation.local_drops", float64(ldrops), "count")
	rep("rotation.active", took.Seconds(), "s")
	rep("rotation.removed", removed.Seconds(), "s")
	rep("grace", l.Config().Grace.Seconds(), "s")
}

// dropEvidence tells a lost request's cause apart: the kernel's drop counters (xfrm_stat,
// IP/ICMP discards and errors) of every node and pod namespace over the streams' life, the
// drops of ping's own sockets, and a guest-clock timeline of the run to set each lost
// request's time (from ping -D) against.
type dropEvidence struct {
	t        *testing.T
	l        *Lab
	spaces   []string
	before   map[string]map[string]uint64
	sockDrop map[string]uint64 // socket drops per pod namespace, read while ping runs
	marks    []timeMark
}

type timeMark struct {
	what string
	at   float64 // guest Unix seconds
}

func newDropEvidence(ctx context.Context, t *testing.T, l *Lab, pods []*Pod) *dropEvidence {
	e := &dropEvidence{t: t, l: l, spaces: []string{""}} // "": the guest's own namespace
	for _, i := range l.RegisteredNodes() {
		e.spaces = append(e.spaces, NodeName(i))
	}
	for _, p := range pods {
		e.spaces = append(e.spaces, p.Name)
	}
	e.before = e.read(ctx)
	return e
}

func (e *dropEvidence) read(ctx context.Context) map[string]map[string]uint64 {
	m := map[string]map[string]uint64{}
	for _, ns := range e.spaces {
		c, err := e.l.NetCounters(ctx, ns)
		if err != nil {
			e.t.Logf("drop evidence: read %s: %v", ns, err)
			continue
		}
		m[ns] = c
	}
	return m
}

func (e *dropEvidence) mark(ctx context.Context, what string) {
	at, err := e.l.GuestTime(ctx)
	if err != nil {
		e.t.Logf("drop evidence: guest clock: %v", err)
		return
	}
	e.marks = append(e.marks, timeMark{what, at})
}

func (e *dropEvidence) sockets(ctx context.Context) {
	e.sockDrop = map[string]uint64{}
	for ns, c := range e.read(ctx) {
		if d := c["Sock.raw.drops"] + c["Sock.icmp.drops"]; d > 0 {
			e.sockDrop[ns] = d
		}
	}
}

// report logs the timeline, every lost request placed on it, and every drop counter that
// grew; it returns the sum of the xfrm_stat counters that grew (errors only: every
// xfrm_stat counter counts a failure).
// localDrops sums what the guest dropped outside IPsec: IP output discards (a full
// backlog behind a veth) and the per-CPU input backlog drops.
func (e *dropEvidence) report(ctx context.Context, what string, stats []StreamStats) (xfrmErrors, localDrops uint64) {
	after := e.read(ctx)
	var b strings.Builder
	t0 := 0.0
	if len(e.marks) > 0 {
		t0 = e.marks[0].at
	}
	phase := func(at float64) string {
		p := "before the streams started"
		for _, m := range e.marks {
			if at >= m.at {
				p = "after " + m.what
			}
		}
		return p
	}
	fmt.Fprintf(&b, "%s timeline (guest clock, from the streams' start):", what)
	for _, m := range e.marks {
		fmt.Fprintf(&b, " %s +%.2fs;", m.what, m.at-t0)
	}
	b.WriteString("\n")
	for _, s := range stats {
		for i, q := range s.LostSeqs {
			br := s.LostBetween[i]
			fmt.Fprintf(&b, "  lost %s seq %d: between replies at +%.2fs and +%.2fs (%s … %s)\n",
				s.Pair, q, br[0]-t0, br[1]-t0, phase(br[0]), phase(br[1]))
		}
	}
	grew := false
	for _, ns := range e.spaces {
		d := CounterDelta(e.before[ns], after[ns])
		if e.sockDrop[ns] > 0 {
			d["Sock.drops (open while streaming)"] = e.sockDrop[ns]
		}
		if len(d) == 0 {
			continue
		}
		grew = true
		keys := make([]string, 0, len(d))
		for k := range d {
			keys = append(keys, k)
			switch {
			case strings.HasPrefix(k, "Xfrm."):
				xfrmErrors += d[k]
			case k == "Ip.OutDiscards" || k == "Softnet.dropped":
				localDrops += d[k]
			}
		}
		sort.Strings(keys)
		label := ns
		if label == "" {
			label = "guest"
		}
		fmt.Fprintf(&b, "  %s:", label)
		for _, k := range keys {
			fmt.Fprintf(&b, " %s +%d", k, d[k])
		}
		b.WriteString("\n")
	}
	if !grew {
		b.WriteString("  no drop, discard, error or xfrm_stat counter grew in any node or pod namespace\n")
	}
	e.t.Log(b.String())
	return xfrmErrors, localDrops
}
