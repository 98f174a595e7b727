package main

import (
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// TestNoCalicoAPIOrClientGoInPlugin: the CNI plugin binary reads no Calico object and no
// Kubernetes API; projectcalico/api (which the agent, the master's tests and the CLI
// use) and client-go stay out of its import graph (plugin/deps_test.go checks k8s.io).
func TestNoCalicoAPIOrClientGoInPlugin(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	out, err := exec.Command(goBin, "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "github.com/containernetworking/cni/pkg/skel") {
		t.Fatalf("go list -deps output implausible:\n%s", out)
	}
	for _, d := range strings.Fields(string(out)) {
		if strings.HasPrefix(d, "github.com/projectcalico/") || strings.HasPrefix(d, "k8s.io/client-go") {
			t.Errorf("the plugin imports %s", d)
		}
	}
}
