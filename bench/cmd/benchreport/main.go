// Command benchreport runs the secureoverlay benchmarks and writes bench/RESULTS.md: the
// Go benchmarks of desired-state computation, and the gated measurements (xfrm
// programming, join writes, CNI ADD, event-to-kernel latency, agent memory,
// secureoverlayctl status at scale, and with -lab rotation and cutover in the VM) that
// print "BENCH name value unit" lines when SECUREOVERLAY_BENCH=1. Every figure in the
// table is a ratio against a baseline measured in the same run or a count that does not
// depend on machine speed; absolute times are shown for context. Run it from the
// repository root (hack/bench.sh does).
package main

import (
	"bufio"
	"bytes"
	"flag"
	"fmt"
	"io"
	"log"
	"math"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"
)

type value struct {
	v    float64
	unit string
}

var (
	out     = flag.String("out", "bench/RESULTS.md", "where to write the table")
	withLab = flag.Bool("lab", false, "also run rotation and cutover in the VM lab (minutes)")
	labSize = flag.String("lab-nodes", "3,8", "node namespaces for the lab runs")
	count   = flag.Int("count", 5, "runs of each Go benchmark (the median is reported)")
	from    = flag.String("from", "", "comma-separated logs of earlier runs whose BENCH lines are merged in (e.g. a separate lab run)")
	only    = flag.String("only", "", "comma-separated sections to run (compute,xfrm,keys,cni,agent,ctl,lab,dataplane,readiness); empty: all")
	noRun   = flag.Bool("norun", false, "run nothing: render the sections (-only) from the -from logs alone (e.g. after a change to how a section is written)")
	update  = flag.Bool("update", false, "replace only the sections that ran in the existing -out file, keep the others and its header (e.g. -only dataplane -update)")
	ctlSize = flag.String("ctl-nodes", "1000,5000", "cluster sizes for secureoverlayctl status")
	results = map[string]value{}
	texts   = map[string]string{}               // "BENCHTEXT name text" lines
	bench   = map[string][]map[string]float64{} // Benchmark name → runs → unit → value
	cmds    []string
	failed  = map[int]string{} // index in cmds → why the command failed
)

func want(s string) bool {
	return *only == "" || slices.Contains(strings.Split(*only, ","), s)
}

// runs says whether section s's benchmarks run now (-norun: none, the figures come from
// -from logs).
func runs(s string) bool { return !*noRun && want(s) }

func run(env []string, args ...string) string {
	cmd := exec.Command("go", args...)
	cmd.Env = append(os.Environ(), env...)
	var buf bytes.Buffer
	cmd.Stdout = io.MultiWriter(&buf, os.Stderr)
	cmd.Stderr = os.Stderr
	line := strings.TrimSpace(strings.Join(env, " ") + " go " + strings.Join(args, " "))
	cmds = append(cmds, line)
	log.Printf("running %s", line)
	if err := cmd.Run(); err != nil {
		log.Printf("%s: %v (figures it printed are kept; the rest show as missing)", line, err)
		failed[len(cmds)-1] = err.Error()
	}
	return buf.String()
}

var benchLine = regexp.MustCompile(`^(Benchmark\S+?)(?:-\d+)?\s+\d+\s+(.*)$`)

func parse(s string) {
	sc := bufio.NewScanner(strings.NewReader(s))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		if f := strings.Fields(l); len(f) >= 3 && f[0] == "BENCHTEXT" {
			texts[f[1]] = strings.Join(f[2:], " ")
			continue
		}
		if f := strings.Fields(l); len(f) == 4 && f[0] == "BENCH" {
			if v, err := strconv.ParseFloat(f[2], 64); err == nil {
				results[f[1]] = value{v, f[3]}
			}
			continue
		}
		if m := benchLine.FindStringSubmatch(l); m != nil {
			f := strings.Fields(m[2])
			r := map[string]float64{}
			for i := 0; i+1 < len(f); i += 2 {
				if v, err := strconv.ParseFloat(f[i], 64); err == nil {
					r[f[i+1]] = v
				}
			}
			bench[m[1]] = append(bench[m[1]], r)
		}
	}
}

func med(name, unit string) (float64, bool) {
	var vs []float64
	for _, r := range bench[name] {
		if v, ok := r[unit]; ok {
			vs = append(vs, v)
		}
	}
	if len(vs) == 0 {
		return 0, false
	}
	slices.Sort(vs)
	return vs[len(vs)/2], true
}

func get(name string) string {
	v, ok := results[name]
	if !ok {
		return "—"
	}
	return num(v.v) + unitSuffix(v.unit)
}

func unitSuffix(u string) string {
	switch u {
	case "count":
		return ""
	case "x":
		return "×"
	}
	return " " + u
}

func num(v float64) string {
	switch {
	case v == float64(int64(v)) && v < 1e9:
		return strconv.FormatInt(int64(v), 10)
	case v >= 100:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case v >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	case v > 0 && v < 0.01:
		return strconv.FormatFloat(v, 'f', int(math.Ceil(-math.Log10(v)))+1, 64) // two significant digits
	}
	return strconv.FormatFloat(v, 'f', 2, 64)
}

func ratio(a, b string) string {
	x, ok1 := results[a]
	y, ok2 := results[b]
	if !ok1 || !ok2 || y.v == 0 {
		return "—"
	}
	return num(x.v/y.v) + "×"
}

func machine() string {
	cpu := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "model name") {
				cpu = strings.TrimSpace(strings.SplitN(l, ":", 2)[1])
				break
			}
		}
	}
	kernel, _ := exec.Command("uname", "-r").Output()
	gov, _ := exec.Command("go", "version").Output()
	return fmt.Sprintf("%s, %d CPUs (shared with other work), Linux %s, %s", cpu, runtime.NumCPU(),
		strings.TrimSpace(string(kernel)), strings.TrimSpace(string(gov)))
}

func main() {
	log.SetFlags(0)
	flag.Parse()
	started := time.Now().UTC()
	benchEnv := []string{"SECUREOVERLAY_BENCH=1"}
	for _, f := range strings.Split(*from, ",") {
		if f == "" {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			log.Fatal(err)
		}
		parse(string(b))
		cmds = append(cmds, "(merged from an earlier run's log "+f+")")
	}
	if runs("compute") {
		parse(run(nil, "test", "-run", "^$", "-bench", "^BenchmarkCompute(Join)?$", "-benchmem", "-count", strconv.Itoa(*count), "./reconciler/desired"))
	}
	if runs("xfrm") {
		parse(run(nil, "test", "-run", "^$", "-bench", "^BenchmarkApplyJoin$", "-benchmem", "-count", strconv.Itoa(*count), "./reconciler/xfrm"))
		parse(run(benchEnv, "test", "-count=1", "-run", "^TestBench(ProgramPolicies|Join)$", "-v", "./reconciler/xfrm"))
		parse(run(benchEnv, "test", "-count=1", "-run", "^TestBenchEventPath$", "-v", "./reconciler/watch"))
	}
	if runs("keys") {
		parse(run(benchEnv, "test", "-count=1", "-run", "^TestBenchDeriveV2Start$", "-v", "./keys"))
	}
	if runs("readiness") {
		parse(run(benchEnv, "test", "-count=1", "-run", "^TestBenchMasterObserve$", "-v", "./readiness"))
		parse(run(benchEnv, "test", "-count=1", "-timeout", "20m", "-run", "^TestBenchViewsAfterReboot$", "-v", "./master"))
	}
	if runs("cni") {
		parse(run(benchEnv, "test", "-count=1", "-run", "^TestBenchChainAdd$", "-v", "./plugin"))
	}
	if runs("agent") {
		parse(run(benchEnv, "test", "-count=1", "-timeout", "30m", "-run", "^TestBench", "-v", "./reconciler/agent"))
	}
	if runs("ctl") {
		parse(run(append(benchEnv, "SECUREOVERLAY_BENCH_CTL_NODES="+*ctlSize), "test", "-count=1", "-timeout", "60m", "-run", "^TestBenchStatus$", "-v", "./ctl"))
	}
	if *withLab && runs("lab") {
		parse(run(benchEnv, "test", "-count=1", "-timeout", "30m", "-run", "^TestBenchProgramStatesLab$", "-v", "./reconciler/xfrm"))
		parse(run(append(benchEnv, "SECUREOVERLAY_BENCH_LAB_NODES="+*labSize), "test", "-count=1", "-timeout", "90m", "-run", "^TestBenchRotationCutover$", "-v", "./conformance/e2e"))
	}
	if runs("dataplane") {
		parse(run(benchEnv, "test", "-count=1", "-timeout", "40m", "-run", "^TestBench(Dataplane|AEAD)$", "-v", "./bench/dataplane"))
	}
	var b strings.Builder
	w := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	w("# Benchmark results\n\n")
	w("Generated by `hack/bench.sh` (`go run ./bench/cmd/benchreport`); what each figure means, where the limits are and what changes at 5,000 nodes: [docs/performance.md](../docs/performance.md).\n\n")
	w("- Machine: %s\n- Date: %s\n- Commands:\n", machine(), started.Format("2006-01-02 15:04 UTC"))
	for i, c := range cmds {
		if why, ok := failed[i]; ok {
			w("  - `%s` — **failed (%s)**: a goal was missed or a measurement broke; the figures it printed are kept, its log says which\n", c, why)
			continue
		}
		w("  - `%s`\n", c)
	}
	w("\nFigures that count as results are ratios against a baseline measured in the same run, or counts independent of machine speed; absolute times are for context only (2 shared CPUs).\n")

	w("\n## 1. Desired-state computation (`desired.Compute`, 4 blocks per node, generations 1 active + 2 pending, enforce; median of %d runs)\n\n", *count)
	w("| pool | nodes | SAs | policies | time/op | allocs/op | bytes/op | time ratio vs 1,000 nodes | allocs ratio vs 1,000 |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, pool := range []string{"Always", "CrossSubnet"} {
		base := fmt.Sprintf("BenchmarkCompute/pool=%s/nodes=1000", pool)
		bt, _ := med(base, "ns/op")
		ba, _ := med(base, "allocs/op")
		for _, n := range []int{100, 1000, 5000} {
			name := fmt.Sprintf("BenchmarkCompute/pool=%s/nodes=%d", pool, n)
			t, ok := med(name, "ns/op")
			if !ok {
				w("| %s | %d | — | — | — | — | — | — | — |\n", pool, n)
				continue
			}
			a, _ := med(name, "allocs/op")
			by, _ := med(name, "B/op")
			sas, _ := med(name, "SAs")
			ps, _ := med(name, "policies")
			w("| %s | %d | %s | %s | %s ms | %s | %s MiB | %s× (nodes %s×) | %s× |\n", pool, n, num(sas), num(ps), num(t/1e6), num(a), num(by/(1<<20)),
				num(t/bt), num(float64(n)/1000), num(a/ba))
		}
	}

	w("\n## 2. Kernel programming: 1,000 peers' policies into a fresh network namespace (host kernel; median of 7 alternating rounds)\n\n")
	w("| what | policies | time | ratio |\n|---|---:|---:|---:|\n")
	w("| minimal loop, one netlink socket (baseline) | %s | %s | 1× |\n", get("program.policies"), get("program.raw_handle"))
	w("| minimal loop, a socket per call (package-level `netlink.XfrmPolicyAdd`; what the agent did before `xfrm.OpenNetlink`) | %s | %s | %s |\n", get("program.policies"), get("program.raw_per_call"), ratio("program.raw_per_call", "program.raw_handle"))
	w("| applier (`xfrm.Applier.Apply` on `xfrm.OpenNetlink`, as the agent: list, diff, SA bookkeeping with the SAs discarded, policies to the kernel) | %s | %s | **%s** (goal ≤ 1.2); vs the per-call loop %s |\n",
		get("program.policies"), get("program.applier"), get("program.ratio_applier_raw"), get("program.ratio_applier_raw_per_call"))
	w("\nSAs need the lab VM's kernel (the host has no esp4/GCM): 1,000 peers' SAs and policies in a fresh namespace of the guest, median of 9 alternating rounds (`--lab`):\n\n")
	w("| what | SAs | policies | time | ratio |\n|---|---:|---:|---:|---:|\n")
	w("| minimal loop, one netlink socket (baseline) | %s | %s | %s | 1× |\n", get("lab_program.sas"), get("lab_program.policies"), get("lab_program.raw_handle"))
	w("| applier on `xfrm.OpenNetlink` (as the agent) | %s | %s | %s | **%s** (goal ≤ 1.2) |\n", get("lab_program.sas"), get("lab_program.policies"), get("lab_program.applier"), get("lab_program.ratio_applier_raw"))

	w("\n## 3. Incremental change: one node joins (enforce, 2 generations)\n\n")
	w("As the agent's event-driven sync absorbs it: `desired.Memo.Update` recomputes the joining peer only, `xfrm.Applier.ApplyChange` writes its objects only (median of the join rounds of `TestBenchJoin`, fresh key incarnation per round). For comparison, the whole-state path every sync took before the memo: a full `desired.Compute` and an `Apply` that walks everything.\n\n")
	w("| cluster | writes (fake: SAs + policies) | real-kernel policy writes | real-kernel writes (policies + SAs in the fake) | Apply of the join, real kernel | Apply of the join, fake | Compute of the join (joiner named) | Compute, comparing every Node | whole State (patched from the last) | before: full Compute | before: Apply walking everything (fake) | initial programming (writes, time) |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, n := range []int{100, 1000, 5000} {
		p := fmt.Sprintf("join.%d.", n)
		w("| %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s in %s |\n", n, get(p+"fake_writes"), get(p+"kernel_policy_writes"), get(p+"kernel_writes"),
			get(p+"kernel_apply"), get(p+"fake_apply"), get(p+"compute"), get(p+"compute_scan"), get(p+"state"), get(p+"compute_full"), get(p+"fake_apply_walk"),
			get(p+"kernel_initial_writes"), get(p+"kernel_initial"))
	}
	w("\nJoin time ratios 5,000/1,000 in that single run (goal ≤ 1.5×; nodes ratio 5×): Compute %s, Apply %s (real kernel), %s (fake); comparing every Node %s; before: full Compute %s, walking Apply %s.\n",
		ratio("join.5000.compute", "join.1000.compute"), ratio("join.5000.kernel_apply", "join.1000.kernel_apply"), ratio("join.5000.fake_apply", "join.1000.fake_apply"),
		ratio("join.5000.compute_scan", "join.1000.compute_scan"), ratio("join.5000.compute_full", "join.1000.compute_full"), ratio("join.5000.fake_apply_walk", "join.1000.fake_apply_walk"))
	w("\n`BenchmarkComputeJoin` (median of %d runs): the Memo.Update of a join, repeated (join timed, leave untimed).\n\n| how the change is found | cluster | time/op | allocs/op | time ratio vs 1,000 |\n|---|---:|---:|---:|---:|\n", *count)
	for _, hint := range []string{"named", "scan"} {
		ct, _ := med(fmt.Sprintf("BenchmarkComputeJoin/hint=%s/nodes=1000", hint), "ns/op")
		for _, n := range []int{100, 1000, 5000} {
			name := fmt.Sprintf("BenchmarkComputeJoin/hint=%s/nodes=%d", hint, n)
			t, ok := med(name, "ns/op")
			if !ok {
				w("| %s | %d | — | — | — |\n", hint, n)
				continue
			}
			a, _ := med(name, "allocs/op")
			w("| %s | %d | %s µs | %s | %s× |\n", map[string]string{"named": "joiner named (Hint)", "scan": "every Node compared"}[hint], n, num(t/1e3), num(a), num(t/ct))
		}
	}
	w("\n`watch.TestBenchEventPath`: the agent's per-event path from the watcher's caches to the desired state for one node joining (node view snapshot, `Watcher.Inputs`, the watcher's `Hint`, `Memo.Update`, `Memo.State`; every peer ready, one generation, real key derivation), against what the agent did before the watcher's hints (`watch.Inputs` of every node, every Node compared). Medians of the rounds.\n\n| path | cluster | snapshot | inputs | update | state | total | ratio 5,000/1,000 |\n|---|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, kind := range []string{"hint", "scan"} {
		for _, n := range []int{1000, 5000} {
			p := fmt.Sprintf("eventpath.%d.", n)
			r := ""
			if n == 5000 {
				r = get("eventpath.ratio_5000_1000." + kind)
			}
			w("| %s | %d | %s | %s | %s | %s | %s | %s |\n", map[string]string{"hint": "watcher's hint", "scan": "before: every node converted and compared"}[kind], n,
				get(p+"snapshot"), get(p+kind+".inputs"), get(p+kind+".update"), get(p+kind+".state"), get(p+kind+".total"), r)
		}
	}
	w("\n`BenchmarkApplyJoin` (fake kernel, median of %d runs): the ApplyChange of a join, repeated (join timed, leave untimed).\n\n| cluster | time/op | allocs/op | bytes/op | time ratio vs 1,000 | allocs ratio vs 1,000 |\n|---:|---:|---:|---:|---:|---:|\n", *count)
	bt, _ := med("BenchmarkApplyJoin/nodes=1000", "ns/op")
	ba, _ := med("BenchmarkApplyJoin/nodes=1000", "allocs/op")
	for _, n := range []int{100, 1000, 5000} {
		name := fmt.Sprintf("BenchmarkApplyJoin/nodes=%d", n)
		t, ok := med(name, "ns/op")
		if !ok {
			w("| %d | — | — | — | — | — |\n", n)
			continue
		}
		a, _ := med(name, "allocs/op")
		by, _ := med(name, "B/op")
		w("| %d | %s ms | %s | %s MiB | %s× | %s× |\n", n, num(t/1e6), num(a), num(by/(1<<20)), num(t/bt), num(a/ba))
	}
	w("\nThe report each node writes after the join (`TestBenchReportSize`: enforce, every peer inbound and encrypting; every node writes one, so a join writes nodes × this to etcd, and every agent caches all of them):\n\n")
	w("| node names | nodes | report annotation | of the 256 KiB annotation limit | written cluster-wide per join |\n|---|---:|---:|---:|---:|\n")
	for _, style := range []string{"short", "eks"} {
		label := map[string]string{"short": "`node-00001`", "eks": "`ip-10-0-12-34.eu-west-1.compute.internal`"}[style]
		for _, n := range []int{100, 1000, 5000} {
			p := fmt.Sprintf("report.%s.%d.", style, n)
			byv, ok := results[p+"bytes"]
			if !ok {
				w("| %s | %d | — | — | — |\n", label, n)
				continue
			}
			by, frac := byv.v, results[p+"limit_fraction"].v
			flag := ""
			if frac > 1 {
				flag = " **over: the API server refuses it**"
			}
			w("| %s | %d | %s KiB | %s%%%s | %s MiB |\n", label, n, num(by/1024), num(100*frac), flag, num(results[p+"cluster_bytes_per_change"].v/(1<<20)))
		}
	}

	w("\n## 4. Event-to-kernel latency (real kube-apiserver + etcd, real kernel policies; from just before the API write is issued to the agent's netlink call for the resulting policy returning; 200 changes each)\n\n")
	w("| agent client | change (API write → policy) | changes | p50 | p99 | max |\n|---|---|---:|---:|---:|---:|\n")
	shipped := fmt.Sprintf("as shipped (`--kube-api-qps` %s, `--kube-api-burst` %s)", get("latency.shipped.qps"), get("latency.shipped.burst"))
	for _, c := range [][2]string{{shipped, "latency.shipped"}, {"client-go default (5 QPS, burst 10; shipped before)", "latency.clientgo"}, {"1,000 QPS (the limiter never waits)", "latency.qps1000"}} {
		for _, k := range [][2]string{{"report on a new Node → its inbound policy", "node"}, {"new IPAMBlock (CrossSubnet, same /24) → its fwd tunnel policy", "block"}} {
			p := c[1] + "." + k[1]
			w("| %s | %s | %s | %s | %s | %s |\n", c[0], k[0], get(p+".changes"), get(p+".p50"), get(p+".p99"), get(p+".max"))
		}
	}
	w("\np50 ratio client-go default / shipped: %s (Node), %s (IPAMBlock); shipped / 1,000 QPS: %s (Node), %s (IPAMBlock).\n",
		ratio("latency.clientgo.node.p50", "latency.shipped.node.p50"), ratio("latency.clientgo.block.p50", "latency.shipped.block.p50"),
		ratio("latency.shipped.node.p50", "latency.qps1000.node.p50"), ratio("latency.shipped.block.p50", "latency.qps1000.block.p50"))
	if _, ok := results["latency.stream.node.p99"]; ok {
		w("\nA stream of Node events (`TestBenchEventStream`, shipped limit): 250 peers, one of them gets its report every 20 ms (**50 Node events/s**), each adding that peer's inbound policy and changing this node's report: %s changes, p50 %s, **p99 %s** (issue 16's goal: < 30 ms), max %s.\n",
			get("latency.stream.node.changes"), get("latency.stream.node.p50"), get("latency.stream.node.p99"), get("latency.stream.node.max"))
	}

	w("\n## 5. CNI ADD through libcni (ADDs alternate between the chains; fresh pod netns each)\n\n")
	w("| chain | ADDs | p50 | p99 | p50 ratio | p99 ratio |\n|---|---:|---:|---:|---:|---:|\n")
	w("| ptp + host-local (baseline) | %s | %s | %s | 1× | 1× |\n", get("cni.samples"), get("cni.ptp.p50"), get("cni.ptp.p99"))
	w("| ptp + host-local + secureoverlay | %s | %s | %s | **%s** | %s |\n", get("cni.samples"), get("cni.secureoverlay.p50"), get("cni.secureoverlay.p99"), get("cni.secureoverlay.ratio_p50"), get("cni.secureoverlay.ratio_p99"))
	w("| ptp + host-local + tuning (Debian) | %s | %s | %s | %s | %s |\n", get("cni.samples"), get("cni.tuning.p50"), get("cni.tuning.p99"), get("cni.tuning.ratio_p50"), get("cni.tuning.ratio_p99"))
	w("\nsecureoverlay vs tuning, p50: %s.\n", ratio("cni.secureoverlay.p50", "cni.tuning.p50"))

	w("\n## 6. Agent memory (real API server: %s Nodes with reports, %s IPAMBlocks; agent for one node, accept mode)\n\n", get("memory.nodes"), get("memory.blocks"))
	w("The `secureoverlay-agent` binary as its own process in a fresh network namespace (shipped flags but `--external-mtu 1500`; RSS from /proc/PID/status, Go heap from its own /metrics; medians of 10 samples 1 s apart after its first full sync, peak RSS at the end). This host has no esp4/GCM, so its SA writes fail (%s succeeded) and the sync is retried with backoff (%s failed, %s succeeded syncs by the end); its %s inbound policies are in the namespace's kernel:\n\n",
		get("memory.binary.state_writes_ok"), get("memory.binary.failed_syncs"), get("memory.binary.ok_syncs"), get("memory.binary.policies"))
	w("| RSS (VmRSS) | peak RSS (VmHWM) | Go heap alloc (lowest sample) | Go heap in use | next GC goal | first full sync (from process start) |\n|---:|---:|---:|---:|---:|---:|\n")
	w("| %s | %s | %s (%s) | %s | %s | %s |\n", get("memory.binary.rss"), get("memory.binary.rss_peak"), get("memory.binary.heap_alloc"), get("memory.binary.heap_alloc_min"),
		get("memory.binary.heap_inuse"), get("memory.binary.next_gc"), get("memory.binary.first_sync"))
	if _, ok := results["memory.baseline.rss"]; ok {
		w("\nBefore/after in this run: another build of the agent (`SECUREOVERLAY_BENCH_BASELINE_AGENT`), measured first on the same objects:\n\n")
		w("| build | RSS | peak RSS | Go heap in use | first full sync |\n|---|---:|---:|---:|---:|\n")
		for _, b := range []string{"baseline", "binary"} {
			p := "memory." + b + "."
			w("| %s | %s | %s | %s | %s |\n", map[string]string{"baseline": "baseline", "binary": "this tree"}[b], get(p+"rss"), get(p+"rss_peak"), get(p+"heap_inuse"), get(p+"first_sync"))
		}
		w("\nRatios this tree / baseline: RSS %s, first full sync %s.\n", ratio("memory.binary.rss", "memory.baseline.rss"), ratio("memory.binary.first_sync", "memory.baseline.first_sync"))
	}
	less := "—"
	if fs, ok := results["memory.binary.first_sync"]; ok {
		if add, ok := results["memory.binary.failed_sa_add"]; ok {
			if n, ok := results["memory.sas"]; ok {
				less = num(fs.v-add.v/1e6*n.v) + " s"
			}
		}
	}
	w("\nOne refused SA add costs this host %s (median of 5 rounds of 500, in the same namespace after the run: the kernel looks for esp4 and GCM each time), so of the binary's first full sync ≈ %s × %s SAs is spent on adds that fail here: without them it is **≈ %s**, plus what a kernel with ESP spends on its own SA adds (§2: the lab's).\n",
		get("memory.binary.failed_sa_add"), get("memory.binary.failed_sa_add"), get("memory.sas"), less)
	w("\nThe agent in the test process instead (same objects, xfrm in the fake so all %s SAs are held; the process's growth from before the agent started):\n\n", get("memory.sas"))
	w("| heap after GC (agent's share) | heap in use | RSS growth | process RSS | first full sync |\n|---:|---:|---:|---:|---:|\n")
	w("| %s | %s | %s | %s | %s |\n", get("memory.heap_alloc"), get("memory.heap_inuse"), get("memory.rss"), get("memory.rss_process"), get("memory.first_sync"))
	w("\nSteady-state reports (`TestBenchReportMemory`; one API server per size, 4 blocks per node): the same measurements with every Node's report empty (as above) and then listing every other node in `inboundFrom` and `encryptingTo` (enforce; the ring stays in accept mode, so the agent's desired state is the same and only its Node cache differs). Report part = full − empty:\n\n")
	w("| nodes | report | write all reports | binary RSS empty → full | ratio | binary peak RSS empty → full | binary heap in use empty → full | ratio | binary GC goal empty → full | in-process heap after GC, lowest of 5 (caches) empty → full | ratio | highest of 5 (a sync in flight) empty → full |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, n := range []int{1000, 2000} {
		p := fmt.Sprintf("memory.reports.%d.", n)
		w("| %d | %s B | %s | %s → %s | %s | %s → %s | %s → %s | %s | %s → %s | %s → %s | %s | %s → %s |\n", n, get(p+"report_bytes"), get(p+"populate_full"),
			get(p+"empty.rss"), get(p+"full.rss"), get(p+"ratio_rss"), get(p+"empty.rss_peak"), get(p+"full.rss_peak"),
			get(p+"empty.heap_inuse"), get(p+"full.heap_inuse"), get(p+"ratio_heap_inuse"), get(p+"empty.next_gc"), get(p+"full.next_gc"),
			get(p+"empty.inproc_heap"), get(p+"full.inproc_heap"), get(p+"ratio_inproc_heap"), get(p+"empty.inproc_heap_max"), get(p+"full.inproc_heap_max"))
	}
	g := func(k string) string { return get("memory.reports.growth_1000_2000." + k) }
	w("\nGrowth of the report part from 1,000 to 2,000 nodes (≈4× is quadratic, ≈2× linear): binary RSS %s, peak RSS %s, heap in use %s, GC goal %s; in-process heap between syncs %s (the highest samples depend on whether one caught a sync in flight). With empty reports, of the whole: binary RSS %s, in-process heap %s.\n",
		g("report_rss"), g("report_rss_peak"), g("report_heap_inuse"), g("report_next_gc"), g("report_inproc_heap"), g("rss_empty"), g("inproc_heap_empty"))

	w("\n## 7. Rotation and cutover in the VM lab (streams on every ordered pod pair, 10/s each)\n\n")
	if _, ok := results["lab."+strings.Split(*labSize, ",")[0]+".up"]; !ok && !*withLab {
		w("Not run (`hack/bench.sh --lab` runs it).\n")
	}
	w("| nodes | enable: lost / sent | xfrm_stat errors | guest drops | enable wall time | rotation: lost / sent | xfrm_stat errors | guest drops | rotation active everywhere | old generation removed after (grace) | lab up |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, s := range strings.Split(*labSize, ",") {
		p := "lab." + strings.TrimSpace(s) + "."
		w("| %s | %s / %s | %s | %s | %s | %s / %s | %s | %s | %s | %s (%s) | %s |\n", strings.TrimSpace(s), get(p+"enable.lost"), get(p+"enable.sent"), get(p+"enable.xfrm_errors"), get(p+"enable.local_drops"), get(p+"enable.wall"),
			get(p+"rotation.lost"), get(p+"rotation.sent"), get(p+"rotation.xfrm_errors"), get(p+"rotation.local_drops"), get(p+"rotation.active"), get(p+"rotation.removed"), get(p+"grace"), get(p+"up"))
	}
	w("\nxfrm_stat errors: the growth of every `/proc/net/xfrm_stat` counter (each counts a failure: no state, policy block, replay, ICV) over the node namespaces while the streams ran. Guest drops: packets the guest dropped outside IPsec in the same window (IP output discards in the pod namespaces — a veth's backlog full — and the per-CPU backlog drops of `/proc/net/softnet_stat`): the emulated CPUs not keeping up. The run's log places each lost request on the cutover's timeline and lists every counter that grew (docs/performance.md §7).\n")
	w("\n## 8. `secureoverlayctl status` at scale (real API server: Nodes with EKS-style names, a NodeReport each listing every peer twice, enforce)\n\n")
	w("End to end as the operator runs it: the cobra command through its normal client path in the test process (median of 3), `-o json` (one run), and the `secureoverlayctl` binary of this tree as its own process (median of 3); `baseline` is another build's binary (`SECUREOVERLAY_BENCH_BASELINE_CTL`, up to 2,000 nodes: above that its whole-report read does not fit this machine's memory). Then each list alone: where the time goes.\n\n")
	w("| nodes | report | problem nodes | `status` | `status -o json` | binary `status` | baseline binary `status` | ratio baseline / binary |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	sizes := strings.Split(*ctlSize, ",")
	for _, n := range sizes {
		p := "ctl.status." + strings.TrimSpace(n) + "."
		by := "—"
		if v, ok := results[p+"report_bytes"]; ok {
			by = num(v.v/1024) + " KiB"
		}
		w("| %s | %s | %s | %s | %s | %s | %s | %s |\n", strings.TrimSpace(n), by, get(p+"problems"), get(p+"inproc.table"), get(p+"inproc.json"),
			get(p+"binary.table"), get(p+"baseline.table"), ratio(p+"baseline.table", p+"binary.table"))
	}
	w("\n| nodes | list Nodes (JSON) | list Nodes (protobuf) | list NodeReports, metadata only (what `status` reads) | list NodeReports whole (dynamic client, gzip: what `status` read before) | whole, uncompressed | whole, uncompressed, bytes only (no decoding) |\n|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, n := range sizes {
		p := "ctl.status." + strings.TrimSpace(n) + "."
		w("| %s | %s | %s | %s | %s | %s | %s |\n", strings.TrimSpace(n), get(p+"list_nodes_json"), get(p+"list_nodes_protobuf"), get(p+"list_reports_metadata"),
			get(p+"list_reports_full"), get(p+"list_reports_full_uncompressed"), get(p+"list_reports_raw_uncompressed"))
	}

	w("\n## 9. Pair-key derivation at an agent's start (5,000-node cluster: 4,999 peers × 2 generations, per peer and generation 4 SAs; medians of 5 alternating rounds)\n\n")
	w("| derivation | time | ratio |\n|---|---:|---:|\n")
	w("| v1: HKDF from the generation's shared root (docs/keys.md §3) | %s | 1× |\n", get("keys.start_v1"))
	w("| v2: per pair one X25519 and one salted extract, then HKDF (docs/keys.md §10), one worker | %s | %s |\n", get("keys.start_v2"), get("keys.start_ratio_v2_v1"))
	w("| v2 parallel: `keys.DerivePeersV2` with GOMAXPROCS (%s) workers | %s (issue 17's bound: 1 s) | serial/parallel %s |\n", get("keys.start_v2_workers"), get("keys.start_v2_parallel"), get("keys.start_ratio_serial_parallel"))

	writeDataplane(w, started)

	w("\n## 11. Protocol v2 readiness on the master (docs/protocol-v2.md §6, §9; pure, no API server)\n\n")
	w("`readiness.TestBenchMasterObserve`: `readiness.Master` (bit matrices, cached bucket digests) against the first implementation kept as the reference (maps, every digest recomputed), 5,000 nodes, 32 buckets:\n\n")
	w("| step | `readiness.Master` | reference | ratio |\n|---|---:|---:|---:|\n")
	w("| one round of 5,000 complete statuses (an enable step) | %s | %s | %s |\n", get("readiness.round"), get("readiness.round_reference"), get("readiness.round_ratio"))
	w("| one node re-keys, then every view is computed | %s | %s | %s |\n", get("readiness.rekey"), get("readiness.rekey_reference"), get("readiness.rekey_ratio"))
	w("\n`master.TestBenchViewsAfterReboot`: one node reboots in a steady cluster; peers install its keys within 0.5–3 s, it installs theirs at 2 s, each node reports 200 ms after its kernel or its view changes; the master's real view queue writes 20 views/s (`--kube-api-qps`). Simulated time. *Gain first*: the shipped writer (largest `readiness.Master.Gain` first, a node's view at most once a second); *FIFO*: one queue in arrival order; *no gap*: gain first without the per-node second; *rows*: docs/protocol-v2.md §9 step 3 as wired — the rebooted node publishes its status as its row (while incomplete, at most once a second), every peer's `readiness.Agent` takes it 100 ms later (`ConsiderRow`), the master reads it when the agents do and writes a view only when `readiness.Master.NeedsView` says the rows leave it something to give, checking queued views again at each reconcile (`viewWriter.Recheck`): the views it still writes are those queued in the second before the row arrives. With views alone every peer's own view must be written for its pair with the rebooted node, so no order beats (N−1)/20 s for every pair; rows do not need them.\n\n")
	w("| nodes | writer | it sends every peer ESP | every peer sends it ESP | every pair ready both ways | view writes | rows published (each to every agent) | pair-direction-seconds waiting |\n|---:|---|---:|---:|---:|---:|---:|---:|\n")
	for _, n := range []string{"1000", "5000"} {
		for _, c := range []struct{ key, name string }{{"gain_first", "gain first"}, {"fifo", "FIFO"}, {"gain_first_no_gap", "no gap"}, {"rows", "rows (§9 step 3: NeedsView, Recheck)"}} {
			p := "readiness.reboot." + n + "." + c.key + "."
			w("| %s | %s | %s | %s | %s | %s | %s | %s |\n", n, c.name, get(p+"own"), get(p+"peers"), get(p+"all"), get(p+"writes"), get(p+"rows"), get(p+"waiting"))
		}
	}
	w("\nRatios gain first / FIFO: the rebooted node's own pairs %s (1,000 nodes), %s (5,000); every pair %s, %s; pair-direction-seconds waiting %s, %s. Rows / gain first, every pair: %s, %s.\n",
		get("readiness.reboot.1000.ratio_own"), get("readiness.reboot.5000.ratio_own"), get("readiness.reboot.1000.ratio_all"), get("readiness.reboot.5000.ratio_all"), get("readiness.reboot.1000.ratio_waiting"), get("readiness.reboot.5000.ratio_waiting"),
		get("readiness.reboot.1000.ratio_rows_all"), get("readiness.reboot.5000.ratio_rows_all"))

	text := b.String()
	if *update {
		old, err := os.ReadFile(*out)
		if err != nil {
			log.Fatalf("-update: %v", err)
		}
		stamp := "run of " + started.UTC().Format("2006-01-02 15:04 UTC")
		if *noRun {
			stamp = "figures from an earlier run's log (-from), written " + started.UTC().Format("2006-01-02 15:04 UTC") + " with -norun"
		}
		text = merge(string(old), text, stamp)
	}
	if err := os.WriteFile(*out, []byte(text), 0o644); err != nil {
		log.Fatal(err)
	}
	log.Printf("wrote %s", *out)
	for i, c := range cmds {
		if _, bad := failed[i]; bad && strings.Contains(c, "./bench/dataplane") {
			// The data-plane benchmark fails only on a correctness check (or a broken
			// measurement): make `make bench-dataplane` and `make bench` fail with it.
			log.Fatalf("%s failed: see its log above", c)
		}
	}
}
