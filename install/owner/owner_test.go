package owner

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

const ns = "secureoverlay"

func pod(owners ...metav1.OwnerReference) *corev1.Pod {
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "agent-x7k2p", OwnerReferences: owners}}
}

func dsRef(name string, uid types.UID, controller bool) metav1.OwnerReference {
	return metav1.OwnerReference{APIVersion: "apps/v1", Kind: "DaemonSet", Name: name, UID: uid, Controller: &controller}
}

func ds(name string, uid types.UID, deleting bool) *appsv1.DaemonSet {
	d := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: uid}}
	if deleting {
		now := metav1.Now()
		d.DeletionTimestamp = &now
		d.Finalizers = []string{"foregroundDeletion"}
	}
	return d
}

func TestDaemonSetDeleted(t *testing.T) {
	cases := []struct {
		name      string
		objs      []runtime.Object
		podName   string
		uninstall bool
		wantErr   bool
	}{
		{name: "daemonset lives (restart, upgrade, reboot)",
			objs: []runtime.Object{pod(dsRef("agent", "u1", true)), ds("agent", "u1", false)}, uninstall: false},
		{name: "daemonset gone (background delete)",
			objs: []runtime.Object{pod(dsRef("agent", "u1", true))}, uninstall: true},
		{name: "daemonset being deleted (foreground delete)",
			objs: []runtime.Object{pod(dsRef("agent", "u1", true)), ds("agent", "u1", true)}, uninstall: true},
		{name: "daemonset re-created under the same name",
			objs: []runtime.Object{pod(dsRef("agent", "u1", true)), ds("agent", "u2", false)}, uninstall: false},
		{name: "owner reference that is not the controller is ignored",
			objs: []runtime.Object{pod(dsRef("agent", "u1", false))}, uninstall: false},
		{name: "pod without owner (static pod)",
			objs: []runtime.Object{pod()}, uninstall: false},
		{name: "other owners first, daemonset controller second",
			objs: []runtime.Object{pod(metav1.OwnerReference{APIVersion: "v1", Kind: "Node", Name: "n1", UID: "n"}, dsRef("agent", "u1", true))}, uninstall: true},
		{name: "pod not found is an error, not an uninstall",
			objs: nil, uninstall: false, wantErr: true},
		{name: "pod identity unknown", podName: "-", uninstall: false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := fake.NewClientset(tc.objs...)
			name := "agent-x7k2p"
			if tc.podName == "-" {
				name = ""
			}
			d, err := DaemonSetDeleted(context.Background(), c, ns, name)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
			if d.Uninstall != tc.uninstall {
				t.Fatalf("uninstall = %v (%s), want %v", d.Uninstall, d.Reason, tc.uninstall)
			}
			if d.Reason == "" {
				t.Fatal("decision without a reason")
			}
		})
	}
}

// An API error on the DaemonSet lookup (e.g. RBAC forbidden, API server down) must keep the
// plugin, never uninstall it.
func TestDaemonSetLookupErrorKeeps(t *testing.T) {
	c := fake.NewClientset(pod(dsRef("agent", "u1", true)))
	c.PrependReactor("get", "daemonsets", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, errors.New("forbidden")
	})
	d, err := DaemonSetDeleted(context.Background(), c, ns, "agent-x7k2p")
	if err == nil || d.Uninstall {
		t.Fatalf("got %+v, %v; want keep with error", d, err)
	}
}

// Decide retries transient API errors, and gives up keeping the plugin when they persist.
func TestDecideRetries(t *testing.T) {
	c := fake.NewClientset(pod(dsRef("agent", "u1", true)))
	fails := 2
	c.PrependReactor("get", "pods", func(k8stesting.Action) (bool, runtime.Object, error) {
		if fails > 0 {
			fails--
			return true, nil, errors.New("connection refused")
		}
		return false, nil, nil
	})
	d, err := Decide(context.Background(), c, nil, ns, "agent-x7k2p", time.Millisecond)
	if err != nil || !d.Uninstall || fails != 0 {
		t.Fatalf("got %+v, %v (fails left %d)", d, err, fails)
	}

	c = fake.NewClientset(pod(dsRef("agent", "u1", true)))
	c.PrependReactor("get", "pods", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, errors.New("connection refused")
	})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	d, err = Decide(ctx, c, nil, ns, "agent-x7k2p", 5*time.Millisecond)
	if err == nil || d.Uninstall {
		t.Fatalf("got %+v, %v; want keep with error", d, err)
	}
}

func waitWatch(t *testing.T, c *fake.Clientset) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		for _, a := range c.Actions() {
			if a.GetVerb() == "watch" && a.GetResource().Resource == "daemonsets" {
				return
			}
		}
	}
	t.Fatal("tracker never watched the daemonset")
}

func startTracker(t *testing.T, c *fake.Clientset) *Tracker {
	t.Helper()
	tr := NewTracker(c, ns, "agent-x7k2p")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); tr.Run(ctx, t.Logf) }()
	t.Cleanup(func() { cancel(); <-done })
	return tr
}

func waitDeleted(t *testing.T, tr *Tracker) string {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if ok, why := tr.Deleted(); ok {
			return why
		}
	}
	t.Fatal("tracker did not see the deletion")
	return ""
}

// The tracker sees the DaemonSet deleted while it still may; when RBAC is gone at SIGTERM,
// its observation decides.
func TestTrackerSeesDeletion(t *testing.T) {
	c := fake.NewClientset(pod(dsRef("agent", "u1", true)), ds("agent", "u1", false))
	tr := startTracker(t, c)
	waitWatch(t, c)
	if ok, _ := tr.Deleted(); ok {
		t.Fatal("deleted before anything happened")
	}
	if err := c.AppsV1().DaemonSets(ns).Delete(context.Background(), "agent", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	why := waitDeleted(t, tr)
	t.Logf("tracker: %s", why)

	// kubectl delete -f goes on to delete our RBAC: every request is now forbidden.
	c.PrependReactor("*", "*", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, errors.New("forbidden")
	})
	d, err := Decide(context.Background(), c, tr, ns, "agent-x7k2p", time.Millisecond)
	if err != nil || !d.Uninstall {
		t.Fatalf("decision %+v, %v; want uninstall from the tracker", d, err)
	}
	// Without the tracker the same situation keeps the plugin.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	if d, err := Decide(ctx, c, nil, ns, "agent-x7k2p", time.Millisecond); err == nil || d.Uninstall {
		t.Fatalf("without tracker: %+v, %v; want keep", d, err)
	}
}

func TestTrackerSeesDeletionTimestamp(t *testing.T) {
	c := fake.NewClientset(pod(dsRef("agent", "u1", true)), ds("agent", "u1", false))
	tr := startTracker(t, c)
	waitWatch(t, c)
	if _, err := c.AppsV1().DaemonSets(ns).Update(context.Background(), ds("agent", "u1", true), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if why := waitDeleted(t, tr); why == "" {
		t.Fatal("no reason")
	}
}

// Events about another DaemonSet (other name, or same name with another UID) are ignored,
// and a live DaemonSet never counts as deleted even when the API later fails.
func TestTrackerIgnoresOthers(t *testing.T) {
	c := fake.NewClientset(pod(dsRef("agent", "u1", true)), ds("agent", "u1", false), ds("other", "u9", false))
	tr := startTracker(t, c)
	waitWatch(t, c)
	if err := c.AppsV1().DaemonSets(ns).Delete(context.Background(), "other", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if ok, why := tr.Deleted(); ok {
		t.Fatalf("another daemonset's deletion counted: %s", why)
	}
	c.PrependReactor("get", "*", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, errors.New("connection refused")
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	if d, err := Decide(ctx, c, tr, ns, "agent-x7k2p", time.Millisecond); err == nil || d.Uninstall {
		t.Fatalf("%+v, %v; want keep", d, err)
	}
}

// The DaemonSet already gone when the tracker starts (the pod outlived it).
func TestTrackerDaemonSetAlreadyGone(t *testing.T) {
	c := fake.NewClientset(pod(dsRef("agent", "u1", true)))
	tr := startTracker(t, c)
	waitDeleted(t, tr)
}

// What the Tracker concludes from the versions of the DaemonSet the watch shows, in order
// (gone: the object of a deletion event). Cascading only for a deletion that deletes our
// pod; a deletion the watch did not see begin (it may have orphaned the pod) is left to
// the SIGTERM decision.
func TestTrackerCascadeRules(t *testing.T) {
	ref := dsRef("agent", "u1", true)
	now := metav1.Now()
	live := ds("agent", "u1", false)
	deleting := func(finalizers ...string) *appsv1.DaemonSet {
		d := ds("agent", "u1", false)
		d.DeletionTimestamp, d.Finalizers = &now, finalizers
		return d
	}
	type ev struct {
		d    *appsv1.DaemonSet
		gone bool
	}
	cases := []struct {
		name                                  string
		evs                                   []ev
		deleted, cascade, orphaned, recreated bool
	}{
		{name: "live", evs: []ev{{live, false}}},
		{name: "background: removed outright", evs: []ev{{live, false}, {live, true}}, deleted: true, cascade: true},
		{name: "foreground", evs: []ev{{live, false}, {deleting(metav1.FinalizerDeleteDependents), false}}, deleted: true, cascade: true},
		{name: "foreground, then removed", evs: []ev{{deleting(metav1.FinalizerDeleteDependents), false}, {deleting(), true}}, deleted: true, cascade: true},
		{name: "orphan", evs: []ev{{live, false}, {deleting(metav1.FinalizerOrphanDependents), false}}, orphaned: true},
		{name: "removed after a deletion the watch missed", evs: []ev{{live, false}, {deleting(), true}}, deleted: true},
		{name: "another finalizer holds it, then removed", evs: []ev{{deleting("example.com/hold"), false}, {deleting(), true}}, deleted: true, cascade: true},
		{name: "removed, then re-created", evs: []ev{{live, true}, {ds("agent", "u2", false), false}}, deleted: true, cascade: true, recreated: true},
		{name: "another UID without a deletion seen", evs: []ev{{ds("agent", "u2", false), false}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tr := NewTracker(nil, ns, "agent-x7k2p")
			for _, e := range c.evs {
				tr.observe(e.d, &ref, e.gone)
			}
			deleted, _ := tr.Deleted()
			orphaned, _ := tr.Orphaned()
			got := []bool{deleted, closed(tr.Cascading()), orphaned, closed(tr.Recreated())}
			want := []bool{c.deleted, c.cascade, c.orphaned, c.recreated}
			if !slices.Equal(got, want) {
				t.Errorf("deleted, cascading, orphaned, recreated = %v, want %v", got, want)
			}
		})
	}
}

func closed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}
