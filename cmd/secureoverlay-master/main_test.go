package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/keys"
)

// The test binary doubles as the master binary when this variable is set.
const envRunMain = "SECUREOVERLAY_TEST_RUN_MASTER_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(envRunMain) == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func masterCmd(args ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), envRunMain+"=1")
	return cmd
}

func TestBadFlags(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--cipher", "des"}, `--cipher "des"`},
		{[]string{"--icv-bytes", "4"}, "--icv-bytes 4"},
		{[]string{"--id", ""}, "--id is empty"},
		{[]string{"--node-selector", "a in (("}, "--node-selector"},
		{[]string{"--kubeconfig", "/nonexistent/kubeconfig"}, "kubeconfig /nonexistent/kubeconfig"},
		{[]string{"--kube-api-qps", "0"}, "--kube-api-qps 0"},
		{[]string{"--kube-api-burst", "0"}, "want a positive rate and a burst of at least 1"},
	} {
		out, err := masterCmd(c.args...).CombinedOutput()
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
			t.Errorf("%v: exit %v, want 1\n%s", c.args, err, out)
		}
		if !strings.Contains(string(out), c.want) {
			t.Errorf("%v: output %q does not mention %q", c.args, out, c.want)
		}
	}
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// TestBinaryAgainstRealAPIServer runs the real main against a real API server: it takes
// the lease, enables encryption for a node that reports, serves metrics, and on SIGTERM
// exits 0 and releases the lease.
func TestBinaryAgainstRealAPIServer(t *testing.T) {
	cluster := kube.Start(t)
	cs, err := kubernetes.NewForConfig(cluster.AdminConfig())
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	kube.CreateNode(t, cluster.AdminConfig(), kube.Node{Name: "n1", IPv4: "198.18.0.1", BootID: "boot-1",
		Annotations: map[string]string{api.ReportAnnotation: `{"mode":"off","incarnation":"boot-1"}`}})
	// A node without an agent, outside --node-selector, must not hold the cutover.
	kube.CreateNode(t, cluster.AdminConfig(), kube.Node{Name: "win1", IPv4: "198.18.0.2", BootID: "boot-2",
		Labels: map[string]string{"kubernetes.io/os": "windows"}})
	if _, err := cs.CoreV1().ConfigMaps(api.Namespace).Create(ctx, configMap(map[string]string{api.ConfigModeKey: "accept"}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	port := freePort(t)
	var out bytes.Buffer
	cmd := masterCmd("--kubeconfig", cluster.Kubeconfig(), "--id", "bin-1", "--metrics-addr", fmt.Sprintf("127.0.0.1:%d", port),
		"--cipher", "aes256gcm", "--icv-bytes", "16", "--resync", "1s", "--node-selector", "kubernetes.io/os=linux")
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("master output:\n%s", out.String())
		}
	})

	var ring *keys.Ring
	deadline := time.Now().Add(60 * time.Second)
	for ; time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		s, err := cs.CoreV1().Secrets(api.Namespace).Get(ctx, api.SecretName, metav1.GetOptions{})
		if err != nil {
			continue
		}
		if ring, err = keys.Parse(s.Data[api.SecretDataKey]); err == nil && ring.Mode == api.ModeAccept {
			break
		}
	}
	if ring == nil || ring.Mode != api.ModeAccept {
		t.Fatalf("the master did not step to accept: %s", keys.Summary(ring))
	}
	if ring.NodeID("win1") != 0 || ring.NodeID("n1") == 0 {
		t.Fatalf("node selector not applied: %+v", ring.Nodes)
	}
	if g := ring.Active(); g.Cipher != keys.AES256GCM || g.ICVBytes != 16 {
		t.Fatalf("flags not applied: cipher %s icv %d", g.Cipher, g.ICVBytes)
	}
	// The status ConfigMap is published after the ring is written: wait for it.
	var st api.MasterStatus
	var stData string
	var stErr error
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		cm, err := cs.CoreV1().ConfigMaps(api.Namespace).Get(ctx, api.StatusConfigMapName, metav1.GetOptions{})
		if err == nil {
			stData = cm.Data[api.StatusDataKey]
			st = api.MasterStatus{}
			stErr = json.Unmarshal([]byte(stData), &st)
			if stErr == nil && st.Leader == "bin-1" && st.Target == api.ModeAccept {
				break
			}
		} else {
			stErr = err
		}
		if time.Now().After(deadline) {
			t.Fatalf("status %q: %v", stData, stErr)
		}
	}

	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", port))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{"secureoverlay_master_leader 1", "secureoverlay_master_active_generation 1",
		`secureoverlay_master_rotations_total{reason="initial"} 1`, `secureoverlay_master_mode{mode="accept"} 1`} {
		if !bytes.Contains(body, []byte(want)) {
			t.Errorf("metrics lack %q", want)
		}
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		exited <- err
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("no exit after SIGTERM")
	}
	lease, err := cs.CoordinationV1().Leases(api.Namespace).Get(ctx, "secureoverlay-master", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if h := lease.Spec.HolderIdentity; h != nil && *h != "" {
		t.Fatalf("lease still held by %q after shutdown", *h)
	}
}

func configMap(data map[string]string) *corev1.ConfigMap {
	return &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: api.ConfigMapName, Namespace: api.Namespace}, Data: data}
}
