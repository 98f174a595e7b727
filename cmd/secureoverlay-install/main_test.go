package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	authorizationv1 "k8s.io/api/authorization/v1"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/install"
	"github.com/secureoverlay/secureoverlay/internal/testutil"
)

// These tests run the real secureoverlay-install binary: from $SECUREOVERLAY_BIN_DIR when
// `make` built it there, else built into a temp dir.

const calicoList = `{
  "name": "k8s-pod-network",
  "cniVersion": "1.0.0",
  "plugins": [
    {
      "type": "calico",
      "datastore_type": "kubernetes",
      "ipam": {"type": "calico-ipam"}
    },
    {
      "type": "portmap",
      "capabilities": {"portMappings": true}
    }
  ]
}
`

var (
	buildOnce sync.Once
	built     string
	buildErr  error
	buildDir  string
)

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

func binary(t *testing.T) string {
	t.Helper()
	if d := os.Getenv("SECUREOVERLAY_BIN_DIR"); d != "" {
		p := filepath.Join(d, "secureoverlay-install")
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	buildOnce.Do(func() {
		if buildDir, buildErr = os.MkdirTemp("", "secureoverlay-install-test-"); buildErr != nil {
			return
		}
		built = filepath.Join(buildDir, "secureoverlay-install")
		cmd := exec.Command("go", "build", "-o", built, ".")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("build: %w\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return built
}

type node struct {
	conf, bin, source string
	plugin            []byte
}

func newNode(t *testing.T) *node {
	t.Helper()
	root := t.TempDir()
	n := &node{conf: filepath.Join(root, "net.d"), bin: filepath.Join(root, "bin"), source: filepath.Join(root, "secureoverlay")}
	n.plugin = []byte("#!/bin/sh\necho plugin\n")
	for _, d := range []string{n.conf, n.bin} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(n.source, n.plugin, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(n.list(), []byte(calicoList), 0o644); err != nil {
		t.Fatal(err)
	}
	return n
}

func (n *node) list() string { return filepath.Join(n.conf, "10-calico.conflist") }

func (n *node) args(extra ...string) []string {
	return append([]string{"--cni-conf-dir", n.conf, "--cni-bin-dir", n.bin, "--plugin-binary", n.source,
		"--external-mtu", "1500", "--mode", "clamp", "--icv-bytes", "16"}, extra...)
}

var wantEntry = install.Entry{Mode: "clamp", ICVBytes: 16, ExternalMTU: 1500}

func (n *node) installed() bool {
	b, err := os.ReadFile(n.list())
	if err != nil {
		return false
	}
	ok, _ := install.InEntry(b, wantEntry)
	bin, err := os.ReadFile(filepath.Join(n.bin, install.PluginType))
	return ok && err == nil && bytes.Equal(bin, n.plugin)
}

func (n *node) pristine() bool {
	b, err := os.ReadFile(n.list())
	_, binErr := os.Stat(filepath.Join(n.bin, install.PluginType))
	return err == nil && string(b) == calicoList && os.IsNotExist(binErr)
}

func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > timeout {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return time.Since(start)
}

func TestOnceAndUninstall(t *testing.T) {
	bin, n := binary(t), newNode(t)
	if out, err := exec.Command(bin, n.args("--once")...).CombinedOutput(); err != nil {
		t.Fatalf("--once: %v\n%s", err, out)
	}
	if !n.installed() {
		t.Fatal("--once did not install")
	}
	if out, err := exec.Command(bin, n.args("--uninstall")...).CombinedOutput(); err != nil {
		t.Fatalf("--uninstall: %v\n%s", err, out)
	}
	if !n.pristine() {
		t.Fatal("--uninstall did not restore the node")
	}
}

func TestBadFlagsWriteNothing(t *testing.T) {
	bin, n := binary(t), newNode(t)
	for _, args := range [][]string{
		n.args("--once", "--mode", "validate"),
		n.args("--once", "--icv-bytes", "10"),
		n.args("--once", "--uninstall"),
		n.args("--once", "--external-mtu", "100"),
	} {
		out, err := exec.Command(bin, args...).CombinedOutput()
		if err == nil {
			t.Errorf("%v succeeded", args)
		}
		if !strings.Contains(string(out), "secureoverlay-install:") {
			t.Errorf("%v: no error message:\n%s", args, out)
		}
	}
	if !n.pristine() {
		t.Fatal("a rejected invocation changed the node")
	}
}

// sidecar starts the binary in watch mode and returns a function that sends SIGTERM and
// waits for a clean exit, returning the output.
func sidecar(t *testing.T, bin string, args []string, env ...string) (term func() string, logged func(what string)) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	var out testutil.SyncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	exited := false
	t.Cleanup(func() {
		if !exited {
			cmd.Process.Kill()
			<-done
		}
	})
	term = func() string {
		t.Helper()
		if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-done:
			exited = true
			if err != nil {
				t.Fatalf("sidecar exit: %v\n%s", err, out.String())
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("sidecar did not exit after SIGTERM\n%s", out.String())
		}
		return out.String()
	}
	// logged waits for a line of the sidecar's containing what (not a sleep: a SIGTERM
	// before the sidecar has set up its handler kills it outright).
	logged = func(what string) {
		t.Helper()
		waitFor(t, fmt.Sprintf("the sidecar to log %q", what), 30*time.Second, func() bool { return strings.Contains(out.String(), what) })
	}
	return term, logged
}

// TestSidecarAgainstAPIServer runs the sidecar as a least-privilege ServiceAccount against
// a real kube-apiserver: it keeps the entry in place across a Calico-style rewrite, keeps
// the plugin on SIGTERM while its DaemonSet lives (restart, upgrade, reboot), and removes
// it, entry first, when the DaemonSet has been deleted.
func TestSidecarAgainstAPIServer(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a real kube-apiserver; skipped with -short")
	}
	bin := binary(t)
	c := kube.Start(t, kube.WithNamespaces("so-e2e"))
	ctx := context.Background()
	admin := kubernetes.NewForConfigOrDie(c.AdminConfig())
	const ns, saName, dsName, podName = "so-e2e", "secureoverlay-agent", "secureoverlay-agent", "secureoverlay-agent-q8f2x"
	const dsName2, podName2 = "secureoverlay-agent-v2", "secureoverlay-agent-v2-7hk3c"
	saCfg := c.ServiceAccountConfig(ns, saName)
	kubeconfig := writeKubeconfig(t, saCfg)

	role := &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "secureoverlay-install"}, Rules: []rbacv1.PolicyRule{
		{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"get"}},
		{APIGroups: []string{"apps"}, Resources: []string{"daemonsets"}, ResourceNames: []string{dsName, dsName2}, Verbs: []string{"get", "list", "watch"}},
	}}
	rb := &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "secureoverlay-install"},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: role.Name},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Namespace: ns, Name: saName}},
	}
	labels := map[string]string{"app": dsName}
	no, yes := false, true
	spec := corev1.PodSpec{ServiceAccountName: saName, AutomountServiceAccountToken: &no,
		Containers: []corev1.Container{{Name: "install", Image: "secureoverlay:test"}}}
	ds := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: dsName}, Spec: appsv1.DaemonSetSpec{
		Selector: &metav1.LabelSelector{MatchLabels: labels},
		Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: labels}, Spec: spec}}}
	if _, err := admin.RbacV1().Roles(ns).Create(ctx, role, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.RbacV1().RoleBindings(ns).Create(ctx, rb, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	kube.RequireAuthorized(t, admin, kube.ServiceAccountUser(ns, saName), kube.ServiceAccountGroups(ns),
		authorizationv1.ResourceAttributes{Group: "apps", Resource: "daemonsets", Namespace: ns, Name: dsName2, Verb: "watch"})
	createOwned := func(ds *appsv1.DaemonSet, podName string) {
		t.Helper()
		ds, err := admin.AppsV1().DaemonSets(ns).Create(ctx, ds, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: podName, Labels: labels,
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "DaemonSet", Name: ds.Name, UID: ds.UID, Controller: &yes}}},
			Spec: spec}
		if _, err := admin.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	ds2 := ds.DeepCopy()
	ds2.Name = dsName2
	createOwned(ds, podName)
	createOwned(ds2, podName2)
	// Let RBAC caches see the binding before the sidecar's one decisive request.
	sa := kubernetes.NewForConfigOrDie(saCfg)
	waitFor(t, "rbac binding", 10*time.Second, func() bool {
		_, err := sa.AppsV1().DaemonSets(ns).Get(ctx, dsName, metav1.GetOptions{})
		return err == nil
	})

	n := newNode(t)
	env := []string{"POD_NAME=" + podName, "POD_NAMESPACE=" + ns}
	args := n.args("--kubeconfig", kubeconfig)

	// 1. Sidecar on a live DaemonSet: installs, repairs a rewrite, keeps on SIGTERM.
	term, _ := sidecar(t, bin, args, env...)
	waitFor(t, "install", 10*time.Second, n.installed)
	if err := os.WriteFile(n.list(), []byte(calicoList), 0o644); err != nil { // in place, like install-cni
		t.Fatal(err)
	}
	d := waitFor(t, "re-insert", 2*time.Second, n.installed)
	t.Logf("entry re-inserted %v after a rewrite", d)
	out := term()
	if !n.installed() {
		t.Fatalf("plugin removed although the DaemonSet lives:\n%s", out)
	}
	if !strings.Contains(out, "keeping the plugin") {
		t.Fatalf("no keep decision logged:\n%s", out)
	}

	// 2. Without pod identity the sidecar cannot check, so it keeps the plugin.
	term, logged := sidecar(t, bin, args)
	logged("sidecar running")
	if out := term(); !n.installed() || !strings.Contains(out, "keeping the plugin") {
		t.Fatalf("sidecar without POD_NAME did not keep the plugin:\n%s", out)
	}

	// 3. The DaemonSet is deleted (kubectl delete: background propagation), then the pod
	// is terminated: the sidecar uninstalls, restoring the original file.
	term, logged = sidecar(t, bin, args, env...)
	logged("following the pod's DaemonSet") // its deletion is seen from now on
	if err := admin.AppsV1().DaemonSets(ns).Delete(ctx, dsName, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	out = term()
	if !n.pristine() {
		b, _ := os.ReadFile(n.list())
		t.Fatalf("sidecar did not uninstall after the DaemonSet was deleted:\n%s\nconflist now:\n%s", out, b)
	}
	if !strings.Contains(out, "uninstalling") {
		t.Fatalf("uninstall reason not logged:\n%s", out)
	}

	// 4. kubectl delete -f deletes the DaemonSet and then our RBAC before the pod gets
	// SIGTERM: the API refuses the check, but the sidecar watched the deletion happen.
	env2 := []string{"POD_NAME=" + podName2, "POD_NAMESPACE=" + ns}
	term, logged = sidecar(t, bin, args, env2...)
	waitFor(t, "install", 10*time.Second, n.installed)
	logged("following the pod's DaemonSet")
	if err := admin.AppsV1().DaemonSets(ns).Delete(ctx, dsName2, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := admin.RbacV1().RoleBindings(ns).Delete(ctx, rb.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "rbac revoked", 10*time.Second, func() bool {
		_, err := sa.CoreV1().Pods(ns).Get(ctx, podName2, metav1.GetOptions{})
		return apierrors.IsForbidden(err)
	})
	out = term()
	if !n.pristine() {
		t.Fatalf("sidecar did not uninstall after DaemonSet and RBAC were deleted:\n%s", out)
	}
	if !strings.Contains(out, "seen by the watch") {
		t.Fatalf("uninstall not decided by the watch:\n%s", out)
	}
}

func writeKubeconfig(t *testing.T, cfg *rest.Config) string {
	t.Helper()
	kc := clientcmdapi.NewConfig()
	kc.Clusters["c"] = &clientcmdapi.Cluster{Server: cfg.Host, CertificateAuthorityData: cfg.CAData}
	kc.AuthInfos["u"] = &clientcmdapi.AuthInfo{Token: cfg.BearerToken}
	kc.Contexts["x"] = &clientcmdapi.Context{Cluster: "c", AuthInfo: "u"}
	kc.CurrentContext = "x"
	p := filepath.Join(t.TempDir(), "kubeconfig")
	if err := clientcmd.WriteToFile(*kc, p); err != nil {
		t.Fatal(err)
	}
	return p
}

// entryMTU returns the externalMTU written into the conflist entry.
func (n *node) entryMTU(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile(n.list())
	if err != nil {
		t.Fatal(err)
	}
	var l struct {
		Plugins []struct {
			Type        string `json:"type"`
			ExternalMTU *int   `json:"externalMTU"`
		} `json:"plugins"`
	}
	if err := json.Unmarshal(b, &l); err != nil {
		t.Fatal(err)
	}
	for _, p := range l.Plugins {
		if p.Type == install.PluginType && p.ExternalMTU != nil {
			return *p.ExternalMTU
		}
	}
	t.Fatalf("no entry with externalMTU:\n%s", b)
	return 0
}

func onceArgs(n *node, extra ...string) []string {
	return append([]string{"--once", "--cni-conf-dir", n.conf, "--cni-bin-dir", n.bin, "--plugin-binary", n.source}, extra...)
}

// TestDetectExternalMTU runs --once with --external-mtu 0 inside a fresh network namespace
// whose only external link is a 1450-byte eth0 (and a larger ens3 that is down): the
// entry gets 1450. With --detect-external-mtu=false it gets 0.
func TestDetectExternalMTU(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("SECUREOVERLAY_REQUIRE_ALL") == "1" {
			t.Fatal("needs root for a network namespace (SECUREOVERLAY_REQUIRE_ALL=1)")
		}
		t.Skip("needs root for a network namespace")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		if os.Getenv("SECUREOVERLAY_REQUIRE_ALL") == "1" {
			t.Fatal("needs iproute2 (SECUREOVERLAY_REQUIRE_ALL=1)")
		}
		t.Skip("needs iproute2")
	}
	bin, n := binary(t), newNode(t)
	netns := fmt.Sprintf("so-install-test-%d", os.Getpid())
	ip := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v\n%s", args, err, out)
		}
	}
	ip("netns", "add", netns)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", netns).Run() })
	ip("-n", netns, "link", "add", "eth0", "mtu", "1450", "type", "veth", "peer", "name", "p0", "mtu", "1450")
	ip("-n", netns, "link", "set", "p0", "up")
	ip("-n", netns, "link", "set", "eth0", "up")
	ip("-n", netns, "link", "add", "ens3", "mtu", "1400", "type", "veth", "peer", "name", "p1") // down: not counted
	// A veth reaches oper-up asynchronously (the kernel's linkwatch work), later still on a
	// busy machine: detection counts only up links, so wait as a node's uplink would be.
	// (Without this wait the test failed once under a CPU hog: "detected externalMTU 0".)
	nsh, err := ns.GetNS("/run/netns/" + netns)
	if err != nil {
		t.Fatal(err)
	}
	defer nsh.Close()
	if err := nsh.Do(func(ns.NetNS) error { return testutil.WaitOperUp("eth0", 10*time.Second) }); err != nil {
		t.Fatal(err)
	}

	var out []byte
	run := func(extra ...string) {
		t.Helper()
		args := append([]string{"netns", "exec", netns, bin}, onceArgs(n, extra...)...)
		var err error
		if out, err = exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
	}
	run("--external-mtu", "0")
	if got := n.entryMTU(t); got != 1450 {
		t.Fatalf("detected externalMTU %d, want 1450; installer output:\n%s", got, out)
	}
	run("--external-mtu", "0", "--detect-external-mtu=false")
	if got := n.entryMTU(t); got != 0 {
		t.Fatalf("externalMTU %d, want 0 (detect at ADD)", got)
	}
	// No matching link: the entry falls back to 0 rather than failing the install.
	run("--external-mtu", "0", "--interface-pattern", "^nomatch$")
	if got := n.entryMTU(t); got != 0 {
		t.Fatalf("externalMTU %d without a matching link, want 0", got)
	}
}

// started is a running installer binary whose output can be read while it runs.
type started struct {
	cmd    *exec.Cmd
	out    *testutil.SyncBuffer
	done   chan error
	exited bool
}

func start(t *testing.T, bin string, args ...string) *started {
	t.Helper()
	s := &started{cmd: exec.Command(bin, args...), out: &testutil.SyncBuffer{}, done: make(chan error, 1)}
	s.cmd.Stdout, s.cmd.Stderr = s.out, s.out
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { s.done <- s.cmd.Wait() }()
	t.Cleanup(func() {
		if !s.exited {
			s.cmd.Process.Kill()
			<-s.done
		}
	})
	return s
}

// waitOutput waits until the output contains every one of want.
func (s *started) waitOutput(t *testing.T, want ...string) {
	t.Helper()
	waitFor(t, fmt.Sprintf("output %q", want), 10*time.Second, func() bool {
		out := s.out.String()
		for _, w := range want {
			if !strings.Contains(out, w) {
				return false
			}
		}
		return true
	})
}

// term sends SIGTERM and returns the exit error; the process must exit within a second.
func (s *started) term(t *testing.T) error {
	t.Helper()
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	sent := time.Now()
	select {
	case err := <-s.done:
		s.exited = true
		t.Logf("exited %v after SIGTERM", time.Since(sent))
		return err
	case <-time.After(time.Second):
		t.Fatalf("still running 1 s after SIGTERM\n%s", s.out)
		return nil
	}
}

// TestSigtermStopsPromptly sends the real binary SIGTERM while a FIFO named like a
// config sorts before the calico config (sidecar and --once), and while --uninstall
// retries a half-written config: it exits within a second every time, having written
// nothing.
func TestSigtermStopsPromptly(t *testing.T) {
	bin := binary(t)
	withFIFO := func(t *testing.T) *node {
		n := newNode(t)
		pipe := filepath.Join(n.conf, "00-pipe.conflist")
		if err := syscall.Mkfifo(pipe, 0o644); err != nil {
			t.Fatal(err)
		}
		// If the installer opened the FIFO, it is blocked in open(2): a writer that comes
		// and goes releases it, so a failing test ends.
		t.Cleanup(func() {
			if fd, err := syscall.Open(pipe, syscall.O_WRONLY|syscall.O_NONBLOCK, 0); err == nil {
				syscall.Close(fd)
			}
		})
		return n
	}
	t.Run("sidecar", func(t *testing.T) {
		n := withFIFO(t)
		s := start(t, bin, n.args("--uninstall-on-delete=false")...)
		s.waitOutput(t, "00-pipe.conflist", "named pipe")
		if err := s.term(t); err != nil {
			t.Fatalf("sidecar exit after SIGTERM: %v\n%s", err, s.out)
		}
		if b, err := os.ReadFile(n.list()); err != nil || string(b) != calicoList {
			t.Fatalf("calico config changed behind a FIFO: %v\n%s", err, b)
		}
	})
	t.Run("once", func(t *testing.T) {
		n := withFIFO(t)
		s := start(t, bin, n.args("--once")...)
		s.waitOutput(t, "00-pipe.conflist", "named pipe")
		if err := s.term(t); err == nil || !strings.Contains(s.out.String(), "context canceled") {
			t.Fatalf("--once after SIGTERM: exit %v; want a failure naming the cancellation\n%s", err, s.out)
		}
		if b, err := os.ReadFile(n.list()); err != nil || string(b) != calicoList {
			t.Fatalf("calico config changed behind a FIFO: %v\n%s", err, b)
		}
	})
	t.Run("uninstall", func(t *testing.T) {
		n := newNode(t)
		if out, err := exec.Command(bin, n.args("--once")...).CombinedOutput(); err != nil {
			t.Fatalf("--once: %v\n%s", err, out)
		}
		b, _ := os.ReadFile(n.list())
		half := b[:len(b)/2]
		if err := os.WriteFile(n.list(), half, 0o644); err != nil {
			t.Fatal(err)
		}
		s := start(t, bin, n.args("--uninstall")...)
		s.waitOutput(t, "10-calico.conflist", "retrying")
		if err := s.term(t); err == nil {
			t.Fatalf("--uninstall interrupted by SIGTERM exited 0\n%s", s.out)
		}
		if got, _ := os.ReadFile(n.list()); !bytes.Equal(got, half) {
			t.Fatal("uninstall wrote over a half-written file")
		}
		if _, err := os.Stat(filepath.Join(n.bin, install.PluginType)); err != nil {
			t.Fatalf("interrupted uninstall removed the binary: %v", err)
		}
	})
}

// TestSymlinkedConflistStaysALink: --once and --uninstall on a calico conflist that is a
// symlink to a file in the config dir edit the target and leave the link a link.
func TestSymlinkedConflistStaysALink(t *testing.T) {
	bin, n := binary(t), newNode(t)
	real := filepath.Join(n.conf, "calico.conflist.real")
	if err := os.Rename(n.list(), real); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("calico.conflist.real", n.list()); err != nil {
		t.Fatal(err)
	}
	isLink := func(when string) {
		t.Helper()
		if got, err := os.Readlink(n.list()); err != nil || got != "calico.conflist.real" {
			t.Fatalf("after %s 10-calico.conflist is no longer the symlink: %q %v", when, got, err)
		}
	}
	if out, err := exec.Command(bin, n.args("--once")...).CombinedOutput(); err != nil {
		t.Fatalf("--once: %v\n%s", err, out)
	}
	isLink("--once")
	if !n.installed() {
		t.Fatal("--once did not install through the link")
	}
	if out, err := exec.Command(bin, n.args("--uninstall")...).CombinedOutput(); err != nil {
		t.Fatalf("--uninstall: %v\n%s", err, out)
	}
	isLink("--uninstall")
	if !n.pristine() {
		t.Fatal("--uninstall did not restore the target")
	}
}
