package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/secureoverlay/secureoverlay/conformance/lab"
	"github.com/secureoverlay/secureoverlay/keys"
)

// parseSPI is an SPI's generation mod 4 and sender, of any kind and lane (the agents send
// on per-CPU lanes where the lab's kernel has them: docs/dataplane.md §10).
func parseSPI(spi uint32) (genMod4, node uint32, ok bool) {
	_, _, g, n, ok := keys.ParseLaneSPI(spi)
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
	v, err := metricSum(out, name, labels...)
	if err != nil {
		return 0, fmt.Errorf("node%d metrics: %w", i, err)
	}
	return v, nil
}

// LeaderMetric is MasterMetric of the master replica that leads (its
// secureoverlay_master_leader is 1).
func (l *Lab) LeaderMetric(ctx context.Context, name string, labels ...string) (float64, error) {
	l.mu.Lock()
	var ms []int
	for m := range l.masterPorts {
		ms = append(ms, m)
	}
	l.mu.Unlock()
	sort.Ints(ms)
	for _, m := range ms {
		if lead, err := l.MasterMetric(ctx, m, "secureoverlay_master_leader"); err == nil && lead == 1 {
			return l.MasterMetric(ctx, m, name, labels...)
		}
	}
	return 0, fmt.Errorf("no running master leads (masters %v)", ms)
}

// MasterMetric sums the samples of metric name (labels as for AgentMetric) from master
// replica m's /metrics (on the host).
func (l *Lab) MasterMetric(ctx context.Context, m int, name string, labels ...string) (float64, error) {
	l.mu.Lock()
	port, ok := l.masterPorts[m]
	l.mu.Unlock()
	if !ok {
		return 0, fmt.Errorf("master %d not running", m)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/metrics", port), nil)
	if err != nil {
		return 0, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, fmt.Errorf("master %d metrics: %w", m, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, fmt.Errorf("master %d metrics: %w", m, err)
	}
	v, err := metricSum(string(b), name, labels...)
	if err != nil {
		return 0, fmt.Errorf("master %d metrics: %w", m, err)
	}
	return v, nil
}

// metricSum sums the samples of metric name in a Prometheus text exposition whose label
// text contains every one of labels.
func metricSum(out, name string, labels ...string) (float64, error) {
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
		return 0, fmt.Errorf("no sample of %s%v", name, labels)
	}
	return sum, nil
}

// PingAll sends n echo requests from every pod to every other pod, one pair after the
// other, each pair's requests 50 ms apart, and waits (up to lab.DefaultLinger after each
// pair's last request) for every reply. It returns one StreamStats per ordered pair and the totals.
func (l *Lab) PingAll(ctx context.Context, pods []*Pod, n int) (stats []StreamStats, sent, lost int, err error) {
	for _, a := range pods {
		for _, b := range pods {
			if a == b {
				continue
			}
			e, err := lab.Echo(ctx, l.VM, a.Name, b.IP, lab.EchoOptions{Count: n, Interval: 50 * time.Millisecond})
			if err != nil {
				return stats, sent, lost, err
			}
			st := newStreamStats(Pair{a.Node, b.Node}, e)
			stats = append(stats, st)
			sent += st.Sent
			lost += st.Lost
		}
	}
	return stats, sent, lost, nil
}

// Stream is an open-ended, sequence-numbered echo stream from a pod to another pod's
// address (lab.EchoStream, the guest's labping), stopped with StopStreams. It ends on
// acknowledged sequence numbers: the stop ends the sending, then every request sent has
// up to lab.DefaultLinger for its reply; a request is lost only when no reply came.
type Stream struct {
	Pair Pair
	s    *lab.EchoStream
}

// StreamStats is a stopped stream's outcome.
type StreamStats struct {
	Pair Pair
	// Sent is the number of echo requests sent, Received the number answered.
	Sent, Received int
	// Lost is Sent - Received; LostSeqs their sequence numbers.
	Lost     int
	LostSeqs []int
	// AfterStop counts replies that arrived after sending stopped: what a stream that
	// stops receiving at its stop would have counted as lost. Reordered counts replies
	// that overtook an earlier request's.
	AfterStop, Reordered int
	MaxRTT               time.Duration
	// Echoes is labping's report: send and reply times, errors.
	Echoes lab.Echoes
}

func newStreamStats(p Pair, e lab.Echoes) StreamStats {
	st := StreamStats{Pair: p, Sent: e.Requests(), Received: e.Answered(), LostSeqs: e.Lost(),
		AfterStop: e.AnsweredAfterStop(), Reordered: e.Reordered, MaxRTT: e.MaxRTT(), Echoes: e}
	st.Lost = len(st.LostSeqs)
	return st
}

// StartStream starts a stream from pod a to pod b, one request every interval.
func (l *Lab) StartStream(ctx context.Context, a, b *Pod, interval time.Duration) (*Stream, error) {
	s, err := lab.StartEchoStream(ctx, l.VM, a.Name, b.IP, lab.EchoOptions{Interval: interval})
	if err != nil {
		return nil, err
	}
	return &Stream{Pair: Pair{a.Node, b.Node}, s: s}, nil
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

// StopStreams stops every stream at once, waits for their replies (each stream's
// linger) and totals them.
func StopStreams(ctx context.Context, ss []*Stream) (stats []StreamStats, sent, lost int, err error) {
	if len(ss) == 0 {
		return nil, 0, 0, nil
	}
	es := make([]*lab.EchoStream, len(ss))
	for i, s := range ss {
		es[i] = s.s
	}
	echoes, err := lab.StopEchoStreams(ctx, es)
	if err != nil {
		return nil, 0, 0, err
	}
	for i, e := range echoes {
		st := newStreamStats(ss[i].Pair, e)
		stats = append(stats, st)
		sent += st.Sent
		lost += st.Lost
	}
	return stats, sent, lost, nil
}

// FormatStreamStats renders one line per stream.
func FormatStreamStats(stats []StreamStats) string {
	var b strings.Builder
	for _, s := range stats {
		fmt.Fprintf(&b, "  %-16s sent %5d  answered %5d  lost %d  answered after the stop %d  reordered %d  max rtt %s",
			s.Pair, s.Sent, s.Received, s.Lost, s.AfterStop, s.Reordered, s.MaxRTT.Round(time.Millisecond))
		if s.Echoes.SocketDrops > 0 {
			fmt.Fprintf(&b, "  socket drops %d", s.Echoes.SocketDrops)
		}
		if len(s.LostSeqs) > 0 {
			fmt.Fprintf(&b, "  lost seqs %v", firstN(s.LostSeqs, 20))
		}
		b.WriteString("\n")
	}
	return b.String()
}

func firstN(s []int, n int) []int {
	if len(s) > n {
		return s[:n]
	}
	return s
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

var pingTimeRE = regexp.MustCompile(`(?m)^\[(\d+\.\d+)\] .*icmp_seq=(\d+) `)

// GuestTime returns the guest's clock (Unix seconds, µs): ping -D's own timestamp of one
// echo on the guest's loopback, so exactly the clock of the streams' timestamps (the
// guest's busybox date has no sub-second format).
func (l *Lab) GuestTime(ctx context.Context) (float64, error) {
	// -W 10: the reply normally comes at once, but a guest busy with streams, a capture
	// and TCG's emulation has been seen to take over a second to answer its own loopback
	// (scenario 7c's mark failed with -W 1); waiting longer costs nothing when it is quick.
	out, _, err := l.VM.Run(ctx, "ping -D -n -c 1 -W 10 127.0.0.1")
	if err != nil {
		return 0, err
	}
	m := pingTimeRE.FindStringSubmatch(out)
	if m == nil {
		return 0, fmt.Errorf("guest clock: no timestamped reply in %q", out)
	}
	return strconv.ParseFloat(m[1], 64)
}

// NetCounters returns the packet-drop evidence of network namespace netns in the guest
// (lab.NetCounters: xfrm, snmp/netstat, link, iptables drop rule and socket drop counters;
// netns "" is the guest's own namespace, with its softnet backlog drops).
func (l *Lab) NetCounters(ctx context.Context, netns string) (map[string]uint64, error) {
	m, err := l.NetCountersOf(ctx, []string{netns})
	if err != nil {
		return nil, err
	}
	return m[netns], nil
}

// NetCountersOf is NetCounters for several namespaces, read in one guest command.
func (l *Lab) NetCountersOf(ctx context.Context, spaces []string) (map[string]map[string]uint64, error) {
	return lab.NetCounters(ctx, l.VM, spaces)
}

// CounterDelta is lab.CounterDelta.
func CounterDelta(before, after map[string]uint64) map[string]uint64 {
	return lab.CounterDelta(before, after)
}
