package kube

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/secureoverlay/secureoverlay/api"
)

func TestFindBinariesMissingSaysMakeTools(t *testing.T) {
	t.Setenv(EnvKubeBin, t.TempDir())
	_, _, err := FindBinaries()
	if err == nil {
		t.Fatal("FindBinaries in an empty directory: want an error")
	}
	if !strings.Contains(err.Error(), "make tools") {
		t.Fatalf("error %q does not say how to build the binaries", err)
	}
}

func TestCalicoCRDsEmbedded(t *testing.T) {
	files := CalicoCRDs()
	for _, want := range []string{"ipamblocks.yaml", "blockaffinities.yaml", "ippools.yaml", "bgppeers.yaml", "felixconfigurations.yaml"} {
		if len(files[want]) == 0 {
			t.Errorf("CRD file %s is not embedded", want)
		}
	}
}

// TestClusterAndCalicoCRDs starts a real API server, installs the Calico CRDs
// and round-trips objects of every kind through the dynamic client.
func TestClusterAndCalicoCRDs(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a real kube-apiserver; skipped with -short")
	}
	t0 := time.Now()
	c := Start(t)
	t.Logf("etcd + kube-apiserver ready in %v", time.Since(t0).Round(time.Millisecond))

	ctx := context.Background()
	cs := kubernetes.NewForConfigOrDie(c.AdminConfig())
	if _, err := cs.CoreV1().Namespaces().Get(ctx, api.Namespace, metav1.GetOptions{}); err != nil {
		t.Fatalf("namespace %s was not created by the harness: %v", api.Namespace, err)
	}

	// The kubeconfig file works on its own.
	kc, err := clientcmd.BuildConfigFromFlags("", c.Kubeconfig())
	if err != nil {
		t.Fatalf("load kubeconfig: %v", err)
	}
	if _, err := kubernetes.NewForConfigOrDie(kc).Discovery().ServerVersion(); err != nil {
		t.Fatalf("server version via kubeconfig: %v", err)
	}

	t1 := time.Now()
	InstallCalicoCRDs(t, c.AdminConfig())
	t.Logf("Calico CRDs established in %v", time.Since(t1).Round(time.Millisecond))
	InstallCalicoCRDs(t, c.AdminConfig()) // idempotent: updates in place

	dc := dynamic.NewForConfigOrDie(c.AdminConfig())
	objs := []struct {
		gvr  schema.GroupVersionResource
		kind string
		name string
		spec map[string]any
	}{
		{IPAMBlocks, "IPAMBlock", "10-65-1-0-26", map[string]any{
			"cidr": "10.65.1.0/26", "affinity": "host:node-a", "strictAffinity": false, "deleted": false,
			"allocations": []any{int64(0), nil, int64(1)}, "unallocated": []any{int64(3), int64(4)},
			"attributes": []any{map[string]any{"handle_id": "ipip-tunnel-addr-node-a", "secondary": map[string]any{"node": "node-a"}}},
		}},
		{BlockAffinities, "BlockAffinity", "node-a-10-65-1-0-26", map[string]any{
			"node": "node-a", "cidr": "10.65.1.0/26", "state": "confirmed", "deleted": "false",
		}},
		{IPPools, "IPPool", "default-ipv4-ippool", map[string]any{
			"cidr": "10.65.0.0/16", "ipipMode": "Always", "vxlanMode": "Never", "natOutgoing": true,
			"disabled": false, "nodeSelector": "all()", "blockSize": int64(26),
		}},
		{BGPPeers, "BGPPeer", "tor-rack-1", map[string]any{
			"peerIP": "198.18.0.254", "asNumber": int64(64512), "node": "node-a",
		}},
		{FelixConfigurations, "FelixConfiguration", "default", map[string]any{
			"ipipEnabled": true, "ipipMTU": int64(1440), "somethingNewer": "kept",
		}},
	}
	for _, o := range objs {
		u := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": CalicoGroup + "/v1",
			"kind":       o.kind,
			"metadata":   map[string]any{"name": o.name},
			"spec":       o.spec,
		}}
		if _, err := dc.Resource(o.gvr).Create(ctx, u, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create %s %s: %v", o.kind, o.name, err)
		}
		got, err := dc.Resource(o.gvr).Get(ctx, o.name, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("get %s %s: %v", o.kind, o.name, err)
		}
		if !reflect.DeepEqual(got.Object["spec"], o.spec) {
			t.Errorf("%s %s spec round-trip:\n got %#v\nwant %#v", o.kind, o.name, got.Object["spec"], o.spec)
		}
		list, err := dc.Resource(o.gvr).List(ctx, metav1.ListOptions{})
		if err != nil || len(list.Items) != 1 {
			t.Errorf("list %s: %d items, err %v; want 1 item", o.gvr.Resource, len(list.Items), err)
		}
	}

	// The schemas are enforced: an unknown ipipMode and a boolean BlockAffinity
	// spec.deleted (a string in v1) are rejected.
	bad := []struct {
		gvr  schema.GroupVersionResource
		kind string
		spec map[string]any
	}{
		{IPPools, "IPPool", map[string]any{"cidr": "10.66.0.0/16", "ipipMode": "Sometimes"}},
		{BlockAffinities, "BlockAffinity", map[string]any{"node": "node-b", "cidr": "10.65.2.0/26", "deleted": false}},
		{IPAMBlocks, "IPAMBlock", map[string]any{"affinity": "host:node-b"}}, // no cidr
	}
	for i, b := range bad {
		u := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": CalicoGroup + "/v1", "kind": b.kind,
			"metadata": map[string]any{"name": "invalid-" + string(rune('a'+i))},
			"spec":     b.spec,
		}}
		_, err := dc.Resource(b.gvr).Create(ctx, u, metav1.CreateOptions{})
		if !apierrors.IsInvalid(err) {
			t.Errorf("create invalid %s %v: got %v, want an Invalid error", b.kind, b.spec, err)
		}
	}
}

// TestServiceAccountRBAC checks that RBAC is real: a ServiceAccount allowed to get
// one Secret by name gets it and is refused every other, and an impersonated
// user without bindings is refused.
func TestServiceAccountRBAC(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a real kube-apiserver; skipped with -short")
	}
	c := Start(t, WithNamespaces("rbac-test"))
	ctx := context.Background()
	admin := kubernetes.NewForConfigOrDie(c.AdminConfig())
	const ns = "rbac-test"

	for _, name := range []string{"allowed", "other"} {
		s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, StringData: map[string]string{"k": name}}
		if _, err := admin.CoreV1().Secrets(ns).Create(ctx, s, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create secret %s: %v", name, err)
		}
	}
	role := &rbacv1.Role{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "read-one-secret"},
		Rules: []rbacv1.PolicyRule{{
			APIGroups: []string{""}, Resources: []string{"secrets"},
			ResourceNames: []string{"allowed"}, Verbs: []string{"get"},
		}},
	}
	if _, err := admin.RbacV1().Roles(ns).Create(ctx, role, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create role: %v", err)
	}
	rb := &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "reader"},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: role.Name},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Namespace: ns, Name: "reader"}},
	}
	if _, err := admin.RbacV1().RoleBindings(ns).Create(ctx, rb, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create role binding: %v", err)
	}

	sa := kubernetes.NewForConfigOrDie(c.ServiceAccountConfig(ns, "reader"))
	// RBAC caches refresh from watches; allow a short moment for the binding.
	var got *corev1.Secret
	var err error
	deadline := time.Now().Add(10 * time.Second)
	for {
		got, err = sa.CoreV1().Secrets(ns).Get(ctx, "allowed", metav1.GetOptions{})
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("service account get secret allowed: %v", err)
	}
	if string(got.Data["k"]) != "allowed" {
		t.Fatalf("secret allowed: got data %q", got.Data["k"])
	}
	if _, err := sa.CoreV1().Secrets(ns).Get(ctx, "other", metav1.GetOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("service account get secret other: got %v, want Forbidden", err)
	}
	if _, err := sa.CoreV1().Secrets(ns).List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("service account list secrets: got %v, want Forbidden", err)
	}
	if _, err := sa.CoreV1().Secrets(api.Namespace).Get(ctx, "allowed", metav1.GetOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("service account get secret in another namespace: got %v, want Forbidden", err)
	}
	who, err := sa.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("service account self-subject review: %v", err)
	}
	if want := "system:serviceaccount:" + ns + ":reader"; who.Status.UserInfo.Username != want {
		t.Errorf("service account authenticated as %q, want %q", who.Status.UserInfo.Username, want)
	}

	// Impersonation: a user with no bindings is refused; the admin is not.
	alice := kubernetes.NewForConfigOrDie(c.ConfigFor("alice", "developers"))
	if _, err := alice.CoreV1().Secrets(ns).Get(ctx, "allowed", metav1.GetOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("impersonated alice get secret: got %v, want Forbidden", err)
	}
	if _, err := admin.CoreV1().Secrets(ns).Get(ctx, "other", metav1.GetOptions{}); err != nil {
		t.Errorf("admin get secret other: %v", err)
	}
	// Binding the group lets alice in: impersonated groups are real too.
	rb2 := rb.DeepCopy()
	rb2.Name = "developers"
	rb2.Subjects = []rbacv1.Subject{{Kind: rbacv1.GroupKind, APIGroup: rbacv1.GroupName, Name: "developers"}}
	if _, err := admin.RbacV1().RoleBindings(ns).Create(ctx, rb2, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create group role binding: %v", err)
	}
	deadline = time.Now().Add(10 * time.Second)
	for {
		_, err = alice.CoreV1().Secrets(ns).Get(ctx, "allowed", metav1.GetOptions{})
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		t.Errorf("impersonated alice in group developers get secret allowed: %v", err)
	}
}

// TestStopStartAPIServerKeepsData stops the API server, checks it is really
// gone, starts it again on the same port and reads the data written before.
func TestStopStartAPIServerKeepsData(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a real kube-apiserver; skipped with -short")
	}
	c := Start(t)
	ctx := context.Background()
	cfg := c.AdminConfig()
	cs := kubernetes.NewForConfigOrDie(cfg)
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: api.Namespace, Name: "survivor"}, Data: map[string]string{"a": "b"}}
	if _, err := cs.CoreV1().ConfigMaps(api.Namespace).Create(ctx, cm, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create configmap: %v", err)
	}
	host := c.Host()

	// An informer started before the restart must see objects created after it:
	// clients reconnect to the same address.
	factory := informers.NewSharedInformerFactoryWithOptions(cs, 0, informers.WithNamespace(api.Namespace))
	cmInformer := factory.Core().V1().ConfigMaps().Informer()
	stop := make(chan struct{})
	defer close(stop)
	factory.Start(stop)
	if !cache.WaitForCacheSync(stop, cmInformer.HasSynced) {
		t.Fatal("configmap informer did not sync")
	}

	tStop := time.Now()
	c.StopAPIServer()
	stopTook := time.Since(tStop)
	t.Logf("kube-apiserver stopped in %v", stopTook.Round(time.Millisecond))
	if stopTook > 15*time.Second {
		t.Errorf("kube-apiserver took %v to stop with a watch open; want a prompt graceful exit", stopTook)
	}
	short, cancel := context.WithTimeout(ctx, 3*time.Second)
	_, err := cs.CoreV1().ConfigMaps(api.Namespace).Get(short, "survivor", metav1.GetOptions{})
	cancel()
	var opErr *net.OpError
	if err == nil {
		t.Fatal("get configmap while the API server is stopped: succeeded")
	}
	if !errors.As(err, &opErr) && !strings.Contains(err.Error(), "connection refused") {
		t.Logf("get while stopped failed with: %v", err)
	}

	t0 := time.Now()
	c.StartAPIServer()
	t.Logf("kube-apiserver restarted in %v", time.Since(t0).Round(time.Millisecond))
	if c.Host() != host {
		t.Fatalf("API server moved from %s to %s", host, c.Host())
	}
	got, err := cs.CoreV1().ConfigMaps(api.Namespace).Get(ctx, "survivor", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get configmap after restart (same client): %v", err)
	}
	if got.Data["a"] != "b" {
		t.Fatalf("configmap after restart: data %v", got.Data)
	}

	after := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: api.Namespace, Name: "after-restart"}}
	if _, err := cs.CoreV1().ConfigMaps(api.Namespace).Create(ctx, after, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create configmap after restart: %v", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, ok, _ := cmInformer.GetStore().GetByKey(api.Namespace + "/after-restart"); ok {
			t.Logf("informer saw the new configmap %v after the restart", time.Since(t0).Round(time.Millisecond))
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("informer started before the restart never saw a configmap created after it")
		}
		time.Sleep(50 * time.Millisecond)
	}

	lines, err := c.LogLines("kube-apiserver")
	if err != nil {
		t.Fatal(err)
	}
	starts := 0
	for _, l := range lines {
		if strings.HasPrefix(l, "=== ") && strings.HasSuffix(l, "starting kube-apiserver") {
			starts++
		}
	}
	if starts != 2 {
		t.Errorf("kube-apiserver log shows %d starts, want 2", starts)
	}
}

// TestCloseStopsProcesses checks that nothing is left listening after Close.
func TestCloseStopsProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a real kube-apiserver; skipped with -short")
	}
	if _, _, err := FindBinaries(); err != nil && os.Getenv(EnvRequireAll) != "1" {
		t.Skipf("kube harness: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := StartProcess(ctx, t.TempDir())
	if err != nil {
		t.Fatalf("StartProcess: %v", err)
	}
	ports := []int{c.apiPort, c.etcdPort, c.etcdPeerPort}
	if err := c.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	for _, p := range ports {
		if !portFree(p) {
			t.Errorf("port %d still in use after Close", p)
		}
	}
	if err := c.StartAPIServerErr(ctx); err == nil {
		t.Error("StartAPIServerErr after Close: want an error")
	}
}

// TestCreateNode checks that Nodes made by the harness carry what a kubelet and
// Calico would have written, as stored by the real API server.
func TestCreateNode(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a real kube-apiserver; skipped with -short")
	}
	c := Start(t)
	CreateNode(t, c.AdminConfig(), Node{Name: "node-a", IPv4: "198.18.0.1", BootID: "boot-1"})
	CreateNode(t, c.AdminConfig(), Node{Name: "node-b", IPv4: "198.18.0.2", BootID: "boot-2", NotReady: true,
		Annotations: map[string]string{api.CalicoIPIPTunnelAnnotation: "10.65.2.1"}})

	cs := kubernetes.NewForConfigOrDie(c.AdminConfig())
	ctx := context.Background()
	for _, want := range []struct {
		name, ip, boot string
		ready          corev1.ConditionStatus
	}{{"node-a", "198.18.0.1", "boot-1", corev1.ConditionTrue}, {"node-b", "198.18.0.2", "boot-2", corev1.ConditionFalse}} {
		n, err := cs.CoreV1().Nodes().Get(ctx, want.name, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("get node %s: %v", want.name, err)
		}
		if n.Status.NodeInfo.BootID != want.boot {
			t.Errorf("node %s bootID %q, want %q", want.name, n.Status.NodeInfo.BootID, want.boot)
		}
		if got := n.Annotations[api.CalicoIPv4AddressAnnotation]; got != want.ip+"/24" {
			t.Errorf("node %s Calico address %q, want %q", want.name, got, want.ip+"/24")
		}
		var ready corev1.ConditionStatus
		for _, cond := range n.Status.Conditions {
			if cond.Type == corev1.NodeReady {
				ready = cond.Status
			}
		}
		if ready != want.ready {
			t.Errorf("node %s Ready=%q, want %q", want.name, ready, want.ready)
		}
	}
	n, _ := cs.CoreV1().Nodes().Get(ctx, "node-b", metav1.GetOptions{})
	if n.Annotations[api.CalicoIPIPTunnelAnnotation] != "10.65.2.1" {
		t.Errorf("node-b tunnel annotation %q", n.Annotations[api.CalicoIPIPTunnelAnnotation])
	}
	if _, err := CreateNodeContext(ctx, cs, Node{Name: "bad", IPv4: "not-an-ip"}); err == nil {
		t.Error("CreateNodeContext with a bad IPv4: want an error")
	}
}

// TestStartFailureReportsLog checks that an API server that cannot start is
// reported at once (not after the timeout), with the tail of its log.
func TestStartFailureReportsLog(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a real etcd; skipped with -short")
	}
	if _, _, err := FindBinaries(); err != nil && os.Getenv(EnvRequireAll) != "1" {
		t.Skipf("kube harness: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	t0 := time.Now()
	c, err := StartProcess(ctx, t.TempDir(), WithAPIServerArgs("--no-such-flag=1"))
	if err == nil {
		c.Close()
		t.Fatal("StartProcess with an unknown kube-apiserver flag: want an error")
	}
	if time.Since(t0) > time.Minute {
		t.Errorf("failure reported after %v; want it as soon as the process exits", time.Since(t0))
	}
	for _, want := range []string{"kube-apiserver exited", "no-such-flag"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not mention %q:\n%v", want, err)
		}
	}
}

// TestServingSANs checks the serving certificate: loopback always, extra SANs
// on request, and nothing else is trusted.
func TestServingSANs(t *testing.T) {
	dir := t.TempDir()
	p, err := writePKI(dir, []string{"198.18.0.10", "apiserver.lab"})
	if err != nil {
		t.Fatal(err)
	}
	pemBytes, err := os.ReadFile(p.serveCert)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(pemBytes)
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(p.caPEM)
	for _, name := range []string{"127.0.0.1", "localhost", "::1", "198.18.0.10", "apiserver.lab"} {
		if _, err := cert.Verify(x509.VerifyOptions{DNSName: name, Roots: roots}); err != nil {
			t.Errorf("serving certificate not valid for %s: %v", name, err)
		}
	}
	if _, err := cert.Verify(x509.VerifyOptions{DNSName: "198.18.0.11", Roots: roots}); err == nil {
		t.Error("serving certificate valid for 198.18.0.11; want only the requested SANs")
	}
	tok, err := os.ReadFile(p.tokenFile)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(tok), `,"system:masters"`) || !strings.HasPrefix(string(tok), p.adminToken+",") {
		t.Error("token file does not give the admin token the group system:masters")
	}
}

// TestStartRetriesBusyPorts takes the port the harness first picks for etcd (and
// then for the API server) and checks that Start moves to fresh ports.
func TestStartRetriesBusyPorts(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a real kube-apiserver; skipped with -short")
	}
	for _, which := range []int{0, 2} { // 0: etcd client port, 2: API server port
		t.Run([]string{"etcd", "", "apiserver"}[which], func(t *testing.T) {
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			busy := l.Addr().(*net.TCPAddr).Port
			calls := 0
			pickPorts = func(n int) ([]int, error) {
				calls++
				ports, err := freePorts(n)
				if err == nil && calls == 1 {
					ports[which] = busy
				}
				return ports, err
			}
			defer func() { pickPorts = freePorts }()

			c := Start(t)
			if calls < 2 {
				t.Fatalf("ports picked %d times; want a retry after the busy port", calls)
			}
			if c.etcdPort == busy || c.apiPort == busy {
				t.Fatalf("cluster uses the busy port %d", busy)
			}
			if _, err := kubernetes.NewForConfigOrDie(c.AdminConfig()).Discovery().ServerVersion(); err != nil {
				t.Fatalf("server version: %v", err)
			}
		})
	}
}
