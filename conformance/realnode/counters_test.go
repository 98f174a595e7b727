package realnode

import (
	"context"
	"fmt"
	"sort"
	"strings"

	"github.com/secureoverlay/secureoverlay/conformance/lab"
)

// netCounters reads the kernel's drop evidence (lab.NetCounters: xfrm, snmp/netstat, link
// drops, our iptables DROP rules, socket drops) in each node's namespace, each pod's and
// the guest's own (softnet backlog drops: the emulated CPUs falling behind). A step reads
// them before and after; when it fails, the difference says on which node and in which
// layer packets went (counterDelta).
func (rc *realCluster) netCounters(ctx context.Context, pods []workload) (map[string]map[string]uint64, error) {
	spaces := []string{"", lab.UnderlayNS} // the underlay: its bridge ports' drops
	for i := 1; i <= clusterNodes; i++ {
		spaces = append(spaces, lab.NodeNS(i))
	}
	for _, p := range pods {
		spaces = append(spaces, p.NetNS)
	}
	return lab.NetCounters(ctx, rc.vm, spaces)
}

// counterDelta lists the drop, error and discard counters that grew between two snapshots,
// one "namespace counter +n" per line, sorted ("guest" is the guest's own namespace).
func counterDelta(before, after map[string]map[string]uint64) string {
	var lines []string
	for ns, a := range after {
		name := ns
		if name == "" {
			name = "guest"
		}
		for k, v := range lab.CounterDelta(before[ns], a) {
			lines = append(lines, fmt.Sprintf("%s %s +%d", name, k, v))
		}
	}
	if len(lines) == 0 {
		return "(none grew)"
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}
