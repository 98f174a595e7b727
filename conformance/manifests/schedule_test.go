package manifests

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/util/retry"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/conformance/kube"
)

// TestManifestPodsScheduled applies the manifest, unchanged, to a real API server with a
// real kube-controller-manager and kube-scheduler, and checks what they make of it on a
// cluster shaped like a user's: a tainted control-plane node, two workers and a Windows
// node. The DaemonSet's pods must be created and bound on every Linux node (the
// control plane included: the agent must encrypt its traffic too) and on no other; the
// master's two replicas must be bound to two different nodes. (No kubelet runs, so the
// pods stay Pending once bound: conformance/realnode runs them.)
func TestManifestPodsScheduled(t *testing.T) {
	kc := kubectlPath(t)
	c := kube.Start(t, kube.WithControllers())
	kube.InstallCalicoCRDs(t, c.AdminConfig())
	cs, err := kubernetes.NewForConfig(c.AdminConfig())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	nodes := []kube.Node{
		{Name: "cp-1", IPv4: "198.18.3.1", BootID: "boot-cp-1", Labels: map[string]string{"node-role.kubernetes.io/control-plane": ""}},
		{Name: "worker-1", IPv4: "198.18.3.2", BootID: "boot-worker-1"},
		{Name: "worker-2", IPv4: "198.18.3.3", BootID: "boot-worker-2"},
		{Name: "win-1", IPv4: "198.18.3.4", BootID: "boot-win-1", Labels: map[string]string{"kubernetes.io/os": "windows"}},
	}
	for _, n := range nodes {
		kube.CreateNode(t, c.AdminConfig(), n)
	}
	// The control plane's taint, as kubeadm sets it (on the latest version: the node
	// lifecycle controller writes new Nodes too).
	if err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		cp, err := cs.CoreV1().Nodes().Get(ctx, "cp-1", metav1.GetOptions{})
		if err != nil {
			return err
		}
		cp.Spec.Taints = append(cp.Spec.Taints, corev1.Taint{Key: "node-role.kubernetes.io/control-plane", Effect: corev1.TaintEffectNoSchedule})
		_, err = cs.CoreV1().Nodes().Update(ctx, cp, metav1.UpdateOptions{})
		return err
	}); err != nil {
		t.Fatal(err)
	}

	out := mustKubectl(t, kc, c.Kubeconfig(), "apply", "-f", manifestPath(t))
	t.Logf("kubectl apply:\n%s", out)

	// bound lists "<workload>@<node>" of the namespace's pods, and the pods not yet bound.
	bound := func() (got []string, unbound []string, err error) {
		pods, err := cs.CoreV1().Pods(api.Namespace).List(ctx, metav1.ListOptions{})
		if err != nil {
			return nil, nil, err
		}
		for _, p := range pods.Items {
			owner := "?"
			if len(p.OwnerReferences) > 0 {
				owner = p.OwnerReferences[0].Kind
			}
			if p.Spec.NodeName == "" {
				unbound = append(unbound, fmt.Sprintf("%s/%s (%s)", owner, p.Name, podScheduledMessage(&p)))
				continue
			}
			got = append(got, owner+"@"+p.Spec.NodeName)
		}
		sort.Strings(got)
		return got, unbound, nil
	}
	want := []string{"DaemonSet@cp-1", "DaemonSet@worker-1", "DaemonSet@worker-2"}
	var got, unbound []string
	deadline := time.Now().Add(2 * time.Minute)
	for {
		got, unbound, err = bound()
		if err != nil {
			t.Fatal(err)
		}
		var ds, rs []string
		for _, g := range got {
			if strings.HasPrefix(g, "DaemonSet@") {
				ds = append(ds, g)
			} else {
				rs = append(rs, g)
			}
		}
		if strings.Join(ds, ",") == strings.Join(want, ",") && len(rs) == 2 && len(unbound) == 0 {
			if rs[0] == rs[1] {
				t.Fatalf("both master replicas on one node: %v", rs)
			}
			for _, r := range rs {
				if !strings.HasPrefix(r, "ReplicaSet@") || strings.HasSuffix(r, "@win-1") {
					t.Fatalf("master pod %s: want a ReplicaSet pod on a Linux node", r)
				}
			}
			t.Logf("pods bound: %v", got)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pods not as expected after 2m: bound %v, unbound %v; want DaemonSet pods on exactly %v and 2 master replicas on two Linux nodes", got, unbound, want)
		}
		time.Sleep(500 * time.Millisecond)
	}
	// And it stays so: no DaemonSet pod appears later on the Windows node.
	time.Sleep(2 * time.Second)
	if got2, _, err := bound(); err != nil || strings.Join(got2, ",") != strings.Join(got, ",") {
		t.Fatalf("pods changed: %v → %v (%v)", got, got2, err)
	}
}

func podScheduledMessage(p *corev1.Pod) string {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodScheduled {
			return c.Reason + ": " + c.Message
		}
	}
	return "not yet considered"
}
