package watch

import (
	"context"
	"sync"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/tools/cache"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/nodeview"
)

// ownView follows this node's NodeView (docs/protocol-v2.md §9 step 2), by name: the
// master's view of this node's pairs. The agent only compares it with its own decisions
// (shadow), so it is not part of HasSynced: an older manifest without the CRD costs one
// warning, not a sync.
type ownView struct {
	factory dynamicinformer.DynamicSharedInformerFactory
	mu      sync.Mutex
	view    api.ReadinessView
	have    bool
	warned  bool
}

// newOwnView builds the informer; onChange runs after every change of the view.
func (w *Watcher) newOwnView(onChange func()) *ownView {
	cfg := w.cfg
	v := &ownView{factory: dynamicinformer.NewFilteredDynamicSharedInformerFactory(cfg.Dynamic, 0, cfg.Namespace,
		func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", cfg.Self).String()
		})}
	inf := v.factory.ForResource(nodeview.GVR).Informer()
	_ = inf.SetWatchErrorHandler(func(r *cache.Reflector, err error) {
		if apierrors.IsNotFound(err) || apierrors.IsForbidden(err) {
			v.mu.Lock()
			warn := !v.warned
			v.warned = true
			v.mu.Unlock()
			if warn {
				cfg.Logger.Warn("this node's NodeView cannot be read (the manifest predates it: apply the manifest); protocol v2's readiness shadow waits",
					"nodeview", cfg.Namespace+"/"+cfg.Self, "error", err)
			}
			return
		}
		cache.DefaultWatchErrorHandler(context.Background(), r, err)
	})
	set := func(obj any) {
		u, ok := obj.(*unstructured.Unstructured)
		if ok && u.GetName() != cfg.Self {
			return // the field selector holds others off; a fake client may not
		}
		var view api.ReadinessView
		var err error
		if ok {
			view, err = nodeview.Parse(u)
		}
		v.mu.Lock()
		v.view, v.have = view, ok && err == nil
		v.mu.Unlock()
		onChange()
	}
	_, _ = inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    set,
		UpdateFunc: func(_, n any) { set(n) },
		DeleteFunc: func(obj any) {
			if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = t.Obj
			}
			if u, ok := obj.(*unstructured.Unstructured); ok && u.GetName() != cfg.Self {
				return
			}
			v.mu.Lock()
			v.view, v.have = api.ReadinessView{}, false
			v.mu.Unlock()
			onChange()
		},
	})
	return v
}

// ReadinessView returns this node's NodeView as last seen, and whether there is one that
// parses (agent.ViewSource).
func (w *Watcher) ReadinessView() (api.ReadinessView, bool) {
	v := w.ownView
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.view, v.have
}
