package e2e

import (
	"bufio"
	"context"
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/secureoverlay/secureoverlay/conformance/lab"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// LossEvidence tells a lost echo request's cause apart. From its start until Report it
// records:
//
//   - the kernel's drop counters (NetCounters: xfrm_stat, IP/ICMP discards and errors,
//     interface drops, iptables DROP rules, sockets) of the guest, every registered node
//     namespace and every pod namespace;
//   - the packets every node put on the underlay, by protocol (lab.WireCount: kernel
//     counters that, unlike a capture, cannot drop);
//   - every xfrm state and policy change in every node namespace, with the kernel's time
//     (`ip -ts xfrm monitor`; the key lines are removed inside the guest);
//   - a guest-clock timeline of the scenario's steps (Mark).
//
// Report places every lost request — labping's send time, on the same guest clock — on
// that timeline, next to the xfrm changes and the agents' syncs on the two nodes it
// crossed around that time, and lists every drop counter that grew anywhere.
type LossEvidence struct {
	l        *Lab
	spaces   []string
	before   map[string]map[string]uint64
	wire     *lab.WireCount
	monitors map[int]xfrmMonitor
	marks    []timeMark
}

type timeMark struct {
	what string
	at   float64 // guest Unix seconds
}

type xfrmMonitor struct {
	pid int
	log string
}

var monitorSeq atomic.Int64

// StartLossEvidence starts recording; pods are the pod namespaces to read counters in.
func (l *Lab) StartLossEvidence(ctx context.Context, pods []*Pod) (*LossEvidence, error) {
	e := &LossEvidence{l: l, spaces: []string{""}, monitors: map[int]xfrmMonitor{}} // "": the guest's own namespace
	for _, i := range l.RegisteredNodes() {
		e.spaces = append(e.spaces, NodeName(i))
	}
	for _, p := range pods {
		e.spaces = append(e.spaces, p.Name)
	}
	var err error
	if e.wire, err = lab.StartWireCount(ctx, l.VM, lab.UnderlayNS, lab.UnderlayBridge); err != nil {
		return nil, err
	}
	// One xfrm monitor per node, each in its own session (so its process group is its
	// pid), all started by one guest command. awk drops the key lines and flushes every
	// line, so killing the pipeline loses nothing it read.
	var b strings.Builder
	nodes := l.RegisteredNodes()
	for _, i := range nodes {
		log := fmt.Sprintf("/tmp/e2e/xfrm-monitor-node%d-%d.log", i, monitorSeq.Add(1))
		e.monitors[i] = xfrmMonitor{log: log}
		cmd := fmt.Sprintf(`exec ip -ts -n %s xfrm monitor SA policy 2>&1 | awk '!/^[[:space:]]*(aead|enc|auth|auth-trunc|comp) / { print; fflush() }'`, lab.NodeNS(i))
		fmt.Fprintf(&b, "setsid /bin/sh -c %s >>%s 2>&1 </dev/null & echo $!\n", lab.ShellQuote(cmd), log)
	}
	out, _, err := l.VM.RunInput(ctx, "sh -s", []byte(b.String()))
	if err != nil {
		return nil, fmt.Errorf("loss evidence: start xfrm monitors: %w", err)
	}
	pids := strings.Fields(out)
	if len(pids) != len(nodes) {
		return nil, fmt.Errorf("loss evidence: start xfrm monitors: %d pids for %d nodes", len(pids), len(nodes))
	}
	for k, i := range nodes {
		m := e.monitors[i]
		if m.pid, err = strconv.Atoi(pids[k]); err != nil {
			return nil, fmt.Errorf("loss evidence: start xfrm monitors: pid %q", pids[k])
		}
		e.monitors[i] = m
	}
	if e.before, err = e.read(ctx); err != nil {
		e.stopMonitors(ctx)
		return nil, err
	}
	return e, nil
}

func (e *LossEvidence) read(ctx context.Context) (map[string]map[string]uint64, error) {
	m, err := e.l.NetCountersOf(ctx, e.spaces)
	if err != nil {
		return nil, fmt.Errorf("loss evidence: %w", err)
	}
	return m, nil
}

// Mark records that the scenario reached step what, at the guest's current time.
func (e *LossEvidence) Mark(ctx context.Context, what string) error {
	at, err := e.l.GuestTime(ctx)
	if err != nil {
		return fmt.Errorf("loss evidence: mark %q: %w", what, err)
	}
	e.marks = append(e.marks, timeMark{what, at})
	return nil
}

func (e *LossEvidence) stopMonitors(ctx context.Context) {
	var pgs []string
	for _, m := range e.monitors {
		pgs = append(pgs, fmt.Sprintf("-%d", m.pid))
	}
	if len(pgs) > 0 {
		// Each monitor runs in its own session (Background), so its process group is its pid.
		_, _, _ = e.l.VM.Run(ctx, "kill -TERM "+strings.Join(pgs, " ")+" 2>/dev/null; true")
	}
}

// fileMarker starts each node's part of readFiles' output.
const fileMarker = "@@FILE"

// readFiles reads one guest file per monitored node in one guest command.
func (e *LossEvidence) readFiles(ctx context.Context, path func(xfrmMonitor, int) string) (map[int]string, error) {
	var b strings.Builder
	b.WriteString("set -e\n")
	for i, m := range e.monitors {
		fmt.Fprintf(&b, "echo '%s %d'; cat %s\n", fileMarker, i, lab.ShellQuote(path(m, i)))
	}
	out, _, err := e.l.VM.RunInput(ctx, "sh -s", []byte(b.String()))
	if err != nil {
		return nil, fmt.Errorf("loss evidence: read the nodes' logs: %w", err)
	}
	files := map[int]string{}
	for _, part := range strings.Split(out, fileMarker+" ")[1:] {
		idx, rest, _ := strings.Cut(part, "\n")
		if i, err := strconv.Atoi(strings.TrimSpace(idx)); err == nil {
			files[i] = rest
		}
	}
	if len(files) != len(e.monitors) {
		return nil, fmt.Errorf("loss evidence: read %d of %d nodes' logs", len(files), len(e.monitors))
	}
	return files, nil
}

// LossReport is what Report found.
type LossReport struct {
	// Text is the timeline, every lost request placed on it, the wire counts and every
	// drop counter that grew.
	Text string
	// Wire holds, per underlay port, the packets put on the wire since the start.
	Wire map[string]lab.WireCounts
	// Grew holds, per namespace ("guest" for the guest's own), the drop counters that grew.
	Grew map[string]map[string]uint64
	// XfrmErrors sums the xfrm_stat counters that grew (each counts a failure);
	// LocalDrops what the guest dropped outside IPsec (IP output discards, interface
	// drops, per-CPU backlog drops, sockets' full receive queues).
	XfrmErrors, LocalDrops uint64

	events map[int][]timedLine // xfrm changes per node
	t0     float64
}

var (
	// A template without an SPI (per-CPU lanes) is printed without one: "proto esp reqid N".
	outPolicyRE = regexp.MustCompile(`^(?:Updated )?src (\S+)/32 dst (\S+)/32 proto ipencap dir out .*\bproto esp (?:spi 0x([0-9a-f]+) )?reqid (\d+)\b`)
	deletedSARE = regexp.MustCompile(`^Deleted src (\S+) dst (\S+) proto esp spi 0x([0-9a-f]+)\b`)
)

// MakeBeforeBreak checks, from the xfrm changes the report recorded, that during the
// rotation from generation old to generation new every node removed a peer's inbound
// SA of generation old only after that peer had switched its outbound policy toward it
// to generation new: the order make-before-break rotation promises. The whole rotation
// must lie within the recording (both steps recorded for every ordered pair). It returns
// one line per ordered pair with both times, and the pairs where that does not hold.
func (r LossReport) MakeBeforeBreak(nodes []int, old, new uint32) (text string, violations []string) {
	ipNode := map[string]int{}
	for _, i := range nodes {
		ipNode[lab.NodeIP(i)] = i
	}
	type pair struct{ from, to int }
	switched := map[pair]float64{} // from's outbound toward to, last switch to new
	removed := map[pair]float64{}  // to's inbound SA from from, first removal of old
	for _, i := range nodes {
		for _, ev := range r.events[i] {
			if m := outPolicyRE.FindStringSubmatch(ev.text); m != nil && ipNode[m[1]] == i {
				if g, ok := templateGeneration(m[3], m[4]); ok && g == new%4 {
					switched[pair{i, ipNode[m[2]]}] = ev.at
				}
			}
			if m := deletedSARE.FindStringSubmatch(ev.text); m != nil && ipNode[m[2]] == i {
				p := pair{ipNode[m[1]], i}
				if g, ok := spiGeneration(m[3]); ok && g == old%4 {
					if _, seen := removed[p]; !seen {
						removed[p] = ev.at
					}
				}
			}
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "rotation %d → %d, per ordered pair (guest clock, seconds from the first mark): sender's outbound switched to %d / receiver's inbound SA of %d removed\n", old, new, new, old)
	for _, from := range nodes {
		for _, to := range nodes {
			if from == to {
				continue
			}
			p := pair{from, to}
			sw, okSw := switched[p]
			rm, okRm := removed[p]
			fmt.Fprintf(&b, "  node%d→node%d: %s / %s", from, to, stamp(sw, okSw, r.t0), stamp(rm, okRm, r.t0))
			switch {
			case !okRm && !okSw:
				violations = append(violations, fmt.Sprintf("no switch of node%d to generation %d and no removal of generation %d by node%d recorded (the xfrm monitor saw no rotation)", from, new, old, to))
				b.WriteString("  ← nothing recorded")
			case !okRm:
				violations = append(violations, fmt.Sprintf("node%d's inbound SA of generation %d from node%d was not removed while recorded", to, old, from))
				b.WriteString("  ← never removed")
			case !okSw:
				violations = append(violations, fmt.Sprintf("node%d removed its inbound SA of generation %d from node%d, which never switched to %d while recorded", to, old, from, new))
				b.WriteString("  ← removed before the sender switched")
			case okRm && rm < sw:
				violations = append(violations, fmt.Sprintf("node%d removed its inbound SA of generation %d from node%d %.2f s before node%d switched its outbound to %d", to, old, from, sw-rm, from, new))
				b.WriteString(fmt.Sprintf("  ← removed %.2f s before the sender switched", sw-rm))
			}
			b.WriteString("\n")
		}
	}
	return b.String(), violations
}

func stamp(at float64, ok bool, t0 float64) string {
	if !ok {
		return "—"
	}
	return fmt.Sprintf("+%.2f", at-t0)
}

// templateGeneration is the generation mod 4 an outbound policy's template sends with: its
// SPI's, or for a template without an SPI (per-CPU lanes, docs/dataplane.md §10) its lane
// reqid's — the agents' default --reqid, whose lanes' reqids follow it.
func templateGeneration(spiHex, reqid string) (uint32, bool) {
	if v, err := strconv.ParseUint(spiHex, 16, 32); spiHex != "" && err == nil && v != 0 {
		return spiGeneration(spiHex)
	}
	r, err := strconv.ParseUint(reqid, 10, 32)
	cfg := desired.Config{}.WithDefaults()
	if err != nil || r < uint64(cfg.LaneReqID) || r >= uint64(cfg.LaneReqID)+desired.LaneReqIDs {
		return 0, false
	}
	return uint32(r-uint64(cfg.LaneReqID)) / 2, true
}

func spiGeneration(hex string) (uint32, bool) {
	v, err := strconv.ParseUint(hex, 16, 32)
	if err != nil {
		return 0, false
	}
	g, _, ok := parseSPI(uint32(v))
	return g, ok
}

// Report stops the recording and reports on the streams' losses; what names the phase.
func (e *LossEvidence) Report(ctx context.Context, what string, stats []StreamStats) (LossReport, error) {
	e.stopMonitors(ctx)
	rep := LossReport{Grew: map[string]map[string]uint64{}}
	after, err := e.read(ctx)
	if err != nil {
		return rep, err
	}
	if rep.Wire, err = e.wire.Read(ctx); err != nil {
		return rep, err
	}
	events := map[int][]timedLine{}
	syncs := map[int][]timedLine{}
	lost := 0
	for _, s := range stats {
		lost += s.Lost
	}
	files, err := e.readFiles(ctx, func(m xfrmMonitor, _ int) string { return m.log })
	if err != nil {
		return rep, err
	}
	for i, text := range files {
		events[i] = parseXfrmMonitor(text)
	}
	if lost > 0 {
		if files, err = e.readFiles(ctx, func(_ xfrmMonitor, i int) string { return agentLog(i) }); err != nil {
			return rep, err
		}
		for i, text := range files {
			syncs[i] = parseAgentLog(text)
		}
	}
	rep.events = events
	if len(e.marks) > 0 {
		rep.t0 = e.marks[0].at
	}

	var b strings.Builder
	t0 := 0.0
	if len(e.marks) > 0 {
		t0 = e.marks[0].at
	}
	fmt.Fprintf(&b, "%s timeline (guest clock, seconds from %q):", what, firstMark(e.marks))
	for _, m := range e.marks {
		fmt.Fprintf(&b, " %s +%.2f;", m.what, m.at-t0)
	}
	b.WriteString("\n")
	for _, s := range stats {
		for _, run := range seqRuns(s.LostSeqs) {
			first, last := s.Echoes.SentAt(run[0]), s.Echoes.SentAt(run[1])
			n := run[1] - run[0] + 1
			fmt.Fprintf(&b, "  lost %s seq %d", s.Pair, run[0])
			if n > 1 {
				fmt.Fprintf(&b, "–%d (%d requests)", run[1], n)
			}
			fmt.Fprintf(&b, ": sent +%.3f", first-t0)
			if n > 1 {
				fmt.Fprintf(&b, " … +%.3f", last-t0)
			}
			fmt.Fprintf(&b, " (%s)", phase(e.marks, first, t0))
			for q := run[0]; q <= run[1]; q++ {
				if why := s.Echoes.Why(q); why != "" {
					fmt.Fprintf(&b, "; seq %d: %s", q, why)
				}
			}
			b.WriteString("\n")
			for _, node := range []int{s.Pair.From, s.Pair.To} {
				for _, ev := range window(events[node], first-1, last+1) {
					fmt.Fprintf(&b, "      +%.3f node%d xfrm: %s\n", ev.at-t0, node, ev.text)
				}
				for _, ev := range window(syncs[node], first-1, last+1) {
					fmt.Fprintf(&b, "      +%.3f node%d agent: %s\n", ev.at-t0, node, ev.text)
				}
			}
		}
	}
	fmt.Fprintf(&b, "  on the underlay (kernel counters per sending port): %s\n", lab.FormatWireCounts(rep.Wire))
	for _, ns := range e.spaces {
		d := CounterDelta(e.before[ns], after[ns])
		if len(d) == 0 {
			continue
		}
		label := ns
		if label == "" {
			label = "guest"
		}
		rep.Grew[label] = d
		keys := make([]string, 0, len(d))
		for k := range d {
			keys = append(keys, k)
			switch {
			case strings.HasPrefix(k, "Xfrm."):
				rep.XfrmErrors += d[k]
			case k == "Ip.OutDiscards" || k == "Softnet.dropped" || strings.HasPrefix(k, "Sock.") ||
				strings.HasPrefix(k, "Dev.") && strings.HasSuffix(k, "_drop"):
				rep.LocalDrops += d[k]
			}
		}
		sort.Strings(keys)
		fmt.Fprintf(&b, "  %s:", label)
		for _, k := range keys {
			fmt.Fprintf(&b, " %s +%d;", k, d[k])
		}
		b.WriteString("\n")
	}
	for _, s := range stats {
		rep.LocalDrops += uint64(s.Echoes.SocketDrops)
	}
	if len(rep.Grew) == 0 {
		b.WriteString("  no drop, discard, error or xfrm_stat counter grew in the guest or any node or pod namespace\n")
	}
	rep.Text = b.String()
	return rep, nil
}

func firstMark(ms []timeMark) string {
	if len(ms) == 0 {
		return "?"
	}
	return ms[0].what
}

// phase names the last mark before at and the time since it.
func phase(ms []timeMark, at, t0 float64) string {
	p := "before the first mark"
	for _, m := range ms {
		if at >= m.at {
			p = fmt.Sprintf("%.2f s after %s", at-m.at, m.what)
		}
	}
	return p
}

// seqRuns groups sorted sequence numbers into runs of consecutive ones: [first, last].
func seqRuns(seqs []int) [][2]int {
	var runs [][2]int
	for _, q := range seqs {
		if n := len(runs); n > 0 && runs[n-1][1] == q-1 {
			runs[n-1][1] = q
			continue
		}
		runs = append(runs, [2]int{q, q})
	}
	return runs
}

type timedLine struct {
	at   float64
	text string
}

func window(ls []timedLine, from, to float64) []timedLine {
	var out []timedLine
	for _, l := range ls {
		if l.at >= from && l.at <= to {
			out = append(out, l)
		}
	}
	return out
}

var (
	monitorStampRE = regexp.MustCompile(`^\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6})\]\s*(.*)$`)
	agentTimeRE    = regexp.MustCompile(`^time=(\S+) level=(\S+) msg=("[^"]*"|\S+)(.*)$`)
)

// parseXfrmMonitor reads `ip -ts xfrm monitor` output: each event starts with a
// "[YYYY-MM-DDTHH:MM:SS.ffffff] " prefix (the guest's local time, UTC) on its first line
// ("Deleted …", "Updated …" or a new object's "src … dst …"), followed by indented lines;
// an event becomes one line of what names it: the first line and the proto/spi, dir and
// tmpl lines (sequence numbers, replay bitmaps and selectors are left out).
func parseXfrmMonitor(out string) []timedLine {
	var evs []timedLine
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if m := monitorStampRE.FindStringSubmatch(line); m != nil {
			at, err := time.ParseInLocation("2006-01-02T15:04:05.000000", m[1], time.UTC)
			if err != nil {
				continue
			}
			evs = append(evs, timedLine{at: float64(at.UnixNano()) / 1e9, text: strings.TrimSpace(m[2])})
			continue
		}
		t := strings.TrimSpace(line)
		if len(evs) == 0 || t == "" {
			continue
		}
		if strings.HasPrefix(t, "proto ") || strings.HasPrefix(t, "dir ") || strings.HasPrefix(t, "tmpl ") {
			ev := &evs[len(evs)-1]
			ev.text = strings.TrimSpace(ev.text + " " + t)
		}
	}
	return evs
}

// parseAgentLog reads the agent's text log (slog): every line with its time.
func parseAgentLog(out string) []timedLine {
	var ls []timedLine
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		m := agentTimeRE.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		at, err := time.Parse(time.RFC3339Nano, m[1])
		if err != nil {
			continue
		}
		ls = append(ls, timedLine{at: float64(at.UnixNano()) / 1e9, text: m[2] + " " + strings.Trim(m[3], `"`) + m[4]})
	}
	return ls
}
