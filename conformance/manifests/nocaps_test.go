package manifests

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

const calicoConflist = `{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {"type": "calico", "datastore_type": "kubernetes", "mtu": 0, "ipam": {"type": "calico-ipam"}},
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}}
  ]
}
`

// TestInstallerNeedsNoCapabilities backs the manifest's installer securityContext
// (root, drop ALL): the real secureoverlay-install, as root with every capability
// dropped (bounding, permitted, effective, inheritable, ambient; no_new_privs),
// installs into and uninstalls from root-owned CNI directories the way the
// init container and sidecar do.
func TestInstallerNeedsNoCapabilities(t *testing.T) {
	if os.Geteuid() != 0 {
		requireOrSkip(t, "needs root (the installer runs as root in the pod)")
	}
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		requireOrSkip(t, "setpriv (util-linux) not installed")
	}
	inst, plugin := binPath(t, "secureoverlay-install"), binPath(t, "secureoverlay")
	host := t.TempDir()
	binDir, confDir := filepath.Join(host, "opt/cni/bin"), filepath.Join(host, "etc/cni/net.d")
	for _, d := range []string{binDir, confDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	conf := filepath.Join(confDir, "10-calico.conflist")
	if err := os.WriteFile(conf, []byte(calicoConflist), 0o644); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) string {
		t.Helper()
		cmd := exec.Command(setpriv, append([]string{"--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs", "--", inst,
			"--cni-bin-dir=" + binDir, "--cni-conf-dir=" + confDir, "--plugin-binary=" + plugin,
			"--external-mtu=1500", "--uninstall-on-delete=false"}, args...)...)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("secureoverlay-install %v without capabilities: %v\n%s", args, err, out)
		}
		return string(out)
	}
	// The harness drops what it says.
	if out, err := exec.Command(setpriv, "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs", "--", "grep", "CapEff", "/proc/self/status").CombinedOutput(); err != nil || !strings.Contains(string(out), "0000000000000000") {
		t.Fatalf("setpriv did not drop the capabilities: %v %s", err, out)
	}
	run("--once")
	got, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(got), `"type": "secureoverlay"`) {
		t.Fatalf("entry not inserted without capabilities:\n%s", got)
	}
	if st, err := os.Stat(filepath.Join(binDir, "secureoverlay")); err != nil || st.Mode().Perm() != 0o755 {
		t.Fatalf("plugin binary not installed: %v", err)
	}
	run("--uninstall")
	got, err = os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, []byte(calicoConflist)) {
		t.Fatalf("uninstall without capabilities did not restore the file:\n%s", got)
	}
	if _, err := os.Stat(filepath.Join(binDir, "secureoverlay")); !os.IsNotExist(err) {
		t.Fatalf("plugin binary still there: %v", err)
	}
}
