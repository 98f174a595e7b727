// Package bench holds what the benchmark measurements in the test tree share: the gate
// that keeps them out of a plain `go test` (and so out of `make test`) and the line format
// bench/cmd/benchreport collects into bench/RESULTS.md. docs/performance.md lists them.
package bench

import (
	"fmt"
	"os"
	"testing"
)

// Gate skips t unless SECUREOVERLAY_BENCH=1 (hack/bench.sh sets it), and, when root is
// set, unless the test runs as root (network namespaces).
func Gate(t testing.TB, root bool) {
	t.Helper()
	if os.Getenv("SECUREOVERLAY_BENCH") != "1" {
		t.Skip("benchmark measurement; set SECUREOVERLAY_BENCH=1 (hack/bench.sh)")
	}
	if root && os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
}

// Report prints one figure as "BENCH name value unit" for bench/cmd/benchreport.
func Report(name string, value float64, unit string) {
	fmt.Printf("BENCH %s %g %s\n", name, value, unit)
}
