package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// The test binary doubles as secureoverlayctl when this variable is set.
const envRunMain = "SECUREOVERLAY_TEST_RUN_CTL_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(envRunMain) == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// run executes the test binary as the command named name (a symlink), like a shell
// running secureoverlayctl or kubectl running the plugin kubectl-secureoverlay.
func run(t *testing.T, name string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(t.TempDir(), name)
	if err := os.Symlink(self, link); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(link, args...)
	cmd.Env = append(os.Environ(), envRunMain+"=1", "HOME="+t.TempDir(), "KUBECONFIG=", "KUBERNETES_SERVICE_HOST=")
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err = cmd.Run()
	code = 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return out.String(), errb.String(), code
}

// TestBinaryNamesAndExitCodes: the same binary runs as secureoverlayctl and as the kubectl
// plugin kubectl-secureoverlay (help names "kubectl secureoverlay"), and the process exit
// codes are the documented ones.
func TestBinaryNamesAndExitCodes(t *testing.T) {
	out, _, code := run(t, "secureoverlayctl", "--help")
	if code != 0 || !strings.Contains(out, "secureoverlayctl status --node node-a") || !strings.Contains(out, "Exit codes:") {
		t.Errorf("secureoverlayctl --help (exit %d):\n%s", code, out)
	}
	out, _, code = run(t, "kubectl-secureoverlay", "--help")
	if code != 0 || !strings.Contains(out, "kubectl secureoverlay status --node node-a") || !strings.Contains(out, "kubectl secureoverlay [command]") {
		t.Errorf("kubectl-secureoverlay --help (exit %d):\n%s", code, out)
	}
	_, errOut, code := run(t, "kubectl-secureoverlay", "status", "--bogus")
	if code != 2 || errOut != "error: unknown flag: --bogus (see 'kubectl secureoverlay --help')\n" {
		t.Errorf("unknown flag: exit %d, stderr %q", code, errOut)
	}
	_, errOut, code = run(t, "secureoverlayctl", "status")
	if code != 3 || errOut != "error: no kubeconfig: use --kubeconfig or set KUBECONFIG\n" {
		t.Errorf("no kubeconfig: exit %d, stderr %q", code, errOut)
	}
	out, _, code = run(t, "secureoverlayctl", "mtu", "--external-mtu", "1450")
	if code != 0 || !strings.Contains(out, "enforced budget     1402") {
		t.Errorf("mtu offline without a kubeconfig (exit %d):\n%s", code, out)
	}
}
