package agent

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	fakediscovery "k8s.io/client-go/discovery/fake"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/internal/testkinds"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/rules"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
	"github.com/secureoverlay/secureoverlay/reconciler/xfrm"
)

// TestJoinCostInALargeCluster: in a 1,000-node cluster (accept mode), one more node costs
// exactly 3 kernel writes on every other node (its inbound and outbound SA and the inbound
// policy), done by a partial sync that does not re-list the kernel.
func TestJoinCostInALargeCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("1,000 nodes; skipped with -short")
	}
	const n = 1000
	names := make([]string, n+1)
	for i := range names {
		names[i] = fmt.Sprintf("node-%04d", i)
	}
	ring := testRing(t, api.ModeAccept, names...)
	data, err := keys.Marshal(ring)
	if err != nil {
		t.Fatal(err)
	}
	ip := func(i int) string { return fmt.Sprintf("198.18.%d.%d", 1+i/250, 1+i%250) }
	objs := []runtime.Object{&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: api.Namespace, Name: api.SecretName},
		Data: map[string][]byte{api.SecretDataKey: data}}}
	for i := range n {
		objs = append(objs, testNode(names[i], ip(i), "boot-"+names[i]))
	}
	cs := fake.NewClientset(objs...)
	cs.Discovery().(*fakediscovery.FakeDiscovery).Resources = []*metav1.APIResourceList{{GroupVersion: "crd.projectcalico.org/v1",
		APIResources: []metav1.APIResource{{Name: "ipamblocks"}, {Name: "ippools"}}}}
	gv := schema.GroupVersion{Group: "crd.projectcalico.org", Version: "v1"}
	dc := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), testkinds.With(map[schema.GroupVersionResource]string{gv.WithResource("ipamblocks"): "IPAMBlockList", gv.WithResource("ippools"): "IPPoolList"}))
	src := watch.New(watch.Config{Self: names[0], Client: cs, Dynamic: dc})
	xk := xfrm.NewFake()
	m := NewMetrics("")
	a, err := New(Config{NodeName: names[0], ExternalMTU: 1500, LedgerDir: t.TempDir()}, Deps{Client: cs, Source: src, Xfrm: xfrm.NewApplier(xk, desired.Config{}),
		Rules: rules.NewApplier(rules.NewFake()), Metrics: m, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go src.Run(ctx)
	waitFor(t, "synced", src.HasSynced)
	t0 := time.Now()
	if err := a.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	first := time.Since(t0)
	states, policies := xk.Snapshot()
	if len(states) != 2*(n-1) || len(policies) != n-1 {
		t.Fatalf("first sync: %d states, %d policies", len(states), len(policies))
	}
	w0, lists := writes(m), xk.Lists
	if _, err := cs.CoreV1().Nodes().Create(ctx, testNode(names[n], ip(n), "boot-new"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "new node in cache", func() bool { s := src.Snapshot(); return s.Node(names[n]) != nil })
	t0 = time.Now()
	if err := a.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	join := time.Since(t0)
	if got := writes(m) - w0; got != 3 {
		t.Errorf("joining node cost %v kernel writes, want 3", got)
	}
	if xk.Lists != lists {
		t.Errorf("a partial sync re-listed the kernel (%d → %d listings)", lists, xk.Lists)
	}
	t.Logf("%d nodes: first full sync %v; one joining node: partial sync %v, %v kernel writes", n, first, join, writes(m)-w0)
}
