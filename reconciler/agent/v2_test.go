package agent

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"path/filepath"
	"slices"
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

// v2node is one real agent of the two-agent protocol v2 test, with its own watcher and
// fake kernel, on a shared fake API.
type v2node struct {
	name string
	a    *Agent
	xk   *xfrm.Fake
	stop func()
}

// TestTwoAgentsDeriveV2: two real agents (watch, desired, xfrm applier, ledger) on one
// fake API move from a v1 generation to a protocol v2 generation as the master would
// make it: each publishes its NodeKeys, derives the pair's v2 SAs from its own private
// key and the other's published key, and the two kernels agree — a's outbound SA to b is
// b's inbound SA from a (same SPI, same key) — while no key of generation 2 equals any
// key of generation 1; the pair sends with generation 2 once it is active.
func TestTwoAgentsDeriveV2(t *testing.T) {
	ring := testRing(t, api.ModeEnforce, "a", "b")
	cs, dc := fakeAPI(t, ring, testNode("a", "198.18.0.1", "boot-a"), testNode("b", "198.18.0.2", "boot-b"))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	start := func(name, boot string) *v2node { return startNode(t, ctx, cs, dc, name, seededLedger(t, name, boot)) }
	na, nb := start("a", "boot-a"), start("b", "boot-b")

	// states returns node n's kernel SAs of generation gen, by (direction, peer).
	ips := map[string]string{"a": "198.18.0.1", "b": "198.18.0.2"}
	states := func(n *v2node, gen uint32) map[desired.Dir]desired.SA {
		s, _ := n.xk.Snapshot()
		out := map[desired.Dir]desired.SA{}
		for _, k := range s {
			// The kernel knows kernel fields only: the generation is in the SPI.
			kind, g4, _, ok := keys.ParseKindSPI(k.SA.SPI)
			if !ok || g4 != gen%4 || kind != keys.KindTransport {
				continue
			}
			dir := desired.In
			if k.SA.Src.String() == ips[n.name] {
				dir = desired.Out
			}
			out[dir] = k.SA
		}
		return out
	}
	agree := func(gen uint32) string {
		sa, sb := states(na, gen), states(nb, gen)
		ao, bi, bo, ai := sa[desired.Out], sb[desired.In], sb[desired.Out], sa[desired.In]
		if ao.SPI == 0 || bi.SPI == 0 || bo.SPI == 0 || ai.SPI == 0 {
			return fmt.Sprintf("generation %d SAs missing: a %v, b %v", gen, len(sa), len(sb))
		}
		if ao.SPI != bi.SPI || !ao.Key.Equal(bi.Key) || bo.SPI != ai.SPI || !bo.Key.Equal(ai.Key) {
			return fmt.Sprintf("generation %d: the two kernels disagree", gen)
		}
		if ao.Key.Equal(bo.Key) {
			return fmt.Sprintf("generation %d: both directions share a key", gen)
		}
		return ""
	}
	if !waitUntil(20*time.Second, func() bool { return agree(1) == "" }) {
		for _, n := range []*v2node{na, nb} {
			st, ps := n.xk.Snapshot()
			for _, x := range st {
				t.Logf("%s state %s", n.name, x.SA)
			}
			for _, p := range ps {
				t.Logf("%s policy %+v", n.name, p.Policy)
			}
			t.Logf("%s status %+v report %+v", n.name, n.a.Status(), n.a.Published())
		}
		t.Fatal(agree(1))
	}

	// The master creates generation 2 as v2 (every node published its key for it).
	for _, n := range []*v2node{na, nb} {
		waitFor(t, n.name+" publishing generation 2's key", func() bool {
			k := n.a.PublishedKeys()
			return k != nil && len(k.Keys) == 1 && k.Keys[0].Generation == 2
		})
	}
	ring = ring.Clone()
	ring.LastGeneration = 2
	salt := make([]byte, keys.GenerationSaltBytes)
	if _, err := rand.Read(salt); err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 1, 2, 0, 0, 0, 0, time.UTC)
	ring.Generations = append(ring.Generations, keys.Generation{Number: 2, State: keys.StatePending, Cipher: keys.AES128GCM, ICVBytes: 8,
		Salt: salt, Reason: "request", Created: now})
	putRingCS(t, cs, ring)
	waitFor(t, "generation 2 (v2) agreed", func() bool { return agree(2) == "" })
	for _, n := range []*v2node{na, nb} {
		waitFor(t, n.name+" claiming generation 2 and publishing 3's key", func() bool {
			r, k := n.a.Published(), n.a.PublishedKeys()
			return r != nil && slices.Contains(r.Generations, 2) && k != nil && len(k.Keys) == 2 && k.Keys[1].Generation == 3
		})
	}
	// Generation 2 active: both send with it.
	ring = ring.Clone()
	ring.Generations[0].State, ring.Generations[0].Retiring = keys.StateRetiring, now
	ring.Generations[1].State, ring.Generations[1].Activated = keys.StateActive, now
	putRingCS(t, cs, ring)
	waitFor(t, "both sending with generation 2", func() bool {
		for _, n := range []*v2node{na, nb} {
			_, ps := n.xk.Snapshot()
			sending := false
			for _, p := range ps {
				if p.Policy.Dir == desired.Out && p.Policy.Tmpl.SPI != 0 && p.Policy.Tmpl.SPI == states(n, 2)[desired.Out].SPI {
					sending = true
				}
			}
			if !sending {
				return false
			}
		}
		return true
	})
	if msg := agree(2); msg != "" {
		t.Fatal(msg)
	}
	// No key of generation 2 is one of generation 1, on either node.
	for _, n := range []*v2node{na, nb} {
		s, _ := n.xk.Snapshot()
		for i, x := range s {
			for _, y := range s[i+1:] {
				if bytes.Equal(x.SA.Key.Bytes(), y.SA.Key.Bytes()) {
					t.Fatalf("%s: SAs 0x%x and 0x%x share a key", n.name, x.SA.SPI, y.SA.SPI)
				}
			}
		}
		if r := n.xk.ReusedKeys(); len(r) != 0 {
			t.Fatalf("%s: keys installed twice: %v", n.name, r)
		}
	}
}

// fakeAPI is a fake API holding nodes, the key Secret with ring, and every resource an
// agent lists (NodeReports, NodeKeys, NodeViews, NodeRows, Calico's IPAM v1).
func fakeAPI(t *testing.T, ring *keys.Ring, nodes ...*corev1.Node) (*fake.Clientset, *dynamicfake.FakeDynamicClient) {
	t.Helper()
	data, err := keys.Marshal(ring)
	if err != nil {
		t.Fatal(err)
	}
	objs := []runtime.Object{&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: api.Namespace, Name: api.SecretName}, Data: map[string][]byte{api.SecretDataKey: data}}}
	for _, n := range nodes {
		objs = append(objs, n)
	}
	cs := fake.NewClientset(objs...)
	cs.Discovery().(*fakediscovery.FakeDiscovery).Resources = []*metav1.APIResourceList{{GroupVersion: "crd.projectcalico.org/v1",
		APIResources: []metav1.APIResource{{Name: "ipamblocks"}, {Name: "ippools"}}}}
	gv := schema.GroupVersion{Group: "crd.projectcalico.org", Version: "v1"}
	dc := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), testkinds.With(map[schema.GroupVersionResource]string{gv.WithResource("ipamblocks"): "IPAMBlockList", gv.WithResource("ippools"): "IPPoolList"}))
	return cs, dc
}

// startNode runs a real agent (its own watcher, fake kernel, the given ledger directory)
// for node name on the fake API cs and dc until ctx ends or the test does; opts change
// its configuration.
func startNode(t *testing.T, ctx context.Context, cs *fake.Clientset, dc *dynamicfake.FakeDynamicClient, name, ledgerDir string, opts ...func(*Config)) *v2node {
	t.Helper()
	w := watch.New(watch.Config{Self: name, Client: cs, Dynamic: dc, DiscoveryRetry: 10 * time.Millisecond})
	xk := xfrm.NewFake()
	cfg := Config{NodeName: name, ExternalMTU: 1500, RetryMin: 10 * time.Millisecond, RetryMax: 50 * time.Millisecond,
		ResyncInterval: 200 * time.Millisecond, LedgerDir: ledgerDir}
	for _, o := range opts {
		o(&cfg)
	}
	a, err := New(cfg, Deps{Client: cs, Dynamic: dc, Source: w, Xfrm: xfrm.NewApplier(xk, cfg.Dataplane),
		Rules: rules.NewApplier(rules.NewFake()), Metrics: NewMetrics(filepath.Join(t.TempDir(), "missing-xfrm_stat"))})
	if err != nil {
		t.Fatal(err)
	}
	actx, acancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { a.Run(actx); close(done) }()
	n := &v2node{name: name, a: a, xk: xk, stop: func() { acancel(); <-done }}
	t.Cleanup(n.stop)
	return n
}

func waitUntil(d time.Duration, f func() bool) bool {
	for deadline := time.Now().Add(d); !f(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			return false
		}
	}
	return true
}

// putRingCS writes r into the key Secret of cs.
func putRingCS(t *testing.T, cs *fake.Clientset, r *keys.Ring) {
	t.Helper()
	data, err := keys.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	sec, err := cs.CoreV1().Secrets(api.Namespace).Get(ctx, api.SecretName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	sec.Data[api.SecretDataKey] = data
	if _, err := cs.CoreV1().Secrets(api.Namespace).Update(ctx, sec, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}
