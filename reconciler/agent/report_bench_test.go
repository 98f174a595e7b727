package agent

import (
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/bench"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
)

// annotationLimit is the API server's bound on all of an object's annotations together.
const annotationLimit = 256 * 1024

// TestBenchReportSize: the bytes of one node's report annotation in the steady state
// (enforce, every peer inbound and encrypting, as BuildReport fills it) for 100, 1,000
// and 5,000 nodes, with short names (node-00001) and with EKS-style names
// (ip-10-0-12-34.eu-west-1.compute.internal). Each agent writes this on every change
// of its claims, so a change that touches every node (a join, a rotation step) writes
// nodes × this many bytes to etcd. Counts, independent of the machine. Runs only with
// SECUREOVERLAY_BENCH=1.
func TestBenchReportSize(t *testing.T) {
	bench.Gate(t, false)
	styles := map[string]func(i int) string{
		"short": func(i int) string { return fmt.Sprintf("node-%05d", i) },
		"eks":   func(i int) string { return fmt.Sprintf("ip-10-0-%d-%d.eu-west-1.compute.internal", i/250, i%250+1) },
	}
	for style, name := range styles {
		for _, n := range []int{100, 1000, 5000} {
			r := watch.Report{NodeReport: api.NodeReport{Mode: api.ModeEnforce, Generations: []uint32{7, 8},
				Incarnation: "0b5c6b2e-61d4-4a8e-9d64-3c1f0e2b7a91", UID: "4f1d2c3b-5a6e-4b7c-8d9e-0f1a2b3c4d5e",
				Epoch: "9c2f4e6a8b1d3f5e", BudgetMTU: 1402, ExternalMTU: 1450, MaxSeqFraction: 0.012, SeqGeneration: 8,
				PeersEncrypted: n - 1, PeersExpected: n - 1, LastSync: time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)},
				InboundFrom: map[string]string{}, EncryptingTo: map[string]string{}}
			for i := 1; i < n; i++ {
				tag := watch.IncarnationTag(watch.KeyIncarnation(fmt.Sprintf("boot-%d", i), fmt.Sprintf("uid-%d", i), fmt.Sprintf("epoch-%d", i)))
				r.InboundFrom[name(i)], r.EncryptingTo[name(i)] = tag, tag
			}
			v, err := json.Marshal(r) // the annotation's value, as patchReport encodes it
			if err != nil {
				t.Fatal(err)
			}
			size := len(api.ReportAnnotation) + len(v)
			fmt.Printf("BENCH report.%s.%d.bytes %d count\n", style, n, size)
			fmt.Printf("BENCH report.%s.%d.limit_fraction %g x\n", style, n, float64(size)/annotationLimit)
			fmt.Printf("BENCH report.%s.%d.cluster_bytes_per_change %d count\n", style, n, size*n)
			t.Logf("%s names, %d nodes: report %d bytes (%.0f%% of the 256 KiB annotation limit)", style, n, size, 100*float64(size)/annotationLimit)
		}
	}
}
