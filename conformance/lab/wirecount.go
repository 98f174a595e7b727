package lab

import (
	"bufio"
	"context"
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// WireCount counts the IPv4 packets put on a bridge by each of its ports, by protocol,
// in the kernel: on every port, an ingress qdisc with one u32 filter per protocol (IPIP,
// ESP) whose pass action counts what matches. Unlike a packet capture it cannot drop a
// packet, however far the emulated CPU falls behind, so "0 plaintext IPIP on the wire"
// holds even when a capture's own count would not be evidence.
//
// Each frame is counted once, where it enters the bridge (the sender's port). The filters
// stay on the ports; each WireCount counts from its start, so several may overlap. Ports
// added to the bridge after Start are not counted.
type WireCount struct {
	vm     *VM
	ns     string
	bridge string
	ports  []string
	base   map[string]WireCounts
}

// WireCounts are packets per IP protocol.
type WireCounts struct {
	IPIP, ESP uint64
}

// The filters' priorities are the protocol numbers they match.
const (
	prefIPIP = 4
	prefESP  = 50
)

// StartWireCount puts the counters on every port of bridge in namespace ns (if they are
// not there yet) and returns a WireCount that counts from now.
func StartWireCount(ctx context.Context, vm *VM, ns, bridge string) (*WireCount, error) {
	// One filter per protocol, each with its own gact action; "tc filter show … pref N" is
	// empty before the first add.
	script := fmt.Sprintf(`set -eu
ports=$(ip -n %[1]s -o link show master %[2]s | awk -F': ' '{print $2}' | cut -d@ -f1)
[ -n "$ports" ] || { echo "bridge %[2]s has no ports" >&2; exit 1; }
for p in $ports; do
	tc -n %[1]s qdisc show dev "$p" ingress | grep -q ingress || tc -n %[1]s qdisc add dev "$p" ingress
	for proto in %[3]d %[4]d; do
		[ -n "$(tc -n %[1]s filter show dev "$p" ingress pref $proto)" ] ||
			tc -n %[1]s filter add dev "$p" ingress pref $proto protocol ip u32 match ip protocol $proto 0xff action pass
	done
	echo "port $p"
done
`, ShellQuote(ns), ShellQuote(bridge), prefIPIP, prefESP)
	out, _, err := vm.RunInput(ctx, "sh -s", []byte(script))
	if err != nil {
		return nil, fmt.Errorf("wire counters on %s/%s: %w", ns, bridge, err)
	}
	w := &WireCount{vm: vm, ns: ns, bridge: bridge}
	for _, l := range strings.Split(out, "\n") {
		if p, ok := strings.CutPrefix(strings.TrimSpace(l), "port "); ok {
			w.ports = append(w.ports, p)
		}
	}
	if w.base, err = w.read(ctx); err != nil {
		return nil, err
	}
	return w, nil
}

// Read returns, per port, the packets counted since Start.
func (w *WireCount) Read(ctx context.Context) (map[string]WireCounts, error) {
	now, err := w.read(ctx)
	if err != nil {
		return nil, err
	}
	d := map[string]WireCounts{}
	for p, c := range now {
		b := w.base[p]
		d[p] = WireCounts{IPIP: c.IPIP - b.IPIP, ESP: c.ESP - b.ESP}
	}
	return d, nil
}

// Total sums per-port counts.
func Total(per map[string]WireCounts) WireCounts {
	var t WireCounts
	for _, c := range per {
		t.IPIP += c.IPIP
		t.ESP += c.ESP
	}
	return t
}

// FormatWireCounts renders per-port counts in port order, e.g. "ul1 4/10 ul2 0/12"
// (IPIP/ESP).
func FormatWireCounts(per map[string]WireCounts) string {
	ports := make([]string, 0, len(per))
	for p := range per {
		ports = append(ports, p)
	}
	sort.Strings(ports)
	var b strings.Builder
	for i, p := range ports {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%s %d IPIP %d ESP", p, per[p].IPIP, per[p].ESP)
	}
	return b.String()
}

func (w *WireCount) read(ctx context.Context) (map[string]WireCounts, error) {
	var b strings.Builder
	for _, p := range w.ports {
		fmt.Fprintf(&b, "echo PORT %[2]s; tc -n %[1]s -s filter show dev %[2]s ingress\n", ShellQuote(w.ns), ShellQuote(p))
	}
	out, _, err := w.vm.RunInput(ctx, "sh -s", []byte("set -e\n"+b.String()))
	if err != nil {
		return nil, fmt.Errorf("read wire counters on %s/%s: %w", w.ns, w.bridge, err)
	}
	m, err := parseWireCounters(out)
	if err != nil {
		return nil, fmt.Errorf("read wire counters on %s/%s: %w", w.ns, w.bridge, err)
	}
	for _, p := range w.ports {
		if _, ok := m[p]; !ok {
			return nil, fmt.Errorf("read wire counters on %s/%s: no counters on port %s", w.ns, w.bridge, p)
		}
	}
	return m, nil
}

var (
	tcPrefRE = regexp.MustCompile(`^filter .* pref (\d+) u32 `)
	tcSentRE = regexp.MustCompile(`^Sent \d+ bytes (\d+) pkt`)
)

// parseWireCounters reads "PORT name" headers, each followed by `tc -s filter show` of
// that port: the action statistics ("Sent B bytes N pkt") of the filter at pref 4 count
// IPIP, those at pref 50 ESP. A port without both filters' statistics is an error.
func parseWireCounters(out string) (map[string]WireCounts, error) {
	m := map[string]WireCounts{}
	seen := map[string]int{}
	port, pref := "", 0
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if p, ok := strings.CutPrefix(l, "PORT "); ok {
			port, pref = p, 0
			m[port] = WireCounts{}
			continue
		}
		if mm := tcPrefRE.FindStringSubmatch(l); mm != nil {
			pref, _ = strconv.Atoi(mm[1])
			continue
		}
		mm := tcSentRE.FindStringSubmatch(l)
		if mm == nil || port == "" {
			continue
		}
		n, _ := strconv.ParseUint(mm[1], 10, 64)
		c := m[port]
		switch pref {
		case prefIPIP:
			c.IPIP += n
		case prefESP:
			c.ESP += n
		default:
			continue
		}
		m[port] = c
		seen[port] |= 1 << min(pref, 63) & (1<<prefIPIP | 1<<prefESP)
	}
	for p := range m {
		if seen[p] != 1<<prefIPIP|1<<prefESP {
			return nil, fmt.Errorf("port %s: missing the statistics of a counting filter", p)
		}
	}
	return m, nil
}
