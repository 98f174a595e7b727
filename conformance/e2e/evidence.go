package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/secureoverlay/secureoverlay/conformance/lab"
	"github.com/secureoverlay/secureoverlay/keys"
)

func parseSPI(spi uint32) (genMod4, node uint32, ok bool) {
	_, g, n, ok := keys.ParseKindSPI(spi)
	return g, n, ok
}

// Pair is an ordered node pair (From sends to To).
type Pair struct{ From, To int }

func (p Pair) String() string { return fmt.Sprintf("node%d→node%d", p.From, p.To) }

// ESPCounts returns, per ordered pair of registered nodes, the packets the
// sender's outbound SAs to that peer have carried (all generations summed),
// from the sender's kernel.
func (l *Lab) ESPCounts(ctx context.Context) (map[Pair]uint64, error) {
	nodes := l.RegisteredNodes()
	ipToNode := map[string]int{}
	for _, i := range nodes {
		ipToNode[lab.NodeIP(i)] = i
	}
	out := map[Pair]uint64{}
	for _, i := range nodes {
		sas, err := lab.XfrmStates(ctx, l.VM, lab.NodeNS(i))
		if err != nil {
			return nil, err
		}
		for _, j := range nodes {
			if j != i {
				out[Pair{i, j}] += 0
			}
		}
		for _, sa := range sas {
			j, ok := ipToNode[sa.Dst]
			if sa.Src != lab.NodeIP(i) || !ok || j == i {
				continue
			}
			out[Pair{i, j}] += sa.Packets
		}
	}
	return out, nil
}

// SortedPairs returns the keys of m in order.
func SortedPairs[V any](m map[Pair]V) []Pair {
	ps := make([]Pair, 0, len(m))
	for p := range m {
		ps = append(ps, p)
	}
	sort.Slice(ps, func(a, b int) bool {
		if ps[a].From != ps[b].From {
			return ps[a].From < ps[b].From
		}
		return ps[a].To < ps[b].To
	})
	return ps
}

// XfrmStat returns node i's /proc/net/xfrm_stat counters.
func (l *Lab) XfrmStat(ctx context.Context, i int) (map[string]uint64, error) {
	out, _, err := l.VM.Run(ctx, "ip netns exec "+lab.NodeNS(i)+" cat /proc/net/xfrm_stat")
	if err != nil {
		return nil, err
	}
	m := map[string]uint64{}
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 2 {
			v, err := strconv.ParseUint(f[1], 10, 64)
			if err == nil {
				m[f[0]] = v
			}
		}
	}
	return m, nil
}

// AgentMetric sums the samples of metric name (optionally only those whose
// label text contains every one of labels) from node i's agent /metrics.
func (l *Lab) AgentMetric(ctx context.Context, i int, name string, labels ...string) (float64, error) {
	out, _, err := l.VM.Run(ctx, fmt.Sprintf("ip netns exec %s wget -q -O - http://127.0.0.1:%d/metrics", lab.NodeNS(i), AgentMetricsPort(i)))
	if err != nil {
		return 0, fmt.Errorf("node%d metrics: %w", i, err)
	}
	var sum float64
	found := false
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
line:
	for sc.Scan() {
		t := sc.Text()
		if !strings.HasPrefix(t, name+"{") && !strings.HasPrefix(t, name+" ") {
			continue
		}
		for _, lb := range labels {
			if !strings.Contains(t, lb) {
				continue line
			}
		}
		f := strings.Fields(t)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			continue
		}
		sum += v
		found = true
	}
	if !found {
		return 0, fmt.Errorf("node%d metrics: no sample of %s%v", i, name, labels)
	}
	return sum, nil
}

// PingAll sends n echo requests from every pod to every other pod, in
// sequence, and returns how many were lost.
func (l *Lab) PingAll(ctx context.Context, pods []*Pod, n int) (sent, lost int, err error) {
	for _, a := range pods {
		for _, b := range pods {
			if a == b {
				continue
			}
			out, _, _ := l.VM.Run(ctx, fmt.Sprintf("ip netns exec %s ping -n -q -c %d -i 0.05 -W 2 %s", lab.ShellQuote(a.Name), n, b.IP))
			m := pingRE.FindStringSubmatch(out)
			if m == nil {
				return sent, lost, fmt.Errorf("ping %s → %s: no summary: %q", a.Name, b.IP, out)
			}
			s, _ := strconv.Atoi(m[1])
			r, _ := strconv.Atoi(m[2])
			sent += s
			lost += s - r
		}
	}
	return sent, lost, nil
}

var pingRE = regexp.MustCompile(`(\d+) packets transmitted, (\d+) received`)

// Stream is an open-ended, sequence-numbered ICMP stream from a pod to
// another pod's address, stopped with Stop. Loss is counted from the
// sequence numbers: every echo request up to the highest one answered must
// have been answered; requests still unanswered after the highest answered
// one when the stream stops (in flight at SIGINT) are reported as Unanswered,
// not as lost.
type Stream struct {
	Pair Pair
	vm   *lab.VM
	pid  int
	log  string
}

// StreamStats is a stopped stream's outcome.
type StreamStats struct {
	Pair Pair
	// Sent is the number of echo requests transmitted, Received the number
	// of distinct sequence numbers answered.
	Sent, Received int
	// Lost counts unanswered sequence numbers below the highest answered one.
	Lost int
	// Unanswered counts requests after the highest answered one (in flight at stop).
	Unanswered int
	// LostSeqs lists the first lost sequence numbers (at most 20).
	LostSeqs []int
	// LostBetween holds, for each of LostSeqs, the guest times (Unix seconds, from
	// ping -D) of the nearest answered requests' replies below and above it (0 if none):
	// when the loss happened, to set against the cutover's timeline.
	LostBetween [][2]float64
}

var (
	seqRE      = regexp.MustCompile(`icmp_seq=(\d+) `)
	replyRE    = regexp.MustCompile(`(?m)^\[(\d+\.\d+)\] .*icmp_seq=(\d+) `)
	sentRE     = regexp.MustCompile(`(\d+) packets transmitted`)
	streamSeq  int
	streamSeqM sync.Mutex
)

// StartStream starts a stream from pod a to pod b, one request every interval.
func (l *Lab) StartStream(ctx context.Context, a, b *Pod, interval time.Duration) (*Stream, error) {
	streamSeqM.Lock()
	streamSeq++
	n := streamSeq
	streamSeqM.Unlock()
	log := fmt.Sprintf("/tmp/e2e/stream-%d.log", n)
	cmd := fmt.Sprintf("exec ip netns exec %s ping -D -n -i %.3f -W 2 %s", lab.ShellQuote(a.Name), interval.Seconds(), b.IP)
	pid, err := l.VM.Background(ctx, cmd, log)
	if err != nil {
		return nil, err
	}
	return &Stream{Pair: Pair{a.Node, b.Node}, vm: l.VM, pid: pid, log: log}, nil
}

// Stop interrupts the stream (ping prints its summary) and counts.
func (s *Stream) Stop(ctx context.Context) (StreamStats, error) {
	st := StreamStats{Pair: s.Pair}
	if err := s.vm.Signal(ctx, s.pid, "INT"); err != nil {
		return st, err
	}
	for i := 0; ; i++ {
		running, err := s.vm.Running(ctx, s.pid)
		if err != nil {
			return st, err
		}
		if !running {
			break
		}
		if i > 100 {
			return st, fmt.Errorf("stream %s: ping did not stop", s.Pair)
		}
		time.Sleep(100 * time.Millisecond)
	}
	b, err := s.vm.ReadFile(ctx, s.log)
	if err != nil {
		return st, err
	}
	st, err = countStream(b)
	st.Pair = s.Pair
	if err != nil {
		return st, fmt.Errorf("stream %s: %w", s.Pair, err)
	}
	return st, nil
}

// countStream counts ping's (non-quiet) output: replies by icmp_seq and the
// summary's transmitted count.
func countStream(b []byte) (StreamStats, error) {
	var st StreamStats
	m := sentRE.FindSubmatch(b)
	if m == nil {
		return st, errors.New("no summary in ping's output")
	}
	st.Sent, _ = strconv.Atoi(string(m[1]))
	got := map[int]bool{}
	high := 0
	for _, mm := range seqRE.FindAllSubmatch(b, -1) {
		q, _ := strconv.Atoi(string(mm[1]))
		got[q] = true
		high = max(high, q)
	}
	st.Received = len(got)
	at := map[int]float64{} // reply time by sequence (with -D)
	for _, mm := range replyRE.FindAllSubmatch(b, -1) {
		ts, _ := strconv.ParseFloat(string(mm[1]), 64)
		q, _ := strconv.Atoi(string(mm[2]))
		if _, dup := at[q]; !dup {
			at[q] = ts
		}
	}
	// iputils numbers requests from 1.
	for q := 1; q <= high; q++ {
		if !got[q] {
			st.Lost++
			if len(st.LostSeqs) < 20 {
				st.LostSeqs = append(st.LostSeqs, q)
				var br [2]float64
				for b := q - 1; b >= 1; b-- {
					if t, ok := at[b]; ok {
						br[0] = t
						break
					}
				}
				for a := q + 1; a <= high; a++ {
					if t, ok := at[a]; ok {
						br[1] = t
						break
					}
				}
				st.LostBetween = append(st.LostBetween, br)
			}
		}
	}
	st.Unanswered = st.Sent - high
	return st, nil
}

// StartStreamsAll starts a stream for every ordered pair of pods.
func (l *Lab) StartStreamsAll(ctx context.Context, pods []*Pod, interval time.Duration) ([]*Stream, error) {
	var out []*Stream
	for _, a := range pods {
		for _, b := range pods {
			if a != b {
				s, err := l.StartStream(ctx, a, b, interval)
				if err != nil {
					return out, err
				}
				out = append(out, s)
			}
		}
	}
	return out, nil
}

// StopStreams stops every stream and totals them.
func StopStreams(ctx context.Context, ss []*Stream) (stats []StreamStats, sent, lost, unanswered int, err error) {
	for _, s := range ss {
		st, e := s.Stop(ctx)
		if e != nil {
			err = errors.Join(err, e)
			continue
		}
		stats = append(stats, st)
		sent += st.Sent
		lost += st.Lost
		unanswered += st.Unanswered
	}
	return stats, sent, lost, unanswered, err
}

// FormatStreamStats renders one line per stream.
func FormatStreamStats(stats []StreamStats) string {
	var b strings.Builder
	for _, s := range stats {
		fmt.Fprintf(&b, "  %-16s sent %5d  answered %5d  lost %d  in flight at stop %d", s.Pair, s.Sent, s.Received, s.Lost, s.Unanswered)
		if len(s.LostSeqs) > 0 {
			fmt.Fprintf(&b, "  lost seqs %v", s.LostSeqs)
		}
		b.WriteString("\n")
	}
	return b.String()
}

var policyRE = regexp.MustCompile(`(?m)^src (\d+\.\d+\.\d+\.\d+)(?:/\d+)? dst (\d+\.\d+\.\d+\.\d+)(?:/\d+)?`)

// PeerObjects counts, in node i's kernel, the xfrm states and policies
// between node i and the node at address peer, per direction.
type PeerObjects struct {
	StatesIn, StatesOut, PoliciesIn, PoliciesOut int
}

// Any reports whether any object refers to the peer.
func (p PeerObjects) Any() bool {
	return p.StatesIn+p.StatesOut+p.PoliciesIn+p.PoliciesOut > 0
}

// Complete reports whether both directions have a state and a policy.
func (p PeerObjects) Complete() bool {
	return p.StatesIn > 0 && p.StatesOut > 0 && p.PoliciesIn > 0 && p.PoliciesOut > 0
}

// ObjectsFor lists node i's xfrm objects towards peer (an underlay address).
func (l *Lab) ObjectsFor(ctx context.Context, i int, peer string) (PeerObjects, error) {
	var o PeerObjects
	self := lab.NodeIP(i)
	sas, err := lab.XfrmStates(ctx, l.VM, lab.NodeNS(i))
	if err != nil {
		return o, err
	}
	for _, sa := range sas {
		switch {
		case sa.Src == peer && sa.Dst == self:
			o.StatesIn++
		case sa.Src == self && sa.Dst == peer:
			o.StatesOut++
		}
	}
	out, _, err := l.VM.Run(ctx, "ip -n "+lab.NodeNS(i)+" xfrm policy")
	if err != nil {
		return o, err
	}
	for _, m := range policyRE.FindAllStringSubmatch(out, -1) {
		switch {
		case m[1] == peer && m[2] == self:
			o.PoliciesIn++
		case m[1] == self && m[2] == peer:
			o.PoliciesOut++
		}
	}
	return o, nil
}

// GuestTime returns the guest's clock (Unix seconds, µs): ping -D's own timestamp of one
// echo on the guest's loopback, so exactly the clock of the streams' timestamps (the
// guest's busybox date has no sub-second format).
func (l *Lab) GuestTime(ctx context.Context) (float64, error) {
	out, _, err := l.VM.Run(ctx, "ping -D -n -c 1 -W 1 127.0.0.1")
	if err != nil {
		return 0, err
	}
	m := replyRE.FindStringSubmatch(out)
	if m == nil {
		return 0, fmt.Errorf("guest clock: no timestamped reply in %q", out)
	}
	return strconv.ParseFloat(m[1], 64)
}

// NetCounters returns the packet-drop evidence of network namespace netns in the guest:
// /proc/net/xfrm_stat (as "Xfrm.Name"), /proc/net/snmp and /proc/net/netstat (as
// "Ip.InDiscards", "TcpExt.…"), and the drops of its open raw and ping sockets (as
// "Sock.raw.drops", "Sock.icmp.drops": ping's sockets, readable only while it runs).
// netns "" is the guest's own namespace, with the per-CPU input backlog drops and time
// squeezes of /proc/net/softnet_stat ("Softnet.dropped", "Softnet.time_squeeze": packets
// lost because the emulated CPUs did not keep up).
func (l *Lab) NetCounters(ctx context.Context, netns string) (map[string]uint64, error) {
	script := "echo XFRM; cat /proc/net/xfrm_stat; echo TABLES; cat /proc/net/snmp /proc/net/netstat; echo RAW; cat /proc/net/raw; echo ICMP; cat /proc/net/icmp"
	cmd := "ip netns exec " + lab.ShellQuote(netns) + " sh -c '" + script + "'"
	if netns == "" { // the guest's own namespace, and its per-CPU backlog drops
		cmd = script + "; echo SOFTNET; cat /proc/net/softnet_stat"
	}
	out, _, err := l.VM.Run(ctx, cmd)
	if err != nil {
		return nil, err
	}
	return parseNetCounters(out), nil
}

func parseNetCounters(out string) map[string]uint64 {
	m := map[string]uint64{}
	section := ""
	var header []string
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) == 1 && (f[0] == "XFRM" || f[0] == "TABLES" || f[0] == "RAW" || f[0] == "ICMP" || f[0] == "SOFTNET") {
			section, header = f[0], nil
			continue
		}
		if len(f) == 0 {
			continue
		}
		switch section {
		case "XFRM":
			if len(f) == 2 {
				if v, err := strconv.ParseUint(f[1], 10, 64); err == nil {
					m["Xfrm."+f[0]] = v
				}
			}
		case "TABLES": // pairs of lines "Ip: names…" / "Ip: values…"
			if header == nil || header[0] != f[0] {
				header = f
				continue
			}
			for i := 1; i < len(f) && i < len(header); i++ {
				if v, err := strconv.ParseUint(f[i], 10, 64); err == nil {
					m[strings.TrimSuffix(f[0], ":")+"."+header[i]] = v
				}
			}
			header = nil
		case "SOFTNET": // one line per CPU, hex: processed, dropped, time_squeeze, …
			if len(f) >= 3 {
				d, err1 := strconv.ParseUint(f[1], 16, 64)
				sq, err2 := strconv.ParseUint(f[2], 16, 64)
				if err1 == nil && err2 == nil {
					m["Softnet.dropped"] += d
					m["Softnet.time_squeeze"] += sq
				}
			}
		case "RAW", "ICMP": // socket tables: the last column is drops
			if f[0] == "sl" {
				continue
			}
			if v, err := strconv.ParseUint(f[len(f)-1], 10, 64); err == nil {
				m["Sock."+strings.ToLower(section)+".drops"] += v
			}
		}
	}
	return m
}

// CounterDelta returns the counters that grew from before to after (after - before),
// for the names that count drops, errors or discards (not the totals of traffic).
func CounterDelta(before, after map[string]uint64) map[string]uint64 {
	d := map[string]uint64{}
	for k, v := range after {
		lk := strings.ToLower(k)
		if !strings.HasPrefix(k, "Xfrm.") && !strings.HasPrefix(k, "Softnet.") && !strings.Contains(lk, "drop") && !strings.Contains(lk, "discard") &&
			!strings.Contains(lk, "err") && !strings.Contains(lk, "noroute") && !strings.Contains(lk, "overflow") &&
			!strings.Contains(lk, "prune") && !strings.Contains(lk, "fail") {
			continue
		}
		if v > before[k] {
			d[k] = v - before[k]
		}
	}
	return d
}
