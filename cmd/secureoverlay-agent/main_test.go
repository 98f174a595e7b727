//go:build linux

package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/gate"
	"github.com/secureoverlay/secureoverlay/internal/testutil"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/nodereport"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
	"github.com/secureoverlay/secureoverlay/reconciler/xfrm"
)

func TestFlagErrors(t *testing.T) {
	for _, args := range [][]string{
		{"--icv-bytes", "10"},
		{"--replay-window", "10"},
		{"--reqid", "0"},
		{"--mark", "0x4000"},
		{"--mark", "0x10000"},
		{"--log-level", "loud"},
		{"--node-name", "", "--external-mtu", "1500"},
		{"--node-name", "a", "--external-mtu", "60"},
		{"--node-name", "a", "--interface-pattern", "("},
		{"--uninstall-step", "0s"},
		{"--uninstall-decision-timeout", "-1s"},
		{"--calico-api-group", "projectcalico.org"},
		{"--calico-recheck-interval", "0s"},
		{"--node-ids", "on"},
		{"stray"},
	} {
		t.Setenv("NODE_NAME", "")
		if err := run(false, args); err == nil {
			t.Errorf("run(%q): no error", args)
		}
	}
	if err := run(false, []string{"-h"}); !errors.Is(err, flag.ErrHelp) {
		t.Errorf("-h: %v", err)
	}
}

func skipOrFail(t *testing.T, reason string) {
	t.Helper()
	if os.Getenv("SECUREOVERLAY_REQUIRE_ALL") == "1" {
		t.Fatalf("%s (required by SECUREOVERLAY_REQUIRE_ALL=1)", reason)
	}
	t.Skip(reason)
}

func ourPolicies(t *testing.T, n ns.NetNS) []string {
	t.Helper()
	cfg := desired.Config{}.WithDefaults()
	pols, err := testutil.InNS(n, xfrm.Netlink{}.ListPolicies)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, p := range pols {
		if !p.Foreign && cfg.OwnsPolicy(p.Policy) {
			out = append(out, p.Policy.String())
		}
	}
	return out
}

// TestBinarySIGTERMAndCleanup runs the real binary inside a fresh network namespace
// against a real API server. This host's kernel has no ESP/GCM, so adding SAs fails: the
// binary programs what it can (the inbound policy), reports the error without claiming
// anything (program before advertise), leaves the kernel as it is on SIGTERM, and
// `cleanup` removes what it owns and nothing else.
func TestBinarySIGTERMAndCleanup(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary and starts a real kube-apiserver; skipped with -short")
	}
	if os.Geteuid() != 0 {
		skipOrFail(t, "needs root to create network namespaces")
	}
	netns, err := testutil.LoopbackNS(t)
	if err != nil {
		skipOrFail(t, "cannot create a network namespace with its loopback up: "+err.Error())
	}

	bin := filepath.Join(t.TempDir(), "secureoverlay-agent")
	ledgerDir := t.TempDir()
	// The boot gate's record (package gate) in a directory of the test's, never the host's.
	stateFile := filepath.Join(t.TempDir(), "dataplane.json")
	gobin := filepath.Join(runtime.GOROOT(), "bin", "go")
	if out, err := exec.Command(gobin, "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}

	c := kube.Start(t)
	ctx := context.Background()
	admin := kubernetes.NewForConfigOrDie(c.AdminConfig())
	kube.InstallCalicoCRDs(t, c.AdminConfig())
	r := keys.NewRing()
	r.Mode, r.Target, r.LastGeneration = api.ModeEnforce, api.ModeEnforce, 1
	root := make([]byte, keys.RootKeyBytes)
	if _, err := rand.Read(root); err != nil {
		t.Fatal(err)
	}
	now := time.Now().UTC()
	r.Generations = []keys.Generation{{Number: 1, State: keys.StateActive, Cipher: keys.AES128GCM, ICVBytes: 8, Root: root, Created: now, Activated: now}}
	r.Nodes = []keys.NodeID{{Name: "a", ID: 1}, {Name: "b", ID: 2}}
	data, err := keys.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin.CoreV1().Secrets(api.Namespace).Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: api.Namespace, Name: api.SecretName},
		Data: map[string][]byte{api.SecretDataKey: data}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := kube.CreateCalico(ctx, dynamic.NewForConfigOrDie(c.AdminConfig()), kube.CalicoV1GV, kube.NewIPPool("p", "10.244.0.0/16", "Always")); err != nil {
		t.Fatal(err)
	}
	// a's earlier agent left an empty report with SA epoch e-a; b's agent reports a's SAs
	// (of a's key incarnation: boot ID, Node UID, epoch) installed both ways.
	na := kube.CreateNode(t, c.AdminConfig(), kube.Node{Name: "a", IPv4: "198.18.0.1", BootID: "boot-a"})
	selfRep, _ := json.Marshal(watch.Report{NodeReport: api.NodeReport{Mode: api.ModeOff, Incarnation: "boot-a", UID: string(na.UID), Epoch: "e-a"}})
	tag := watch.IncarnationTag(watch.KeyIncarnation("boot-a", string(na.UID), "e-a"))
	nb := kube.CreateNode(t, c.AdminConfig(), kube.Node{Name: "b", IPv4: "198.18.0.2", BootID: "boot-b"})
	rep, _ := json.Marshal(watch.Report{NodeReport: api.NodeReport{Mode: api.ModeEnforce, Generations: []uint32{1}, Incarnation: "boot-b", UID: string(nb.UID), Epoch: "e-b"},
		InboundFrom: map[string]string{"a": tag}, EncryptingTo: map[string]string{"a": tag}})
	for name, r := range map[string][]byte{"a": selfRep, "b": rep} {
		patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]string{api.ReportAnnotation: string(r)}}})
		if _, err := admin.CoreV1().Nodes().Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	// A foreign policy that cleanup must leave alone.
	foreign := &netlink.XfrmPolicy{Src: mustNet("198.18.9.1/32"), Dst: mustNet("198.18.9.2/32"), Proto: 4, Dir: netlink.XFRM_DIR_OUT, Priority: 100,
		Tmpls: []netlink.XfrmPolicyTmpl{{Src: net.ParseIP("198.18.9.1"), Dst: net.ParseIP("198.18.9.2"), Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TRANSPORT, Reqid: 7}}}
	if err := netns.Do(func(ns.NetNS) error { return netlink.XfrmPolicyAdd(foreign) }); err != nil {
		t.Fatal(err)
	}

	// Kubeconfig for the admin (RBAC is covered by the in-process real test) through the proxy.
	addr := testutil.NSProxy(t, netns, strings.TrimPrefix(c.Host(), "https://"))
	kc := clientcmdapi.NewConfig()
	kc.Clusters["c"] = &clientcmdapi.Cluster{Server: "https://" + addr, CertificateAuthorityData: c.CAData()}
	kc.AuthInfos["u"] = &clientcmdapi.AuthInfo{Token: c.AdminConfig().BearerToken}
	kc.Contexts["x"] = &clientcmdapi.Context{Cluster: "c", AuthInfo: "u"}
	kc.CurrentContext = "x"
	kcPath := filepath.Join(t.TempDir(), "kubeconfig")
	if err := clientcmd.WriteToFile(*kc, kcPath); err != nil {
		t.Fatal(err)
	}

	var stderr strings.Builder
	cmd := exec.Command(bin, "--kubeconfig", kcPath, "--node-name", "a", "--external-mtu", "1500", "--metrics-addr", "127.0.0.1:19467", "--resync-interval", "1h", "--ledger-dir", ledgerDir, "--state-file", stateFile)
	cmd.Stderr = &stderr
	if err := netns.Do(func(ns.NetNS) error { return cmd.Start() }); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("agent stderr:\n%s", stderr.String())
		}
	})

	report := func() *watch.Report {
		raw, err := nodereport.Read(ctx, admin, dynamic.NewForConfigOrDie(c.AdminConfig()), api.Namespace, "a")
		if err != nil {
			t.Fatal(err)
		}
		if raw != "" {
			r, err := watch.ParseReport(raw)
			if err != nil {
				t.Fatal(err)
			}
			return r
		}
		return nil
	}
	deadline := time.Now().Add(60 * time.Second)
	for r := report(); r == nil || r.Error == ""; r = report() {
		if time.Now().After(deadline) {
			t.Fatalf("no error report; stderr:\n%s", stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	got := report()
	if !strings.Contains(got.Error, "add xfrm state") || len(got.InboundFrom) != 0 || len(got.EncryptingTo) != 0 || got.Mode != api.ModeOff {
		t.Errorf("report from a node whose SAs cannot be added: %+v", got)
	}
	pols := ourPolicies(t, netns)
	if len(pols) != 1 || !strings.Contains(pols[0], "dir=in") {
		t.Fatalf("our policies after the failed sync: %v", pols)
	}

	// Health endpoints from inside the namespace.
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: func(ctx context.Context, network, a string) (net.Conn, error) {
		return testutil.InNS(netns, func() (net.Conn, error) { return (&net.Dialer{}).DialContext(ctx, network, a) })
	}}}
	get := func(path string) (int, string) {
		resp, err := hc.Get("http://127.0.0.1:19467" + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get("/readyz"); code != 503 || !strings.Contains(body, "add xfrm state") {
		t.Errorf("readyz = %d %q", code, body)
	}
	if code, _ := get("/healthz"); code != 200 {
		t.Errorf("healthz = %d", code)
	}
	if _, body := get("/metrics"); !strings.Contains(body, `secureoverlay_xfrm_stat_total{counter="XfrmInNoStates"}`) ||
		!strings.Contains(body, `secureoverlay_agent_syncs_total{kind="full",result="error"}`) {
		t.Errorf("metrics lack xfrm_stat or the failed sync:\n%.2000s", body)
	}

	// SIGTERM: exits 0 and leaves the kernel as it is.
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("no exit within 20s of SIGTERM")
	}
	if after := ourPolicies(t, netns); len(after) != 1 || after[0] != pols[0] {
		t.Fatalf("SIGTERM changed the data plane: %v -> %v", pols, after)
	}
	if !strings.Contains(stderr.String(), "pod identity unknown") || !strings.Contains(stderr.String(), "data plane left as it is") {
		t.Errorf("SIGTERM without a pod identity does not say why it kept the data plane:\n%s", stderr.String())
	}

	// Uninstall: the binary runs as pod agent-x of DaemonSet secureoverlay-agent. The
	// DaemonSet is deleted (background, as kubectl does): the walk-down starts when the
	// watch shows it, before any SIGTERM, runs its steps (--uninstall-step) and removes
	// what we own; the process then waits for SIGTERM (exiting earlier would make the
	// kubelet restart it). (The SAs cannot be added on this host, so the steps that
	// program them fail and the exit status is 1; the last step still removes everything.)
	ds := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: api.Namespace, Name: "secureoverlay-agent"},
		Spec: appsv1.DaemonSetSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "so"}},
			Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"app": "so"}},
				Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "agent", Image: "secureoverlay:test"}}}}}}
	if ds, err = admin.AppsV1().DaemonSets(api.Namespace).Create(ctx, ds, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// The harness runs no controllers: create the ServiceAccount pod admission asks for.
	if _, err := admin.CoreV1().ServiceAccounts(api.Namespace).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: api.Namespace, Name: "default"}},
		metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	yes := true
	if _, err := admin.CoreV1().Pods(api.Namespace).Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: api.Namespace, Name: "agent-x",
		Labels:          map[string]string{"app": "so"},
		OwnerReferences: []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "DaemonSet", Name: ds.Name, UID: ds.UID, Controller: &yes}}},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "agent", Image: "secureoverlay:test"}}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	stderr2 := &testutil.SyncBuffer{}
	cmd2 := exec.Command(bin, "--kubeconfig", kcPath, "--node-name", "a", "--external-mtu", "1500", "--metrics-addr", "",
		"--resync-interval", "1h", "--ledger-dir", ledgerDir, "--state-file", stateFile, "--pod-name", "agent-x", "--pod-namespace", api.Namespace, "--uninstall-step", "500ms")
	cmd2.Stderr = stderr2
	if err := netns.Do(func(ns.NetNS) error { return cmd2.Start() }); err != nil {
		t.Fatal(err)
	}
	exited2 := make(chan error, 1)
	go func() { exited2 <- cmd2.Wait() }()
	t.Cleanup(func() {
		if cmd2.ProcessState == nil {
			_ = cmd2.Process.Kill()
			<-exited2
		}
		if t.Failed() {
			t.Logf("uninstalling agent stderr:\n%s", stderr2.String())
		}
	})
	// Synced, and the tracker's watch on the DaemonSet open (a deletion before it would
	// only be inferred: no walk-down).
	for deadline := time.Now().Add(30 * time.Second); !strings.Contains(stderr2.String(), "caches synced") || !strings.Contains(stderr2.String(), "following the pod's DaemonSet"); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("agent did not sync:\n%s", stderr2.String())
		}
	}
	if err := admin.AppsV1().DaemonSets(api.Namespace).Delete(ctx, ds.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	for deadline := t0.Add(20 * time.Second); !strings.Contains(stderr2.String(), "waiting for SIGTERM"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no walk-down within 20s of the DaemonSet's deletion, without SIGTERM")
		}
	}
	took := time.Since(t0)
	if !strings.Contains(stderr2.String(), "the DaemonSet is being deleted") || !strings.Contains(stderr2.String(), "was deleted") {
		t.Errorf("no uninstall decision in the log:\n%s", stderr2.String())
	}
	if took < time.Second {
		t.Errorf("walk-down took %v, want at least 2 steps of 500ms", took)
	}
	if after := ourPolicies(t, netns); len(after) != 0 {
		t.Errorf("after the uninstall walk-down: %v", after)
	}
	select {
	case err := <-exited2:
		t.Fatalf("the agent exited after its walk-down, before SIGTERM (%v): the kubelet would restart it", err)
	case <-time.After(time.Second):
	}
	if err := cmd2.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-exited2:
	case <-time.After(5 * time.Second):
		t.Fatal("no exit within 5s of SIGTERM after the walk-down")
	}
	if after := ourPolicies(t, netns); len(after) != 0 {
		t.Errorf("after SIGTERM: %v", after)
	}
	t.Logf("DaemonSet deleted → walk-down done after %v without SIGTERM; SIGTERM → exit; nothing of ours left", took.Round(time.Millisecond))

	// cleanup removes ours, not the foreign policy; and the boot gate's record (here one
	// left saying enforce, as a node that encrypted would have it).
	if err := gate.WriteState(stateFile, gate.State{Mode: "enforce", Node: "a"}); err != nil {
		t.Fatal(err)
	}
	clean := exec.Command(bin, "cleanup", "--ledger-dir", ledgerDir, "--state-file", stateFile)
	out, err := testutil.InNS(netns, func() ([]byte, error) { return clean.CombinedOutput() })
	if err != nil {
		t.Fatalf("cleanup: %v\n%s", err, out)
	}
	if after := ourPolicies(t, netns); len(after) != 0 {
		t.Errorf("after cleanup: %v", after)
	}
	if _, err := os.Stat(filepath.Join(ledgerDir, "ledger")); !os.IsNotExist(err) {
		t.Errorf("cleanup left the sa key ledger: %v", err)
	}
	if _, err := os.Stat(stateFile); !os.IsNotExist(err) {
		t.Errorf("cleanup left the boot gate's state file: %v", err)
	}
	all, err := testutil.InNS(netns, func() ([]netlink.XfrmPolicy, error) { return netlink.XfrmPolicyList(netlink.FAMILY_V4) })
	if err != nil || len(all) != 1 || all[0].Priority != 100 {
		t.Errorf("cleanup touched the foreign policy: %v %v", all, err)
	}
}

func mustNet(s string) *net.IPNet {
	_, n, err := net.ParseCIDR(s)
	if err != nil {
		panic(err)
	}
	return n
}
