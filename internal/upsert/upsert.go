// Package upsert writes an object one writer owns: a JSON merge patch, or a create when the
// object does not exist yet (NodeReport and NodeKeys, each written by its node's agent;
// NodeView, written by the master's leader). No resourceVersion: an admission policy (or
// RBAC, for NodeViews) holds every other writer off the object, so the last write is the
// truth.
package upsert

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
)

// Write merge-patches obj's name with patch, or creates obj when there is none.
func Write(ctx context.Context, r dynamic.ResourceInterface, obj *unstructured.Unstructured, patch []byte, fieldManager string) error {
	name := obj.GetName()
	_, err := r.Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: fieldManager})
	if apierrors.IsNotFound(err) {
		_, err = r.Create(ctx, withoutNullAnnotations(obj), metav1.CreateOptions{FieldManager: fieldManager})
		if apierrors.IsAlreadyExists(err) { // created meanwhile (a previous write timed out late)
			_, err = r.Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: fieldManager})
		}
	}
	return err
}

// withoutNullAnnotations is obj without the annotations it sets to null (a merge patch's
// way to remove them; a create has nothing to remove). obj itself is not modified.
func withoutNullAnnotations(obj *unstructured.Unstructured) *unstructured.Unstructured {
	a, ok := obj.Object["metadata"].(map[string]any)["annotations"].(map[string]any)
	if !ok {
		return obj
	}
	kept := map[string]any{}
	for k, v := range a {
		if v != nil {
			kept[k] = v
		}
	}
	if len(kept) == len(a) {
		return obj
	}
	c := obj.DeepCopy()
	meta := c.Object["metadata"].(map[string]any)
	if len(kept) == 0 {
		delete(meta, "annotations")
	} else {
		meta["annotations"] = kept
	}
	return c
}

// NodeObject is one of our per-node objects: apiVersion and kind, named after node in
// namespace ns, labelled part of secureoverlay, owned by the Node (uid nodeUID: the garbage
// collector deletes it with the Node; "" for no owner), with the top-level fields given.
func NodeObject(apiVersion, kind, ns, node, nodeUID string, fields map[string]any) *unstructured.Unstructured {
	u := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": apiVersion,
		"kind":       kind,
		"metadata": map[string]any{
			"name":      node,
			"namespace": ns,
			"labels":    map[string]any{"app.kubernetes.io/part-of": "secureoverlay"},
		},
	}}
	for f, v := range fields {
		u.Object[f] = v
	}
	if nodeUID != "" {
		u.SetOwnerReferences([]metav1.OwnerReference{{APIVersion: "v1", Kind: "Node", Name: node, UID: types.UID(nodeUID)}})
	}
	return u
}

// WriteObject writes obj (made by NodeObject): a merge patch of its top-level fields, its
// owner references and its annotations (every field it has, so that a field emptied is
// emptied), or a create.
func WriteObject(ctx context.Context, r dynamic.ResourceInterface, obj *unstructured.Unstructured, fieldManager string) error {
	patch := map[string]any{}
	for f, v := range obj.Object {
		if f != "apiVersion" && f != "kind" && f != "metadata" {
			patch[f] = v
		}
	}
	meta := map[string]any{"ownerReferences": nil}
	if refs, ok := obj.Object["metadata"].(map[string]any)["ownerReferences"]; ok {
		meta["ownerReferences"] = refs
	}
	if a, ok := obj.Object["metadata"].(map[string]any)["annotations"]; ok {
		meta["annotations"] = a
	}
	patch["metadata"] = meta
	raw, err := json.Marshal(patch)
	if err != nil {
		return err
	}
	return Write(ctx, r, obj, raw, fieldManager)
}

// WriteNodeObject writes obj (made by NodeObject) to resource gvr in obj's namespace as
// WriteObject does, within timeout; its error names the object (kind, namespace, name).
func WriteNodeObject(ctx context.Context, dc dynamic.Interface, gvr schema.GroupVersionResource, obj *unstructured.Unstructured, fieldManager string, timeout time.Duration) error {
	if dc == nil {
		return fmt.Errorf("%s: no dynamic client", gvr.Resource)
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if err := WriteObject(ctx, dc.Resource(gvr).Namespace(obj.GetNamespace()), obj, fieldManager); err != nil {
		return fmt.Errorf("write %s %s/%s: %w", obj.GetKind(), obj.GetNamespace(), obj.GetName(), err)
	}
	return nil
}
