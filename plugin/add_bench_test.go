//go:build linux

package plugin

import (
	"context"
	"fmt"
	"github.com/secureoverlay/secureoverlay/bench"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/plugins/pkg/testutils"
)

// TestBenchChainAdd measures CNI ADD through libcni for three chains on the same node
// namespace: ptp+host-local (the baseline, standing in for calico), the same plus
// secureoverlay (MTU detected from the uplink, enforce), and the same plus Debian's tuning
// plugin (another small chained plugin, setting the MTU ptp already set). ADDs alternate
// between the chains so all three see the same machine load; each ADD gets a fresh pod
// namespace (created outside the timing) and is deleted after. Runs only with
// SECUREOVERLAY_BENCH=1 (hack/bench.sh); prints "BENCH name value unit" lines.
func TestBenchChainAdd(t *testing.T) {
	bench.Gate(t, false)
	const rounds, warmup = 200, 5
	e := newChainEnv(t, 1500)
	ctx := context.Background()
	tail := map[string]string{
		"ptp":           ``,
		"secureoverlay": fmt.Sprintf(`, {"type": "secureoverlay", "logFile": %q}`, filepath.Join(e.dataDir, "secureoverlay.log")),
		"tuning":        `, {"type": "tuning", "mtu": 1400}`,
	}
	chains := []string{"ptp", "secureoverlay", "tuning"}
	lists := map[string]*libcni.NetworkConfigList{}
	for _, c := range chains {
		s := fmt.Sprintf(`{"cniVersion": "1.0.0", "name": "bench-%s", "plugins": [
  {"type": "ptp", "mtu": 1400, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "198.19.8.0/24"}]], "dataDir": %q}}%s]}`,
			c, filepath.Join(e.dataDir, "ipam-"+c), tail[c])
		l, err := libcni.ConfListFromBytes([]byte(s))
		if err != nil {
			t.Fatalf("parse conflist %s: %v\n%s", c, err, s)
		}
		lists[c] = l
	}
	samples := map[string][]time.Duration{}
	for i := range rounds + warmup {
		for j := range chains {
			c := chains[(i+j)%len(chains)] // rotate the order every round
			pod, err := testutils.NewNS()
			if err != nil {
				t.Fatal(err)
			}
			rt := &libcni.RuntimeConf{ContainerID: fmt.Sprintf("bench-%s-%d", c, i), NetNS: pod.Path(), IfName: "eth0"}
			var d time.Duration
			err = e.run(t, func() error {
				t0 := time.Now()
				_, err := e.cni.AddNetworkList(ctx, lists[c], rt)
				d = time.Since(t0)
				return err
			})
			if err != nil {
				t.Fatalf("ADD %s: %v", c, err)
			}
			if err := e.run(t, func() error { return e.cni.DelNetworkList(ctx, lists[c], rt) }); err != nil {
				t.Fatalf("DEL %s: %v", c, err)
			}
			_ = pod.Close()
			_ = testutils.UnmountNS(pod)
			if i >= warmup {
				samples[c] = append(samples[c], d)
			}
		}
	}
	q := func(c string, f float64) time.Duration {
		s := slices.Clone(samples[c])
		slices.Sort(s)
		return s[min(len(s)-1, int(f*float64(len(s))))]
	}
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	fmt.Printf("BENCH cni.samples %d count\n", rounds)
	for _, c := range chains {
		fmt.Printf("BENCH cni.%s.p50 %g ms\nBENCH cni.%s.p99 %g ms\n", c, ms(q(c, 0.5)), c, ms(q(c, 0.99)))
	}
	for _, c := range chains[1:] {
		fmt.Printf("BENCH cni.%s.ratio_p50 %g x\nBENCH cni.%s.ratio_p99 %g x\n", c,
			float64(q(c, 0.5))/float64(q("ptp", 0.5)), c, float64(q(c, 0.99))/float64(q("ptp", 0.99)))
	}
}
