// Package watch is the agent's input side: client-go shared informers (list+watch, no
// polling) over everything the desired state depends on, and a Snapshot of their caches.
//
// Inputs:
//   - Nodes: Calico's projectcalico.org/IPv4Address (CIDR or bare IP) and
//     IPv4IPIPTunnelAddr annotations, status.nodeInfo.bootID (the incarnation), the Ready
//     condition and the other agents' secureoverlay.io/report annotations.
//   - The key Secret: a namespace-scoped informer with a field selector on its name, so
//     RBAC can grant get/list/watch on that one Secret (resourceNames) and nothing else.
//   - Calico IPAMBlock, BlockAffinity, IPPool and BGPPeer through a dynamic informer, from
//     whichever of crd.projectcalico.org/v1 or projectcalico.org/v3 serves them
//     (DiscoverCalico; retried until one does, the error is visible through Err).
//
// Invariants:
//   - HasSynced is true only when every informer has synced; the agent writes nothing to
//     the kernel before that.
//   - OnChange is called for every add/update/delete that can change the desired state
//     (Node updates that touch none of the fields above are filtered out); it must be
//     cheap and non-blocking (the agent enqueues one work-queue key).
//   - Unknown fields are tolerated; objects that do not parse are listed in
//     Snapshot.Skipped and contribute nothing; key bytes never leave through errors.
package watch

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// Config wires a Watcher.
type Config struct {
	Client    kubernetes.Interface
	Dynamic   dynamic.Interface
	Discovery discovery.DiscoveryInterface // default Client.Discovery()
	// Namespace and SecretName locate the key Secret (defaults api.Namespace, api.SecretName).
	Namespace  string
	SecretName string
	// Self is this node's name: a change of only its own report annotation (the agent's
	// output) does not trigger a sync.
	Self string
	// OnChange is called (with the kind of object) for every relevant event.
	OnChange func(kind string)
	// DiscoveryRetry is the pause between Calico discovery attempts (default 15s).
	DiscoveryRetry time.Duration
	Logger         *slog.Logger
}

// Watcher owns the informers.
type Watcher struct {
	cfg       Config
	nodes     cache.SharedIndexInformer
	secrets   cache.SharedIndexInformer
	coreStart func(<-chan struct{})

	mu        sync.Mutex
	calico    CalicoAPI
	calicoErr error
	crd       map[string]cache.SharedIndexInformer // by resource name

	onChange atomic.Pointer[func(string)]

	ringMu  sync.Mutex
	ringRV  string
	ring    *keys.Ring
	ringErr error
}

// New builds the informers (nothing runs until Run).
func New(cfg Config) *Watcher {
	if cfg.Namespace == "" {
		cfg.Namespace = api.Namespace
	}
	if cfg.SecretName == "" {
		cfg.SecretName = api.SecretName
	}
	if cfg.Discovery == nil {
		cfg.Discovery = cfg.Client.Discovery()
	}
	if cfg.DiscoveryRetry == 0 {
		cfg.DiscoveryRetry = 15 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	w := &Watcher{cfg: cfg, crd: map[string]cache.SharedIndexInformer{}}
	if cfg.OnChange != nil {
		w.SetOnChange(cfg.OnChange)
	}
	nf := informers.NewSharedInformerFactory(cfg.Client, 0)
	sf := informers.NewSharedInformerFactoryWithOptions(cfg.Client, 0, informers.WithNamespace(cfg.Namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", cfg.SecretName).String()
		}))
	w.nodes = nf.Core().V1().Nodes().Informer()
	if err := w.nodes.SetTransform(NodeTransform(cfg.Self)); err != nil {
		cfg.Logger.Error("node cache transform not set: peers' reports are cached whole", "error", err)
	}
	w.secrets = sf.Core().V1().Secrets().Informer()
	_, _ = w.nodes.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(any) { w.notify("node") },
		UpdateFunc: func(o, n any) {
			a, ok1 := o.(*corev1.Node)
			b, ok2 := n.(*corev1.Node)
			if !ok1 || !ok2 || relevantChange(a, b, cfg.Self) {
				w.notify("node")
			}
		},
		DeleteFunc: func(any) { w.notify("node") },
	})
	_, _ = w.secrets.AddEventHandler(changeHandler(func() { w.notify("secret") }))
	w.coreStart = func(stop <-chan struct{}) { nf.Start(stop); sf.Start(stop) }
	return w
}

// SetOnChange sets the event callback (call it before Run).
func (w *Watcher) SetOnChange(f func(kind string)) { w.onChange.Store(&f) }

func (w *Watcher) notify(kind string) {
	if f := w.onChange.Load(); f != nil {
		(*f)(kind)
	}
}

func changeHandler(f func()) cache.ResourceEventHandlerFuncs {
	return cache.ResourceEventHandlerFuncs{AddFunc: func(any) { f() }, UpdateFunc: func(any, any) { f() }, DeleteFunc: func(any) { f() }}
}

// Run starts the informers and keeps retrying Calico discovery until it succeeds; it
// returns when ctx is done.
func (w *Watcher) Run(ctx context.Context) {
	w.coreStart(ctx.Done())
	for {
		c, err := DiscoverCalico(w.cfg.Discovery)
		if err == nil {
			w.startCalico(ctx, c)
			break
		}
		w.mu.Lock()
		w.calicoErr = err
		w.mu.Unlock()
		w.cfg.Logger.Warn("calico resources not found; retrying", "error", err, "retry", w.cfg.DiscoveryRetry)
		w.notify("discovery")
		select {
		case <-ctx.Done():
			return
		case <-time.After(w.cfg.DiscoveryRetry):
		}
	}
	<-ctx.Done()
}

func (w *Watcher) startCalico(ctx context.Context, c CalicoAPI) {
	f := dynamicinformer.NewDynamicSharedInformerFactory(w.cfg.Dynamic, 0)
	w.mu.Lock()
	for _, r := range []struct {
		kind string
		gvr  schema.GroupVersionResource
	}{{"ipamblocks", c.IPAMBlocks}, {"blockaffinities", c.BlockAffinities}, {"ippools", c.IPPools}, {"bgppeers", c.BGPPeers}} {
		if r.gvr.Resource == "" {
			continue
		}
		inf := f.ForResource(r.gvr).Informer()
		kind := r.kind
		_, _ = inf.AddEventHandler(changeHandler(func() { w.notify(kind) }))
		w.crd[kind] = inf
	}
	w.calico, w.calicoErr = c, nil
	w.mu.Unlock()
	f.Start(ctx.Done())
	w.cfg.Logger.Info("watching calico resources", "groupVersion", c.GroupVersion)
	w.notify("discovery")
}

// HasSynced reports whether every informer has synced.
func (w *Watcher) HasSynced() bool {
	if !w.nodes.HasSynced() || !w.secrets.HasSynced() {
		return false
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.calicoErr != nil || len(w.crd) == 0 {
		return false
	}
	for _, inf := range w.crd {
		if !inf.HasSynced() {
			return false
		}
	}
	return true
}

// Err is why the watcher cannot sync (Calico discovery failed), or nil (also while the
// first discovery is still running).
func (w *Watcher) Err() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.calicoErr
}

// NodeCacheSynced reports whether the Node cache has synced (enough to publish an error
// report on this node while the other inputs are missing).
func (w *Watcher) NodeCacheSynced() bool { return w.nodes.HasSynced() }

// Node returns the cached Node, or nil.
func (w *Watcher) Node(name string) *corev1.Node {
	obj, ok, err := w.nodes.GetStore().GetByKey(name)
	if err != nil || !ok {
		return nil
	}
	n, _ := obj.(*corev1.Node)
	return n
}

// Snapshot reads every cache. Call it only after HasSynced.
func (w *Watcher) Snapshot() Snapshot {
	var s Snapshot
	for _, obj := range w.nodes.GetStore().List() {
		if n, ok := obj.(*corev1.Node); ok {
			s.Nodes = append(s.Nodes, ParseNode(n))
		}
	}
	slices.SortFunc(s.Nodes, func(a, b NodeInfo) int { return strings.Compare(a.Name, b.Name) })
	s.Ring, s.RingErr = w.currentRing()

	w.mu.Lock()
	s.Calico = w.calico
	crd := w.crd
	w.mu.Unlock()
	each := func(kind string, f func(u *unstructured.Unstructured) error) {
		inf := crd[kind]
		if inf == nil {
			return
		}
		for _, obj := range inf.GetStore().List() {
			u, ok := obj.(*unstructured.Unstructured)
			if !ok {
				continue
			}
			if err := f(u); err != nil {
				s.Skipped = append(s.Skipped, desired.Skip{Object: strings.TrimSuffix(kind, "s") + "/" + u.GetName(), Reason: err.Error()})
			}
		}
	}
	var affs []BlockAffinity
	each("ipamblocks", func(u *unstructured.Unstructured) error {
		b, err := ParseIPAMBlock(u)
		if err == nil {
			s.Blocks = append(s.Blocks, b)
		}
		return err
	})
	each("blockaffinities", func(u *unstructured.Unstructured) error {
		a, err := ParseBlockAffinity(u)
		if err == nil {
			affs = append(affs, a)
		}
		return err
	})
	each("ippools", func(u *unstructured.Unstructured) error {
		p, err := ParseIPPool(u)
		if err == nil && !p.Disabled {
			s.Pools = append(s.Pools, p)
		}
		return err
	})
	each("bgppeers", func(u *unstructured.Unstructured) error {
		p, ok, err := ParseBGPPeer(u)
		if ok {
			s.BGPPeers = append(s.BGPPeers, p)
		}
		return err
	})
	ApplyAffinities(s.Blocks, affs)
	sortBlocks(s.Blocks)
	slices.SortFunc(s.Pools, func(a, b desired.Pool) int { return strings.Compare(a.Name, b.Name) })
	slices.SortFunc(s.BGPPeers, func(a, b desired.BGPPeer) int { return strings.Compare(a.Name, b.Name) })
	slices.SortFunc(s.Skipped, func(a, b desired.Skip) int { return strings.Compare(a.Object, b.Object) })
	return s
}

// currentRing parses the Secret, caching the result per resourceVersion.
func (w *Watcher) currentRing() (*keys.Ring, error) {
	obj, ok, err := w.secrets.GetStore().GetByKey(w.cfg.Namespace + "/" + w.cfg.SecretName)
	if err != nil {
		return nil, fmt.Errorf("secret %s/%s: %w", w.cfg.Namespace, w.cfg.SecretName, err)
	}
	if !ok {
		return nil, fmt.Errorf("secret %s/%s: %w", w.cfg.Namespace, w.cfg.SecretName, ErrNoSecret)
	}
	sec := obj.(*corev1.Secret)
	w.ringMu.Lock()
	defer w.ringMu.Unlock()
	if sec.ResourceVersion != "" && sec.ResourceVersion == w.ringRV {
		return w.ring, w.ringErr
	}
	data, has := sec.Data[api.SecretDataKey]
	var r *keys.Ring
	if !has {
		err = fmt.Errorf("secret %s/%s: no data key %q", w.cfg.Namespace, w.cfg.SecretName, api.SecretDataKey)
	} else if r, err = keys.Parse(data); err != nil {
		err = fmt.Errorf("secret %s/%s: %w", w.cfg.Namespace, w.cfg.SecretName, err)
	}
	w.ringRV, w.ring, w.ringErr = sec.ResourceVersion, r, err
	return r, err
}
