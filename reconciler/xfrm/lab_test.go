//go:build linux

package xfrm

import (
	"strings"
	"testing"

	"github.com/secureoverlay/secureoverlay/conformance/lab"
)

// TestLabDataPath boots the VM lab (Debian's kernel with esp4, ipip and gcm) and runs this
// package's kernel tests inside it with SECUREOVERLAY_REQUIRE_ESP=1, so SAs and the ESP data
// path are proven on a real kernel even where the host's kernel lacks them. The test binary
// itself is shared into the guest read-only over 9p.
func TestLabDataPath(t *testing.T) {
	tests := []string{"TestNetlinkStatesRealKernel", "TestNetlinkPoliciesRealKernel", "TestDataPathESPOverIPIP", "TestDataPathCrossSubnetTunnel",
		"TestCalicoEBPFForwardingBypassesXfrm", "TestCalicoEBPFTunnelledRouteStaysESP", "TestPerCPUStatesRealKernel",
		"TestPerCPUStatesSelectGeneration"}
	lab.RunInGuest(t, lab.GuestTest{Run: "^(" + strings.Join(tests, "|") + ")$", Want: tests,
		Env: []string{"SECUREOVERLAY_REQUIRE_ESP=1", "SECUREOVERLAY_REQUIRE_ALL=1"}})
}
