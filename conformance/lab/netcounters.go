package lab

import (
	"context"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// NetCounters returns the packet-drop evidence of each network namespace in spaces in vm's
// guest, read in one guest command, by namespace:
// /proc/net/xfrm_stat (as "Xfrm.Name"), /proc/net/snmp and /proc/net/netstat (as
// "Ip.InDiscards", "TcpExt.…"), every interface's receive and transmit errors and drops
// from /proc/net/dev (as "Dev.eth0.tx_drop": a veth counts there what its peer's full
// backlog refused), the packet counters of every iptables rule that drops or rejects
// (as "Ipt.raw OUTPUT -p 4 … -j DROP"; a rewritten chain restarts its counters), and the
// drops of its open raw and ping sockets (as "Sock.raw.drops", "Sock.icmp.drops",
// readable only while they are open). netns "" is the guest's own namespace, with the
// per-CPU input backlog drops and time squeezes of /proc/net/softnet_stat
// ("Softnet.dropped", "Softnet.time_squeeze": packets lost because the emulated CPUs
// did not keep up).

func NetCounters(ctx context.Context, vm *VM, spaces []string) (map[string]map[string]uint64, error) {
	const script = "echo XFRM; cat /proc/net/xfrm_stat; echo TABLES; cat /proc/net/snmp /proc/net/netstat; echo DEV; cat /proc/net/dev; " +
		"echo IPT; iptables-save -c 2>/dev/null; echo RAW; cat /proc/net/raw; echo ICMP; cat /proc/net/icmp; " +
		"echo CONNTRACK; cat /proc/net/stat/nf_conntrack 2>/dev/null || true"
	var b strings.Builder
	b.WriteString("set -e\n")
	for i, ns := range spaces {
		fmt.Fprintf(&b, "echo '%s %d'\n", nsMarker, i)
		if ns == "" { // the guest's own namespace, and its per-CPU backlog drops
			// and the neighbour tables' (global: their file is only in this one)
			fmt.Fprintf(&b, "%s; echo SOFTNET; cat /proc/net/softnet_stat; echo NEIGH; cat /proc/net/stat/arp_cache\n", script)
		} else {
			fmt.Fprintf(&b, "ip netns exec %s sh -c '%s'\n", ShellQuote(ns), script)
		}
	}
	out, _, err := vm.RunInput(ctx, "sh -s", []byte(b.String()))
	if err != nil {
		return nil, fmt.Errorf("read counters of %q: %w", spaces, err)
	}
	m := map[string]map[string]uint64{}
	for _, part := range strings.Split(out, nsMarker+" ")[1:] {
		idx, rest, _ := strings.Cut(part, "\n")
		i, err := strconv.Atoi(strings.TrimSpace(idx))
		if err != nil || i < 0 || i >= len(spaces) {
			return nil, fmt.Errorf("read counters: bad namespace marker %q", idx)
		}
		m[spaces[i]] = parseNetCounters(rest)
	}
	if len(m) != len(spaces) {
		return nil, fmt.Errorf("read counters: %d of %d namespaces answered", len(m), len(spaces))
	}
	return m, nil
}

// nsMarker starts each namespace's part of NetCountersOf's output.
const nsMarker = "@@NETNS"

var (
	iptRuleRE = regexp.MustCompile(`^\[(\d+):\d+\] -A (\S+) (.*-j (?:DROP|REJECT).*)$`)
	// /proc/net/dev: "  eth0: rx_bytes rx_packets rx_errs rx_drop … tx_bytes tx_packets tx_errs tx_drop …"
	devFields = map[int]string{2: "rx_errs", 3: "rx_drop", 10: "tx_errs", 11: "tx_drop"}
)

func parseNetCounters(out string) map[string]uint64 {
	m := map[string]uint64{}
	section, table := "", ""
	var header []string
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) == 1 && slices.Contains([]string{"XFRM", "TABLES", "DEV", "IPT", "RAW", "ICMP", "SOFTNET", "CONNTRACK", "NEIGH"}, f[0]) {
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
		case "DEV":
			name, rest, ok := strings.Cut(line, ":")
			if !ok || strings.Contains(rest, "|") {
				continue // the two header lines
			}
			vals := strings.Fields(rest)
			for i, what := range devFields {
				if i < len(vals) {
					if v, err := strconv.ParseUint(vals[i], 10, 64); err == nil {
						m["Dev."+strings.TrimSpace(name)+"."+what] = v
					}
				}
			}
		case "IPT":
			if strings.HasPrefix(line, "*") {
				table = strings.TrimPrefix(line, "*")
				continue
			}
			if mm := iptRuleRE.FindStringSubmatch(line); mm != nil {
				if v, err := strconv.ParseUint(mm[1], 10, 64); err == nil {
					m["Ipt."+table+" "+mm[2]+" "+mm[3]] += v
				}
			}
		case "SOFTNET": // one line per CPU, hex: processed, dropped, time_squeeze, …
			if len(f) >= 3 {
				d, err1 := strconv.ParseUint(f[1], 16, 64)
				sq, err2 := strconv.ParseUint(f[2], 16, 64)
				if err1 == nil && err2 == nil {
					m["Softnet.dropped"] += d
					m["Softnet.time_squeeze"] += sq
				}
			}
		case "CONNTRACK", "NEIGH": // a header line, then one line per CPU, hex: summed per column
			if header == nil {
				header = f
				continue
			}
			prefix := map[string]string{"CONNTRACK": "Conntrack.", "NEIGH": "Neigh."}[section]
			for i := 0; i < len(f) && i < len(header); i++ {
				if header[i] == "entries" {
					continue // a gauge (and the same on every line), not a count
				}
				if v, err := strconv.ParseUint(f[i], 16, 64); err == nil {
					m[prefix+header[i]] += v
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
// for the names that count drops, errors or discards (not the totals of traffic). TCP's
// counters are left out: TCP carries only the control plane (agents to the API server),
// whose retransmissions say nothing about the data plane's echoes.
func CounterDelta(before, after map[string]uint64) map[string]uint64 {
	d := map[string]uint64{}
	for k, v := range after {
		lk := strings.ToLower(k)
		if strings.HasPrefix(k, "Tcp") {
			continue
		}
		if !strings.HasPrefix(k, "Xfrm.") && !strings.HasPrefix(k, "Softnet.") && !strings.HasPrefix(k, "Ipt.") &&
			!strings.Contains(lk, "drop") && !strings.Contains(lk, "discard") &&
			!strings.Contains(lk, "err") && !strings.Contains(lk, "noroute") && !strings.Contains(lk, "overflow") &&
			!strings.Contains(lk, "prune") && !strings.Contains(lk, "fail") && !strings.Contains(lk, "invalid") && !strings.Contains(lk, "full") {
			continue
		}
		if v > before[k] {
			d[k] = v - before[k]
		}
	}
	return d
}
