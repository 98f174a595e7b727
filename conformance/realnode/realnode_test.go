// Package realnode is the real-node tier: the lab VM runs real kubelets with Debian's
// containerd and runc (hack/tools-node.sh) against the host's control plane, with the
// image `make image` built. TestRealClusterEncrypts (cluster_test.go: two nodes, Calico's
// CNI chain, the manifest applied by kubectl, ≈15 min) tells the operator's whole story
// (docs/lab.md, "The real-node cluster"; `make demo-cluster` prints its report).
package realnode

import (
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/secureoverlay/secureoverlay/conformance/lab"
)

const (
	apiPort = 6443 // in the guest, at lab.GuestForwardAddr
	share   = "/opt/node"
)

// stageFile puts src at dst: a hard link when both are on one file system (the
// images are large), else a copy.
func stageFile(t *testing.T, src, dst string, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		t.Fatal(err)
	}
	if real, err := filepath.EvalSymlinks(src); err == nil {
		src = real // a hard link to a symlink would dangle in the share
	}
	if err := os.Link(src, dst); err == nil {
		return
	}
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// tools are the real-node tier's inputs, all built or unpacked under .cache by `make tools`.
type tools struct {
	image    string   // .cache/image: secureoverlay.tar, pause.tar, image.env
	kubeBin  string   // .cache/kube/bin: kubelet, kubectl, …
	nodeBins []string // containerd, containerd-shim-runc-v2, ctr, runc
}

// findTools returns the tier's inputs; when one is missing it skips t, or fails it under
// SECUREOVERLAY_REQUIRE_ALL.
func findTools(t *testing.T) tools {
	t.Helper()
	cache := cacheDir()
	tl := tools{image: filepath.Join(cache, "image"), kubeBin: filepath.Join(cache, "kube", "bin")}
	for _, b := range []string{"containerd", "containerd-shim-runc-v2", "ctr", "runc"} {
		tl.nodeBins = append(tl.nodeBins, filepath.Join(cache, "node", "bin", b))
	}
	need := append([]string{filepath.Join(tl.image, "secureoverlay.tar"), filepath.Join(tl.image, "pause.tar"),
		filepath.Join(tl.kubeBin, "kubelet"), filepath.Join(tl.kubeBin, "kubectl")}, tl.nodeBins...)
	for _, f := range need {
		if _, err := os.Stat(f); err != nil {
			if lab.RequireAll() {
				t.Fatalf("SECUREOVERLAY_REQUIRE_ALL=1 but %s is missing: run make tools", f)
			}
			t.Skipf("%s missing: run make tools", f)
		}
	}
	// The image holds the binaries under test, and `make build` does not rebuild it: a
	// standalone run on a stale image tests old code (session 19's stories did).
	check := exec.Command(filepath.Join(lab.RepoRoot(), "hack", "tools-image.sh"), "--check")
	check.Env = append(os.Environ(), "SECUREOVERLAY_IMAGE_DIR="+tl.image)
	if out, err := check.CombinedOutput(); err != nil {
		msg := fmt.Sprintf("the image in %s is older than its inputs (hack/tools-image.sh --check: %v %s): run `make image`", tl.image, err, out)
		if lab.RequireAll() {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return tl
}

func cacheDir() string {
	if d := os.Getenv("SECUREOVERLAY_CACHE_DIR"); d != "" {
		return d
	}
	return lab.CacheDir()
}

const containerdConfig = `version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
# containerd's own calls to its shims time out after 2-5 s by default, sized for real
# hardware. The emulated guest runs them 300-1000x slower while a rolling update starts
# and stops containers on both nodes: run 61 and CI (stop 31) saw "get state ... context
# deadline exceeded" and "failed to delete shim: close wait error", after which containerd
# retried the old master pod's sandbox exit for good (KillPodSandbox DeadlineExceeded
# every 2 min, the pod Terminating until the rollout's deadline). A slow node's operator
# raises these; so do we.
[timeouts]
  "io.containerd.timeout.shim.cleanup" = "60s"
  "io.containerd.timeout.shim.load" = "60s"
  "io.containerd.timeout.shim.shutdown" = "30s"
  "io.containerd.timeout.task.state" = "30s"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "%s"
  enable_cdi = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    # overlayfs (the lab image loads the module): the native snapshotter copies the whole
    # image per container and fills the guest's tmpfs.
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "` + share + `/bin/runc"
        SystemdCgroup = false
        # The guest's root is the initramfs: runc cannot pivot_root out of it. (The CRI
        # section's no_pivot_root applies only to the v1 linux runtime, not to runc v2.)
        NoPivotRoot = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "` + lab.GuestCNIDir + `"
    conf_dir = "/etc/cni/net.d"
`

const kubeletConfig = `apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
failSwapOn: false
resolvConf: ""
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {"memory.available": "20Mi"}
serializeImagePulls: false
registerNode: true
nodeStatusReportFrequency: 10s
`

// hold keeps the VM for debugging by hand when SECUREOVERLAY_REALNODE_HOLD names a
// directory: every NAME.sh written there runs in the guest, its output goes to
// NAME.out; a file named "stop" (or 30 minutes) ends it.
func hold(t *testing.T, vm *lab.VM) {
	dir := os.Getenv("SECUREOVERLAY_REALNODE_HOLD")
	if dir == "" {
		return
	}
	t.Logf("holding the VM: write shell scripts to %s/NAME.sh, touch %s/stop to end", dir, dir)
	_ = os.MkdirAll(dir, 0o755)
	end := time.Now().Add(30 * time.Minute)
	for time.Now().Before(end) {
		if _, err := os.Stat(filepath.Join(dir, "stop")); err == nil {
			_ = os.Remove(filepath.Join(dir, "stop"))
			return
		}
		scripts, _ := filepath.Glob(filepath.Join(dir, "*.sh"))
		for _, sc := range scripts {
			b, err := os.ReadFile(sc)
			_ = os.Remove(sc)
			if err != nil {
				continue
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			out, serr, err := vm.Run(ctx, string(b))
			cancel()
			_ = os.WriteFile(strings.TrimSuffix(sc, ".sh")+".out", []byte(fmt.Sprintf("%s\n--- stderr\n%s\n--- err %v\n", out, serr, err)), 0o644)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func waitFor(ctx context.Context, d time.Duration, cond func() (bool, error)) error {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	for {
		ok, err := cond()
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			if err != nil {
				return err
			}
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

func readEnv(t *testing.T, path string) map[string]string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, "="); ok {
			m[k] = v
		}
	}
	return m
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }
