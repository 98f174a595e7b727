package manifests

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/internal/testutil"
	"github.com/secureoverlay/secureoverlay/nodekeys"
	"github.com/secureoverlay/secureoverlay/nodereport"
)

// realAgent runs the real secureoverlay-agent binary with an agent token bound to a
// pod on node-a — the manifest's RBAC and admission policy — inside a fresh network
// namespace (so its kernel writes never touch this host), reaching the API server
// through a loopback proxy. With the ring the master initialised (mode off, no
// keys) its sync needs no ESP support: it must publish its report on node-a. Run as
// node-b with the same token, its report write must be refused by the policy.
func realAgent(t *testing.T, c *kube.Cluster, cs kubernetes.Interface) {
	if os.Geteuid() != 0 {
		requireOrSkip(t, "needs root to create a network namespace for the agent")
	}
	bin := binPath(t, "secureoverlay-agent")
	netns := newNetNS(t)
	cfg := podBoundConfig(t, c, cs, "node-a")
	cfg.Host = "https://" + testutil.NSProxy(t, netns, strings.TrimPrefix(c.Host(), "https://"))
	kcfg := writeKubeconfig(t, cfg)
	ledgerDir := t.TempDir()
	ctx := context.Background()

	const metricsAddr = "127.0.0.1:19467" // inside the fresh namespace
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		var c net.Conn
		err := netns.Do(func(ns.NetNS) error {
			var err error
			c, err = (&net.Dialer{}).DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}}}
	getInNS := func(path string) string {
		resp, err := hc.Get("http://" + metricsAddr + path)
		if err != nil {
			return ""
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	run := func(node string, until func(log string) bool) string {
		t.Helper()
		var log testutil.SyncBuffer
		cmd := exec.Command(bin, "--kubeconfig", kcfg, "--node-name", node, "--namespace", api.Namespace,
			"--external-mtu", "1500", "--metrics-addr", metricsAddr, "--resync-interval", "1h", "--ledger-dir", ledgerDir,
			"--state-file", filepath.Join(ledgerDir, "dataplane.json"))
		cmd.Stdout, cmd.Stderr = &log, &log
		if err := netns.Do(func(ns.NetNS) error { return cmd.Start() }); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(60 * time.Second)
		for !until(log.String()) && time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond)
		}
		_ = cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		return log.String()
	}
	dc := dynamic.NewForConfigOrDie(c.AdminConfig())
	report := func(node string) string { // its NodeReport's, or its annotation's
		raw, err := nodereport.Read(ctx, cs, dc, api.Namespace, node)
		if err != nil {
			t.Fatal(err)
		}
		return raw
	}
	// The policy subtest left a report on node-a; remove it (as admin) first.
	if _, err := cs.CoreV1().Nodes().Patch(ctx, "node-a", "application/merge-patch+json",
		[]byte(`{"metadata":{"annotations":{"secureoverlay.io/report":null}}}`), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}

	hasKeys := func(node string) bool {
		_, err := dc.Resource(nodekeys.GVR).Namespace(api.Namespace).Get(ctx, node, metav1.GetOptions{})
		return err == nil
	}
	log := run("node-a", func(string) bool { return report("node-a") != "" && hasKeys("node-a") })
	if r := report("node-a"); r == "" {
		t.Fatalf("the real agent published no report on its own node through the policy; log:\n%s", log)
	} else {
		t.Logf("real agent's report on node-a: %s", r)
	}
	if strings.Contains(log, "ValidatingAdmissionPolicy") || strings.Contains(log, "forbidden") {
		t.Errorf("agent log shows a refusal on its own node:\n%s", log)
	}

	before := report("node-b")
	// The agent does not log a failed report write; /readyz and the report-write
	// metric show it.
	var readyz string
	// The report's write is refused: its NodeStatus (written first), or its NodeReport.
	refused := func(readyz string) bool {
		return strings.Contains(readyz, "may only write the nodestatuses of its own Node") ||
			strings.Contains(readyz, "may only write the nodereports of its own Node")
	}
	run("node-b", func(string) bool {
		// Its writers race: the NodeKeys refusal may show first; wait for the report's.
		readyz = getInNS("/readyz")
		return refused(readyz)
	})
	// Its own NodeReport and NodeStatus are there, owned by its Node (the garbage
	// collector's link).
	for _, gvr := range []schema.GroupVersionResource{nodereport.GVR, nodereport.StatusGVR} {
		if u, err := dc.Resource(gvr).Namespace(api.Namespace).Get(ctx, "node-a", metav1.GetOptions{}); err != nil {
			t.Errorf("node-a's %s: %v", gvr.Resource, err)
		} else if refs := u.GetOwnerReferences(); len(refs) != 1 || refs[0].Kind != "Node" || refs[0].Name != "node-a" || refs[0].UID == "" {
			t.Errorf("node-a's %s owners: %+v", gvr.Resource, refs)
		}
	}
	if !refused(readyz) {
		t.Errorf("running as node-b with node-a's token: /readyz does not show the policy's refusal of its report: %q", readyz)
	} else {
		t.Logf("agent as node-b, /readyz: %s", strings.TrimSpace(readyz))
	}
	if after := report("node-b"); after != before {
		t.Errorf("an agent whose token names node-a wrote node-b's report: %q", after)
	}
	// Its public keys: node-a's NodeKeys, owned by node-a, for its key incarnation; none
	// for node-b (the policy refused that write too).
	if u, err := dc.Resource(nodekeys.GVR).Namespace(api.Namespace).Get(ctx, "node-a", metav1.GetOptions{}); err != nil {
		t.Errorf("node-a's NodeKeys: %v", err)
	} else if k, err := nodekeys.Parse(u); err != nil || len(k.Keys) != 1 || k.Incarnation.BootID == "" {
		t.Errorf("node-a's NodeKeys: %+v, %v", k, err)
	} else if refs := u.GetOwnerReferences(); len(refs) != 1 || refs[0].Kind != "Node" || refs[0].Name != "node-a" || refs[0].UID == "" {
		t.Errorf("node-a's NodeKeys owners: %+v", refs)
	} else {
		t.Logf("node-a's NodeKeys: epoch %s, generation %d, x25519 %s", k.Incarnation.Epoch, k.Keys[0].Generation, k.Keys[0].X25519)
	}
	if _, err := dc.Resource(nodekeys.GVR).Namespace(api.Namespace).Get(ctx, "node-b", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("node-b's NodeKeys, written with node-a's token: %v (want not found)", err)
	}
}

// newNetNS creates a network namespace with `ip netns add` (lo up) and opens it.
// Not testutils.NewNS: that creates the namespace on a locked OS thread which then
// exits, and the harness starts kube-apiserver and etcd with Pdeathsig, which fires
// when the *thread* that started them exits — if Go happened to run that goroutine on
// the thread that started the API server, the API server is killed.
func newNetNS(t *testing.T) ns.NetNS {
	t.Helper()
	if _, err := exec.LookPath("ip"); err != nil {
		requireOrSkip(t, "ip (iproute2) not installed")
	}
	name := fmt.Sprintf("so-manifests-%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		requireOrSkip(t, fmt.Sprintf("cannot create a network namespace: %v: %s", err, out))
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("lo up in %s: %v: %s", name, err, out)
	}
	n, err := ns.GetNS("/run/netns/" + name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = n.Close() })
	return n
}
