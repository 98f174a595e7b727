package master

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/nodekeys"
	"github.com/secureoverlay/secureoverlay/nodereport"
)

// TestAgentSecretAccess (docs/keys.md §11), against a real API server with the master's
// RBAC: the public ring follows the Secret without a root; the agents' read access to
// the Secret is granted before the first v1 generation is written, stays while a v1
// generation is live or an agent reads only the Secret, and is revoked — the API
// server's authorizer says no — once neither holds; an older agent coming back grants
// it again.
func TestAgentSecretAccess(t *testing.T) {
	e := newEnv(t)
	admin := kubernetes.NewForConfigOrDie(e.cluster.AdminConfig())
	ctx := e.ctx
	// The manifest's Role, and its binding starting revoked so that the grant is seen.
	if _, err := admin.RbacV1().Roles(api.Namespace).Create(ctx, &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: api.AgentKeysAccess},
		Rules: []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"secrets"}, ResourceNames: []string{api.SecretName}, Verbs: []string{"get", "list", "watch"}}}},
		metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.RbacV1().RoleBindings(api.Namespace).Create(ctx, &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: api.AgentKeysAccess},
		RoleRef: rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: api.AgentKeysAccess}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	policy := testPolicy()
	policy.ProtocolV2 = true
	r0 := e.startMaster("master-a", policy)
	agents := map[string]*agent{}
	for i, n := range []string{"n1", "n2"} {
		agents[n] = e.addNode(n, i+1)
		agents[n].readsRing.Store(true)
	}
	allowed := func(want bool, what string) {
		e.eventually(what, wait, func() (bool, string) {
			sar, err := admin.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
				User: "system:serviceaccount:" + api.Namespace + ":" + api.AgentServiceAccount, Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + api.Namespace},
				ResourceAttributes: &authorizationv1.ResourceAttributes{Namespace: api.Namespace, Verb: "get", Resource: "secrets", Name: api.SecretName}}}, metav1.CreateOptions{})
			if err != nil {
				return false, err.Error()
			}
			return sar.Status.Allowed == want, fmt.Sprintf("allowed %v (%s)", sar.Status.Allowed, sar.Status.Reason)
		})
	}
	allowed(false, "no access while the ring is empty and every agent reads the public ring")
	// The order of the writes, by etcd revision (one counter for every resource), from
	// a state where both agents' NodeKeys are in and the binding is revoked (a report read
	// before its NodeKeys may grant for a moment).
	e.eventually("both agents declare that they read the public ring", wait, func() (bool, string) {
		for n := range agents {
			u, err := e.dyn().Resource(nodekeys.GVR).Namespace(api.Namespace).Get(ctx, n, metav1.GetOptions{})
			if err != nil {
				return false, err.Error()
			}
			if k, err := nodekeys.Parse(u); err != nil || !k.Has(api.CapabilityRingConfigMap) {
				return false, fmt.Sprintf("%s: %+v %v", n, k, err)
			}
		}
		return true, ""
	})
	time.Sleep(time.Second)
	allowed(false, "no access once both NodeKeys are in")
	list, err := admin.RbacV1().RoleBindings(api.Namespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	from := metav1.ListOptions{ResourceVersion: list.ResourceVersion}
	rw, err := admin.RbacV1().RoleBindings(api.Namespace).Watch(ctx, from)
	if err != nil {
		t.Fatal(err)
	}
	defer rw.Stop()
	sw, err := admin.CoreV1().Secrets(api.Namespace).Watch(ctx, from)
	if err != nil {
		t.Fatal(err)
	}
	defer sw.Stop()
	grantedAt, firstV1At := make(chan int64, 1), make(chan int64, 1)
	go firstEvent(rw, grantedAt, func(o any) bool {
		rb, ok := o.(*rbacv1.RoleBinding)
		return ok && rb.Name == api.AgentKeysAccess && len(rb.Subjects) > 0
	})
	go firstEvent(sw, firstV1At, func(o any) bool {
		s, ok := o.(*corev1.Secret)
		if !ok || s.Name != api.SecretName {
			return false
		}
		r, err := keys.Parse(s.Data[api.SecretDataKey])
		return err == nil && r.HasRoots()
	})

	// Generation 1 is v1: the agents publish no keys.
	e.setConfig(map[string]string{api.ConfigEnabledKey: "true"}, nil)
	e.ringIs(api.ModeEnforce, wait, "1:active")
	g, v := <-grantedAt, <-firstV1At
	if g >= v {
		t.Fatalf("the binding was granted at revision %d, not before the first v1 generation was written (%d)", g, v)
	}
	allowed(true, "the agents may read the Secret (generation 1 is v1)")
	e.eventually("the public ring without its root", wait, func() (bool, string) {
		cm, err := admin.CoreV1().ConfigMaps(api.Namespace).Get(ctx, api.RingConfigMapName, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		pub, err := keys.Parse([]byte(cm.Data[api.RingDataKey]))
		if err != nil {
			return false, err.Error()
		}
		full := e.ring()
		open, err := keys.Unseal(pub, full)
		if err != nil || !pub.Sealed() || strings.Contains(cm.Data[api.RingDataKey], `"root"`) {
			return false, fmt.Sprintf("public %s: %v", keys.Summary(pub), err)
		}
		a, _ := keys.Marshal(open)
		b, _ := keys.Marshal(full)
		return string(a) == string(b), "the unsealed public ring differs from the Secret's"
	})

	// Every agent publishes keys and reads the public ring; the next generation is v2;
	// once generation 1 is gone, access is revoked.
	for _, a := range agents {
		a.readsRing.Store(true)
		a.publish.Store(true)
	}
	waitPublished(e, agents, 2)
	publishing(e, r0, len(agents)) // in the master's caches too: it decides from them
	e.requestRotation("2026-01-01T00:00:00Z")
	r := e.ringIs(api.ModeEnforce, wait, "2:active")
	if !r.Generation(2).V2() {
		t.Fatalf("generation 2 is v1 with every node publishing: %s", keys.Summary(r))
	}
	e.eventually("generation 1 removed", wait, func() (bool, string) { r := e.ring(); return !r.HasRoots(), keys.Summary(r) })
	allowed(false, "the agents may no longer read the Secret")
	e.eventually("the status says so", wait, func() (bool, string) {
		st := e.status()
		return st.AgentSecretAccess == "revoked" && strings.Contains(st.AgentSecretAccessWhy, "no v1 generation is live"), st.AgentSecretAccess + ": " + st.AgentSecretAccessWhy
	})

	// An agent that reads only the Secret (a rolling update back): granted again.
	agents["n1"].readsRing.Store(false)
	allowed(true, "access granted again for an agent that reads only the Secret")
	e.eventually("the status names the node", wait, func() (bool, string) {
		st := e.status()
		return st.AgentSecretAccess == "granted" && strings.Contains(st.AgentSecretAccessWhy, "node n1"), st.AgentSecretAccess + ": " + st.AgentSecretAccessWhy
	})
	agents["n1"].readsRing.Store(true)
	allowed(false, "revoked again")
}

// firstEvent sends the resourceVersion of the first event of w whose object matches.
func firstEvent(w watch.Interface, out chan<- int64, match func(any) bool) {
	for ev := range w.ResultChan() {
		if ev.Type != watch.Added && ev.Type != watch.Modified {
			continue
		}
		if m, ok := ev.Object.(metav1.Object); ok && match(ev.Object) {
			rv, _ := strconv.ParseInt(m.GetResourceVersion(), 10, 64)
			out <- rv
			return
		}
	}
}

// waitPublished waits until every agent's NodeKeys holds generation gen's key.
func waitPublished(e *env, agents map[string]*agent, gen uint32) {
	e.eventually(fmt.Sprintf("every node publishing generation %d's key", gen), wait, func() (bool, string) {
		for n := range agents {
			u, err := e.dyn().Resource(nodekeys.GVR).Namespace(api.Namespace).Get(context.Background(), n, metav1.GetOptions{})
			if err != nil {
				return false, err.Error()
			}
			if k, err := nodekeys.Parse(u); err != nil || !slices.ContainsFunc(k.Keys, func(x nodekeys.Key) bool { return x.Generation == gen }) {
				return false, fmt.Sprintf("%s: %+v %v", n, k, err)
			}
		}
		return true, ""
	})
}

// TestMasterWithOlderRBAC: a master image newer than the applied manifest (its Role has
// neither the public ring nor the binding) still runs the cluster: the agents read the
// Secret, and the master says once why it does not write the ConfigMap.
func TestMasterWithOlderRBAC(t *testing.T) {
	e := newEnv(t)
	admin := kubernetes.NewForConfigOrDie(e.cluster.AdminConfig())
	role, err := admin.RbacV1().Roles(api.Namespace).Get(e.ctx, "secureoverlay-master", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var rules []rbacv1.PolicyRule
	for _, r := range role.Rules {
		if slices.Contains(r.Resources, "rolebindings") {
			continue
		}
		r.ResourceNames = slices.DeleteFunc(slices.Clone(r.ResourceNames), func(n string) bool { return n == api.RingConfigMapName })
		rules = append(rules, r)
	}
	role.Rules = rules
	if _, err := admin.RbacV1().Roles(api.Namespace).Update(e.ctx, role, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	// The authorizer's informer has taken the older Role before the master starts.
	kube.RequireDenied(t, admin, kube.ServiceAccountUser(api.Namespace, "secureoverlay-master"), kube.ServiceAccountGroups(api.Namespace),
		authorizationv1.ResourceAttributes{Verb: "get", Resource: "configmaps", Namespace: api.Namespace, Name: api.RingConfigMapName},
		authorizationv1.ResourceAttributes{Verb: "update", Group: "rbac.authorization.k8s.io", Resource: "rolebindings", Namespace: api.Namespace, Name: "secureoverlay-agent-keys"})
	e.startMaster("master-a", testPolicy())
	enableCluster(e, "n1", "n2")
	logs := e.sink.text()
	for _, want := range []string{"cannot read the public ring ConfigMap (the master's RBAC predates it", "the agents' Secret access is not managed"} {
		if strings.Count(logs, want) != 1 {
			t.Errorf("the master logged %q %d times, want once", want, strings.Count(logs, want))
		}
	}
	if _, err := admin.CoreV1().ConfigMaps(api.Namespace).Get(e.ctx, api.RingConfigMapName, metav1.GetOptions{}); err == nil {
		t.Error("a public ring was written without the RBAC for it")
	}
}

// TestMasterSaysWhatItReads (docs/keys.md §6): beside the public ring the master says it
// reads NodeStatuses (api.RingMasterDataKey) once it lists them — agents stop writing
// their NodeReports only then — and says nothing when its RBAC predates NodeStatuses (a
// master image newer than the applied manifest), reading NodeReports only.
func TestMasterSaysWhatItReads(t *testing.T) {
	for _, tc := range []struct {
		name      string
		olderRBAC bool
		want      string
	}{
		{"the manifest's RBAC", false, api.MasterReadsNodeStatuses},
		{"RBAC without nodestatuses", true, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			admin := kubernetes.NewForConfigOrDie(e.cluster.AdminConfig())
			if tc.olderRBAC {
				role, err := admin.RbacV1().Roles(api.Namespace).Get(e.ctx, "secureoverlay-master", metav1.GetOptions{})
				if err != nil {
					t.Fatal(err)
				}
				for i, r := range role.Rules {
					role.Rules[i].Resources = slices.DeleteFunc(slices.Clone(r.Resources), func(s string) bool { return s == nodereport.StatusResource })
				}
				if _, err := admin.RbacV1().Roles(api.Namespace).Update(e.ctx, role, metav1.UpdateOptions{}); err != nil {
					t.Fatal(err)
				}
				kube.RequireDenied(t, admin, kube.ServiceAccountUser(api.Namespace, "secureoverlay-master"), kube.ServiceAccountGroups(api.Namespace),
					authorizationv1.ResourceAttributes{Verb: "list", Group: nodereport.Group, Resource: nodereport.StatusResource, Namespace: api.Namespace})
			}
			e.startMaster("master-a", testPolicy())
			enableCluster(e, "n1", "n2")
			var data map[string]string
			e.eventually("the public ring written with what the master reads", wait, func() (bool, string) {
				cm, err := admin.CoreV1().ConfigMaps(api.Namespace).Get(e.ctx, api.RingConfigMapName, metav1.GetOptions{})
				if err != nil {
					return false, err.Error()
				}
				data = cm.Data
				reads, has := data[api.RingMasterDataKey]
				return data[api.RingDataKey] != "" && reads == tc.want && has == (tc.want != ""), fmt.Sprintf("%s %q", api.RingMasterDataKey, reads)
			})
			if tc.olderRBAC && !strings.Contains(e.sink.text(), "the agents' NodeStatuses cannot be listed") {
				t.Error("the master did not say it reads the NodeReports only")
			}
		})
	}
}
