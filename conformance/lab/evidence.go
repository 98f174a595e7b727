package lab

import (
	"bufio"
	"context"
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// Capture is a tcpdump running in a guest namespace, writing a pcap file in
// the guest's /tmp (a tmpfs). Tests start one on the underlay bridge before
// sending traffic, stop it, then count packets by filter: this is the evidence
// that nothing crossed in the clear, as far as the capture saw everything —
// Stop returns the packets the kernel dropped before tcpdump read them, and
// counts from a capture that dropped are not evidence (WireCount's are).
//
// To keep up on a starved emulated CPU, tcpdump keeps only the first
// CaptureSnaplen bytes of each frame (every header a filter or test reads is
// within them; "greater N" and ip[2:2] still see the real length) in a
// CaptureBufferKiB ring.
type Capture struct {
	vm    *VM
	ns    string
	iface string
	file  string
	pid   int
}

// Capture settings: a frame's Ethernet, outer IPv4, ESP header and IV (50 bytes), or
// Ethernet, outer and inner IPv4 and ICMP header (62 bytes), fit in the snap length; the
// ring holds about 80,000 frames of that size (tcpdump's default 2 MiB ring with the
// interface MTU as frame size holds about 1,300: 11 s of the scenarios' traffic).
const (
	CaptureSnaplen   = 96
	CaptureBufferKiB = 16384
)

// ShellQuote quotes s for the guest's /bin/sh.
func ShellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'"'"'`) + "'"
}

// StartCapture starts tcpdump on iface in namespace ns (the guest's root
// namespace when ns is empty) and returns once it is listening.
func StartCapture(ctx context.Context, vm *VM, ns, iface string) (*Capture, error) {
	prefix := ""
	if ns != "" {
		prefix = "ip netns exec " + ShellQuote(ns) + " "
	}
	script := fmt.Sprintf(`set -eu
f=$(mktemp /tmp/capture-XXXXXX)
%stcpdump -Z root -U --immediate-mode -n -s %d -B %d -i %s -w "$f.pcap" >"$f.log" 2>&1 </dev/null &
pid=$!
i=0
until grep -q 'listening on' "$f.log"; do
	if ! kill -0 $pid 2>/dev/null || [ $i -ge 200 ]; then cat "$f.log" >&2; kill $pid 2>/dev/null; exit 1; fi
	i=$((i+1)); sleep 0.05
done
echo "$pid $f"
`, prefix, CaptureSnaplen, CaptureBufferKiB, ShellQuote(iface))
	out, _, err := vm.RunInput(ctx, "sh -s", []byte(script))
	if err != nil {
		return nil, fmt.Errorf("start capture on %s/%s: %w", ns, iface, err)
	}
	c := &Capture{vm: vm, ns: ns, iface: iface}
	if _, err := fmt.Sscanf(strings.TrimSpace(out), "%d %s", &c.pid, &c.file); err != nil {
		return nil, fmt.Errorf("start capture on %s/%s: unexpected answer %q: %w", ns, iface, out, err)
	}
	return c, nil
}

// Stop ends the capture (SIGINT, so tcpdump flushes) and returns the number of
// packets the kernel dropped before tcpdump saw them, which must be 0 for the
// counts to be evidence.
func (c *Capture) Stop(ctx context.Context) (dropped int, err error) {
	script := fmt.Sprintf(`sleep 0.2; kill -INT %d 2>/dev/null
i=0
while kill -0 %d 2>/dev/null; do
	[ $i -ge 100 ] && { kill -KILL %d; echo "tcpdump did not stop" >&2; exit 1; }
	i=$((i+1)); sleep 0.05
done
cat %s.log`, c.pid, c.pid, c.pid, c.file)
	out, _, err := c.vm.Run(ctx, script)
	if err != nil {
		return 0, fmt.Errorf("stop capture on %s/%s: %w", c.ns, c.iface, err)
	}
	m := regexp.MustCompile(`(?m)^(\d+) packets? dropped by kernel`).FindStringSubmatch(out)
	if m == nil {
		return 0, fmt.Errorf("stop capture on %s/%s: no drop statistics in tcpdump's output", c.ns, c.iface)
	}
	return strconv.Atoi(m[1])
}

// Packets returns tcpdump's one-line summaries of the captured packets that
// match the pcap filter expression (all packets when filter is empty).
func (c *Capture) Packets(ctx context.Context, filter string) ([]string, error) {
	cmd := fmt.Sprintf("tcpdump -n -r %s.pcap", c.file)
	if filter != "" {
		cmd += " -- " + ShellQuote(filter)
	}
	out, _, err := c.vm.Run(ctx, fmt.Sprintf("%s 2>%s.err || { cat %s.err >&2; exit 1; }", cmd, c.file, c.file))
	if err != nil {
		return nil, fmt.Errorf("read capture %s/%s with filter %q: %w", c.ns, c.iface, filter, err)
	}
	var lines []string
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		if l := strings.TrimSpace(sc.Text()); l != "" {
			lines = append(lines, l)
		}
	}
	return lines, nil
}

// Count is len(Packets(ctx, filter)).
func (c *Capture) Count(ctx context.Context, filter string) (int, error) {
	p, err := c.Packets(ctx, filter)
	return len(p), err
}

// SA is one xfrm state as `ip -s xfrm state` reports it, without key material.
type SA struct {
	Src, Dst string
	Proto    string // "esp"
	SPI      uint32
	ReqID    uint32
	Mode     string // "transport" or "tunnel"
	ESN      bool
	// ReplayWindow is the ESN replay window (replay_window in the ESN context),
	// or the legacy replay-window otherwise.
	ReplayWindow int
	// Seq and OSeq are the highest inbound and the last outbound sequence
	// numbers (64-bit with ESN).
	Seq, OSeq uint64
	Bytes     uint64
	Packets   uint64
	// ReplayDrops, IntegrityFailed: the stats line's "replay" and "failed".
	ReplayDrops, IntegrityFailed uint64
}

var (
	saHeadRE   = regexp.MustCompile(`^src (\S+) dst (\S+)$`)
	saProtoRE  = regexp.MustCompile(`^proto (\S+) spi 0x([0-9a-f]+)\(\d+\) reqid (\d+)\(0x[0-9a-f]+\) mode (\S+)$`)
	saReplayRE = regexp.MustCompile(`^replay-window (\d+) seq 0x[0-9a-f]+ flag .*\besn\b`)
	saLegacyRE = regexp.MustCompile(`^replay-window (\d+) seq 0x[0-9a-f]+`)
	saESNSeqRE = regexp.MustCompile(`^seq-hi 0x([0-9a-f]+), seq 0x([0-9a-f]+), oseq-hi 0x([0-9a-f]+), oseq 0x([0-9a-f]+)$`)
	saESNWinRE = regexp.MustCompile(`^replay_window (\d+), bitmap-length \d+$`)
	saLifeRE   = regexp.MustCompile(`^(\d+)\(bytes\), (\d+)\(packets\)$`)
	saStatsRE  = regexp.MustCompile(`^replay-window \d+ replay (\d+) failed (\d+)$`)
	keyLineRE  = regexp.MustCompile(`^(aead|enc|auth|auth-trunc|comp) `)
)

// ParseXfrmStates parses `ip -s xfrm state` output (iproute2 6.x). Key lines
// are skipped, and errors quote line numbers, never text.
func ParseXfrmStates(out string) ([]SA, error) {
	var sas []SA
	var cur *SA
	next := ""
	sc := bufio.NewScanner(strings.NewReader(out))
	n := 0
	for sc.Scan() {
		n++
		l := strings.TrimSpace(sc.Text())
		if l == "" || keyLineRE.MatchString(l) {
			continue
		}
		if m := saHeadRE.FindStringSubmatch(l); m != nil {
			sas = append(sas, SA{Src: m[1], Dst: m[2]})
			cur = &sas[len(sas)-1]
			next = ""
			continue
		}
		if cur == nil {
			return nil, fmt.Errorf("parse xfrm states: line %d precedes the first state", n)
		}
		switch next {
		case "lifetime":
			if m := saLifeRE.FindStringSubmatch(l); m != nil {
				cur.Bytes, _ = strconv.ParseUint(m[1], 10, 64)
				cur.Packets, _ = strconv.ParseUint(m[2], 10, 64)
			} else {
				return nil, fmt.Errorf("parse xfrm states: line %d: no byte/packet counters after 'lifetime current'", n)
			}
			next = ""
			continue
		case "stats":
			if m := saStatsRE.FindStringSubmatch(l); m != nil {
				cur.ReplayDrops, _ = strconv.ParseUint(m[1], 10, 64)
				cur.IntegrityFailed, _ = strconv.ParseUint(m[2], 10, 64)
			}
			next = ""
			continue
		}
		switch {
		case l == "lifetime current:":
			next = "lifetime"
		case l == "stats:":
			next = "stats"
		case saProtoRE.MatchString(l):
			m := saProtoRE.FindStringSubmatch(l)
			spi, _ := strconv.ParseUint(m[2], 16, 32)
			req, _ := strconv.ParseUint(m[3], 10, 32)
			cur.Proto, cur.SPI, cur.ReqID, cur.Mode = m[1], uint32(spi), uint32(req), m[4]
		case saReplayRE.MatchString(l):
			cur.ESN = true
		case saLegacyRE.MatchString(l):
			if !cur.ESN {
				cur.ReplayWindow, _ = strconv.Atoi(saLegacyRE.FindStringSubmatch(l)[1])
			}
		case saESNSeqRE.MatchString(l):
			m := saESNSeqRE.FindStringSubmatch(l)
			hi, _ := strconv.ParseUint(m[1], 16, 32)
			lo, _ := strconv.ParseUint(m[2], 16, 32)
			ohi, _ := strconv.ParseUint(m[3], 16, 32)
			olo, _ := strconv.ParseUint(m[4], 16, 32)
			cur.Seq, cur.OSeq = hi<<32|lo, ohi<<32|olo
		case saESNWinRE.MatchString(l):
			cur.ReplayWindow, _ = strconv.Atoi(saESNWinRE.FindStringSubmatch(l)[1])
		}
	}
	for i, sa := range sas {
		if sa.Proto == "" {
			return nil, fmt.Errorf("parse xfrm states: state %d (%s -> %s) has no proto/spi line", i, sa.Src, sa.Dst)
		}
	}
	return sas, nil
}

// XfrmStates returns the xfrm states of namespace ns (root when empty). The
// key lines are removed inside the guest, so key bytes never reach the host.
func XfrmStates(ctx context.Context, vm *VM, ns string) ([]SA, error) {
	cmd := "ip -s xfrm state"
	if ns != "" {
		cmd = "ip -n " + ShellQuote(ns) + " -s xfrm state"
	}
	// A private temp file per call (concurrent calls must not share one); the listing
	// goes to a file rather than a pipe so ip's own failure is not masked.
	out, _, err := vm.Run(ctx, `f=$(mktemp) || exit 1; `+cmd+` >"$f" && grep -v -E '^[[:space:]]*(aead|enc|auth|auth-trunc|comp) ' "$f"; rc=$?; rm -f "$f"; [ $rc -le 1 ]`)
	if err != nil {
		return nil, fmt.Errorf("list xfrm states in %q: %w", ns, err)
	}
	sas, err := ParseXfrmStates(out)
	if err != nil {
		return nil, fmt.Errorf("list xfrm states in %q: %w", ns, err)
	}
	return sas, nil
}
