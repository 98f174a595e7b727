package owner

import (
	"context"
	authorizationv1 "k8s.io/api/authorization/v1"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/secureoverlay/secureoverlay/conformance/kube"
)

// Setup is the cluster side of an installer pod: the least-privilege Role the installer
// needs (docs/install.md), a ServiceAccount bound to it, a DaemonSet and one of its pods
// (created by hand: the harness runs no controllers).
type Setup struct {
	Namespace, ServiceAccount, DaemonSet, Pod string
}

// InstallerRules are the RBAC rules the installer's ServiceAccount needs in its namespace:
// get its own pod (name unknown in advance), and get/list/watch only its DaemonSet.
func InstallerRules(daemonSet string) []rbacv1.PolicyRule {
	return []rbacv1.PolicyRule{
		{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"get"}},
		{APIGroups: []string{"apps"}, Resources: []string{"daemonsets"}, ResourceNames: []string{daemonSet}, Verbs: []string{"get", "list", "watch"}},
	}
}

func createSetup(ctx context.Context, t *testing.T, admin kubernetes.Interface, s Setup, withRole bool) *appsv1.DaemonSet {
	t.Helper()
	if withRole {
		role := &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Namespace: s.Namespace, Name: "secureoverlay-install"}, Rules: InstallerRules(s.DaemonSet)}
		if _, err := admin.RbacV1().Roles(s.Namespace).Create(ctx, role, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		rb := &rbacv1.RoleBinding{
			ObjectMeta: metav1.ObjectMeta{Namespace: s.Namespace, Name: "secureoverlay-install"},
			RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: role.Name},
			Subjects:   []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Namespace: s.Namespace, Name: s.ServiceAccount}},
		}
		if _, err := admin.RbacV1().RoleBindings(s.Namespace).Create(ctx, rb, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		kube.RequireAuthorized(t, admin, kube.ServiceAccountUser(s.Namespace, s.ServiceAccount), kube.ServiceAccountGroups(s.Namespace),
			authorizationv1.ResourceAttributes{Group: "apps", Resource: "daemonsets", Namespace: s.Namespace, Name: s.DaemonSet, Verb: "watch"})
	}
	labels := map[string]string{"app": s.DaemonSet}
	no := false
	podSpec := corev1.PodSpec{
		ServiceAccountName: s.ServiceAccount, AutomountServiceAccountToken: &no,
		Containers: []corev1.Container{{Name: "install", Image: "secureoverlay:test"}},
	}
	ds := &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Namespace: s.Namespace, Name: s.DaemonSet},
		Spec: appsv1.DaemonSetSpec{
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: labels}, Spec: podSpec},
		},
	}
	ds, err := admin.AppsV1().DaemonSets(s.Namespace).Create(ctx, ds, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	yes := true
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: s.Namespace, Name: s.Pod, Labels: labels,
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "DaemonSet", Name: ds.Name, UID: ds.UID, Controller: &yes, BlockOwnerDeletion: &yes}}},
		Spec: podSpec,
	}
	if _, err := admin.CoreV1().Pods(s.Namespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	return ds
}

// decideEventually retries while RBAC caches catch up with a new binding.
func decideEventually(ctx context.Context, t *testing.T, c kubernetes.Interface, s Setup) (Decision, error) {
	t.Helper()
	var d Decision
	var err error
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if d, err = DaemonSetDeleted(ctx, c, s.Namespace, s.Pod); err == nil || !apierrors.IsForbidden(err) {
			break
		}
	}
	return d, err
}

// TestDecisionAgainstAPIServer runs the decision as the installer's ServiceAccount with
// only InstallerRules against a real kube-apiserver: DaemonSet alive, being deleted
// (foreground, held by its finalizer since no garbage collector runs), gone, re-created;
// and without the Role the API refuses and the decision keeps the plugin.
func TestDecisionAgainstAPIServer(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a real kube-apiserver; skipped with -short")
	}
	c := kube.Start(t, kube.WithNamespaces("so-install"))
	ctx := context.Background()
	admin := kubernetes.NewForConfigOrDie(c.AdminConfig())
	s := Setup{Namespace: "so-install", ServiceAccount: "secureoverlay-agent", DaemonSet: "secureoverlay-agent", Pod: "secureoverlay-agent-abcde"}
	sa := kubernetes.NewForConfigOrDie(c.ServiceAccountConfig(s.Namespace, s.ServiceAccount))
	ds := createSetup(ctx, t, admin, s, true)

	d, err := decideEventually(ctx, t, sa, s)
	if err != nil || d.Uninstall {
		t.Fatalf("daemonset alive: %+v, %v; want keep", d, err)
	}

	// The least privilege is really least: no list, no other verbs.
	if _, err := sa.CoreV1().Pods(s.Namespace).List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("list pods: %v, want Forbidden", err)
	}
	if err := sa.AppsV1().DaemonSets(s.Namespace).Delete(ctx, s.DaemonSet, metav1.DeleteOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("delete daemonset: %v, want Forbidden", err)
	}

	fg := metav1.DeletePropagationForeground
	if err := admin.AppsV1().DaemonSets(s.Namespace).Delete(ctx, s.DaemonSet, metav1.DeleteOptions{PropagationPolicy: &fg}); err != nil {
		t.Fatal(err)
	}
	if d, err = DaemonSetDeleted(ctx, sa, s.Namespace, s.Pod); err != nil || !d.Uninstall {
		t.Fatalf("daemonset being deleted: %+v, %v; want uninstall", d, err)
	}
	t.Logf("foreground delete: %s", d.Reason)

	// Drop the finalizer the (absent) garbage collector would have handled: gone.
	patch := []byte(`{"metadata":{"finalizers":null}}`)
	if _, err := admin.AppsV1().DaemonSets(s.Namespace).Patch(ctx, s.DaemonSet, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	if d, err = DaemonSetDeleted(ctx, sa, s.Namespace, s.Pod); err != nil || !d.Uninstall {
		t.Fatalf("daemonset gone: %+v, %v; want uninstall", d, err)
	}
	t.Logf("gone: %s", d.Reason)

	// Re-created under the same name (upgrade by delete + apply): keep.
	re := ds.DeepCopy()
	re.ResourceVersion, re.UID, re.DeletionTimestamp, re.Finalizers, re.CreationTimestamp = "", "", nil, nil, metav1.Time{}
	if _, err := admin.AppsV1().DaemonSets(s.Namespace).Create(ctx, re, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if d, err = DaemonSetDeleted(ctx, sa, s.Namespace, s.Pod); err != nil || d.Uninstall {
		t.Fatalf("daemonset re-created: %+v, %v; want keep", d, err)
	}

	// The DaemonSet is re-created with a new UID; a tracker follows it (watch allowed by
	// resourceNames). kubectl delete -f deletes it, then the RoleBinding: at "SIGTERM" the
	// API refuses, and the tracker's observation decides.
	tr := NewTracker(sa, s.Namespace, s.Pod)
	pod, err := admin.CoreV1().Pods(s.Namespace).Get(ctx, s.Pod, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cur, err := admin.AppsV1().DaemonSets(s.Namespace).Get(ctx, s.DaemonSet, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pod.OwnerReferences[0].UID = cur.UID // the pod belongs to the live DaemonSet now
	if _, err := admin.CoreV1().Pods(s.Namespace).Update(ctx, pod, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	tctx, tcancel := context.WithCancel(ctx)
	tdone := make(chan struct{})
	go func() { defer close(tdone); tr.Run(tctx, t.Logf) }()
	defer func() { tcancel(); <-tdone }()
	waitWatching := func(what string) {
		for deadline := time.Now().Add(45 * time.Second); !tr.watching.Load(); time.Sleep(50 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("tracker not watching %s", what)
			}
		}
	}
	waitWatching("after start")
	if ok, why := tr.Deleted(); ok {
		t.Fatalf("tracker reports deletion of a live daemonset: %s", why)
	}
	// An API server restart while the DaemonSet stays unchanged: the tracker must watch
	// again. A watch from the DaemonSet's own (now pre-restart) resourceVersion would be
	// refused as too old forever, and the deletion below would go unseen once our RBAC is
	// gone (regression: it watched from the object's resourceVersion).
	c.StopAPIServer()
	for deadline := time.Now().Add(10 * time.Second); tr.watching.Load(); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("tracker still watching a stopped API server")
		}
	}
	c.StartAPIServer()
	waitWatching("after an API server restart")
	if err := admin.AppsV1().DaemonSets(s.Namespace).Delete(ctx, s.DaemonSet, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := admin.RbacV1().RoleBindings(s.Namespace).Delete(ctx, "secureoverlay-install", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if ok, _ := tr.Deleted(); ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("tracker did not see the deletion")
		}
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		_, err := sa.CoreV1().Pods(s.Namespace).Get(ctx, s.Pod, metav1.GetOptions{})
		if apierrors.IsForbidden(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("rbac not revoked: %v", err)
		}
	}
	dctx, dcancel := context.WithTimeout(ctx, 2*time.Second)
	defer dcancel()
	if d, err := Decide(dctx, sa, nil, s.Namespace, s.Pod, 100*time.Millisecond); err == nil || d.Uninstall {
		t.Fatalf("without the tracker: %+v, %v; want keep (the API refuses)", d, err)
	}
	d, err = Decide(ctx, sa, tr, s.Namespace, s.Pod, 100*time.Millisecond)
	if err != nil || !d.Uninstall {
		t.Fatalf("with the tracker: %+v, %v; want uninstall", d, err)
	}
	t.Logf("with RBAC gone: %s", d.Reason)

	// A ServiceAccount without the Role: Forbidden, and the decision keeps the plugin.
	s2 := Setup{Namespace: "so-install", ServiceAccount: "no-rbac", DaemonSet: "other-ds", Pod: "other-ds-xyz"}
	norbac := kubernetes.NewForConfigOrDie(c.ServiceAccountConfig(s2.Namespace, s2.ServiceAccount))
	createSetup(ctx, t, admin, s2, false)
	if err := admin.AppsV1().DaemonSets(s2.Namespace).Delete(ctx, s2.DaemonSet, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	d, err = DaemonSetDeleted(ctx, norbac, s2.Namespace, s2.Pod)
	if !apierrors.IsForbidden(err) || d.Uninstall {
		t.Fatalf("without RBAC: %+v, %v; want keep with Forbidden", d, err)
	}
}

// TestTrackerCascadeAgainstAPIServer checks the Tracker's cascade rules against what a
// real kube-apiserver's watch delivers for each propagation policy (the harness runs no
// garbage collector, so finalizers stay until the test removes them): background (what
// `kubectl delete` does) removes the object outright, with no deletionTimestamp in the
// deletion event, and cascades; foreground cascades while the object waits for its
// dependents; orphan does not cascade, not even when the object is finally removed; and a
// DaemonSet created again under the name after a deletion is seen as re-created.
func TestTrackerCascadeAgainstAPIServer(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a real kube-apiserver; skipped with -short")
	}
	c := kube.Start(t, kube.WithNamespaces("so-cascade"))
	ctx := context.Background()
	admin := kubernetes.NewForConfigOrDie(c.AdminConfig())
	if _, err := admin.CoreV1().ServiceAccounts("so-cascade").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: "so-cascade", Name: "agent"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	start := func(name string) (*Tracker, *appsv1.DaemonSet, chan struct{}) {
		s := Setup{Namespace: "so-cascade", ServiceAccount: "agent", DaemonSet: name, Pod: name + "-abcde"}
		ds := createSetup(ctx, t, admin, s, false)
		tr := NewTracker(admin, s.Namespace, s.Pod)
		tctx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { defer close(done); tr.Run(tctx, t.Logf) }()
		t.Cleanup(func() { cancel(); <-done })
		for deadline := time.Now().Add(30 * time.Second); !tr.watching.Load(); time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: tracker not watching", name)
			}
		}
		return tr, ds, done
	}
	waitClosed := func(what string, ch <-chan struct{}) {
		t.Helper()
		select {
		case <-ch:
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: not seen within 10s", what)
		}
	}
	del := func(name string, p metav1.DeletionPropagation) {
		t.Helper()
		if err := admin.AppsV1().DaemonSets("so-cascade").Delete(ctx, name, metav1.DeleteOptions{PropagationPolicy: &p}); err != nil {
			t.Fatal(err)
		}
	}
	unfinalize := func(name string) {
		t.Helper()
		if _, err := admin.AppsV1().DaemonSets("so-cascade").Patch(ctx, name, types.MergePatchType, []byte(`{"metadata":{"finalizers":null}}`), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	bg, bgDS, _ := start("bg")
	del("bg", metav1.DeletePropagationBackground)
	waitClosed("background deletion", bg.Cascading())
	re := bgDS.DeepCopy()
	re.ResourceVersion, re.UID, re.CreationTimestamp = "", "", metav1.Time{}
	if _, err := admin.AppsV1().DaemonSets("so-cascade").Create(ctx, re, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitClosed("re-creation", bg.Recreated())

	fg, _, _ := start("fg")
	del("fg", metav1.DeletePropagationForeground)
	waitClosed("foreground deletion", fg.Cascading())
	unfinalize("fg")

	or, _, orDone := start("or")
	del("or", metav1.DeletePropagationOrphan)
	// The tracker stops following once it sees the orphan finalizer: our pod left.
	waitClosed("the tracker ending after an orphaning deletion", orDone)
	if ok, why := or.Orphaned(); !ok {
		t.Fatal("orphaning deletion not recognised")
	} else {
		t.Logf("orphan: %s", why)
	}
	unfinalize("or") // what the garbage collector does once it has orphaned the pods
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, err := admin.AppsV1().DaemonSets("so-cascade").Get(ctx, "or", metav1.GetOptions{}); apierrors.IsNotFound(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("orphaned daemonset not removed")
		}
	}
	if closed(or.Cascading()) {
		t.Error("an orphaning deletion counted as cascading")
	}
	if ok, _ := or.Deleted(); ok {
		t.Error("an orphaning deletion counted as deleting our pod at SIGTERM")
	}
}
