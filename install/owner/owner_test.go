package owner

import (
	"context"
	"errors"
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
	d, err := Decide(context.Background(), c, ns, "agent-x7k2p", time.Millisecond)
	if err != nil || !d.Uninstall || fails != 0 {
		t.Fatalf("got %+v, %v (fails left %d)", d, err, fails)
	}

	c = fake.NewClientset(pod(dsRef("agent", "u1", true)))
	c.PrependReactor("get", "pods", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, errors.New("connection refused")
	})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	d, err = Decide(ctx, c, ns, "agent-x7k2p", 5*time.Millisecond)
	if err == nil || d.Uninstall {
		t.Fatalf("got %+v, %v; want keep with error", d, err)
	}
}
