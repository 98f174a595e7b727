// Package objcache is an informer over one namespaced custom resource of ours whose objects
// are kept parsed (NodeKeys, NodeRows): each object is turned into a T when it arrives, so a
// reader never re-parses and the cache holds the parsed form, not the unstructured one.
package objcache

import (
	"context"
	"sync"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/tools/cache"
)

// Cache is an informer over the objects of one resource in one namespace, keeping each
// parsed. An object that does not parse is kept as its error. Version counts the changes,
// so a reader can tell whether anything changed between two reads.
type Cache[T any] struct {
	ns  string
	inf cache.SharedIndexInformer
	f   dynamicinformer.DynamicSharedInformerFactory

	mu      sync.Mutex
	version uint64
	listErr error
	missing func(error)
}

// entry is what the informer stores instead of the object.
type entry[T any] struct {
	Namespace, Name, ResourceVersion string
	Value                            T
	Err                              error
}

func (e *entry[T]) GetObjectKind() schema.ObjectKind { return schema.EmptyObjectKind }
func (e *entry[T]) DeepCopyObject() runtime.Object   { d := *e; return &d }
func (e *entry[T]) GetObjectMeta() metav1.Object {
	return &metav1.ObjectMeta{Namespace: e.Namespace, Name: e.Name, ResourceVersion: e.ResourceVersion}
}

// New builds the informer over gvr in ns (nothing runs until Start). parse turns each
// object into a T. onChange, if set, is called after every change with the object's name;
// it must be cheap and must not block.
func New[T any](dc dynamic.Interface, gvr schema.GroupVersionResource, ns string, parse func(*unstructured.Unstructured) (T, error), onChange func(name string)) *Cache[T] {
	c := &Cache[T]{ns: ns}
	c.f = dynamicinformer.NewFilteredDynamicSharedInformerFactory(dc, 0, ns, nil)
	c.inf = c.f.ForResource(gvr).Informer()
	_ = c.inf.SetTransform(func(obj any) (any, error) {
		u, ok := obj.(*unstructured.Unstructured)
		if !ok {
			return obj, nil
		}
		v, err := parse(u)
		return &entry[T]{Namespace: u.GetNamespace(), Name: u.GetName(), ResourceVersion: u.GetResourceVersion(), Value: v, Err: err}, nil
	})
	_ = c.inf.SetWatchErrorHandlerWithContext(func(ctx context.Context, r *cache.Reflector, err error) {
		c.mu.Lock()
		c.listErr = err
		missing := c.missing
		c.mu.Unlock()
		if missing != nil && (apierrors.IsNotFound(err) || apierrors.IsForbidden(err)) {
			missing(err)
			return
		}
		cache.DefaultWatchErrorHandler(ctx, r, err)
	})
	changed := func(obj any) {
		if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = t.Obj
		}
		e, ok := obj.(*entry[T])
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

// OnMissing makes f handle the list and watch errors that say the resource is not served
// or not allowed (an older manifest), instead of client-go's log line at every retry; the
// informer keeps retrying. Call it before Start.
func (c *Cache[T]) OnMissing(f func(error)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.missing = f
}

// Start runs the informer until stop is closed.
func (c *Cache[T]) Start(stop <-chan struct{}) { c.f.Start(stop) }

// HasSynced reports whether the first list has been read (false while the CRD is not
// served: an older manifest).
func (c *Cache[T]) HasSynced() bool { return c.inf.HasSynced() }

// Err is the informer's last list or watch error (nil once synced).
func (c *Cache[T]) Err() error {
	if c.HasSynced() {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.listErr
}

// Get returns the object named name, parsed; ok is false when there is none, err set when
// it does not parse.
func (c *Cache[T]) Get(name string) (v T, ok bool, err error) {
	obj, exists, _ := c.inf.GetStore().GetByKey(c.ns + "/" + name)
	if !exists {
		var zero T
		return zero, false, nil
	}
	e := obj.(*entry[T])
	return e.Value, true, e.Err
}

// Each calls f with every object that parses, by name, in no particular order.
func (c *Cache[T]) Each(f func(name string, v T)) {
	for _, obj := range c.inf.GetStore().List() {
		if e, ok := obj.(*entry[T]); ok && e.Err == nil {
			f(e.Name, e.Value)
		}
	}
}

// Version counts the changes seen so far.
func (c *Cache[T]) Version() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.version
}
