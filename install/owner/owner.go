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
// Anything uncertain (API errors, no pod identity, no DaemonSet owner) decides "keep":
// leaving the plugin in place is always safe, removing it while the DaemonSet lives is not
// (its next pod would reinstall, but pods started in between would run without the MTU
// check). Needs RBAC: get on pods and daemonsets (apps) in the pod's namespace.
package owner

import (
	"context"
	"fmt"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
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
	var ref *metav1.OwnerReference
	for i := range pod.OwnerReferences {
		r := &pod.OwnerReferences[i]
		if r.Kind == "DaemonSet" && r.Controller != nil && *r.Controller {
			ref = r
			break
		}
	}
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

// Decide retries DaemonSetDeleted every interval until it answers without an API error or
// ctx ends; on ctx end it returns the last (keeping) decision and error.
func Decide(ctx context.Context, c kubernetes.Interface, namespace, name string, interval time.Duration) (Decision, error) {
	for {
		d, err := DaemonSetDeleted(ctx, c, namespace, name)
		if err == nil {
			return d, nil
		}
		select {
		case <-ctx.Done():
			return Decision{Reason: d.Reason}, err
		case <-time.After(interval):
		}
	}
}
