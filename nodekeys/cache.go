package nodekeys

import (
	"context"
	"sync"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/tools/cache"
)

// Cache is an informer over the NodeKeys of one namespace, keeping each object parsed (a
// few hundred bytes per node). An object that does not parse is kept as its error: a
// reader treats that node as publishing no keys. Version counts the changes, so a reader
// can tell whether anything changed between two reads.
type Cache struct {
	ns  string
	inf cache.SharedIndexInformer
	f   dynamicinformer.DynamicSharedInformerFactory

	mu      sync.Mutex
	version uint64
	listErr error
}

// entry is what the informer stores instead of the object.
type entry struct {
	Namespace, Name, ResourceVersion string
	Keys                             Keys
	Err                              error
}

func (e *entry) GetObjectKind() schema.ObjectKind { return schema.EmptyObjectKind }
func (e *entry) DeepCopyObject() runtime.Object   { d := *e; return &d }
func (e *entry) GetObjectMeta() metav1.Object {
	return &metav1.ObjectMeta{Namespace: e.Namespace, Name: e.Name, ResourceVersion: e.ResourceVersion}
}

// NewCache builds the informer (nothing runs until Start). onChange, if set, is called
// after every change with the node's name; it must be cheap and must not block.
func NewCache(dc dynamic.Interface, ns string, onChange func(node string)) *Cache {
	c := &Cache{ns: ns}
	c.f = dynamicinformer.NewFilteredDynamicSharedInformerFactory(dc, 0, ns, nil)
	c.inf = c.f.ForResource(GVR).Informer()
	_ = c.inf.SetTransform(func(obj any) (any, error) {
		u, ok := obj.(*unstructured.Unstructured)
		if !ok {
			return obj, nil
		}
		k, err := Parse(u)
		return &entry{Namespace: u.GetNamespace(), Name: u.GetName(), ResourceVersion: u.GetResourceVersion(), Keys: k, Err: err}, nil
	})
	_ = c.inf.SetWatchErrorHandlerWithContext(func(ctx context.Context, r *cache.Reflector, err error) {
		c.mu.Lock()
		c.listErr = err
		c.mu.Unlock()
		cache.DefaultWatchErrorHandler(ctx, r, err)
	})
	changed := func(obj any) {
		if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = t.Obj
		}
		e, ok := obj.(*entry)
		if !ok {
			return
		}
		c.mu.Lock()
		c.version++
		c.mu.Unlock()
		if onChange != nil {
			onChange(e.Name)
		}
	}
	_, _ = c.inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    changed,
		UpdateFunc: func(_, n any) { changed(n) },
		DeleteFunc: changed,
	})
	return c
}

// Start runs the informer until stop is closed.
func (c *Cache) Start(stop <-chan struct{}) { c.f.Start(stop) }

// HasSynced reports whether the first list has been read (false while the CRD is not
// served: an older manifest).
func (c *Cache) HasSynced() bool { return c.inf.HasSynced() }

// Err is the informer's last list or watch error (nil once synced).
func (c *Cache) Err() error {
	if c.HasSynced() {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.listErr
}

// Get returns node's published keys; ok is false when the node has no NodeKeys, err set
// when its object does not parse.
func (c *Cache) Get(node string) (k Keys, ok bool, err error) {
	obj, exists, _ := c.inf.GetStore().GetByKey(c.ns + "/" + node)
	if !exists {
		return Keys{}, false, nil
	}
	e := obj.(*entry)
	return e.Keys, true, e.Err
}

// Version counts the changes seen so far.
func (c *Cache) Version() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.version
}
