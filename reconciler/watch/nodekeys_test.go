package watch

import (
	"context"
	"crypto/rand"
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
	"github.com/secureoverlay/secureoverlay/nodekeys"
)

// TestNodeKeysKeptWhileTheNodeExists: a peer's NodeKeys reaches the snapshot (and moves
// the node view on); deleted while its Node exists — `kubectl delete -f` deletes our
// namespace before the agents walk down — its keys stay (dropping them would drop the
// pair's v2 SAs mid-uninstall: lost packets, seen in the real-node story); once the Node
// is gone they go with it.
func TestNodeKeysKeptWhileTheNodeExists(t *testing.T) {
	ctx, w, cs, dc := watcherOfA(t, api.ModeAccept, node("a", "198.18.0.1/24", "boot-a", nil), node("b", "198.18.0.2/24", "boot-b", nil))
	waitFor(t, "caches to sync", w.HasSynced)

	priv, err := keys.GeneratePrivateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	k := nodekeys.Keys{Incarnation: nodekeys.Incarnation{BootID: "boot-b", UID: "uid-b", Epoch: "e-b"},
		Keys: []nodekeys.Key{{Generation: 2, X25519: priv.Public()}}}
	if err := nodekeys.Write(ctx, dc, api.Namespace, "b", "", k); err != nil {
		t.Fatal(err)
	}
	keysOf := func(name string) *nodekeys.Keys {
		s := w.Snapshot()
		if n := s.Node(name); n != nil {
			return n.Keys
		}
		return nil
	}
	waitFor(t, "b's keys in the snapshot", func() bool { k2 := keysOf("b"); return k2 != nil && k2.Equal(k) })
	seq := w.Snapshot().NodesSeq
	if err := dc.Resource(nodekeys.GVR).Namespace(api.Namespace).Delete(ctx, "b", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the deletion seen", func() bool { _, ok, _ := w.pubKeys.Get("b"); return !ok })
	time.Sleep(50 * time.Millisecond)
	if k2 := keysOf("b"); k2 == nil || !k2.Equal(k) || w.Snapshot().NodesSeq != seq {
		t.Fatalf("b's keys after its NodeKeys was deleted while b exists: %+v", k2)
	}
	if err := cs.CoreV1().Nodes().Delete(ctx, "b", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b gone", func() bool { s := w.Snapshot(); return s.Node("b") == nil })
}

// watcherOfA runs node a's Watcher until the test ends, on fake clients holding nodes
// and a key Secret with a ring of mode in which a and b have node IDs (Calico's v1 group
// served, NodeReports and NodeKeys listable).
func watcherOfA(t *testing.T, mode api.Mode, nodes ...*corev1.Node) (context.Context, *Watcher, *fake.Clientset, *dynamicfake.FakeDynamicClient) {
	t.Helper()
	data, err := keys.Marshal(testRing(t, mode, 8, "a", "b"))
	if err != nil {
		t.Fatal(err)
	}
	objs := []runtime.Object{&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: api.Namespace, Name: api.SecretName}, Data: map[string][]byte{api.SecretDataKey: data}}}
	for _, n := range nodes {
		objs = append(objs, n)
	}
	cs := fake.NewClientset(objs...)
	cs.Discovery().(*fakediscovery.FakeDiscovery).Resources = []*metav1.APIResourceList{resources("crd.projectcalico.org/v1", "ipamblocks", "ippools")}
	dc := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), testkinds.With(map[schema.GroupVersionResource]string{gvBlocks: "IPAMBlockList", gvPools: "IPPoolList"}))
	w := New(Config{Self: "a", Client: cs, Dynamic: dc, DiscoveryRetry: 10 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go w.Run(ctx)
	return ctx, w, cs, dc
}
