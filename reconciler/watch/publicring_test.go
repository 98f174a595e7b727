package watch

import (
	"bytes"
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	fakediscovery "k8s.io/client-go/discovery/fake"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/internal/testkinds"
	"github.com/secureoverlay/secureoverlay/keys"
)

// TestWatcherPublicRing: the agent reads the public ring ConfigMap, and the Secret only
// while that withholds a v1 root or is missing (docs/keys.md §11): an agent of a v2-only
// cluster never lists or watches a Secret.
func TestWatcherPublicRing(t *testing.T) {
	mixed := testRing(t, api.ModeEnforce, 8, "a", "b") // generation 1: v1, active
	mixed.LastGeneration = 2
	mixed.Generations = append(mixed.Generations, keys.Generation{Number: 2, State: keys.StatePending, Cipher: keys.AES128GCM,
		ICVBytes: 8, Salt: bytes.Repeat([]byte{0xa2}, keys.GenerationSaltBytes), Created: mixed.Generations[0].Created.Add(time.Hour)})
	v2only := mixed.Clone()
	v2only.Generations = v2only.Generations[1:]
	v2only.Generations[0].State, v2only.Generations[0].Activated = keys.StateActive, v2only.Generations[0].Created
	enc := func(r *keys.Ring, public bool) []byte {
		f := keys.Marshal
		if public {
			f = keys.MarshalPublic
		}
		b, err := f(r)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: api.Namespace, Name: api.RingConfigMapName, ResourceVersion: "1"},
		Data: map[string]string{api.RingDataKey: string(enc(v2only, true))}}
	secret := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: api.Namespace, Name: api.SecretName, ResourceVersion: "1"},
		Data: map[string][]byte{api.SecretDataKey: enc(v2only, false)}}
	cs := fake.NewClientset(node("a", "198.18.0.1/24", "boot-a", nil), node("b", "198.18.0.2", "boot-b", nil), cm, secret)
	var secretReads atomic.Int32
	count := func(a k8stesting.Action) (bool, runtime.Object, error) {
		if a.GetResource().Resource == "secrets" {
			secretReads.Add(1)
		}
		return false, nil, nil
	}
	cs.PrependReactor("list", "secrets", count)
	cs.PrependReactor("get", "secrets", count)
	cs.PrependWatchReactor("secrets", func(a k8stesting.Action) (bool, watch.Interface, error) {
		secretReads.Add(1)
		return false, nil, nil
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w := runFakeWatcher(t, ctx, cs)
	ringIs := func(what string, want *keys.Ring) {
		t.Helper()
		wb := enc(want, false)
		waitFor(t, what, func() bool {
			r, err := w.currentRing()
			if err != nil {
				return false
			}
			b, _ := keys.Marshal(r)
			return bytes.Equal(b, wb)
		})
	}
	ringIs("the v2-only public ring", v2only)
	time.Sleep(100 * time.Millisecond) // a Secret informer started by mistake would have listed by now
	if n := secretReads.Load(); n != 0 || w.secretSynced() {
		t.Fatalf("a v2-only public ring: %d Secret reads, want none", n)
	}

	// A v1 generation: the agent watches the Secret; until that holds the root, the ring
	// is not ready (the kernel is kept), and then it is the Secret's ring.
	cm = cm.DeepCopy()
	cm.ResourceVersion, cm.Data[api.RingDataKey] = "2", string(enc(mixed, true))
	if _, err := cs.CoreV1().ConfigMaps(api.Namespace).Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the root not there yet", func() bool {
		_, err := w.currentRing()
		return errors.Is(err, keys.ErrRootNotYet)
	})
	if secretReads.Load() == 0 {
		t.Fatal("a sealed generation and no Secret read")
	}
	secret = secret.DeepCopy()
	secret.ResourceVersion, secret.Data[api.SecretDataKey] = "2", enc(mixed, false)
	if _, err := cs.CoreV1().Secrets(api.Namespace).Update(ctx, secret, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	ringIs("the unsealed ring", mixed)
	r1, _ := w.currentRing()
	if r2, _ := w.currentRing(); r1 != r2 {
		t.Fatal("the same versions gave another ring pointer (Inputs.KeysVersion)")
	}

	// No ConfigMap (a master that predates it): the Secret's ring.
	if err := cs.CoreV1().ConfigMaps(api.Namespace).Delete(ctx, api.RingConfigMapName, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the Secret's ring without a ConfigMap", func() bool { r, err := w.currentRing(); return err == nil && r != r1 })
	ringIs("the Secret's ring", mixed)

	// v2-only again: the Secret's informer stops.
	cm.ResourceVersion, cm.Data[api.RingDataKey] = "3", string(enc(v2only, true))
	if _, err := cs.CoreV1().ConfigMaps(api.Namespace).Create(ctx, cm, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ringIs("the v2-only public ring again", v2only)
	waitFor(t, "the Secret informer to stop", func() bool { return !w.secretSynced() })
	if !w.HasSynced() {
		t.Fatal("not synced without the Secret")
	}
}

// TestWatcherRingForbidden: an agent whose RBAC predates the public ring (the ConfigMap
// is forbidden) reads the Secret as before instead of never syncing.
func TestWatcherRingForbidden(t *testing.T) {
	ring := testRing(t, api.ModeEnforce, 8, "a", "b")
	data, err := keys.Marshal(ring)
	if err != nil {
		t.Fatal(err)
	}
	secret := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: api.Namespace, Name: api.SecretName, ResourceVersion: "1"},
		Data: map[string][]byte{api.SecretDataKey: data}}
	cs := fake.NewClientset(node("a", "198.18.0.1/24", "boot-a", nil), node("b", "198.18.0.2", "boot-b", nil), secret)
	cs.PrependReactor("list", "configmaps", func(a k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewForbidden(schema.GroupResource{Resource: "configmaps"}, api.RingConfigMapName, errors.New("RBAC: no rule"))
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w := runFakeWatcher(t, ctx, cs)
	r, err := w.currentRing()
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := keys.Marshal(r); !bytes.Equal(got, data) {
		t.Fatal("not the Secret's ring")
	}
}

// runFakeWatcher runs a Watcher of node "a"'s view on cs (Calico's v1 CRDs served, no
// Calico objects) until ctx is done, and waits for it to sync.
func runFakeWatcher(t *testing.T, ctx context.Context, cs *fake.Clientset) *Watcher {
	t.Helper()
	w, _ := runFakeWatcherDynamic(t, ctx, cs)
	return w
}

// runFakeWatcherDynamic is runFakeWatcher, also returning the fake dynamic client; each
// of opts changes the watcher's Config first.
func runFakeWatcherDynamic(t *testing.T, ctx context.Context, cs *fake.Clientset, opts ...func(*Config)) (*Watcher, *dynamicfake.FakeDynamicClient) {
	t.Helper()
	cs.Discovery().(*fakediscovery.FakeDiscovery).Resources = []*metav1.APIResourceList{
		resources("crd.projectcalico.org/v1", "ipamblocks", "blockaffinities", "ippools", "bgppeers")}
	dc := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), testkinds.With(map[schema.GroupVersionResource]string{gvBlocks: "IPAMBlockList", gvAffs: "BlockAffinityList", gvPools: "IPPoolList", gvPeers: "BGPPeerList"}))
	cfg := Config{Client: cs, Dynamic: dc, DiscoveryRetry: 10 * time.Millisecond}
	for _, o := range opts {
		o(&cfg)
	}
	w := New(cfg)
	go w.Run(ctx)
	waitFor(t, "caches to sync", w.HasSynced)
	return w, dc
}

// TestWatcherSecretCacheOutlivesStop: when the watcher stops (the agent's SIGTERM), the
// Secret's cache stays synced like every other: the uninstall walk-down without a
// successful sync computes from the caches (HasSynced).
func TestWatcherSecretCacheOutlivesStop(t *testing.T) {
	data, err := keys.Marshal(testRing(t, api.ModeEnforce, 8, "a", "b"))
	if err != nil {
		t.Fatal(err)
	}
	cs := fake.NewClientset(node("a", "198.18.0.1/24", "boot-a", nil), node("b", "198.18.0.2", "boot-b", nil),
		&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: api.Namespace, Name: api.SecretName, ResourceVersion: "1"},
			Data: map[string][]byte{api.SecretDataKey: data}})
	ctx, cancel := context.WithCancel(context.Background())
	w := runFakeWatcher(t, ctx, cs)
	cancel()
	time.Sleep(200 * time.Millisecond)
	if !w.HasSynced() {
		t.Fatal("not synced after the watcher stopped")
	}
	if _, err := w.currentRing(); err != nil {
		t.Fatalf("ring after the watcher stopped: %v", err)
	}
}
