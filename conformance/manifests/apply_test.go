package manifests

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/internal/testutil"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/nodeid"
	"github.com/secureoverlay/secureoverlay/nodekeys"
	"github.com/secureoverlay/secureoverlay/nodereport"
	"github.com/secureoverlay/secureoverlay/noderow"
	"github.com/secureoverlay/secureoverlay/readiness"
)

const (
	agentSA  = "system:serviceaccount:secureoverlay:secureoverlay-agent"
	masterSA = "system:serviceaccount:secureoverlay:secureoverlay-master"
)

// TestManifestAgainstRealAPIServer applies manifests/secureoverlay.yaml with the real
// kubectl to a real kube-apiserver + etcd (with the Calico CRDs installed), proves
// the RBAC and the admission policy with real tokens, runs the real master against
// the applied objects, and deletes everything with kubectl delete -f.
func TestManifestAgainstRealAPIServer(t *testing.T) {
	kc := kubectlPath(t)
	c := kube.Start(t)
	kube.InstallCalicoCRDs(t, c.AdminConfig())
	admin := c.Kubeconfig()
	file := manifestPath(t)
	objs := loadManifest(t)

	cs, err := kubernetes.NewForConfig(c.AdminConfig())
	if err != nil {
		t.Fatal(err)
	}
	dyn, mapper := dynamicClient(t, c.AdminConfig())

	t.Run("dry-run=server", func(t *testing.T) {
		out := mustKubectl(t, kc, admin, "apply", "--dry-run=server", "-f", file)
		t.Logf("kubectl apply --dry-run=server:\n%s", out)
		for _, o := range objs {
			if o.kind() == "Namespace" || o.kind() == "CustomResourceDefinition" {
				continue // the harness creates them before every test
			}
			if _, err := get(dyn, mapper, o); !apierrors.IsNotFound(err) {
				t.Errorf("%s exists after a dry run (err %v)", o, err)
			}
		}
	})

	t.Run("dry-run=server overlays", func(t *testing.T) {
		for _, o := range overlays {
			dir := filepath.Join(repoRoot(t), "manifests", o)
			if out, err := kubectl(t, kc, admin, "apply", "--dry-run=server", "-k", dir); err != nil {
				t.Errorf("kubectl apply --dry-run=server -k manifests/%s: %v\n%s", o, err, out)
			}
		}
	})

	t.Run("apply", func(t *testing.T) {
		out := mustKubectl(t, kc, admin, "apply", "-f", file)
		t.Logf("kubectl apply:\n%s", out)
		for _, o := range objs {
			got, err := get(dyn, mapper, o)
			if err != nil {
				t.Errorf("%s after apply: %v", o, err)
				continue
			}
			t.Logf("created %s (uid %s)", o, got.GetUID())
		}
		// Idempotent: the live objects are what the file says (kubectl diff exits 0
		// only without differences; apply may still print "configured" for kinds whose
		// patch is computed as a no-op merge patch).
		if out, err := kubectl(t, kc, admin, "diff", "-f", file); err != nil {
			t.Errorf("kubectl diff after apply: %v\n%s", err, out)
		}
		out = mustKubectl(t, kc, admin, "apply", "-f", file)
		if strings.Contains(out, " created") {
			t.Errorf("second apply created objects:\n%s", out)
		}
	})
	if t.Failed() {
		t.FailNow()
	}

	// The master is on the host network: the API server defaults a host-network pod's
	// ports to host ports, so the scheduler itself never puts two master pods on one node
	// (the required anti-affinity says the same in the manifest). A server-side dry-run
	// create of a pod from the Deployment's template shows the pod the scheduler would see.
	t.Run("master host port", func(t *testing.T) {
		dep, err := cs.AppsV1().Deployments(api.Namespace).Get(context.Background(), "secureoverlay-master", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "master-dry-run", Labels: dep.Spec.Template.Labels}, Spec: dep.Spec.Template.Spec}
		got, err := cs.CoreV1().Pods(api.Namespace).Create(context.Background(), pod, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		if err != nil {
			t.Fatalf("dry-run create of a master pod: %v", err)
		}
		c := got.Spec.Containers[0]
		if !got.Spec.HostNetwork || got.Spec.DNSPolicy != corev1.DNSClusterFirstWithHostNet || len(c.Ports) != 1 || c.Ports[0].HostPort != 9466 {
			t.Errorf("master pod: hostNetwork %v, dnsPolicy %s, ports %+v; want the metrics port 9466 as a host port", got.Spec.HostNetwork, got.Spec.DNSPolicy, c.Ports)
		}
	})

	t.Run("auth can-i", func(t *testing.T) {
		// The authorizer sees the applied RBAC through an informer: wait until one
		// allowed access per binding holds before asserting on the rest.
		sa := kube.ServiceAccountGroups(api.Namespace)
		nodes := authorizationv1.ResourceAttributes{Verb: "list", Resource: "nodes"}
		kube.RequireAuthorized(t, cs, agentSA, sa, nodes, authorizationv1.ResourceAttributes{Verb: "get", Resource: "secrets", Namespace: api.Namespace, Name: api.SecretName})
		kube.RequireAuthorized(t, cs, masterSA, sa, nodes, authorizationv1.ResourceAttributes{Verb: "update", Resource: "secrets", Namespace: api.Namespace, Name: api.SecretName})
		canI(t, kc, admin)
		canIProjectcalico(t, cs)
	})

	t.Run("agent admission policy", func(t *testing.T) {
		agentPolicy(t, c, cs)
	})

	t.Run("real master initialises the empty Secret", func(t *testing.T) {
		realMaster(t, c, cs, kc, admin)
	})

	t.Run("real agent reports through the policy", func(t *testing.T) {
		realAgent(t, c, cs)
	})

	t.Run("delete -f", func(t *testing.T) {
		// --wait=false: without a controller-manager the namespace controller never
		// finalizes the Namespace, so waiting for it would hang. On a real cluster
		// plain `kubectl delete -f` waits and completes.
		out := mustKubectl(t, kc, admin, "delete", "--wait=false", "-f", file)
		t.Logf("kubectl delete -f:\n%s", out)
		deadline := time.Now().Add(30 * time.Second)
		for _, o := range objs {
			for {
				got, err := get(dyn, mapper, o)
				if apierrors.IsNotFound(err) {
					t.Logf("gone: %s", o)
					break
				}
				if err == nil && got.GetDeletionTimestamp() != nil {
					t.Logf("terminating: %s (finalizers %v; no namespace controller in the harness)", o, got.GetFinalizers())
					break
				}
				if time.Now().After(deadline) {
					t.Errorf("%s still present after delete -f (err %v)", o, err)
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
	})
}

func dynamicClient(t *testing.T, cfg *rest.Config) (dynamic.Interface, meta.RESTMapper) {
	t.Helper()
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	dc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return dyn, restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc))
}

type objectGetter interface {
	GetUID() types.UID
	GetDeletionTimestamp() *metav1.Time
	GetFinalizers() []string
}

func get(dyn dynamic.Interface, mapper meta.RESTMapper, o object) (objectGetter, error) {
	gvk := o.u.GroupVersionKind()
	m, err := mapper.RESTMapping(schema.GroupKind{Group: gvk.Group, Kind: gvk.Kind}, gvk.Version)
	if err != nil {
		return nil, fmt.Errorf("map %s: %w", gvk, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if m.Scope.Name() == meta.RESTScopeNameNamespace {
		return dyn.Resource(m.Resource).Namespace(o.ns()).Get(ctx, o.name(), metav1.GetOptions{})
	}
	return dyn.Resource(m.Resource).Get(ctx, o.name(), metav1.GetOptions{})
}

// canI checks what each ServiceAccount may and may not do, with kubectl auth can-i
// (a SubjectAccessReview against the RBAC the manifest created).
func canI(t *testing.T, kc, admin string) {
	type check struct {
		as   string
		args string // verb resource [name] plus flags
		want bool
	}
	ns := "-n secureoverlay"
	checks := []check{
		// agent: what it needs
		{agentSA, "get nodes", true},
		{agentSA, "list nodes", true},
		{agentSA, "watch nodes", true},
		{agentSA, "patch nodes/node-a", true}, // limited to its own Node's report by the admission policy
		{agentSA, "list ipamblocks.crd.projectcalico.org", true},
		{agentSA, "watch ipamblocks.crd.projectcalico.org", true},
		{agentSA, "list blockaffinities.crd.projectcalico.org", true},
		{agentSA, "list ippools.crd.projectcalico.org", true},
		{agentSA, "watch bgppeers.crd.projectcalico.org", true},
		{agentSA, "watch felixconfigurations.crd.projectcalico.org", true},
		{agentSA, "get secrets/keys " + ns, true},
		{agentSA, "list secrets/keys " + ns, true},  // list/watch by metadata.name field selector
		{agentSA, "watch secrets/keys " + ns, true}, // granted by the manifest until the master revokes it
		{agentSA, "get configmaps/secureoverlay-ring " + ns, true},
		{agentSA, "watch configmaps/secureoverlay-ring " + ns, true},
		{agentSA, "get pods/any-pod " + ns, true},                          // installer: its own pod
		{agentSA, "watch daemonsets.apps/secureoverlay-agent " + ns, true}, // installer: its DaemonSet
		{agentSA, "create nodekeys.secureoverlay.io " + ns, true},          // its public keys (the policy: its own only)
		{agentSA, "patch nodekeys.secureoverlay.io/node-a " + ns, true},
		{agentSA, "watch nodekeys.secureoverlay.io " + ns, true},       // peers' public keys (protocol v2)
		{agentSA, "get nodeviews.secureoverlay.io/node-a " + ns, true}, // its view of its pairs (protocol v2)
		{agentSA, "watch nodeviews.secureoverlay.io " + ns, true},
		{agentSA, "create noderows.secureoverlay.io " + ns, true}, // its readiness row (the policy: its own only)
		{agentSA, "patch noderows.secureoverlay.io/node-a " + ns, true},
		{agentSA, "watch noderows.secureoverlay.io " + ns, true},      // peers' rows (protocol v2)
		{agentSA, "create nodestatuses.secureoverlay.io " + ns, true}, // its report for the master (the policy: its own only)
		{agentSA, "patch nodestatuses.secureoverlay.io/node-a " + ns, true},
		{agentSA, "get nodestatuses.secureoverlay.io/node-a " + ns, true},
		{agentSA, "create nodereports.secureoverlay.io " + ns, true}, // its report for the peers
		{agentSA, "watch nodereports.secureoverlay.io " + ns, true},
		// agent: what it must not
		{agentSA, "get secrets/other " + ns, false},
		{agentSA, "list secrets " + ns, false},
		{agentSA, "list secrets -A", false},
		{agentSA, "get secrets/keys -n kube-system", false},
		{agentSA, "update secrets/keys " + ns, false},
		{agentSA, "delete nodes/node-a", false},
		{agentSA, "create nodes", false},
		{agentSA, "update nodes/node-a", false},
		{agentSA, "patch nodes --subresource=status", false},
		{agentSA, "create ippools.crd.projectcalico.org", false},
		{agentSA, "get configmaps/secureoverlay-config " + ns, false},
		{agentSA, "update configmaps/secureoverlay-ring " + ns, false},
		{agentSA, "update rolebindings.rbac.authorization.k8s.io/secureoverlay-agent-keys " + ns, false},
		{agentSA, "list pods " + ns, false},
		{agentSA, "get daemonsets.apps/other " + ns, false},
		{agentSA, "delete daemonsets.apps/secureoverlay-agent " + ns, false},
		{agentSA, "delete nodekeys.secureoverlay.io/node-a " + ns, false},
		{agentSA, "update nodekeys.secureoverlay.io/node-a " + ns, false},
		{agentSA, "create nodekeys.secureoverlay.io -n kube-system", false},
		{agentSA, "patch nodeviews.secureoverlay.io/node-a " + ns, false}, // only the master writes views
		{agentSA, "create nodeviews.secureoverlay.io " + ns, false},
		{agentSA, "delete nodeviews.secureoverlay.io/node-a " + ns, false},
		{agentSA, "delete noderows.secureoverlay.io/node-a " + ns, false},
		{agentSA, "update noderows.secureoverlay.io/node-a " + ns, false},
		{agentSA, "create noderows.secureoverlay.io -n kube-system", false},
		{agentSA, "delete nodestatuses.secureoverlay.io/node-a " + ns, false},
		{agentSA, "update nodestatuses.secureoverlay.io/node-a " + ns, false},
		{agentSA, "create nodestatuses.secureoverlay.io -n kube-system", false},
		// master: what it needs
		{masterSA, "get nodes", true},
		{masterSA, "list nodes", true},
		{masterSA, "watch nodes", true},
		{masterSA, "create secrets " + ns, true},
		{masterSA, "get secrets/keys " + ns, true},
		{masterSA, "watch secrets/keys " + ns, true},
		{masterSA, "update secrets/keys " + ns, true},
		{masterSA, "get configmaps/secureoverlay-config " + ns, true},
		{masterSA, "watch configmaps/secureoverlay-config " + ns, true},
		{masterSA, "create configmaps " + ns, true},
		{masterSA, "update configmaps/secureoverlay-status " + ns, true},
		{masterSA, "create events " + ns, true},
		{masterSA, "patch events " + ns, true},
		{masterSA, "create leases.coordination.k8s.io " + ns, true},
		{masterSA, "update leases.coordination.k8s.io/secureoverlay-master " + ns, true},
		// master: what it must not
		{masterSA, "update configmaps/secureoverlay-ring " + ns, true},
		{masterSA, "update rolebindings.rbac.authorization.k8s.io/secureoverlay-agent-keys " + ns, true},
		{masterSA, "create rolebindings.rbac.authorization.k8s.io " + ns, false},
		{masterSA, "update rolebindings.rbac.authorization.k8s.io/secureoverlay-agent " + ns, false},
		{masterSA, "delete rolebindings.rbac.authorization.k8s.io/secureoverlay-agent-keys " + ns, false},
		{masterSA, "update roles.rbac.authorization.k8s.io/secureoverlay-agent-keys " + ns, false},
		{masterSA, "get secrets/other " + ns, false},
		{masterSA, "list secrets " + ns, false},
		{masterSA, "delete secrets/keys " + ns, false},
		{masterSA, "create secrets -n kube-system", false},
		{masterSA, "patch nodes/node-a", false},
		{masterSA, "update configmaps/secureoverlay-config " + ns, false},
		{masterSA, "update configmaps/other " + ns, false},
		{masterSA, "update leases.coordination.k8s.io/other " + ns, false},
		{masterSA, "list pods " + ns, false},
		{masterSA, "list ipamblocks.crd.projectcalico.org", false},
		{masterSA, "patch nodekeys.secureoverlay.io/node-a " + ns, false}, // only agents publish keys
		{masterSA, "patch noderows.secureoverlay.io/node-a " + ns, false}, // and rows
		{masterSA, "watch noderows.secureoverlay.io " + ns, true},         // which views they make needless
		{masterSA, "watch nodekeys.secureoverlay.io " + ns, true},         // who publishes the next generation's key
		{masterSA, "watch nodereports.secureoverlay.io " + ns, true},      // the agents' reports
		{masterSA, "watch nodestatuses.secureoverlay.io " + ns, true},     // under either kind
		{masterSA, "patch nodestatuses.secureoverlay.io/node-a " + ns, false},
		{masterSA, "create nodeviews.secureoverlay.io " + ns, true}, // the agents' views (protocol v2)
		{masterSA, "patch nodeviews.secureoverlay.io/node-a " + ns, true},
		{masterSA, "list nodeviews.secureoverlay.io " + ns, true},
		{masterSA, "create nodeviews.secureoverlay.io -n kube-system", false},
		{masterSA, "create nodeids.secureoverlay.io " + ns, true}, // the node table (docs/keys.md §13)
		{masterSA, "patch nodeids.secureoverlay.io/id-17 " + ns, true},
		{masterSA, "delete nodeids.secureoverlay.io/id-17 " + ns, true},
		{masterSA, "watch nodeids.secureoverlay.io " + ns, true},
		{masterSA, "create nodeids.secureoverlay.io -n kube-system", false},
		{agentSA, "list nodeids.secureoverlay.io " + ns, true}, // agents read the table
		{agentSA, "watch nodeids.secureoverlay.io " + ns, true},
		{agentSA, "create nodeids.secureoverlay.io " + ns, false}, // and never write an ID
		{agentSA, "patch nodeids.secureoverlay.io/id-17 " + ns, false},
		{agentSA, "update nodeids.secureoverlay.io/id-17 " + ns, false},
		{agentSA, "delete nodeids.secureoverlay.io/id-17 " + ns, false},
	}
	for _, ck := range checks {
		args := append([]string{"auth", "can-i"}, strings.Fields(ck.args)...)
		args = append(args, "--as", ck.as)
		cmd := exec.Command(kc, append([]string{"--kubeconfig", admin}, args...)...)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		o, err := cmd.Output() // "yes" exits 0, "no" exits 1; warnings go to stderr
		out := strings.TrimSpace(string(o))
		got := out == "yes"
		if got != (err == nil) || (out != "yes" && out != "no") {
			t.Errorf("can-i %s as %s: %q, %v, stderr %q", ck.args, ck.as, out, err, stderr.String())
		}
		if got != ck.want {
			t.Errorf("%s: can-i %s = %v, want %v (%s)", short(ck.as), ck.args, got, ck.want, strings.TrimSpace(out))
		}
	}
	t.Logf("%d kubectl auth can-i checks", len(checks))
}

// operatorUser is a user bound to the secureoverlay-operator ClusterRole.
const operatorUser = "operator-alice"

// canIProjectcalico checks the projectcalico.org rules with SubjectAccessReviews:
// kubectl auth can-i cannot name a group the server does not serve (the harness has
// only the crd.projectcalico.org CRDs).
func canIProjectcalico(t *testing.T, cs kubernetes.Interface) {
	// The operator ClusterRole is not bound by the manifest (docs/cli.md): bind it to a
	// user, as an admin would.
	crb := &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "secureoverlay-operator-test"},
		RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "secureoverlay-operator"},
		Subjects: []rbacv1.Subject{{Kind: rbacv1.UserKind, APIGroup: rbacv1.GroupName, Name: operatorUser}}}
	if _, err := cs.RbacV1().ClusterRoleBindings().Create(context.Background(), crb, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	kube.RequireAuthorized(t, cs, operatorUser, []string{"system:authenticated"},
		authorizationv1.ResourceAttributes{Group: "operator.tigera.io", Resource: "installations", Name: "default", Verb: "get"})
	allowed := func(user, group, verb, resource string) bool {
		t.Helper()
		sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
			User: user, Groups: []string{"system:authenticated"},
			ResourceAttributes: &authorizationv1.ResourceAttributes{Group: group, Resource: resource, Verb: verb},
		}}
		if user != operatorUser {
			sar.Spec.Groups = []string{"system:serviceaccounts", "system:serviceaccounts:secureoverlay", "system:authenticated"}
		}
		got, err := cs.AuthorizationV1().SubjectAccessReviews().Create(context.Background(), sar, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return got.Status.Allowed
	}
	// secureoverlayctl mtu --apply: operators may read and patch exactly Calico's own MTU
	// knob (the operator's Installation "default", the manifest's kube-system/calico-config)
	// and list pods (metadata) to name those that predate a change; nothing else of Calico's.
	for _, tc := range []struct {
		group, resource, ns, name, verb string
		want                            bool
	}{
		{"operator.tigera.io", "installations", "", "default", "get", true},
		{"operator.tigera.io", "installations", "", "default", "patch", true},
		{"operator.tigera.io", "installations", "", "other", "patch", false},
		{"operator.tigera.io", "installations", "", "default", "delete", false},
		{"operator.tigera.io", "installations", "", "", "create", false},
		{"", "configmaps", "kube-system", "calico-config", "get", true},
		{"", "configmaps", "kube-system", "calico-config", "patch", true},
		{"", "configmaps", "kube-system", "calico-config", "update", false},
		{"", "configmaps", "kube-system", "calico-config", "delete", false},
		{"", "configmaps", "kube-system", "kubeadm-config", "get", false},
		{"", "configmaps", "kube-system", "", "list", false},
		{"", "pods", "", "", "list", true},
		{"", "pods", "kube-system", "", "delete", false},
		{"crd.projectcalico.org", "felixconfigurations", "", "default", "patch", false},
		{"projectcalico.org", "felixconfigurations", "", "default", "patch", false},
		{"apps", "daemonsets", "kube-system", "calico-node", "patch", false},
	} {
		sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
			User: operatorUser, Groups: []string{"system:authenticated"},
			ResourceAttributes: &authorizationv1.ResourceAttributes{Group: tc.group, Resource: tc.resource,
				Namespace: tc.ns, Name: tc.name, Verb: tc.verb},
		}}
		got, err := cs.AuthorizationV1().SubjectAccessReviews().Create(context.Background(), sar, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if got.Status.Allowed != tc.want {
			t.Errorf("operator %s %s.%s %s/%s: allowed=%v, want %v", tc.verb, tc.resource, tc.group, tc.ns, tc.name, got.Status.Allowed, tc.want)
		}
	}
	// Calico's DatastoreMigration: the agent and operators read it (which group Calico
	// uses), nobody of ours writes it.
	for _, tc := range []struct {
		user, verb string
		want       bool
	}{{agentSA, "list", true}, {agentSA, "watch", true}, {agentSA, "update", false}, {operatorUser, "get", true},
		{operatorUser, "list", true}, {operatorUser, "delete", false}, {masterSA, "list", false}} {
		if got := allowed(tc.user, "migration.projectcalico.org", tc.verb, "datastoremigrations"); got != tc.want {
			t.Errorf("%s %s datastoremigrations.migration.projectcalico.org: allowed=%v, want %v", short(tc.user), tc.verb, got, tc.want)
		}
	}
	for _, tc := range []struct {
		user, verb, resource string
		want                 bool
	}{
		{agentSA, "list", "ippools", true},
		{agentSA, "watch", "ipamblocks", true},
		{agentSA, "watch", "blockaffinities", true},
		{agentSA, "list", "bgppeers", true},
		{agentSA, "create", "ippools", false},
		{agentSA, "list", "felixconfigurations", true},
		{agentSA, "get", "ippools", false},
		{masterSA, "list", "ippools", false},
		// operators read both groups (doctor, mtu and status on a v3 cluster)
		{operatorUser, "list", "ipamblocks", true},
		{operatorUser, "list", "ippools", true},
		{operatorUser, "get", "felixconfigurations", true},
		{operatorUser, "list", "blockaffinities", true},
		{operatorUser, "create", "ippools", false},
	} {
		sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
			User: tc.user, Groups: []string{"system:serviceaccounts", "system:serviceaccounts:secureoverlay", "system:authenticated"},
			ResourceAttributes: &authorizationv1.ResourceAttributes{Group: "projectcalico.org", Resource: tc.resource, Verb: tc.verb},
		}}
		if tc.user == operatorUser {
			sar.Spec.Groups = []string{"system:authenticated"}
		}
		_ = allowed
		got, err := cs.AuthorizationV1().SubjectAccessReviews().Create(context.Background(), sar, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if got.Status.Allowed != tc.want {
			t.Errorf("%s %s %s.projectcalico.org: allowed=%v, want %v", short(tc.user), tc.verb, tc.resource, got.Status.Allowed, tc.want)
		}
	}
}

func short(user string) string { return user[strings.LastIndex(user, ":")+1:] }

// podBoundConfig returns a client config for the agent ServiceAccount with a token
// bound to a Pod scheduled on node, as the kubelet requests for a projected token:
// the API server puts the node's name into the token, and the authenticator turns
// it into the user's extra authentication.kubernetes.io/node-name.
func podBoundConfig(t *testing.T, c *kube.Cluster, cs kubernetes.Interface, node string) *rest.Config {
	t.Helper()
	ctx := context.Background()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: api.Namespace, Name: "agent-" + node},
		Spec: corev1.PodSpec{
			ServiceAccountName:           "secureoverlay-agent",
			NodeName:                     node,
			AutomountServiceAccountToken: new(bool),
			Containers:                   []corev1.Container{{Name: "agent", Image: "ghcr.io/secureoverlay/secureoverlay:test"}},
		},
	}
	created, err := cs.CoreV1().Pods(api.Namespace).Create(ctx, pod, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		created, err = cs.CoreV1().Pods(api.Namespace).Get(ctx, pod.Name, metav1.GetOptions{})
	}
	if err != nil {
		t.Fatalf("create pod on %s: %v", node, err)
	}
	expiry := int64(3600)
	tr := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		ExpirationSeconds: &expiry,
		BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: created.Name, UID: created.UID},
	}}
	tr, err = cs.CoreV1().ServiceAccounts(api.Namespace).CreateToken(ctx, "secureoverlay-agent", tr, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("token bound to pod %s: %v", created.Name, err)
	}
	cfg := c.AdminConfig()
	cfg.BearerToken = tr.Status.Token
	return cfg
}

// agentPolicy proves the ValidatingAdmissionPolicy with real tokens: an agent token
// bound to a pod on node-a may change node-a's report annotation and nothing else.
func agentPolicy(t *testing.T, c *kube.Cluster, cs kubernetes.Interface) {
	kube.CreateNode(t, c.AdminConfig(), kube.Node{Name: "node-a", IPv4: "198.18.0.1", BootID: "boot-a",
		Annotations: map[string]string{"example.com/other": "x"}})
	kube.CreateNode(t, c.AdminConfig(), kube.Node{Name: "node-b", IPv4: "198.18.0.2", BootID: "boot-b"})

	asA, err := kubernetes.NewForConfig(podBoundConfig(t, c, cs, "node-a"))
	if err != nil {
		t.Fatal(err)
	}
	// Who the API server thinks we are: the node claim must be there.
	ctx := context.Background()
	ssr, err := asA.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("self subject review: %v", err)
	}
	if got := ssr.Status.UserInfo.Extra["authentication.kubernetes.io/node-name"]; len(got) != 1 || got[0] != "node-a" {
		t.Fatalf("pod-bound agent token: extra node-name = %v, want [node-a] (user %s)", got, ssr.Status.UserInfo.Username)
	}
	t.Logf("pod-bound agent token authenticates as %s with node-name %v", ssr.Status.UserInfo.Username, ssr.Status.UserInfo.Extra["authentication.kubernetes.io/node-name"])

	unbound, err := kubernetes.NewForConfig(c.ServiceAccountConfig(api.Namespace, "secureoverlay-agent"))
	if err != nil {
		t.Fatal(err)
	}

	mergePatch := func(cl kubernetes.Interface, node, patch string) error {
		_, err := cl.CoreV1().Nodes().Patch(ctx, node, types.MergePatchType, []byte(patch), metav1.PatchOptions{})
		return err
	}
	report := func(v string) string {
		return fmt.Sprintf(`{"metadata":{"annotations":{%q:%q}}}`, api.ReportAnnotation, v)
	}
	// The policy becomes active asynchronously after its creation: wait until it
	// refuses the clearest violation.
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := mergePatch(asA, "node-b", report(`{"mode":"off"}`))
		if err != nil && strings.Contains(err.Error(), "ValidatingAdmissionPolicy") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("admission policy not enforced after 30 s: patch of node-b by node-a's agent returned %v", err)
		}
		// Undo a write that slipped through before the policy was active.
		_ = mergePatch(cs, "node-b", fmt.Sprintf(`{"metadata":{"annotations":{%q:null}}}`, api.ReportAnnotation))
		time.Sleep(200 * time.Millisecond)
	}

	cases := []struct {
		name   string
		client kubernetes.Interface
		node   string
		patch  string
		allow  bool
	}{
		{"own report", asA, "node-a", report(`{"mode":"accept"}`), true},
		{"own report again", asA, "node-a", report(`{"mode":"encrypt"}`), true},
		{"own report removed", asA, "node-a", fmt.Sprintf(`{"metadata":{"annotations":{%q:null}}}`, api.ReportAnnotation), true},
		{"own report restored", asA, "node-a", report(`{"mode":"enforce"}`), true},
		{"other node's report", asA, "node-b", report(`{"mode":"off"}`), false},
		{"own other annotation", asA, "node-a", `{"metadata":{"annotations":{"example.com/other":"y"}}}`, false},
		{"own new annotation", asA, "node-a", `{"metadata":{"annotations":{"example.com/new":"y"}}}`, false},
		{"own annotation removed", asA, "node-a", `{"metadata":{"annotations":{"example.com/other":null}}}`, false},
		{"own Calico address", asA, "node-a", fmt.Sprintf(`{"metadata":{"annotations":{%q:"198.18.0.9/24"}}}`, api.CalicoIPv4AddressAnnotation), false},
		{"own label", asA, "node-a", `{"metadata":{"labels":{"example.com/l":"y"}}}`, false},
		{"own spec", asA, "node-a", `{"spec":{"unschedulable":true}}`, false},
		{"own taint", asA, "node-a", `{"spec":{"taints":[{"key":"k","effect":"NoSchedule"}]}}`, false},
		{"own finalizer", asA, "node-a", `{"metadata":{"finalizers":["example.com/f"]}}`, false},
		{"report with a label", asA, "node-a", `{"metadata":{"labels":{"example.com/l":"y"},"annotations":{"secureoverlay.io/report":"{}"}}}`, false},
		{"token without node claim", unbound, "node-a", report(`{"mode":"off"}`), false},
	}
	for _, tc := range cases {
		before, err := cs.CoreV1().Nodes().Get(ctx, tc.node, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		err = mergePatch(tc.client, tc.node, tc.patch)
		after, gerr := cs.CoreV1().Nodes().Get(ctx, tc.node, metav1.GetOptions{})
		if gerr != nil {
			t.Fatal(gerr)
		}
		switch {
		case tc.allow && err != nil:
			t.Errorf("%s: refused: %v", tc.name, err)
		case !tc.allow && err == nil:
			t.Errorf("%s: allowed, want refused", tc.name)
		case !tc.allow && !apierrors.IsInvalid(err) && !apierrors.IsForbidden(err):
			t.Errorf("%s: %v, want invalid/forbidden", tc.name, err)
		case !tc.allow && after.ResourceVersion != before.ResourceVersion:
			t.Errorf("%s: refused but the node changed", tc.name)
		default:
			if err != nil {
				t.Logf("%s: refused: %v", tc.name, err)
			} else {
				t.Logf("%s: allowed", tc.name)
			}
		}
	}
	// Deleting and creating Nodes is refused by RBAC already; the policy would too.
	if err := asA.CoreV1().Nodes().Delete(ctx, "node-a", metav1.DeleteOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("agent deleting its node: %v, want forbidden", err)
	}

	// Its readiness row: its own only, and never deleted (a row of another node's name
	// would speak for that node's kernel).
	dcA := dynamic.NewForConfigOrDie(podBoundConfig(t, c, cs, "node-a"))
	row := readiness.NewStatus(1, readiness.KeyDigest("a"), readiness.Keys{2: readiness.KeyDigest("b")}, nil, nil, readiness.DefaultBuckets)
	if err := noderow.Write(ctx, dcA, api.Namespace, "node-a", "", row); err != nil {
		t.Errorf("agent writing its own NodeRow: %v", err)
	}
	if err := noderow.Write(ctx, dcA, api.Namespace, "node-b", "", row); err == nil || !strings.Contains(err.Error(), "may only write the noderows of its own Node") {
		t.Errorf("agent of node-a writing node-b's NodeRow: %v, want the policy's refusal", err)
	}
	if err := dcA.Resource(noderow.GVR).Namespace(api.Namespace).Delete(ctx, "node-a", metav1.DeleteOptions{}); err == nil {
		t.Error("agent deleting its NodeRow: allowed")
	}
	if err := dynamic.NewForConfigOrDie(c.AdminConfig()).Resource(noderow.GVR).Namespace(api.Namespace).Delete(ctx, "node-a", metav1.DeleteOptions{}); err != nil {
		t.Error(err)
	}

	// Its NodeStatus (the report for the master and the CLI): the same rules.
	rep := []byte(`{"mode":"off"}`)
	if err := nodereport.WriteStatus(ctx, dcA, api.Namespace, "node-a", "", "off", rep); err != nil {
		t.Errorf("agent writing its own NodeStatus: %v", err)
	}
	if err := nodereport.WriteStatus(ctx, dcA, api.Namespace, "node-b", "", "off", rep); err == nil || !strings.Contains(err.Error(), "may only write the nodestatuses of its own Node") {
		t.Errorf("agent of node-a writing node-b's NodeStatus: %v, want the policy's refusal", err)
	}
	if err := dcA.Resource(nodereport.StatusGVR).Namespace(api.Namespace).Delete(ctx, "node-a", metav1.DeleteOptions{}); err == nil {
		t.Error("agent deleting its NodeStatus: allowed")
	}
	if err := dynamic.NewForConfigOrDie(c.AdminConfig()).Resource(nodereport.StatusGVR).Namespace(api.Namespace).Delete(ctx, "node-a", metav1.DeleteOptions{}); err != nil {
		t.Error(err)
	}
}

// realMaster runs the real secureoverlay-master binary as the manifest's master
// ServiceAccount against the applied objects: it must take the manifest's empty
// Secret as "not initialised" and fill it, publish its status, and never refuse
// the ring.
func realMaster(t *testing.T, c *kube.Cluster, cs kubernetes.Interface, kc, admin string) {
	bin := binPath(t, "secureoverlay-master")
	kcfg := writeKubeconfig(t, c.ServiceAccountConfig(api.Namespace, "secureoverlay-master"))
	ctx := context.Background()
	sec, err := cs.CoreV1().Secrets(api.Namespace).Get(ctx, api.SecretName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(sec.Data) != 0 {
		t.Fatalf("the applied Secret already has data keys %d", len(sec.Data))
	}

	var log testutil.SyncBuffer
	cmd := exec.Command(bin, "--kubeconfig", kcfg, "--namespace", api.Namespace, "--id", "test-master",
		"--metrics-addr", "127.0.0.1:0", "--rotate-interval", "0", "--node-selector", "kubernetes.io/os=linux")
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("master log:\n%s", log.String())
		}
	}()

	var ring *keys.Ring
	deadline := time.Now().Add(60 * time.Second)
	for ring == nil {
		if time.Now().After(deadline) {
			t.Fatalf("the master did not initialise Secret %s/%s within 60 s", api.Namespace, api.SecretName)
		}
		time.Sleep(200 * time.Millisecond)
		sec, err := cs.CoreV1().Secrets(api.Namespace).Get(ctx, api.SecretName, metav1.GetOptions{})
		if err != nil {
			continue
		}
		data, ok := sec.Data[api.SecretDataKey]
		if !ok {
			continue
		}
		r, err := keys.Parse(data)
		if err != nil {
			t.Fatalf("the master wrote a ring that does not parse: %v", err)
		}
		ring = r
		if sec.Labels["app.kubernetes.io/part-of"] != "secureoverlay" {
			t.Errorf("the master dropped the manifest's labels: %v", sec.Labels)
		}
	}
	t.Logf("master initialised the Secret: %s", keys.Summary(ring))
	if ring.Target != api.ModeEnforce {
		t.Errorf("ring target %s, want enforce (ConfigMap enabled=true)", ring.Target)
	}
	for time.Now().Before(deadline) {
		if _, err := cs.CoreV1().ConfigMaps(api.Namespace).Get(ctx, api.StatusConfigMapName, metav1.GetOptions{}); err == nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	st, err := cs.CoreV1().ConfigMaps(api.Namespace).Get(ctx, api.StatusConfigMapName, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("status ConfigMap: %v", err)
	}
	t.Logf("master status: %s", st.Data[api.StatusDataKey])
	if _, err := cs.CoordinationV1().Leases(api.Namespace).Get(ctx, "secureoverlay-master", metav1.GetOptions{}); err != nil {
		t.Errorf("leader election Lease: %v", err)
	}
	publicRing(t, c, kc, admin, cs)
	nodeIDs(t, c, cs)
	if !strings.Contains(log.String(), "key ring secret has no data key, initializing it") {
		t.Errorf("master log does not show the empty Secret being initialised:\n%s", log.String())
	}
	if strings.Contains(log.String(), "refusing invalid key ring") || strings.Contains(log.String(), "forbidden") {
		t.Errorf("master log shows a refusal:\n%s", log.String())
	}
}

// nodeIDs: under the manifest's RBAC the real master keeps one NodeID per live entry of
// the Secret's node table (docs/keys.md §13).
func nodeIDs(t *testing.T, c *kube.Cluster, cs kubernetes.Interface) {
	t.Helper()
	ctx := context.Background()
	dc := dynamic.NewForConfigOrDie(c.AdminConfig())
	var got, want map[string]uint32
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		sec, err := cs.CoreV1().Secrets(api.Namespace).Get(ctx, api.SecretName, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		r, err := keys.Parse(sec.Data[api.SecretDataKey])
		if err != nil {
			t.Fatal(err)
		}
		want, _ = nodeid.IDs(r, nil, "")
		l, err := dc.Resource(nodeid.GVR).Namespace(api.Namespace).List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatalf("list NodeIDs: %v", err)
		}
		got = map[string]uint32{}
		for i := range l.Items {
			e, err := nodeid.Parse(&l.Items[i])
			if err != nil {
				t.Fatalf("the master wrote a NodeID that does not parse: %v", err)
			}
			got[e.Node] = e.ID
		}
		if len(want) > 0 && maps.Equal(got, want) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("NodeIDs %v, the Secret's node table %v", got, want)
		}
	}
	t.Logf("NodeIDs: %v", got)
}

func writeKubeconfig(t *testing.T, cfg *rest.Config) string {
	t.Helper()
	kc := clientcmdapi.NewConfig()
	kc.Clusters["c"] = &clientcmdapi.Cluster{Server: cfg.Host, CertificateAuthorityData: cfg.CAData}
	kc.AuthInfos["u"] = &clientcmdapi.AuthInfo{Token: cfg.BearerToken}
	kc.Contexts["c"] = &clientcmdapi.Context{Cluster: "c", AuthInfo: "u"}
	kc.CurrentContext = "c"
	p := filepath.Join(t.TempDir(), "kubeconfig")
	if err := clientcmd.WriteToFile(*kc, p); err != nil {
		t.Fatal(err)
	}
	return p
}

// publicRing checks docs/keys.md §11 with the real master and the manifest's RBAC: the
// public ring ConfigMap holds the Secret's ring without a byte of any root, and the
// agents' Secret access follows the agents — granted while one reads only the Secret,
// revoked (kubectl auth can-i: no) once none does and no generation is v1.
func publicRing(t *testing.T, c *kube.Cluster, kc, admin string, cs kubernetes.Interface) {
	t.Helper()
	ctx := context.Background()
	var pub *keys.Ring
	var data string
	deadline := time.Now().Add(30 * time.Second)
	for pub == nil {
		if time.Now().After(deadline) {
			t.Fatalf("no public ring ConfigMap %s/%s within 30 s", api.Namespace, api.RingConfigMapName)
		}
		time.Sleep(200 * time.Millisecond)
		cm, err := cs.CoreV1().ConfigMaps(api.Namespace).Get(ctx, api.RingConfigMapName, metav1.GetOptions{})
		if err != nil {
			continue
		}
		data = cm.Data[api.RingDataKey]
		if pub, err = keys.Parse([]byte(data)); err != nil {
			t.Fatalf("the public ring does not parse: %v", err)
		}
	}
	sec, err := cs.CoreV1().Secrets(api.Namespace).Get(ctx, api.SecretName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	full, err := keys.Parse(sec.Data[api.SecretDataKey])
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range full.Generations {
		if len(g.Root) > 0 && (strings.Contains(data, base64.StdEncoding.EncodeToString(g.Root)) || strings.Contains(data, hex.EncodeToString(g.Root))) {
			t.Fatalf("the public ring holds generation %d's root", g.Number)
		}
	}
	if !slices.Equal(pub.Numbers(), full.Numbers()) || pub.Mode != full.Mode {
		t.Errorf("public ring %s, Secret's %s", keys.Summary(pub), keys.Summary(full))
	}
	if full.HasRoots() {
		t.Fatalf("ring %s: the master made a v1 generation in a cluster whose agents run none", keys.Summary(full))
	}
	agent := "system:serviceaccount:" + api.Namespace + ":" + api.AgentServiceAccount
	canGet := func(want string) {
		t.Helper()
		var got string
		deadline := time.Now().Add(30 * time.Second)
		for {
			out, _ := kubectl(t, kc, admin, "auth", "can-i", "get", "secrets/keys", "-n", api.Namespace, "--as", agent)
			if got = strings.TrimSpace(out); got == want || time.Now().After(deadline) {
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		rb, err := cs.RbacV1().RoleBindings(api.Namespace).Get(ctx, api.AgentKeysAccess, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("kubectl auth can-i get secrets/keys as the agent: %s (RoleBinding %s subjects %v)", got, api.AgentKeysAccess, rb.Subjects)
		if got != want {
			t.Fatalf("kubectl auth can-i get secrets/keys as the agent = %q, want %q", got, want)
		}
	}
	// The nodes that report (the policy test's) have no NodeKeys saying they read the
	// public ring: agents that read only the Secret keep their access.
	dc := dynamic.NewForConfigOrDie(c.AdminConfig())
	reports, err := nodereport.ReadAll(ctx, cs, dc, api.Namespace)
	if err != nil || len(reports) == 0 {
		t.Fatalf("no reporting node to test with (%v)", err)
	}
	canGet("yes")
	// Every reporting agent reads the public ring and no generation is v1: revoked.
	inc := nodekeys.Incarnation{BootID: "8f1c2a9e-5b7d-4e3f-9a61-0c2d4e6f8a10", UID: "1d3b5f79-2c4e-4a6b-8d0f-2a4c6e8f0b13", Epoch: "6f2c9d0e4a8b1c3d"}
	for node := range reports {
		k := nodekeys.Keys{Incarnation: inc, Capabilities: []string{api.CapabilityRingConfigMap}}
		if err := nodekeys.Write(ctx, dc, api.Namespace, node, "", k); err != nil {
			t.Fatal(err)
		}
	}
	canGet("no")
	// Agents that read only the Secret again (older agents in a rolling update): granted
	// again. (Every reporting node, not one picked from the map: a report the master does
	// not parse — the policy test writes odd ones — is no agent's, and grants nothing.)
	for node := range reports {
		if err := nodekeys.Write(ctx, dc, api.Namespace, node, "", nodekeys.Keys{Incarnation: inc}); err != nil {
			t.Fatal(err)
		}
	}
	canGet("yes")
	// The real agent's test, next, needs these nodes without NodeKeys.
	for node := range reports {
		if err := dc.Resource(nodekeys.GVR).Namespace(api.Namespace).Delete(ctx, node, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
}
