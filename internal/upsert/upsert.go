// Package upsert writes an object an agent is the only writer of: a JSON merge patch, or a
// create when the object does not exist yet (NodeReport, NodeKeys). No resourceVersion: an
// admission policy holds every other agent off the object, so the last write is the truth.
package upsert

import (
	"context"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
)

// Write merge-patches obj's name with patch, or creates obj when there is none.
func Write(ctx context.Context, r dynamic.ResourceInterface, obj *unstructured.Unstructured, patch []byte, fieldManager string) error {
	name := obj.GetName()
	_, err := r.Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: fieldManager})
	if apierrors.IsNotFound(err) {
		_, err = r.Create(ctx, obj, metav1.CreateOptions{FieldManager: fieldManager})
		if apierrors.IsAlreadyExists(err) { // created meanwhile (a previous write timed out late)
			_, err = r.Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: fieldManager})
		}
	}
	return err
}
