package realnode

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"

	"github.com/secureoverlay/secureoverlay/conformance/lab"
)

// netCounters reads, in each node's namespace and each pod's, the kernel's own counters of
// where packets go and where they are dropped: every field of /proc/net/snmp and
// /proc/net/netstat, every link's rx/tx drops, and the packet counts of our iptables DROP
// rules. A step snapshots them before and after; when packets are lost, the difference
// says on which node and in which layer (see lossReport).
func (rc *realCluster) netCounters(ctx context.Context, pods []workload) (map[string]int64, error) {
	var nss []string
	for i := 1; i <= clusterNodes; i++ {
		nss = append(nss, lab.NodeNS(i))
	}
	for _, p := range pods {
		nss = append(nss, p.NetNS)
	}
	var b strings.Builder
	for _, ns := range nss {
		fmt.Fprintf(&b, `ip netns exec %[1]s sh -c '
awk "{ if (\$1==p) { for (i=2;i<=NF;i++) print substr(p,1,length(p)-1) \".\" h[i], \$i; p=\"\" } else { p=\$1; for (i=2;i<=NF;i++) h[i]=\$i } }" /proc/net/snmp /proc/net/netstat
for d in /sys/class/net/*; do echo "link.${d##*/}.rx_dropped $(cat $d/statistics/rx_dropped)"; echo "link.${d##*/}.tx_dropped $(cat $d/statistics/tx_dropped)"; done
iptables-save -c 2>/dev/null | awk "/^\[.*SECUREOVERLAY.*-j DROP/ { split(substr(\$1,2),c,\":\"); print \"iptables.\" \$3 \".\" \$NF \".\" NR, c[1] }"
' | sed 's/^/%[1]s /'
`, lab.ShellQuote(ns))
	}
	out, _, err := rc.vm.RunInput(ctx, "sh -s", []byte(b.String()))
	if err != nil {
		return nil, fmt.Errorf("read kernel counters: %w", err)
	}
	m := map[string]int64{}
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) != 3 {
			continue
		}
		v, err := strconv.ParseInt(f[2], 10, 64)
		if err != nil {
			continue
		}
		m[f[0]+" "+f[1]] = v
	}
	if len(m) == 0 {
		return nil, fmt.Errorf("read kernel counters: nothing parsed from %q", out)
	}
	return m, nil
}

// counterDelta lists the counters that changed between two snapshots, one "ns key +n" per
// line, sorted.
func counterDelta(before, after map[string]int64) string {
	var lines []string
	for k, v := range after {
		if d := v - before[k]; d != 0 {
			lines = append(lines, fmt.Sprintf("%s %+d", k, d))
		}
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}
