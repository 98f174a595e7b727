//go:build linux

package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	authorizationv1 "k8s.io/api/authorization/v1"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/internal/testutil"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/nodereport"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/ledger"
	"github.com/secureoverlay/secureoverlay/reconciler/rules"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
	"github.com/secureoverlay/secureoverlay/reconciler/xfrm"
)

func skipOrFail(t *testing.T, reason string) {
	t.Helper()
	if os.Getenv("SECUREOVERLAY_REQUIRE_ALL") == "1" {
		t.Fatalf("%s (required by SECUREOVERLAY_REQUIRE_ALL=1)", reason)
	}
	t.Skip(reason)
}

func newNetNS(t *testing.T) ns.NetNS {
	t.Helper()
	if os.Geteuid() != 0 {
		skipOrFail(t, "needs root to create network namespaces")
	}
	if _, err := exec.LookPath("iptables"); err != nil {
		skipOrFail(t, "needs iptables (hack/install-deps.sh)")
	}
	n, err := testutils.NewNS()
	if err != nil {
		skipOrFail(t, "cannot create a network namespace: "+err.Error())
	}
	t.Cleanup(func() {
		_ = n.Close()
		_ = testutils.UnmountNS(n)
	})
	return n
}

// nsKernel is the agent's xfrm kernel in the test namespace: policies in the REAL kernel
// (netlink), states in the fake, because this host's kernel has no ESP/GCM. Full SAs are
// proven in the VM lab (conformance/lab).
type nsKernel struct {
	ns     ns.NetNS
	states *xfrm.Fake
}

func do(n ns.NetNS, f func() error) error { return n.Do(func(ns.NetNS) error { return f() }) }

func (k nsKernel) ListStates() ([]xfrm.KernelSA, error) { return k.states.ListStates() }
func (k nsKernel) AddState(sa desired.SA) error         { return k.states.AddState(sa) }
func (k nsKernel) DeleteState(sa desired.SA) error      { return k.states.DeleteState(sa) }
func (k nsKernel) ListPolicies() ([]xfrm.KernelPolicy, error) {
	return testutil.InNS(k.ns, xfrm.Netlink{}.ListPolicies)
}
func (k nsKernel) AddPolicy(p desired.Policy) error {
	return do(k.ns, func() error { return xfrm.Netlink{}.AddPolicy(p) })
}
func (k nsKernel) UpdatePolicy(p desired.Policy) error {
	return do(k.ns, func() error { return xfrm.Netlink{}.UpdatePolicy(p) })
}
func (k nsKernel) DeletePolicy(p desired.Policy) error {
	return do(k.ns, func() error { return xfrm.Netlink{}.DeletePolicy(p) })
}

// nsIPT runs the real iptables (rules.System) inside the test namespace.
type nsIPT struct {
	ns  ns.NetNS
	sys *rules.System
}

func (i nsIPT) ListChains(table string) ([]string, error) {
	return testutil.InNS(i.ns, func() ([]string, error) { return i.sys.ListChains(table) })
}
func (i nsIPT) NewChain(table, chain string) error {
	return do(i.ns, func() error { return i.sys.NewChain(table, chain) })
}
func (i nsIPT) List(table, chain string) ([]string, error) {
	return testutil.InNS(i.ns, func() ([]string, error) { return i.sys.List(table, chain) })
}
func (i nsIPT) ListWithCounters(table, chain string) ([]string, error) {
	return testutil.InNS(i.ns, func() ([]string, error) { return i.sys.ListWithCounters(table, chain) })
}
func (i nsIPT) Insert(table, chain string, pos int, spec ...string) error {
	return do(i.ns, func() error { return i.sys.Insert(table, chain, pos, spec...) })
}
func (i nsIPT) DeleteById(table, chain string, id int) error {
	return do(i.ns, func() error { return i.sys.DeleteById(table, chain, id) })
}
func (i nsIPT) ClearAndDeleteChain(table, chain string) error {
	return do(i.ns, func() error { return i.sys.ClearAndDeleteChain(table, chain) })
}
func (i nsIPT) Restore(data []byte) error {
	return do(i.ns, func() error { return i.sys.Restore(data) })
}

// ours lists our policies in the namespace as "dir src>dst".
func ours(t *testing.T, n ns.NetNS, cfg desired.Config) map[string]bool {
	t.Helper()
	pols, err := testutil.InNS(n, xfrm.Netlink{}.ListPolicies)
	if err != nil {
		t.Fatalf("list policies: %v", err)
	}
	out := map[string]bool{}
	for _, p := range pols {
		if !p.Foreign && cfg.OwnsPolicy(p.Policy) {
			out[fmt.Sprintf("%s %s>%s", p.Policy.Dir, p.Policy.Src.Addr(), p.Policy.Dst.Addr())] = true
		}
	}
	return out
}

func rawRules(t *testing.T, n ns.NetNS) string {
	t.Helper()
	out, err := testutil.InNS(n, func() ([]byte, error) { return exec.Command("iptables", "-w", "5", "-t", "raw", "-S").CombinedOutput() })
	if err != nil {
		t.Fatalf("iptables -t raw -S: %v: %s", err, out)
	}
	return string(out)
}

// reportChecker sits in the agent's HTTP transport: whenever the agent patches its report,
// it checks right then that the namespace's kernel holds every policy the report claims
// (program before advertise).
type reportChecker struct {
	ns         ns.NetNS
	cfg        desired.Config
	self       netip.Addr
	ips        map[string]netip.Addr
	mu         sync.Mutex
	checked    int // report writes checked
	objects    int // of them to the NodeReport
	removals   int // patches removing the annotation
	violations []string
}

// checkingRT is one client's transport wrapped by the shared checker.
type checkingRT struct {
	rt http.RoundTripper
	c  *reportChecker
}

func (w checkingRT) RoundTrip(req *http.Request) (*http.Response, error) {
	annotation := req.Method == http.MethodPatch && strings.HasSuffix(req.URL.Path, "/nodes/a")
	object := (req.Method == http.MethodPatch && strings.HasSuffix(req.URL.Path, "/nodereports/a")) ||
		(req.Method == http.MethodPost && strings.HasSuffix(req.URL.Path, "/nodereports"))
	if (annotation || object) && req.Body != nil {
		body, err := io.ReadAll(req.Body)
		if err != nil {
			return nil, err
		}
		req.Body = io.NopCloser(bytes.NewReader(body))
		w.c.check(body, object)
	}
	return w.rt.RoundTrip(req)
}

// WrappedRoundTripper lets client-go reach the inner transport (request cancellation).
func (w checkingRT) WrappedRoundTripper() http.RoundTripper { return w.rt }

// check checks a report write's body: a patch of the Node's annotation, or (object) a
// NodeReport. A patch that removes the annotation claims nothing.
func (c *reportChecker) check(body []byte, object bool) {
	var p struct {
		Metadata struct {
			Annotations map[string]*string `json:"annotations"`
		} `json:"metadata"`
		Report string `json:"report"`
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := json.Unmarshal(body, &p); err != nil {
		c.violations = append(c.violations, "undecodable report write")
		return
	}
	raw := p.Report
	if !object {
		v := p.Metadata.Annotations[api.ReportAnnotation]
		if v == nil {
			c.removals++
			return
		}
		raw = *v
	} else {
		c.objects++
	}
	c.checked++
	r, err := watch.ParseReport(raw)
	if err != nil {
		c.violations = append(c.violations, err.Error())
		return
	}
	pols, err := testutil.InNS(c.ns, xfrm.Netlink{}.ListPolicies)
	if err != nil {
		c.violations = append(c.violations, err.Error())
		return
	}
	have := map[string]bool{}
	for _, kp := range pols {
		have[fmt.Sprintf("%s %s>%s", kp.Policy.Dir, kp.Policy.Src.Addr(), kp.Policy.Dst.Addr())] = true
	}
	for peer := range r.InboundFrom {
		if k := fmt.Sprintf("in %s>%s", c.ips[peer], c.self); !have[k] {
			c.violations = append(c.violations, fmt.Sprintf("report %d (%+v) claims inbound from %s before the kernel holds %s (has %v)", c.checked, *r, peer, k, have))
		}
	}
	for peer := range r.EncryptingTo {
		if k := fmt.Sprintf("out %s>%s", c.self, c.ips[peer]); !have[k] {
			c.violations = append(c.violations, "report claims encrypting to "+peer+" before the kernel holds "+k)
		}
	}
}

func agentRBAC(t *testing.T, admin kubernetes.Interface) {
	t.Helper()
	ctx := context.Background()
	cr := &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: "secureoverlay-agent"}, Rules: []rbacv1.PolicyRule{
		{APIGroups: []string{""}, Resources: []string{"nodes"}, Verbs: []string{"get", "list", "watch", "patch"}},
		// As the manifest: Calico's objects of both groups, its DatastoreMigrations.
		{APIGroups: []string{"crd.projectcalico.org", "projectcalico.org"}, Resources: []string{"ipamblocks", "blockaffinities", "ippools", "bgppeers", "felixconfigurations"}, Verbs: []string{"list", "watch"}},
		{APIGroups: []string{"migration.projectcalico.org"}, Resources: []string{"datastoremigrations"}, Verbs: []string{"list", "watch"}},
	}}
	role := &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Namespace: api.Namespace, Name: "secureoverlay-agent"}, Rules: []rbacv1.PolicyRule{
		{APIGroups: []string{""}, Resources: []string{"secrets"}, ResourceNames: []string{api.SecretName}, Verbs: []string{"get", "list", "watch"}},
		{APIGroups: []string{""}, Resources: []string{"configmaps"}, ResourceNames: []string{api.RingConfigMapName}, Verbs: []string{"get", "list", "watch"}},
		{APIGroups: []string{nodereport.Group}, Resources: []string{nodereport.Resource}, Verbs: []string{"get", "list", "watch", "create", "patch"}},
	}}
	subj := []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Namespace: api.Namespace, Name: "agent"}}
	if _, err := admin.RbacV1().ClusterRoles().Create(ctx, cr, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.RbacV1().Roles(api.Namespace).Create(ctx, role, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "secureoverlay-agent"},
		RoleRef: rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: cr.Name}, Subjects: subj}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.RbacV1().RoleBindings(api.Namespace).Create(ctx, &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Namespace: api.Namespace, Name: "secureoverlay-agent"},
		RoleRef: rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: role.Name}, Subjects: subj}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	kube.RequireAuthorized(t, admin, kube.ServiceAccountUser(api.Namespace, "agent"), kube.ServiceAccountGroups(api.Namespace),
		authorizationv1.ResourceAttributes{Resource: "nodes", Verb: "watch"},
		authorizationv1.ResourceAttributes{Resource: "secrets", Namespace: api.Namespace, Name: api.SecretName, Verb: "watch"})
}

// peerReport is peer's report (boot peerBoot, Node UID peerUID, epoch "e-"+name) claiming
// a's SAs (made for a's key incarnation selfInc) installed both ways.
func peerReport(selfInc, name, peerBoot, peerUID string) string {
	tag := watch.IncarnationTag(selfInc)
	b, _ := json.Marshal(watch.Report{NodeReport: api.NodeReport{Mode: api.ModeEnforce, Generations: []uint32{1}, Incarnation: peerBoot,
		UID: peerUID, Epoch: "e-" + name},
		InboundFrom: map[string]string{"a": tag}, EncryptingTo: map[string]string{"a": tag}})
	return string(b)
}

// annotateReport sets node name's report annotation to mk(its UID).
func annotateReport(t *testing.T, cfg *rest.Config, name string, mk func(uid string) string) {
	t.Helper()
	cs := kubernetes.NewForConfigOrDie(cfg)
	n, err := cs.CoreV1().Nodes().Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]string{api.ReportAnnotation: mk(string(n.UID))}}})
	if _, err := cs.CoreV1().Nodes().Patch(context.Background(), name, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
}

// seedSelf leaves node a an empty report with SA epoch "e-a" made for its current Node
// object, and a ledger directory with that epoch and no keys (as an earlier agent that
// claimed nothing would have). It returns a's key incarnation, so peers' reports can name
// it before the agent starts, and the ledger directory for every agent process of a.
func seedSelf(t *testing.T, cfg *rest.Config, boot string) (inc, ledgerDir string) {
	t.Helper()
	var uidA string
	annotateReport(t, cfg, "a", func(uid string) string {
		uidA = uid
		inc = watch.KeyIncarnation(boot, uid, "e-a")
		b, _ := json.Marshal(watch.Report{NodeReport: api.NodeReport{Mode: api.ModeOff, Incarnation: boot, UID: uid, Epoch: "e-a"}})
		return string(b)
	})
	ledgerDir = t.TempDir()
	l, _, err := ledger.Open(ledgerDir, ledger.Identity{Node: "a", BootID: boot, UID: uidA}, ledger.Options{NewEpoch: func() string { return "e-a" }})
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	return inc, ledgerDir
}

// createPeer creates peer node name whose agent reports a's SAs installed both ways.
func createPeer(t *testing.T, cfg *rest.Config, name, ip, boot, selfInc string) {
	t.Helper()
	kube.CreateNode(t, cfg, kube.Node{Name: name, IPv4: ip, BootID: boot})
	annotateReport(t, cfg, name, func(uid string) string { return peerReport(selfInc, name, boot, uid) })
}

func writes(m *Metrics) float64 {
	var sum float64
	for _, l := range [][2]string{{"state", "add"}, {"state", "replace"}, {"state", "delete"}, {"policy", "add"}, {"policy", "update"}, {"policy", "delete"}} {
		sum += value(m.Writes.WithLabelValues(l[0], l[1]))
	}
	return sum
}

// TestAgentAgainstRealAPIServerAndKernel runs the agent against a real kube-apiserver (as
// a least-privilege ServiceAccount) and a fresh network namespace on this host.
func TestAgentAgainstRealAPIServerAndKernel(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a real kube-apiserver; skipped with -short")
	}
	netns := newNetNS(t)
	sys, err := rules.NewSystem()
	if err != nil {
		skipOrFail(t, "iptables: "+err.Error())
	}
	c := kube.Start(t)
	admin := kubernetes.NewForConfigOrDie(c.AdminConfig())
	kube.InstallCalicoCRDs(t, c.AdminConfig())
	agentRBAC(t, admin)
	ctx := context.Background()

	// The key ring: enforce, one active generation with a random root (never printed).
	ring := testRing(t, api.ModeEnforce, "a", "b", "c")
	data, err := keys.Marshal(ring)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin.CoreV1().Secrets(api.Namespace).Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: api.Namespace, Name: api.SecretName},
		Data: map[string][]byte{api.SecretDataKey: data}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// A Secret the agent must not be able to read (least privilege + field selector).
	if _, err := admin.CoreV1().Secrets(api.Namespace).Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: api.Namespace, Name: "other"},
		StringData: map[string]string{"x": "y"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	dyn := dynamic.NewForConfigOrDie(c.AdminConfig())
	if _, err := kube.CreateCalico(ctx, dyn, kube.CalicoV1GV, kube.NewIPPool("default-ipv4-ippool", "10.244.0.0/16", "Always")); err != nil {
		t.Fatal(err)
	}
	kube.CreateNode(t, c.AdminConfig(), kube.Node{Name: "a", IPv4: "198.18.0.1", BootID: "boot-a"})
	incA, ledgerDir := seedSelf(t, c.AdminConfig(), "boot-a")
	createPeer(t, c.AdminConfig(), "b", "198.18.0.2", "boot-b", incA)

	dp := desired.Config{}.WithDefaults()
	states := xfrm.NewFake()
	kern := nsKernel{ns: netns, states: states}
	ipt := nsIPT{ns: netns, sys: sys}
	checker := &reportChecker{ns: netns, cfg: dp, self: netip.MustParseAddr("198.18.0.1"),
		ips: map[string]netip.Addr{"b": netip.MustParseAddr("198.18.0.2"), "c": netip.MustParseAddr("198.18.0.3")}}
	saCfg := c.ServiceAccountConfig(api.Namespace, "agent")
	saCfg.WrapTransport = func(rt http.RoundTripper) http.RoundTripper { return checkingRT{rt: rt, c: checker} }
	// The agent's identity really is least-privileged.
	if _, err := kubernetes.NewForConfigOrDie(c.ServiceAccountConfig(api.Namespace, "agent")).CoreV1().Secrets(api.Namespace).Get(ctx, "other", metav1.GetOptions{}); err == nil {
		t.Fatal("the agent's service account can read another Secret")
	}

	start := func(resync time.Duration) (*Agent, *Metrics, func()) {
		t.Helper()
		client := kubernetes.NewForConfigOrDie(saCfg)
		m := NewMetrics("")
		dc := dynamic.NewForConfigOrDie(saCfg)
		src := watch.New(watch.Config{Client: client, Dynamic: dc, Self: "a", DiscoveryRetry: 200 * time.Millisecond})
		// The lists kept (b's reports are the test's, not an agent's): the checker holds
		// every claim the reports list against the kernel at write time.
		a, err := New(Config{NodeName: "a", Dataplane: dp, ResyncInterval: resync, ExternalMTU: 1500, LedgerDir: ledgerDir, ReportLists: ListsAlways},
			Deps{Client: client, Dynamic: dc, Source: src, Xfrm: xfrm.NewApplier(kern, dp), Rules: rules.NewApplier(ipt), Metrics: m,
				Logger: slog.New(slog.NewTextHandler(os.Stderr, nil))})
		if err != nil {
			t.Fatal(err)
		}
		rctx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { a.Run(rctx); close(done) }()
		return a, m, func() { cancel(); <-done }
	}
	report := func() *watch.Report { // as peers and the master read it
		raw, err := nodereport.Read(ctx, admin, dyn, api.Namespace, "a")
		if err != nil {
			t.Fatal(err)
		}
		if raw == "" {
			return nil
		}
		r, err := watch.ParseReport(raw)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	t.Cleanup(func() { // leave nothing behind even on failure (the namespace goes too)
		_, _ = Cleanup(kern, ipt, dp)
	})

	// 1. Start: b is programmed, then reported.
	a1, m1, stop1 := start(time.Hour)
	waitFor(t, "report with b", func() bool { r := report(); return r != nil && r.EncryptingTo["b"] != "" })
	if got := ours(t, netns, dp); !got["in 198.18.0.2>198.18.0.1"] || !got["out 198.18.0.1>198.18.0.2"] || len(got) != 2 {
		t.Fatalf("policies after start: %v", got)
	}
	if rr := rawRules(t, netns); !strings.Contains(rr, "-A PREROUTING -m comment --comment") || !strings.Contains(rr, "-s 198.18.0.2/32 -p ipencap") {
		t.Fatalf("iptables after start:\n%s", rr)
	}
	if r := report(); r.Mode != api.ModeEnforce || r.Incarnation != "boot-a" || r.BudgetMTU != 1452 || r.PeersEncrypted != 1 || r.Error != "" {
		t.Errorf("report = %+v", r)
	}
	// b reports only as an annotation (an agent of 0.1): a writes its NodeReport and,
	// for b, its annotation too, with the same claims.
	annotation := func(node string) string {
		n, err := admin.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return n.Annotations[api.ReportAnnotation]
	}
	object := func(node string) string {
		u, err := dyn.Resource(nodereport.GVR).Namespace(api.Namespace).Get(ctx, node, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return ""
		}
		if err != nil {
			t.Fatal(err)
		}
		return nodereport.Raw(u)
	}
	if o, an := object("a"), annotation("a"); o == "" || o != an {
		t.Errorf("with a peer of 0.1: NodeReport %q, annotation %q; want both, the same", o, an)
	}

	// 2. A node added in the API shows up as programmed policies; measure the latency.
	w0 := writes(m1)
	t0 := time.Now()
	createPeer(t, c.AdminConfig(), "c", "198.18.0.3", "boot-c", incA)
	waitFor(t, "policies for c", func() bool {
		got := ours(t, netns, dp)
		return got["in 198.18.0.3>198.18.0.1"] && got["out 198.18.0.1>198.18.0.3"]
	})
	addLatency := time.Since(t0)
	waitFor(t, "report with c", func() bool { r := report(); return r != nil && r.EncryptingTo["c"] != "" })
	// Settle, then count: adding one peer is 2 SAs + 2 policies, nothing else rewritten.
	time.Sleep(200 * time.Millisecond)
	addWrites := writes(m1) - w0
	t.Logf("node added in the API → policies in the kernel: %v; xfrm writes for the new peer: %v", addLatency, addWrites)
	if addWrites != 4 {
		t.Errorf("adding one peer made %v xfrm writes, want 4 (2 SAs, 2 policies)", addWrites)
	}

	// 3. A deleted node's objects are pruned.
	t0 = time.Now()
	if err := admin.CoreV1().Nodes().Delete(ctx, "c", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "policies for c pruned", func() bool { got := ours(t, netns, dp); return len(got) == 2 && !got["out 198.18.0.1>198.18.0.3"] })
	t.Logf("node deleted in the API → its policies pruned: %v", time.Since(t0))
	waitFor(t, "SAs for c pruned", func() bool { s, _ := states.Snapshot(); return len(s) == 2 })
	waitFor(t, "iptables rules for c pruned", func() bool { return !strings.Contains(rawRules(t, netns), "198.18.0.3") })
	waitFor(t, "report without c", func() bool { r := report(); return r != nil && r.InboundFrom["c"] == "" && r.EncryptingTo["c"] == "" })

	// 4. SIGTERM (context cancelled) leaves the data plane as it is.
	_ = a1
	stop1()
	beforeStop := ours(t, netns, dp)
	if len(beforeStop) != 2 || !strings.Contains(rawRules(t, netns), "-j DROP") {
		t.Fatalf("data plane changed on shutdown: %v\n%s", beforeStop, rawRules(t, netns))
	}

	// 5. A restarted agent adopts everything (no writes) and a short resync repairs drift
	// made behind its back.
	a2, m2, stop2 := start(300 * time.Millisecond)
	defer stop2()
	waitFor(t, "restarted agent ready", func() bool { return a2.Status().Ready })
	if w := writes(m2); w != 0 {
		t.Errorf("restarted agent made %v xfrm writes, want 0 (adopt)", w)
	}
	// b's agent is upgraded: it publishes a NodeReport (same claims, written later than
	// its annotation). No peer reads only annotations any more: a removes its own, and
	// the kernel does not change.
	bReport := annotation("b")
	var br watch.Report
	if err := json.Unmarshal([]byte(bReport), &br); err != nil {
		t.Fatal(err)
	}
	br.LastSync = time.Now().UTC().Truncate(time.Second)
	bRaw, _ := json.Marshal(br)
	bNode, err := admin.CoreV1().Nodes().Get(ctx, "b", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := nodereport.Write(ctx, dyn, api.Namespace, "b", string(bNode.UID), string(br.Mode), bRaw); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a's annotation removed once every peer publishes a NodeReport", func() bool { return annotation("a") == "" })
	if r := report(); r == nil || r.EncryptingTo["b"] == "" || object("a") == "" {
		t.Errorf("after the annotation's removal, a's report (its NodeReport) = %+v", r)
	}
	// The namespace's reports are deleted (as `kubectl delete -f` deletes the namespace
	// before the agents' SIGTERM): b's last claims are kept, nothing in a's kernel moves.
	w0 = writes(m2)
	if err := dyn.Resource(nodereport.GVR).Namespace(api.Namespace).Delete(ctx, "b", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // several 300 ms resyncs
	if got := ours(t, netns, dp); len(got) != 2 || !got["out 198.18.0.1>198.18.0.2"] || writes(m2) != w0 || !strings.Contains(rawRules(t, netns), "-s 198.18.0.2/32") {
		t.Errorf("after b's NodeReport was deleted: policies %v, %v xfrm writes", got, writes(m2)-w0)
	}
	// An API server outage leaves the data plane alone; afterwards events flow again.
	c.StopAPIServer()
	time.Sleep(time.Second) // several resyncs run from the caches meanwhile
	if got := ours(t, netns, dp); len(got) != 2 {
		t.Fatalf("policies during the API server outage: %v", got)
	}
	if !a2.Status().Healthy {
		t.Error("unhealthy during an API server outage")
	}
	c.StartAPIServer()
	// c comes back as a new Node object WITHOUT a reboot (same name, IP and boot ID, as
	// when a kubelet re-registers): its new UID gives the pair new keys.
	createPeer(t, c.AdminConfig(), "c", "198.18.0.3", "boot-c", incA)
	waitFor(t, "policies for c after the outage", func() bool { return ours(t, netns, dp)["out 198.18.0.1>198.18.0.3"] })
	if r := states.ReusedKeys(); len(r) != 0 {
		t.Errorf("SAs re-created under a used key after c's Node was re-created: %v", r)
	}
	if n := states.KeysAdded(); n != 6 {
		t.Errorf("distinct keys installed = %d, want 6 (2 for b, 2 for c, 2 for c's new Node object)", n)
	}
	if err := admin.CoreV1().Nodes().Delete(ctx, "c", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "c pruned again", func() bool { return len(ours(t, netns, dp)) == 2 })
	waitFor(t, "ready again", func() bool { return a2.Status().Ready })
	waitFor(t, "report without c again", func() bool {
		r := report()
		return r != nil && r.Error == "" && r.PeersExpected == 1 && r.InboundFrom["c"] == ""
	})
	time.Sleep(100 * time.Millisecond) // let the publishing sync return

	// The flush must really remove our policies, so the agent must really put them back:
	// counted by its own policy adds. (A snapshot of the kernel right after the flush
	// raced the 300 ms resync: a sync that had already re-added them but not yet returned
	// looked like a flush that did nothing — seen once under a CPU hog.)
	policyAdds := func() float64 { return value(m2.Writes.WithLabelValues("policy", "add")) }
	addsBefore := policyAdds()
	if err := do(netns, func() error { return netlink.XfrmPolicyFlush() }); err != nil {
		t.Fatal(err)
	}
	if out, err := testutil.InNS(netns, func() ([]byte, error) {
		return exec.Command("sh", "-c", "iptables -w 5 -t raw -F SECUREOVERLAY-IN && iptables -w 5 -t raw -D PREROUTING 1").CombinedOutput()
	}); err != nil {
		t.Fatalf("flush iptables: %v: %s", err, out)
	}
	t0 = time.Now()
	waitFor(t, "resync restores policies and rules", func() bool {
		rr := rawRules(t, netns)
		return len(ours(t, netns, dp)) == 2 && strings.Contains(rr, "-A PREROUTING -m comment") && strings.Contains(rr, "-s 198.18.0.2/32")
	})
	waitFor(t, "the agent re-added both flushed policies", func() bool { return policyAdds()-addsBefore >= 2 })
	t.Logf("flushed xfrm policies and iptables chain restored by a resync after %v", time.Since(t0))
	stop2()

	// 6. cleanup removes everything we own.
	res, err := Cleanup(kern, ipt, dp)
	if err != nil {
		t.Fatal(err)
	}
	if got := ours(t, netns, dp); len(got) != 0 || res.PoliciesDeleted != 2 || res.StatesDeleted != 2 {
		t.Errorf("after cleanup: policies %v, result %+v", got, res)
	}
	if rr := rawRules(t, netns); strings.Contains(rr, "SECUREOVERLAY") {
		t.Errorf("iptables after cleanup:\n%s", rr)
	}

	checker.mu.Lock()
	defer checker.mu.Unlock()
	if checker.checked == 0 || checker.objects == 0 || checker.checked == checker.objects || checker.removals == 0 {
		t.Errorf("report writes checked: %d (%d NodeReports), %d annotation removals; want both kinds and a removal", checker.checked, checker.objects, checker.removals)
	}
	for _, v := range checker.violations {
		t.Error(v)
	}
	t.Logf("%d report writes (%d NodeReports) checked against the kernel at write time", checker.checked, checker.objects)
}
