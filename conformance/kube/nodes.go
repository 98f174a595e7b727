package kube

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/util/retry"

	"github.com/secureoverlay/secureoverlay/api"
)

// Node describes a Node object a test creates. There is no kubelet: the harness
// writes what a kubelet and Calico would (status and annotations).
type Node struct {
	Name string
	// IPv4 is the node's address (a 198.18.0.0/15 test address); it becomes the
	// InternalIP and, as IPv4/24, Calico's projectcalico.org/IPv4Address
	// annotation. Empty: neither is set.
	IPv4 string
	// BootID is status.nodeInfo.bootID, the node's incarnation.
	BootID string
	// NotReady sets the Ready condition to False (default True).
	NotReady bool
	// Annotations are added as given (after the Calico address annotation).
	Annotations map[string]string
	Labels      map[string]string
}

// CreateNode creates the Node and sets its status (Ready, addresses, boot ID).
// Fails t on error.
func CreateNode(t testing.TB, cfg *rest.Config, n Node) *corev1.Node {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatalf("create node %s: client: %v", n.Name, err)
	}
	node, err := CreateNodeContext(ctx, cs, n)
	if err != nil {
		t.Fatal(err)
	}
	return node
}

// CreateNodeContext is CreateNode for use outside tests.
func CreateNodeContext(ctx context.Context, cs kubernetes.Interface, n Node) (*corev1.Node, error) {
	obj := &corev1.Node{ObjectMeta: metav1.ObjectMeta{
		Name:        n.Name,
		Labels:      map[string]string{"kubernetes.io/hostname": n.Name, "kubernetes.io/os": "linux"},
		Annotations: map[string]string{},
	}}
	maps.Copy(obj.Labels, n.Labels)
	if n.IPv4 != "" {
		ip, err := netip.ParseAddr(n.IPv4)
		if err != nil || !ip.Is4() {
			return nil, fmt.Errorf("create node %s: IPv4 %q is not an IPv4 address", n.Name, n.IPv4)
		}
		obj.Annotations[api.CalicoIPv4AddressAnnotation] = ip.String() + "/24"
	}
	maps.Copy(obj.Annotations, n.Annotations)
	created, err := cs.CoreV1().Nodes().Create(ctx, obj, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("create node %s: %w", n.Name, err)
	}
	// With WithControllers, the node lifecycle controller may write the new Node (its
	// taints) between our two calls: retry the status write on the latest version.
	var updated *corev1.Node
	err = retry.RetryOnConflict(retry.DefaultRetry, func() error {
		created.Status = NodeStatus(n)
		u, err := cs.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{})
		if apierrors.IsConflict(err) {
			if latest, gerr := cs.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{}); gerr == nil {
				created = latest
			}
		}
		updated = u
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("update status of node %s: %w", n.Name, err)
	}
	return updated, nil
}

// NodeStatus is the status a kubelet would report for n, heartbeat now.
func NodeStatus(n Node) corev1.NodeStatus {
	now := metav1.Now()
	ready := corev1.NodeCondition{
		Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady",
		LastHeartbeatTime: now, LastTransitionTime: now,
	}
	if n.NotReady {
		ready.Status, ready.Reason = corev1.ConditionFalse, "KubeletNotReady"
	}
	// What a small kubelet node reports, so that the scheduler (WithControllers) can
	// place pods that request resources.
	res := corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse("2"),
		corev1.ResourceMemory: resource.MustParse("4Gi"),
		corev1.ResourcePods:   resource.MustParse("110"),
	}
	st := corev1.NodeStatus{
		Capacity:    res,
		Allocatable: res.DeepCopy(),
		Conditions:  []corev1.NodeCondition{ready},
		NodeInfo: corev1.NodeSystemInfo{
			BootID:          n.BootID,
			OperatingSystem: "linux",
			Architecture:    "amd64",
			KubeletVersion:  "v1.36.3",
		},
	}
	if n.IPv4 != "" {
		st.Addresses = []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: n.IPv4},
			{Type: corev1.NodeHostName, Address: n.Name},
		}
	}
	return st
}

// Parallel runs f(0) … f(n-1) on w goroutines (tests that create thousands of objects)
// and returns the first error; every call runs whatever fails.
func Parallel(n, w int, f func(i int) error) error {
	var mu sync.Mutex
	var first error
	var wg sync.WaitGroup
	next := make(chan int)
	for range w {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				if err := f(i); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
				}
			}
		}()
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
	return first
}
