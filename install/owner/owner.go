// Package owner decides, when the installer sidecar receives SIGTERM, whether the
// DaemonSet that owns its pod is being deleted, which is the only case in which the
// installer uninstalls. A pod is also terminated on a rolling update, a restart, a node
// drain or a reboot; in all of those the DaemonSet lives on and the plugin must stay.
//
// The decision follows pod → ownerReferences (controller, kind DaemonSet) → DaemonSet:
//   - the DaemonSet is gone (kubectl delete uses background propagation: the DaemonSet
//     object disappears first, then the garbage collector terminates its pods);
//   - or it has a deletionTimestamp (foreground propagation).
//
// A DaemonSet of that name with a different UID means ours was deleted and re-created
// (an upgrade by delete + apply): the new DaemonSet's pods own the installation now, so
// the old pod keeps it rather than racing them.
//
// A Tracker watches the DaemonSet for the sidecar's whole life and remembers a deletion
// it saw; Decide falls back on it when the API refuses at SIGTERM (kubectl delete -f may
// have removed our ServiceAccount or RBAC already).
//
// Anything else uncertain (API errors, no pod identity, no DaemonSet owner) decides
// "keep": leaving the plugin in place is always safe, removing it while the DaemonSet
// lives is not (its next pod would reinstall, but pods started in between would run
// without the MTU check). Needs RBAC in the pod's namespace: get on pods; get, list and
// watch on daemonsets (apps), which may be restricted to the DaemonSet by resourceNames.
package owner

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

// Decision is the outcome of DaemonSetDeleted.
type Decision struct {
	// Uninstall is true only when the owning DaemonSet is being deleted.
	Uninstall bool
	// Reason explains the decision for the log.
	Reason string
}

// DaemonSetDeleted looks up pod namespace/name and its controlling DaemonSet. It returns
// an error (and Uninstall false) when the API cannot answer.
func DaemonSetDeleted(ctx context.Context, c kubernetes.Interface, namespace, name string) (Decision, error) {
	if namespace == "" || name == "" {
		return Decision{Reason: "pod identity unknown (POD_NAMESPACE/POD_NAME unset)"}, nil
	}
	pod, err := c.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return Decision{Reason: "pod lookup failed"}, fmt.Errorf("get pod %s/%s: %w", namespace, name, err)
	}
	ref := controllerRef(pod.OwnerReferences)
	if ref == nil {
		return Decision{Reason: fmt.Sprintf("pod %s/%s has no controlling DaemonSet", namespace, name)}, nil
	}
	ds, err := c.AppsV1().DaemonSets(namespace).Get(ctx, ref.Name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return Decision{Uninstall: true, Reason: fmt.Sprintf("daemonset %s/%s is gone", namespace, ref.Name)}, nil
	case err != nil:
		return Decision{Reason: "daemonset lookup failed"}, fmt.Errorf("get daemonset %s/%s: %w", namespace, ref.Name, err)
	case ds.UID != ref.UID:
		return Decision{Reason: fmt.Sprintf("daemonset %s/%s was re-created (uid %s, ours %s); its pods own the installation", namespace, ref.Name, ds.UID, ref.UID)}, nil
	case ds.DeletionTimestamp != nil:
		return Decision{Uninstall: true, Reason: fmt.Sprintf("daemonset %s/%s is being deleted", namespace, ref.Name)}, nil
	}
	return Decision{Reason: fmt.Sprintf("daemonset %s/%s lives on (restart, upgrade or reboot)", namespace, ref.Name)}, nil
}

// NewClient returns a clientset from kubeconfig, or from the pod's service account when
// kubeconfig is empty.
func NewClient(kubeconfig string) (kubernetes.Interface, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client config: %w", err)
	}
	cfg.UserAgent = "secureoverlay-install"
	c, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	return c, nil
}

// Decide makes the SIGTERM decision. It asks the API (DaemonSetDeleted), retrying errors
// every interval until ctx ends. When the API refuses or fails but tr (may be nil) has
// seen our DaemonSet deleted, that settles it: `kubectl delete -f` may have removed our
// ServiceAccount or RBAC already. Otherwise, on ctx end, it returns a keeping decision and
// the last error.
func Decide(ctx context.Context, c kubernetes.Interface, tr *Tracker, namespace, name string, interval time.Duration) (Decision, error) {
	for {
		d, err := DaemonSetDeleted(ctx, c, namespace, name)
		if err == nil {
			return d, nil
		}
		if tr != nil {
			if gone, why := tr.Deleted(); gone {
				return Decision{Uninstall: true, Reason: why + " (seen by the watch; the API now answers: " + err.Error() + ")"}, nil
			}
		}
		select {
		case <-ctx.Done():
			return Decision{Reason: d.Reason}, err
		case <-time.After(interval):
		}
	}
}

// Tracker follows the owning DaemonSet for the sidecar's whole life, so that the SIGTERM
// decision does not depend only on API access at the end: `kubectl delete -f` may delete
// the ServiceAccount and RBAC objects right after the DaemonSet, and then a request made
// at SIGTERM is refused. A watch opened before keeps delivering events (authorization
// happens when a request starts), so the Tracker sees the DaemonSet's deletion and
// remembers it.
//
// It also tells when the deletion certainly cascades to our pod (Cascading): every node's
// watch sees the DaemonSet's deletion within moments of the others, while the pods'
// SIGTERMs follow the garbage collector's deletes (rate-limited) and each kubelet's
// latency, so an agent that starts its uninstall walk-down then is in step with its peers
// (docs/agent.md "Uninstall"). After a deletion it keeps watching for a DaemonSet of the
// same name with another UID (Recreated: delete + apply).
type Tracker struct {
	c        kubernetes.Interface
	ns, name string

	mu       sync.Mutex
	deleted  string // reason; sticky once set
	orphaned string // the DaemonSet is being deleted with propagation Orphan: our pod stays
	deleting bool   // seen with a deletionTimestamp and without the orphan finalizer

	cascade, recreated         chan struct{}
	cascadeOnce, recreatedOnce sync.Once

	watching atomic.Bool // a watch on the DaemonSet is open (for tests and diagnostics)

	// OnWatch, if set before Run, is called once, when the first watch on the DaemonSet
	// is open: from then on its deletion is seen (a log line for operators and tests).
	OnWatch   func()
	watchOnce sync.Once
}

// NewTracker returns a Tracker for pod namespace/name.
func NewTracker(c kubernetes.Interface, namespace, name string) *Tracker {
	return &Tracker{c: c, ns: namespace, name: name, cascade: make(chan struct{}), recreated: make(chan struct{})}
}

// Cascading is closed once the Tracker has seen our DaemonSet deleted in a way that
// deletes our pod: removed outright (background propagation, what `kubectl delete` does)
// or being deleted in the foreground. A deletion only inferred (gone when the watch
// reconnected, or removed after a deletionTimestamp the watch did not show) leaves it
// open: propagation Orphan keeps the pods running, and only the pod's SIGTERM tells.
func (t *Tracker) Cascading() <-chan struct{} { return t.cascade }

// Recreated is closed when, after our DaemonSet's deletion, a DaemonSet of the same name
// with another UID appears (delete + apply).
func (t *Tracker) Recreated() <-chan struct{} { return t.recreated }

// Orphaned reports whether our DaemonSet is being deleted with propagation Orphan (our
// pod is left running, without a controller), and why.
func (t *Tracker) Orphaned() (bool, string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.orphaned != "", t.orphaned
}

// Deleted reports whether the Tracker has seen the owning DaemonSet deleted or being
// deleted, and why.
func (t *Tracker) Deleted() (bool, string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.deleted != "", t.deleted
}

func (t *Tracker) markDeleted(reason string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.setDeleted(reason)
}

// setDeleted records the first deletion reason; t.mu is held.
func (t *Tracker) setDeleted(reason string) {
	if t.deleted == "" {
		t.deleted = reason
	}
}

// Run follows the DaemonSet until ctx ends: it resolves the pod's controlling DaemonSet,
// then gets and watches it by name (RBAC: get on pods; get, list and watch on the
// DaemonSet, which may be restricted by resourceNames), re-establishing the watch when it
// closes and backing off on errors. Errors are reported to logf.
func (t *Tracker) Run(ctx context.Context, logf func(format string, args ...any)) {
	backoff := time.Second
	wait := func() bool {
		select {
		case <-ctx.Done():
			return false
		case <-time.After(backoff):
			backoff = min(2*backoff, 30*time.Second)
			return true
		}
	}
	var ref *metav1.OwnerReference
	for ref == nil {
		pod, err := t.c.CoreV1().Pods(t.ns).Get(ctx, t.name, metav1.GetOptions{})
		if err == nil {
			if ref = controllerRef(pod.OwnerReferences); ref == nil {
				logf("pod %s/%s has no controlling DaemonSet; not tracking", t.ns, t.name)
				return
			}
			break
		}
		logf("track daemonset: get pod %s/%s: %v", t.ns, t.name, err)
		if !wait() {
			return
		}
	}
	for ctx.Err() == nil {
		err := t.follow(ctx, ref)
		if t.done() || ctx.Err() != nil {
			return
		}
		if err != nil {
			// After the deletion, `kubectl delete -f` takes our RBAC too: the watch for a
			// re-creation retries quietly.
			if ok, _ := t.Deleted(); !ok {
				logf("track daemonset %s/%s: %v", t.ns, ref.Name, err)
			}
			if !wait() {
				return
			}
			continue
		}
		backoff = time.Second // a watch that ended normally is simply re-opened
	}
}

// follow gets the DaemonSet, then watches it from that version until the watch ends.
func (t *Tracker) follow(ctx context.Context, ref *metav1.OwnerReference) error {
	dsc := t.c.AppsV1().DaemonSets(t.ns)
	// List (not Get) so the watch starts from the list's resourceVersion, the store's
	// current revision. Watching from the object's own resourceVersion fails with "too old
	// resource version" once the DaemonSet has been unchanged for longer than the watch
	// cache's window or after an API server restart, and the deletion would go unseen.
	sel := fields.OneTermEqualSelector("metadata.name", ref.Name).String()
	list, err := dsc.List(ctx, metav1.ListOptions{FieldSelector: sel})
	if err != nil {
		return fmt.Errorf("list: %w", err)
	}
	var ds *appsv1.DaemonSet
	for i := range list.Items {
		if list.Items[i].Name == ref.Name {
			ds = &list.Items[i]
		}
	}
	if ds == nil {
		t.markDeleted(fmt.Sprintf("daemonset %s/%s is gone", t.ns, ref.Name))
	} else if t.observe(ds, ref, false) {
		return nil
	}
	w, err := dsc.Watch(ctx, metav1.ListOptions{
		FieldSelector:   sel,
		ResourceVersion: list.ResourceVersion,
	})
	if err != nil {
		return fmt.Errorf("watch: %w", err)
	}
	t.watching.Store(true)
	defer t.watching.Store(false)
	if t.OnWatch != nil {
		t.watchOnce.Do(t.OnWatch)
	}
	defer w.Stop()
	for {
		var ev watch.Event
		var open bool
		select {
		case <-ctx.Done():
			return nil
		case ev, open = <-w.ResultChan():
		}
		if !open {
			return nil
		}
		switch ev.Type {
		case watch.Error:
			return fmt.Errorf("watch: %v", apierrors.FromObject(ev.Object))
		case watch.Added, watch.Modified, watch.Deleted:
			d, ok := ev.Object.(*appsv1.DaemonSet)
			if !ok || d.Name != ref.Name {
				continue
			}
			if t.observe(d, ref, ev.Type == watch.Deleted) {
				return nil
			}
		}
	}
}

// done reports whether there is nothing more to follow: our pod left the DaemonSet
// (orphaned), or a new DaemonSet replaced the deleted one.
func (t *Tracker) done() bool {
	select {
	case <-t.recreated:
		return true
	default:
	}
	ok, _ := t.Orphaned()
	return ok
}

// observe records what one version of the DaemonSet named like ours says (gone: it is
// the object of a deletion event), and reports whether following can stop.
func (t *Tracker) observe(ds *appsv1.DaemonSet, ref *metav1.OwnerReference, gone bool) bool {
	if ds.UID != ref.UID {
		// Another DaemonSet of that name. After ours was deleted: re-created.
		if ok, _ := t.Deleted(); ok && !gone {
			t.recreatedOnce.Do(func() { close(t.recreated) })
			return true
		}
		return false
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case ds.DeletionTimestamp != nil && !gone && slices.Contains(ds.Finalizers, metav1.FinalizerOrphanDependents):
		if t.orphaned == "" {
			t.orphaned = fmt.Sprintf("daemonset %s/%s is being deleted with propagation Orphan: its pods stay", t.ns, ref.Name)
		}
		return true
	case ds.DeletionTimestamp != nil && !gone:
		t.setDeleted(fmt.Sprintf("daemonset %s/%s is being deleted", t.ns, ref.Name))
		t.deleting = true
		if slices.Contains(ds.Finalizers, metav1.FinalizerDeleteDependents) {
			t.cascadeOnce.Do(func() { close(t.cascade) })
		}
	case gone:
		t.setDeleted(fmt.Sprintf("daemonset %s/%s was deleted", t.ns, ref.Name))
		// Removed outright (no deletionTimestamp: background propagation), or at the end
		// of a deletion the watch showed without the orphan finalizer. Otherwise the
		// deletion may have orphaned our pod: SIGTERM will tell.
		if ds.DeletionTimestamp == nil || t.deleting {
			t.cascadeOnce.Do(func() { close(t.cascade) })
		}
	}
	return false
}

func controllerRef(refs []metav1.OwnerReference) *metav1.OwnerReference {
	for i := range refs {
		r := &refs[i]
		if r.Kind == "DaemonSet" && r.Controller != nil && *r.Controller {
			return r
		}
	}
	return nil
}
