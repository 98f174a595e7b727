package lab

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/secureoverlay/secureoverlay/conformance/lab/wire"
)

// LabPing is the guest's echo-stream tool (conformance/lab/guest/labping).
const LabPing = "/sbin/labping"

// DefaultLinger is EchoOptions' default wait for outstanding replies.
const DefaultLinger = 30 * time.Second

// EchoOptions shape an echo stream. The zero value is an open-ended stream of one
// 56-byte request every 50 ms with a 30 s linger.
type EchoOptions struct {
	// Count ends the stream after that many requests (0: when stopped).
	Count int
	// Interval between requests (default 50 ms).
	Interval time.Duration
	// Linger bounds the wait for outstanding replies after the last request (default
	// 30 s: on a loaded 2-core host the emulated CPUs have stalled long enough for
	// replies to arrive 7.8 s after their request, with nothing lost). A stream waits
	// that long only when a reply never comes.
	Linger time.Duration
	// Size is the ICMP payload in bytes (default 56, as ping's): the IP packet is 28
	// bytes larger.
	Size int
	// DF sets Don't Fragment and forbids local fragmentation (ping's -M do): a request
	// over the path MTU fails ("message too long") or comes back as "fragmentation
	// needed, mtu N" (Echoes.Why).
	DF bool
}

func (o EchoOptions) args(report, dst string) string {
	if o.Interval == 0 {
		o.Interval = 50 * time.Millisecond
	}
	if o.Linger == 0 {
		o.Linger = DefaultLinger
	}
	if o.Size == 0 {
		o.Size = 56
	}
	a := fmt.Sprintf("-i %s -W %s -s %d", o.Interval, o.Linger, o.Size)
	if o.Count > 0 {
		a += fmt.Sprintf(" -c %d", o.Count)
	}
	if o.DF {
		a += " -M do"
	}
	if report != "" {
		a += " -o " + ShellQuote(report)
	}
	return a + " " + ShellQuote(dst)
}

// EchoStream is a stream of sequence-numbered ICMP echo requests from a guest network
// namespace to one address, run by labping in the background while a test changes the
// data plane (rotation, cutover, faults).
//
// It ends on acknowledged sequence numbers: Stop stops the *sending*, and labping then
// waits (up to the linger) for the replies of everything it sent. A reply still on its way
// at the stop is a reply; a request is lost only when no reply came at all.
type EchoStream struct {
	vm     *VM
	pid    int
	report string // guest path of labping's JSON report
	log    string
	what   string // "ns → dst", for errors
}

var (
	echoSeqMu sync.Mutex
	echoSeq   int
)

// StartEchoStream starts labping in namespace ns to dst in the background.
func StartEchoStream(ctx context.Context, vm *VM, ns, dst string, o EchoOptions) (*EchoStream, error) {
	echoSeqMu.Lock()
	echoSeq++
	n := echoSeq
	echoSeqMu.Unlock()
	s := &EchoStream{vm: vm, what: ns + " → " + dst,
		report: fmt.Sprintf("/tmp/echo-%d.json", n), log: fmt.Sprintf("/tmp/echo-%d.log", n)}
	cmd := fmt.Sprintf("rm -f %s; exec ip netns exec %s %s %s", ShellQuote(s.report), ShellQuote(ns), LabPing, o.args(s.report, dst))
	pid, err := vm.Background(ctx, cmd, s.log)
	if err != nil {
		return nil, fmt.Errorf("echo stream %s: %w", s.what, err)
	}
	s.pid = pid
	// Wait until labping catches SIGINT (its started line): a stream stopped before that
	// would never end (a background job starts with SIGINT ignored). Then the stream is
	// also really running when the caller goes on.
	wait := fmt.Sprintf(`for i in $(seq 1 1200); do
	grep -q %[1]s %[2]s 2>/dev/null && exit 0
	[ -d /proc/%[3]d ] || { echo "labping ended before it started:" >&2; cat %[2]s >&2; exit 1; }
	sleep 0.05
done
echo "labping did not start within 60s" >&2; exit 1`, ShellQuote("^"+labpingStarted), ShellQuote(s.log), pid)
	if _, _, err := vm.RunInput(ctx, "sh -s", []byte(wait)); err != nil {
		return nil, fmt.Errorf("echo stream %s: %w", s.what, err)
	}
	return s, nil
}

// labpingStarted is labping's StartedLine (package main cannot be imported).
const labpingStarted = "labping: streaming to"

// Stop stops the stream and returns its outcome.
func (s *EchoStream) Stop(ctx context.Context) (Echoes, error) {
	e, err := StopEchoStreams(ctx, []*EchoStream{s})
	if err != nil {
		return Echoes{}, err
	}
	return e[0], nil
}

// Wait waits for a stream with a Count to end by itself and returns its outcome.
func (s *EchoStream) Wait(ctx context.Context) (Echoes, error) {
	e, err := collectEchoes(ctx, s.vm, []*EchoStream{s}, false)
	if err != nil {
		return Echoes{}, err
	}
	return e[0], nil
}

// StopEchoStreams stops every stream at once (they must share one VM), waits until each
// has written its report, and returns them in order.
func StopEchoStreams(ctx context.Context, ss []*EchoStream) ([]Echoes, error) {
	return collectEchoes(ctx, ss[0].vm, ss, true)
}

// collectEchoes optionally signals the streams, then waits in the guest until every one
// has written its report (labping writes it atomically as its last act) and reads them.
func collectEchoes(ctx context.Context, vm *VM, ss []*EchoStream, stop bool) ([]Echoes, error) {
	if len(ss) == 0 {
		return nil, nil
	}
	var b strings.Builder
	if stop {
		b.WriteString("kill -INT")
		for _, s := range ss {
			fmt.Fprintf(&b, " %d", s.pid)
		}
		b.WriteString(" 2>/dev/null\n")
	}
	for _, s := range ss {
		// /proc/PID/stat's state, not kill -0: a zombie is not a running labping.
		fmt.Fprintf(&b, `until [ -s %[1]s ]; do
	st=$(cut -d')' -f2 /proc/%[2]d/stat 2>/dev/null | cut -d' ' -f2)
	if { [ -z "$st" ] || [ "$st" = Z ]; } && [ ! -s %[1]s ]; then echo "labping %[2]d (%[4]s) ended without a report:" >&2; cat %[3]s >&2; exit 1; fi
	sleep 0.05
done
`, ShellQuote(s.report), s.pid, ShellQuote(s.log), strings.ReplaceAll(s.what, "'", ""))
	}
	for _, s := range ss {
		fmt.Fprintf(&b, "cat %s\n", ShellQuote(s.report))
	}
	out, _, err := vm.RunInput(ctx, "sh -s", []byte(b.String()))
	if err != nil {
		return nil, fmt.Errorf("collect %d echo streams: %w", len(ss), err)
	}
	return parseEchoes([]byte(out), len(ss))
}

func parseEchoes(out []byte, n int) ([]Echoes, error) {
	var es []Echoes
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), wire.MaxOutput)
	for sc.Scan() {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 {
			continue
		}
		var e Echoes
		if err := json.Unmarshal(line, &e.PingReport); err != nil {
			return nil, fmt.Errorf("echo stream report %d: %w", len(es)+1, err)
		}
		es = append(es, e)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(es) != n {
		return nil, fmt.Errorf("%d echo stream reports, want %d", len(es), n)
	}
	return es, nil
}

// Echo runs a bounded echo stream (o.Count requests) in the foreground.
func Echo(ctx context.Context, vm *VM, ns, dst string, o EchoOptions) (Echoes, error) {
	if o.Count < 1 {
		return Echoes{}, fmt.Errorf("echo %s → %s: need a count", ns, dst)
	}
	out, _, err := vm.Run(ctx, fmt.Sprintf("ip netns exec %s %s %s", ShellQuote(ns), LabPing, o.args("", dst)))
	if err != nil {
		return Echoes{}, fmt.Errorf("echo %s → %s: %w", ns, dst, err)
	}
	es, err := parseEchoes([]byte(out), 1)
	if err != nil {
		return Echoes{}, fmt.Errorf("echo %s → %s: %w", ns, dst, err)
	}
	return es[0], nil
}

// Echoes is the outcome of an echo stream: labping's report, read by sequence number.
type Echoes struct{ wire.PingReport }

// Requests is the number of requests sent (including failed sends).
func (e Echoes) Requests() int { return len(e.Sent) }

// Answered is the number of requests with a reply.
func (e Echoes) Answered() int {
	n := 0
	for _, r := range e.Reply {
		if r != 0 {
			n++
		}
	}
	return n
}

// Lost lists the sequence numbers of the requests that got no reply (within the linger).
func (e Echoes) Lost() []int {
	var l []int
	for i, r := range e.Reply {
		if r == 0 {
			l = append(l, i+1)
		}
	}
	return l
}

// AnsweredAfterStop counts the replies that arrived after sending stopped: replies a
// stream that stops receiving at its stop (ping on SIGINT) would have counted as lost.
func (e Echoes) AnsweredAfterStop() int {
	n := 0
	for _, r := range e.Reply {
		if r != 0 && r > e.Stopped {
			n++
		}
	}
	return n
}

// MaxRTT is the longest round trip of an answered request.
func (e Echoes) MaxRTT() time.Duration {
	var m int64
	for i, r := range e.Reply {
		if r != 0 {
			m = max(m, r-e.Sent[i])
		}
	}
	return time.Duration(m)
}

// SentAt is the guest time request seq was sent, in Unix seconds.
func (e Echoes) SentAt(seq int) float64 { return float64(e.Sent[seq-1]) / 1e9 }

// Why says what labping knows about a lost request: its local send error or an ICMP
// error that quoted it ("" when neither).
func (e Echoes) Why(seq int) string {
	if s := e.SendErrors[seq]; s != "" {
		return "send failed: " + s
	}
	return e.ICMPErrors[seq]
}
