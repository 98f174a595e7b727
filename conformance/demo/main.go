// Command demo is `make demo`: it brings up the VM lab with the real system
// (conformance/e2e), enables encryption under traffic, runs pod-to-pod
// traffic across every node pair while capturing the underlay, rotates the
// keys once under traffic, prints a short report, and tears everything down.
// It exits 1 when any figure violates its requirement (plaintext IPIP on the
// wire, a packet lost during cutover or rotation, a pod MTU over the budget),
// 2 when the lab cannot run here (run `make tools build`).
//
//	go run ./conformance/demo [-keep DIR]
package main

import (
	"context"
	"flag"
	"fmt"
	"maps"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/budget"
	"github.com/secureoverlay/secureoverlay/conformance/e2e"
	"github.com/secureoverlay/secureoverlay/conformance/lab"
)

func main() {
	keep := flag.String("keep", "", "keep every log (API server, masters, agents, guest console) in this directory")
	flag.Parse()
	if r := e2e.Unavailable(); r != "" {
		fmt.Fprintf(os.Stderr, "demo: the lab cannot run here: %s\n", r)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, 12*time.Minute+e2e.DefaultGrace)
	defer cancel()
	ok, err := run(ctx, *keep)
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		os.Exit(1)
	}
	if !ok {
		os.Exit(1)
	}
}

var start = time.Now()

func step(format string, a ...any) {
	fmt.Printf("[%6.1fs] %s\n", time.Since(start).Seconds(), fmt.Sprintf(format, a...))
}

// check is one requirement of the report.
type check struct {
	what string
	ok   bool
}

func run(ctx context.Context, keep string) (ok bool, err error) {
	state := keep
	if state == "" {
		state, err = os.MkdirTemp("", "secureoverlay-demo-")
		if err != nil {
			return false, err
		}
	}
	step("bringing up the lab: API server + etcd on the host, 3 node namespaces in a QEMU VM, the real agents, master and CNI chain")
	l, err := e2e.Up(ctx, e2e.Config{Nodes: 3, StateDir: state, Progress: func(s string) { step("  %s", s) }})
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: logs kept in %s\n", state)
		return false, err
	}
	defer func() {
		step("tearing down (VM, master, API server) …")
		if cerr := l.Close(); cerr != nil && err == nil {
			err = cerr
		}
		if keep == "" && ok && err == nil {
			_ = os.RemoveAll(state)
		} else {
			fmt.Printf("logs: %s\n", state)
		}
		step("done")
	}()
	var pods []*e2e.Pod
	for _, p := range l.Pods() {
		pods = append(pods, p)
	}

	// 1. Enable under traffic.
	cutEv, err := l.StartLossEvidence(ctx, pods)
	if err != nil {
		return false, err
	}
	if err := cutEv.Mark(ctx, "streams starting"); err != nil {
		return false, err
	}
	step("starting a sequence-numbered ICMP stream on each of the %d ordered pod pairs (every 100 ms)", len(pods)*(len(pods)-1))
	streams, err := l.StartStreamsAll(ctx, pods, 100*time.Millisecond)
	if err != nil {
		return false, err
	}
	time.Sleep(2 * time.Second)
	step("enabling encryption: ConfigMap secureoverlay-config enabled=\"true\" (off → accept → encrypt → enforce) …")
	if err := cutEv.Mark(ctx, "enable requested"); err != nil {
		return false, err
	}
	if err := l.Enable(ctx); err != nil {
		return false, err
	}
	dCut, err := l.WaitMode(ctx, "enforce", 4*time.Minute)
	if err != nil {
		return false, err
	}
	step("every node reports enforce after %s", dCut.Round(100*time.Millisecond))
	if err := cutEv.Mark(ctx, "settled in enforce"); err != nil {
		return false, err
	}
	time.Sleep(time.Second)
	if err := cutEv.Mark(ctx, "stopping streams"); err != nil {
		return false, err
	}
	cutStats, cutSent, cutLost, err := e2e.StopStreams(ctx, streams)
	if err != nil {
		return false, err
	}
	cutRep, err := cutEv.Report(ctx, "cutover", cutStats)
	if err != nil {
		return false, err
	}
	step("cutover: %d echo requests, %d lost", cutSent, cutLost)

	// 2. Traffic under a capture and the kernel's wire counters.
	step("capturing the underlay bridge (and counting its packets in the kernel); pinging every pod from every pod …")
	wire, err := lab.StartWireCount(ctx, l.VM, lab.UnderlayNS, lab.UnderlayBridge)
	if err != nil {
		return false, err
	}
	capture, err := lab.StartCapture(ctx, l.VM, lab.UnderlayNS, lab.UnderlayBridge)
	if err != nil {
		return false, err
	}
	before, err := l.ESPCounts(ctx)
	if err != nil {
		return false, err
	}
	pingStats, pingSent, pingLost, err := l.PingAll(ctx, pods, 10)
	if err != nil {
		return false, err
	}
	mid, err := l.ESPCounts(ctx)
	if err != nil {
		return false, err
	}
	st, err := l.Status(ctx)
	if err != nil {
		return false, err
	}
	gen0 := st.ActiveGeneration

	// 3. Rotate under traffic (still capturing).
	step("rotating keys under traffic: annotation %s on secureoverlay-config …", api.RotateRequestAnnotation)
	rotEv, err := l.StartLossEvidence(ctx, pods)
	if err != nil {
		return false, err
	}
	if err := rotEv.Mark(ctx, "streams starting"); err != nil {
		return false, err
	}
	streams, err = l.StartStreamsAll(ctx, pods, 100*time.Millisecond)
	if err != nil {
		return false, err
	}
	time.Sleep(2 * time.Second)
	if err := rotEv.Mark(ctx, "rotation requested"); err != nil {
		return false, err
	}
	if _, err := l.RequestRotation(ctx); err != nil {
		return false, err
	}
	gen1, dRot, err := l.WaitRotation(ctx, gen0, 3*time.Minute)
	if err != nil {
		return false, err
	}
	if err := rotEv.Mark(ctx, "new generation active everywhere"); err != nil {
		return false, err
	}
	step("generation %d active on every node after %s; waiting for generation %d to be removed (grace %s) …", gen1, dRot.Round(100*time.Millisecond), gen0, l.Config().Grace)
	dRem, err := l.WaitGenerationRemoved(ctx, gen0, l.Config().Grace+3*time.Minute)
	if err != nil {
		return false, err
	}
	if err := rotEv.Mark(ctx, "old generation removed"); err != nil {
		return false, err
	}
	time.Sleep(time.Second)
	if err := rotEv.Mark(ctx, "stopping streams"); err != nil {
		return false, err
	}
	rotStats, rotSent, rotLost, err := e2e.StopStreams(ctx, streams)
	if err != nil {
		return false, err
	}
	rotRep, err := rotEv.Report(ctx, "rotation", rotStats)
	if err != nil {
		return false, err
	}
	step("rotation: %d echo requests, %d lost; generation %d removed %s after the switch", rotSent, rotLost, gen0, dRem.Round(100*time.Millisecond))
	mbbText, mbbViolations := rotRep.MakeBeforeBreak(l.RegisteredNodes(), gen0, gen1)

	// 4. MTU: a DF packet of exactly the budget crosses.
	ext := l.Config().UnderlayMTU
	bud, _ := budget.Budget(ext, 8)
	doc, _ := budget.Documented(ext)
	df, err := lab.Echo(ctx, l.VM, pods[0].Name, pods[1].IP, lab.EchoOptions{Count: 3, Interval: 200 * time.Millisecond, Size: bud - 28, DF: true})
	if err != nil {
		return false, err
	}
	dfOK := df.Answered() == 3

	dropped, err := capture.Stop(ctx)
	if err != nil {
		return false, err
	}
	perPort, err := wire.Read(ctx)
	if err != nil {
		return false, err
	}
	w := lab.Total(perPort)
	ipip, err := capture.Count(ctx, "ip proto 4")
	if err != nil {
		return false, err
	}
	esp, err := capture.Count(ctx, "ip proto 50")
	if err != nil {
		return false, err
	}
	after, err := l.ESPCounts(ctx)
	if err != nil {
		return false, err
	}
	reps, err := l.Reports(ctx)
	if err != nil {
		return false, err
	}
	st, err = l.Status(ctx)
	if err != nil {
		return false, err
	}

	// The report.
	var checks []check
	fmt.Println()
	fmt.Println("secureoverlay demo — report")
	fmt.Println(strings.Repeat("─", 72))
	fmt.Printf("nodes        %d:", len(reps))
	allEnforce := true
	minBudget := 0
	for _, i := range l.RegisteredNodes() {
		r := reps[e2e.NodeName(i)]
		mode := "no report"
		if r != nil {
			mode = string(r.Mode)
			if minBudget == 0 || r.BudgetMTU < minBudget {
				minBudget = r.BudgetMTU
			}
		}
		allEnforce = allEnforce && r != nil && r.Mode == api.ModeEnforce
		fmt.Printf("  %s %s (%s)", e2e.NodeName(i), lab.NodeIP(i), mode)
	}
	fmt.Println()
	fmt.Printf("pods         %d, through Calico %s's own CNI plugin (calico + calico-ipam, Kubernetes datastore) → secureoverlay → portmap\n", len(l.Pods()), l.CalicoVersion())
	fmt.Printf("mode         %s (master %s, target %s)\n", st.Mode, st.Leader, st.Target)
	checks = append(checks, check{"every node enforces", allEnforce && st.Mode == api.ModeEnforce})
	fmt.Printf("generation   %d (rotated once from %d; %d removed from ring, reports and kernels)\n", st.ActiveGeneration, gen0, gen0)
	checks = append(checks, check{"rotated exactly once", st.ActiveGeneration == gen0+1})
	fmt.Printf("ESP packets per pair (sender's outbound SA counters: generation %d during the ping round, generation %d since the rotation):\n", gen0, gen1)
	for _, p := range e2e.SortedPairs(mid) {
		fmt.Printf("  %-14s %6d %6d\n", p, mid[p]-before[p], after[p])
		checks = append(checks, check{"ESP on " + p.String(), mid[p] > before[p] && after[p] > 0})
	}
	fmt.Printf("plaintext IPIP seen on the underlay   %d   (kernel counters on every port; ESP packets: %d)\n", w.IPIP, w.ESP)
	if dropped == 0 {
		fmt.Printf("                                      the capture agrees: %d IPIP, %d ESP, 0 dropped\n", ipip, esp)
	} else {
		fmt.Printf("                                      the capture dropped %d packets (its %d IPIP, %d ESP are not evidence)\n", dropped, ipip, esp)
	}
	checks = append(checks, check{"no plaintext IPIP on the wire", w.IPIP == 0 && w.ESP > 0},
		check{"capture and kernel counters agree", dropped != 0 || uint64(ipip) == w.IPIP && uint64(esp) == w.ESP})
	fmt.Printf("packets lost during cutover           %d of %d (off → enforce in %s; %d answered only after the stream stopped sending)\n", cutLost, cutSent, dCut.Round(100*time.Millisecond), afterStop(cutStats))
	fmt.Printf("packets lost during rotation          %d of %d (%d → %d in %s; %d answered only after the stream stopped sending)\n", rotLost, rotSent, gen0, gen1, dRot.Round(100*time.Millisecond), afterStop(rotStats))
	fmt.Printf("packets lost in the ping round        %d of %d\n", pingLost, pingSent)
	fmt.Printf("drop counters (guest, nodes, pods)    cutover: %s; rotation: %s\n", grewSummary(cutRep), grewSummary(rotRep))
	fmt.Printf("make-before-break                     %s\n", mbbSummary(mbbViolations))
	checks = append(checks,
		check{"make-before-break: every sender switched before its peer removed the old SA", len(mbbViolations) == 0},
		check{"0 lost during cutover", cutLost == 0 && streamsAnswered(cutStats)},
		check{"0 lost during rotation", rotLost == 0 && streamsAnswered(rotStats)},
		check{"0 lost in the ping round", pingLost == 0 && streamsAnswered(pingStats)})
	podMTU := 0
	for _, p := range pods {
		podMTU = max(podMTU, p.MTU)
	}
	fmt.Printf("MTU budget   underlay %d, ICV 8 → budget %d (agents report %d; the documented rule's %d would overrun by %d)\n", ext, bud, minBudget, doc, doc-bud)
	fmt.Printf("             pods at %d; a DF packet of %d bytes crosses encrypted: %v\n", podMTU, bud, dfOK)
	checks = append(checks, check{"pod MTU within budget", podMTU <= bud && minBudget == bud}, check{"DF packet at the budget crosses", dfOK})
	fmt.Printf("timings      lab up %s (VM boot %s), cutover %s, rotation %s, total %s\n",
		l.UpDuration.Round(100*time.Millisecond), l.BootDuration.Round(100*time.Millisecond), dCut.Round(100*time.Millisecond), dRot.Round(100*time.Millisecond), time.Since(start).Round(time.Second))
	fmt.Println(strings.Repeat("─", 72))
	for _, r := range []struct {
		lost int
		rep  e2e.LossReport
	}{{cutLost, cutRep}, {rotLost, rotRep}} {
		if r.lost > 0 {
			fmt.Print(r.rep.Text)
		}
	}
	if len(mbbViolations) > 0 {
		fmt.Print(mbbText)
	}
	ok = true
	for _, c := range checks {
		if !c.ok {
			ok = false
			fmt.Printf("FAIL: %s\n", c.what)
		}
	}
	if ok {
		fmt.Printf("PASS: all %d requirements met\n", len(checks))
	}
	return ok, nil
}

// streamsAnswered is false when a stream got no answer at all.
func streamsAnswered(ss []e2e.StreamStats) bool {
	for _, s := range ss {
		if s.Received == 0 {
			return false
		}
	}
	return true
}

func afterStop(ss []e2e.StreamStats) int {
	n := 0
	for _, s := range ss {
		n += s.AfterStop
	}
	return n
}

// grewSummary is "none grew", or the number of drop counters that grew, the xfrm and local
// drop totals, and the first few counters by name (namespace/counter +delta).
func grewSummary(r e2e.LossReport) string {
	if len(r.Grew) == 0 {
		return "none grew"
	}
	var named []string
	for _, ns := range slices.Sorted(maps.Keys(r.Grew)) {
		for _, c := range slices.Sorted(maps.Keys(r.Grew[ns])) {
			named = append(named, fmt.Sprintf("%s/%s +%d", ns, c, r.Grew[ns][c]))
		}
	}
	n := len(named)
	if len(named) > 3 {
		named = append(named[:3], "…")
	}
	return fmt.Sprintf("%d grew (xfrm errors %d, local drops %d: %s)", n, r.XfrmErrors, r.LocalDrops, strings.Join(named, ", "))
}

func mbbSummary(v []string) string {
	if len(v) == 0 {
		return "held: every sender switched to the new generation before its peer removed the old one"
	}
	return fmt.Sprintf("BROKEN for %d pairs: %s", len(v), strings.Join(v, "; "))
}
