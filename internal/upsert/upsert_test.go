package upsert

import (
	"context"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	dynamicfake "k8s.io/client-go/dynamic/fake"
)

// TestWriteObject: the first write creates the object with its owner; a later one patches
// every field (an emptied field is emptied, a field the object no longer has stays as a
// merge patch leaves it), drops the owner when given none, and merges annotations.
func TestWriteObject(t *testing.T) {
	gvr := schema.GroupVersionResource{Group: "secureoverlay.io", Version: "v1alpha1", Resource: "things"}
	dc := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), map[schema.GroupVersionResource]string{gvr: "ThingList"})
	r := dc.Resource(gvr).Namespace("ns")
	ctx := context.Background()
	first := NodeObject("secureoverlay.io/v1alpha1", "Thing", "ns", "node-a", "uid-a", map[string]any{"a": "1", "b": "2"})
	first.SetAnnotations(map[string]string{"x": "1"})
	if err := WriteObject(ctx, r, first, "test"); err != nil {
		t.Fatal(err)
	}
	got, err := r.Get(ctx, "node-a", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if refs := got.GetOwnerReferences(); len(refs) != 1 || refs[0].UID != "uid-a" || refs[0].Kind != "Node" || got.GetLabels()["app.kubernetes.io/part-of"] != "secureoverlay" || got.Object["a"] != "1" {
		t.Fatalf("created %+v", got.Object)
	}
	second := NodeObject("secureoverlay.io/v1alpha1", "Thing", "ns", "node-a", "", map[string]any{"a": ""})
	second.SetAnnotations(map[string]string{"y": "2"})
	if err := WriteObject(ctx, r, second, "test"); err != nil {
		t.Fatal(err)
	}
	if got, err = r.Get(ctx, "node-a", metav1.GetOptions{}); err != nil {
		t.Fatal(err)
	}
	if len(got.GetOwnerReferences()) != 0 || got.Object["a"] != "" || got.Object["b"] != "2" || got.GetAnnotations()["x"] != "1" || got.GetAnnotations()["y"] != "2" {
		t.Fatalf("patched %+v", got.Object)
	}
}
