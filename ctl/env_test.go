package ctl

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	v3 "github.com/projectcalico/api/pkg/apis/projectcalico/v3"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/reconciler/agent"
	"github.com/secureoverlay/secureoverlay/reconciler/kernelinfo"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

// fixedNow is the injected clock of every golden test.
var fixedNow = time.Date(2026, 3, 4, 10, 0, 0, 0, time.UTC)

// env is one test's real kube-apiserver + etcd with Calico's CRDs.
type env struct {
	t       *testing.T
	cluster *kube.Cluster
	cs      kubernetes.Interface
	dyn     dynamic.Interface
	ctx     context.Context
	kc      string

	// Agent metrics served by real agent.Metrics registries, one per agent pod.
	mu       sync.Mutex
	servers  map[string]*httptest.Server // pod name → server
	xfrmDir  string
	rising   map[string]bool   // pod name → bump an xfrm_stat counter on every scrape
	dropping map[string]string // pod name → plaintext rule action whose counter rises ("drop", "count")
	metrics  map[string]*agent.Metrics
	port     int // the port of the last scrape
	scrapeNo map[string]int
	// roots are the key roots written to the Secret; no output may contain them.
	roots [][]byte
	// calico is the group-version applyCalico writes to (the CRDs installed).
	calico schema.GroupVersion
}

// newEnv starts a cluster with Calico's real crd.projectcalico.org/v1 CRDs.
func newEnv(t *testing.T) *env { return newEnvCalico(t, kube.CalicoV1) }

// newEnvCalico starts a cluster with Calico's real CRDs of the groups asked; applyCalico
// writes to v3 when only v3 is installed, else to v1.
func newEnvCalico(t *testing.T, which kube.CalicoAPI) *env {
	t.Helper()
	cluster := kube.Start(t)
	cfg := cluster.AdminConfig()
	kube.InstallCalicoCRDs(t, cfg, which)
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	gv := kube.CalicoV1GV
	if which == kube.CalicoV3 {
		gv = kube.CalicoV3GV
	}
	return &env{t: t, cluster: cluster, cs: cs, dyn: dyn, ctx: ctx, kc: cluster.Kubeconfig(), calico: gv,
		servers: map[string]*httptest.Server{}, xfrmDir: t.TempDir(), rising: map[string]bool{}, scrapeNo: map[string]int{},
		dropping: map[string]string{}, metrics: map[string]*agent.Metrics{}}
}

// result is one CLI invocation.
type result struct {
	stdout, stderr string
	code           int
}

func (r result) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
}

// run runs the CLI in-process against the test cluster (admin kubeconfig) with the fixed
// clock.
func (e *env) run(args ...string) result {
	e.t.Helper()
	return e.runClock(func() time.Time { return fixedNow }, args...)
}

func (e *env) runClock(now func() time.Time, args ...string) result {
	e.t.Helper()
	var out, errb bytes.Buffer
	c := &CLI{Now: now, PollInterval: 100 * time.Millisecond, FetchMetrics: e.fetch, Links: fakeLinks}
	code := c.Run(e.ctx, append([]string{"--kubeconfig", e.kc}, args...), &out, &errb)
	r := result{stdout: out.String(), stderr: errb.String(), code: code}
	e.checkNoKeys(r)
	return r
}

// checkNoKeys fails the test when any root key written to the Secret appears in output.
func (e *env) checkNoKeys(r result) {
	e.t.Helper()
	all := r.stdout + r.stderr
	for _, k := range e.roots {
		for _, enc := range []string{hex.EncodeToString(k), base64.StdEncoding.EncodeToString(k), base64.RawStdEncoding.EncodeToString(k)} {
			if strings.Contains(all, enc) {
				e.t.Fatalf("key bytes in CLI output:\n%s", r)
			}
		}
	}
}

// fetch serves an agent pod's metrics from a real agent.Metrics registry (the API
// server's pod proxy cannot reach a loopback pod IP, so the proxy hop is replaced).
func (e *env) fetch(ctx context.Context, _ *clients, pod *corev1.Pod, port int) ([]byte, error) {
	e.mu.Lock()
	srv := e.servers[pod.Name]
	path := filepath.Join(e.xfrmDir, pod.Name)
	e.scrapeNo[pod.Name]++
	e.port = port
	if e.rising[pod.Name] {
		writeXfrmStat(e.t, path, e.scrapeNo[pod.Name])
	}
	if action := e.dropping[pod.Name]; action != "" {
		n := uint64(10 * e.scrapeNo[pod.Name])
		e.metrics[pod.Name].SetPlaintext([]agent.PlaintextCount{{Direction: "in", Action: action, Packets: n, Bytes: 100 * n}})
	}
	e.mu.Unlock()
	if srv == nil {
		return nil, fmt.Errorf("pod %s: no metrics server on port %d", pod.Name, port)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := srv.Client().Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	_, err = b.ReadFrom(resp.Body)
	return b.Bytes(), err
}

// healthyKernel is what every test agent detects of its kernel (Debian bookworm's,
// esp4_offload not loaded).
func healthyKernel() kernelinfo.Info {
	return kernelinfo.Derive("6.1.0-41-amd64", map[string]bool{"esp4": true, "xfrm_user": true, "ipip": true, "ip_tunnel": true}, nil)
}

// setKernel sets the kernel info an agent pod's metrics export.
func (e *env) setKernel(pod string, k kernelinfo.Info) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.metrics[pod].SetKernel(k)
}

func writeXfrmStat(t *testing.T, path string, noStates int) {
	text := fmt.Sprintf("XfrmInError             \t0\nXfrmInNoStates          \t%d\nXfrmInStateSeqError     \t0\nXfrmOutNoStates         \t0\n", noStates)
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Error(err)
	}
}

// addAgentPod creates an agent Pod on node and a metrics server backed by a real
// agent.Metrics reading its own xfrm_stat file.
func (e *env) addAgentPod(node string) {
	e.t.Helper()
	name := "secureoverlay-agent-" + node
	path := filepath.Join(e.xfrmDir, name)
	writeXfrmStat(e.t, path, 3) // non-zero since boot, but not rising
	m := agent.NewMetrics(path)
	m.SetKernel(healthyKernel())
	srv := httptest.NewServer(promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{}))
	e.t.Cleanup(srv.Close)
	e.mu.Lock()
	e.servers[name] = srv
	e.metrics[name] = m
	e.mu.Unlock()
	_, err := e.cs.CoreV1().ServiceAccounts(api.Namespace).Create(e.ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		e.t.Fatal(err)
	}
	no := false
	_, err = e.cs.CoreV1().Pods(api.Namespace).Create(e.ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"app.kubernetes.io/name": "secureoverlay-agent"}},
		Spec: corev1.PodSpec{NodeName: node, AutomountServiceAccountToken: &no, HostNetwork: true,
			Containers: []corev1.Container{{Name: "agent", Image: "secureoverlay-agent:test"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) createNode(name, ip, boot string, labels map[string]string) {
	e.t.Helper()
	kube.CreateNode(e.t, e.cluster.AdminConfig(), kube.Node{Name: name, IPv4: ip, BootID: boot, Labels: labels})
}

// reboot changes node's boot ID (status.nodeInfo.bootID), as a kubelet does after a reboot.
func (e *env) reboot(node, boot string) {
	e.t.Helper()
	n, err := e.cs.CoreV1().Nodes().Get(e.ctx, node, metav1.GetOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	n.Status.NodeInfo.BootID = boot
	if _, err := e.cs.CoreV1().Nodes().UpdateStatus(e.ctx, n, metav1.UpdateOptions{}); err != nil {
		e.t.Fatal(err)
	}
}

// setAddress sets node's Calico IPv4 address annotation.
func (e *env) setAddress(node, cidr string) {
	e.t.Helper()
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]any{api.CalicoIPv4AddressAnnotation: cidr}}})
	if _, err := e.cs.CoreV1().Nodes().Patch(e.ctx, node, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		e.t.Fatalf("patch address of node %s: %v", node, err)
	}
}

// setReport writes the agent report annotation of node (rep nil removes it; raw, if
// non-empty, is written verbatim).
func (e *env) setReport(node string, rep *watch.Report, raw string) {
	e.t.Helper()
	var val any
	switch {
	case raw != "":
		val = raw
	case rep != nil:
		b, err := json.Marshal(rep)
		if err != nil {
			e.t.Fatal(err)
		}
		val = string(b)
	}
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]any{api.ReportAnnotation: val}}})
	if _, err := e.cs.CoreV1().Nodes().Patch(e.ctx, node, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		e.t.Fatalf("patch report of node %s: %v", node, err)
	}
}

func (e *env) setMasterStatus(ms *api.MasterStatus) {
	e.t.Helper()
	cms := e.cs.CoreV1().ConfigMaps(api.Namespace)
	if ms == nil {
		if err := cms.Delete(e.ctx, api.StatusConfigMapName, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			e.t.Fatal(err)
		}
		return
	}
	b, err := json.Marshal(ms)
	if err != nil {
		e.t.Fatal(err)
	}
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: api.StatusConfigMapName}, Data: map[string]string{api.StatusDataKey: string(b)}}
	if _, err := cms.Update(e.ctx, cm, metav1.UpdateOptions{}); apierrors.IsNotFound(err) {
		_, err = cms.Create(e.ctx, cm, metav1.CreateOptions{})
		if err != nil {
			e.t.Fatal(err)
		}
	} else if err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) setConfigMap(data map[string]string) {
	e.t.Helper()
	cms := e.cs.CoreV1().ConfigMaps(api.Namespace)
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: api.ConfigMapName}, Data: data}
	if _, err := cms.Update(e.ctx, cm, metav1.UpdateOptions{}); apierrors.IsNotFound(err) {
		if _, err := cms.Create(e.ctx, cm, metav1.CreateOptions{}); err != nil {
			e.t.Fatal(err)
		}
	} else if err != nil {
		e.t.Fatal(err)
	}
}

// applyCalico creates or replaces a cluster-scoped Calico object (a typed
// projectcalico/api v3 object, converted to the group e.calico serves) with strict field
// validation: the real CRDs reject what Calico would not store.
func (e *env) applyCalico(obj runtime.Object) {
	e.t.Helper()
	u, gvr, err := kube.CalicoObject(e.calico, obj)
	if err != nil {
		e.t.Fatal(err)
	}
	res := e.dyn.Resource(gvr)
	cur, err := res.Get(e.ctx, u.GetName(), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		_, err = res.Create(e.ctx, u, kube.StrictCreate)
	} else if err == nil {
		u.SetResourceVersion(cur.GetResourceVersion())
		_, err = res.Update(e.ctx, u, kube.StrictUpdate)
	}
	if err != nil {
		e.t.Fatalf("apply %s %s: %v", u.GetKind(), u.GetName(), err)
	}
}

// ipPool is an IPPool as calicoctl writes it (kube.NewIPPool), changed by edit.
func ipPool(name, cidr string, ipip v3.IPIPMode, edit func(*v3.IPPoolSpec)) *v3.IPPool {
	p := kube.NewIPPool(name, cidr, ipip)
	if edit != nil {
		edit(&p.Spec)
	}
	return p
}

// felixDefault is the FelixConfiguration "default" with spec.
func felixDefault(spec v3.FelixConfigurationSpec) *v3.FelixConfiguration {
	f := kube.NewFelixConfiguration("default")
	f.Spec = spec
	return f
}

// intp and boolp point at their argument (the typed specs use pointers for optional fields).
func intp(v int) *int    { return &v }
func boolp(v bool) *bool { return &v }

// ring7 is a valid ring in mode enforce with generation 7 active.
func (e *env) ring7(nodes ...string) []byte {
	e.t.Helper()
	root := make([]byte, 32)
	if _, err := rand.Read(root); err != nil {
		e.t.Fatal(err)
	}
	e.roots = append(e.roots, root)
	r := &keys.Ring{SchemaVersion: keys.SchemaVersion, Mode: api.ModeEnforce, Target: api.ModeEnforce, LastGeneration: 7,
		Generations: []keys.Generation{{Number: 7, State: keys.StateActive, Cipher: keys.AES128GCM, ICVBytes: 8, Root: root,
			Reason: "request", Created: fixedNow.Add(-2 * time.Hour), Activated: fixedNow.Add(-2*time.Hour + 3*time.Second)}}}
	for i, n := range nodes {
		r.Nodes = append(r.Nodes, keys.NodeID{Name: n, ID: uint32(i + 1)})
	}
	b, err := keys.Marshal(r)
	if err != nil {
		e.t.Fatal(err)
	}
	return b
}

// plantedRoot returns random key material a test pastes into the Secret somewhere other
// than a root (as a careless edit could); like the roots, no output may contain it.
func (e *env) plantedRoot() []byte {
	e.t.Helper()
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		e.t.Fatal(err)
	}
	e.roots = append(e.roots, k)
	return k
}

func (e *env) setSecret(data map[string][]byte) {
	e.t.Helper()
	ss := e.cs.CoreV1().Secrets(api.Namespace)
	if data == nil {
		if err := ss.Delete(e.ctx, api.SecretName, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			e.t.Fatal(err)
		}
		return
	}
	s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: api.SecretName}, Data: data}
	if _, err := ss.Update(e.ctx, s, metav1.UpdateOptions{}); apierrors.IsNotFound(err) {
		if _, err := ss.Create(e.ctx, s, metav1.CreateOptions{}); err != nil {
			e.t.Fatal(err)
		}
	} else if err != nil {
		e.t.Fatal(err)
	}
}

// installOperatorRBAC grants user what docs/cli.md lists for operators; withCalico=false
// leaves out the Calico CRDs, withSecret=false the key Secret.
func (e *env) installOperatorRBAC(user string, withCalico, withSecret bool) {
	e.t.Helper()
	name := "secureoverlay-operator-" + user
	rules := operatorClusterRules(withCalico)
	_, err := e.cs.RbacV1().ClusterRoles().Create(e.ctx, &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: name}, Rules: rules}, metav1.CreateOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	subj := []rbacv1.Subject{{Kind: "User", Name: user, APIGroup: "rbac.authorization.k8s.io"}}
	_, err = e.cs.RbacV1().ClusterRoleBindings().Create(e.ctx, &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: name},
		RoleRef: rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: name}, Subjects: subj}, metav1.CreateOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	_, err = e.cs.RbacV1().Roles(api.Namespace).Create(e.ctx, &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: name}, Rules: operatorNamespaceRules(withSecret)}, metav1.CreateOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	_, err = e.cs.RbacV1().RoleBindings(api.Namespace).Create(e.ctx, &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: name},
		RoleRef: rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: name}, Subjects: subj}, metav1.CreateOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	// The authorizer learns new bindings from an informer: wait until they apply.
	cs, err := kubernetes.NewForConfig(e.cluster.ConfigFor(user))
	if err != nil {
		e.t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		_, err := cs.CoreV1().ConfigMaps(api.Namespace).Get(e.ctx, api.StatusConfigMapName, metav1.GetOptions{})
		if !apierrors.IsForbidden(err) {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("rbac for %s not in effect after 20s: %v", user, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

var rfc3339 = regexp.MustCompile(`\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ`)

// normTimes replaces the API server's timestamps (managedFields, creation) with TIME, for
// golden files.
func normTimes(s string) string { return rfc3339.ReplaceAllString(s, "TIME") }

// goldenCheck compares got with testdata/name (rewritten with -update).
func goldenCheck(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read golden %s (run go test ./ctl -run %s -update): %v", path, t.Name(), err)
	}
	if string(want) != got {
		t.Errorf("%s differs from the golden file:\n--- got\n%s\n--- want\n%s", name, got, want)
	}
}
