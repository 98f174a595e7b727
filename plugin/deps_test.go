package plugin

import (
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// TestNoClientGoInPlugin keeps the plugin binary small and its start fast: nothing from
// Kubernetes may enter its import graph.
func TestNoClientGoInPlugin(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	out, err := exec.Command(goBin, "list", "-deps", "github.com/secureoverlay/secureoverlay/cmd/secureoverlay").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	deps := strings.Fields(string(out))
	if len(deps) < 10 || !strings.Contains(string(out), "github.com/containernetworking/cni/pkg/skel") {
		t.Fatalf("go list -deps output implausible:\n%s", out)
	}
	for _, d := range deps {
		if strings.HasPrefix(d, "k8s.io/") || strings.HasPrefix(d, "sigs.k8s.io/") {
			t.Errorf("plugin imports %s", d)
		}
	}
}
