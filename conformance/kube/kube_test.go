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
	"k8s.io/apimachinery/pkg/runtime"
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

// TestCalicoDirMissingSaysWhatAndWhere: without Calico's files the harness names the
// missing files and the directory it looked in, and never falls back to CRDs of its own.
func TestCalicoDirMissingSaysWhatAndWhere(t *testing.T) {
	dir := t.TempDir()
	t.Setenv(EnvCalicoDir, dir)
	_, err := CalicoDir()
	if err == nil {
		t.Fatal("CalicoDir in an empty directory: want an error")
	}
	for _, want := range []string{dir, crdFileV1, crdFileV3, EnvCalicoDir} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
}

// TestCalicoCRDsAreCalicos reads Calico's release files: the 22 Calico kinds of each group (the files also carry the policy.networking.k8s.io ClusterNetworkPolicy CRD, which is not Calico's), only
// CRDs (the v3 manifest also carries Calico's DaemonSet and RBAC), and the fields whose
// types differ between the groups as Calico defines them.
func TestCalicoCRDsAreCalicos(t *testing.T) {
	dir := RequireCalico(t)
	for _, tc := range []struct {
		a    CalicoAPI
		want int
	}{{CalicoV1, 22}, {CalicoV3, 22}, {CalicoBoth, 44}} {
		crds, err := CalicoCRDs(dir, tc.a)
		if err != nil {
			t.Fatalf("%s: %v", tc.a, err)
		}
		if len(crds) != tc.want {
			t.Errorf("%s: %d CRDs, want %d", tc.a, len(crds), tc.want)
		}
		for _, c := range crds {
			if c.GetKind() != "CustomResourceDefinition" {
				t.Errorf("%s: %s is a %s", tc.a, c.GetName(), c.GetKind())
			}
		}
	}
	deletedType := func(a CalicoAPI, name string) string {
		crds, _ := CalicoCRDs(dir, a)
		for _, c := range crds {
			if c.GetName() == name {
				vs, _, _ := unstructured.NestedSlice(c.Object, "spec", "versions")
				typ, _, _ := unstructured.NestedString(vs[0].(map[string]any), "schema", "openAPIV3Schema", "properties", "spec", "properties", "deleted", "type")
				return typ
			}
		}
		return "missing"
	}
	if got := deletedType(CalicoV1, "blockaffinities.crd.projectcalico.org"); got != "string" {
		t.Errorf("v1 BlockAffinity spec.deleted is %q, want string", got)
	}
	if got := deletedType(CalicoV3, "blockaffinities.projectcalico.org"); got != "boolean" {
		t.Errorf("v3 BlockAffinity spec.deleted is %q, want boolean", got)
	}
	if _, src, err := MigrationCRD(dir); err != nil {
		t.Errorf("DatastoreMigration CRD: %v", err)
	} else {
		t.Logf("DatastoreMigration CRD from %s", src)
	}
}

// TestClusterAndCalicoCRDs starts a real API server, installs Calico's real CRDs of
// each group (v1, v3 and both, the migration's state) and writes a fixture of every kind
// the agent reads with strict field validation; then proves the schemas are Calico's and
// strict: fixtures with a missing required field, a pruned legacy field or a field of
// the other group's type are rejected.
func TestClusterAndCalicoCRDs(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a real kube-apiserver; skipped with -short")
	}
	RequireCalico(t)
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
	InstallCalicoCRDs(t, c.AdminConfig(), CalicoBoth)
	t.Logf("Calico CRDs (both groups) established in %v", time.Since(t1).Round(time.Millisecond))
	InstallCalicoCRDs(t, c.AdminConfig(), CalicoV1) // idempotent: updates in place

	dc := dynamic.NewForConfigOrDie(c.AdminConfig())
	for _, gv := range []schema.GroupVersion{CalicoV1GV, CalicoV3GV} {
		block := NewIPAMBlock("10.65.1.0/26", "host:node-a")
		Allocate(block, 0, "ipip-tunnel-addr-node-a", "node-a", map[string]string{"type": "ipipTunnelAddress"})
		Allocate(block, 5, "k8s-pod-network.abc", "node-b", map[string]string{"namespace": "default", "pod": "borrowed"})
		felix := NewFelixConfiguration("default")
		mtu, on := 1480, true
		felix.Spec.IPIPMTU, felix.Spec.IPIPEnabled = &mtu, &on
		for _, obj := range []runtime.Object{
			NewIPPool("default-ipv4-ippool", "10.65.0.0/16", "Always"),
			block,
			NewBlockAffinity("node-a", "10.65.1.0/26"),
			NewBGPPeer("tor-rack-1", "198.18.0.254"),
			felix,
		} {
			want, gvr, err := CalicoObject(gv, obj)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := CreateCalico(ctx, dc, gv, obj); err != nil {
				t.Fatalf("%s: %v", gv, err)
			}
			got, err := dc.Resource(gvr).Get(ctx, want.GetName(), metav1.GetOptions{})
			if err != nil {
				t.Fatalf("get %s %s: %v", gvr, want.GetName(), err)
			}
			ws, _, _ := unstructured.NestedMap(want.Object, "spec")
			gs, _, _ := unstructured.NestedMap(got.Object, "spec")
			// Everything written is stored as written (nothing pruned); the server may
			// add defaults.
			gn := normalizeInts(gs).(map[string]any)
			for k, v := range normalizeInts(ws).(map[string]any) {
				if !reflect.DeepEqual(gn[k], v) {
					t.Errorf("%s %s spec.%s round-trip: got %#v, want %#v", gvr, want.GetName(), k, gn[k], v)
				}
			}
		}
	}

	// The schemas are Calico's and strict field validation is on: each of these fixtures
	// is rejected (the real v1 CRDs would silently prune spec.ipip without Strict).
	bad := []struct {
		name string
		gvr  schema.GroupVersionResource
		obj  map[string]any
	}{
		{"ipamblock without allocations/attributes/strictAffinity/unallocated", IPAMBlocks, map[string]any{"cidr": "10.65.9.0/26", "affinity": "host:node-b"}},
		{"ipamblock deleted as a string", IPAMBlocks, map[string]any{"cidr": "10.65.9.0/26", "allocations": []any{}, "attributes": []any{},
			"unallocated": []any{}, "strictAffinity": false, "deleted": "true"}},
		{"legacy ippool spec.ipip", IPPools, map[string]any{"cidr": "10.66.0.0/16", "ipip": map[string]any{"enabled": true, "mode": "always"}}},
		{"v1 blockaffinity deleted as a boolean", BlockAffinities, map[string]any{"node": "node-b", "cidr": "10.65.2.0/26", "state": "confirmed", "deleted": false}},
		{"v3 blockaffinity deleted as a string", CalicoV3GV.WithResource("blockaffinities"), map[string]any{"node": "node-b", "cidr": "10.65.2.0/26", "state": "confirmed", "deleted": "false"}},
		{"ippool unknown ipipMode", CalicoV3GV.WithResource("ippools"), map[string]any{"cidr": "10.66.0.0/16", "ipipMode": "Sometimes"}},
	}
	for i, b := range bad {
		kind := map[string]string{"ipamblocks": "IPAMBlock", "ippools": "IPPool", "blockaffinities": "BlockAffinity"}[b.gvr.Resource]
		u := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": b.gvr.GroupVersion().String(), "kind": kind,
			"metadata": map[string]any{"name": "invalid-" + string(rune('a'+i))},
			"spec":     b.obj,
		}}
		_, err := dc.Resource(b.gvr).Create(ctx, u, StrictCreate)
		if err == nil {
			t.Errorf("%s: accepted; want it rejected", b.name)
			continue
		}
		if !apierrors.IsInvalid(err) && !apierrors.IsBadRequest(err) {
			t.Errorf("%s: got %v, want Invalid or BadRequest", b.name, err)
		}
		t.Logf("%s: rejected: %v", b.name, err)
	}
}

// normalizeInts turns every integer into int64 (the API server's JSON decoding does).
func normalizeInts(v any) any {
	switch x := v.(type) {
	case map[string]any:
		out := map[string]any{}
		for k, e := range x {
			out[k] = normalizeInts(e)
		}
		return out
	case []any:
		out := make([]any, len(x))
		for i, e := range x {
			out[i] = normalizeInts(e)
		}
		return out
	case int:
		return int64(x)
	case int32:
		return int64(x)
	case float64:
		if x == float64(int64(x)) {
			return int64(x)
		}
	}
	return v
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
