// Package nodeview is where the master tells each agent which of its pairs protocol v2's
// per-pair readiness has confirmed: a NodeView object (secureoverlay.io/v1alpha1,
// namespaced in the agents' namespace, named after the Node, owned by it) holding an
// api.ReadinessView — the digest of the master's key view and the peers not yet confirmed
// to hold inbound SAs from the node, or to send it ESP (docs/protocol-v2.md §4, §6, §9
// step 2; package readiness). Node IDs and digests of public key incarnations only. Only
// the master writes it; each agent watches its own, by name.
package nodeview

import (
	"context"
	"fmt"
	"time"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/internal/upsert"
)

// The NodeView API (manifests/secureoverlay.yaml, CRD nodeviews.secureoverlay.io).
const (
	Group    = "secureoverlay.io"
	Version  = "v1alpha1"
	Resource = "nodeviews"
	Kind     = "NodeView"
	ListKind = "NodeViewList"
	// FieldManager is the master's field manager.
	FieldManager = "secureoverlay-master"
	// maxField bounds each list field when read (the CRD's schema says the same): a list
	// of 65,536 IDs of up to 3 varint bytes, in base64.
	maxField = 262144
)

// GVR is the NodeView resource.
var GVR = schema.GroupVersionResource{Group: Group, Version: Version, Resource: Resource}

// fields is v as the object holds it: every field present, so that a merge patch also
// empties a list that became empty.
func fields(v api.ReadinessView) map[string]any {
	return map[string]any{"view": map[string]any{"keys": v.Keys, "notIn": v.NotIn, "notOut": v.NotOut}}
}

// Object is node's NodeView in namespace ns holding v, owned by the Node (uid nodeUID:
// the garbage collector deletes it with the Node; "" for no owner).
func Object(ns, node, nodeUID string, v api.ReadinessView) *unstructured.Unstructured {
	return upsert.NodeObject(Group+"/"+Version, Kind, ns, node, nodeUID, fields(v))
}

// Parse reads a NodeView object's view (still to be decoded by readiness.DecodeView).
func Parse(u *unstructured.Unstructured) (api.ReadinessView, error) {
	m, ok := u.Object["view"].(map[string]any)
	if !ok {
		return api.ReadinessView{}, fmt.Errorf("%s %s: no view", Kind, u.GetName())
	}
	var v api.ReadinessView
	for _, f := range []struct {
		name string
		dst  *string
	}{{"keys", &v.Keys}, {"notIn", &v.NotIn}, {"notOut", &v.NotOut}} {
		x, present := m[f.name]
		s, isString := x.(string)
		if present && x != nil && !isString {
			return api.ReadinessView{}, fmt.Errorf("%s %s: view.%s is not a string", Kind, u.GetName(), f.name)
		}
		if len(s) > maxField {
			return api.ReadinessView{}, fmt.Errorf("%s %s: view.%s has %d bytes, at most %d", Kind, u.GetName(), f.name, len(s), maxField)
		}
		*f.dst = s
	}
	return v, nil
}

// writeTimeout bounds one write (the caller's context bounds it too).
const writeTimeout = 10 * time.Second

// Write stores node's view: a JSON merge patch of the view and the owner, or a create
// when there is no object yet.
func Write(ctx context.Context, dc dynamic.Interface, ns, node, nodeUID string, v api.ReadinessView) error {
	return upsert.WriteNodeObject(ctx, dc, GVR, Object(ns, node, nodeUID, v), FieldManager, writeTimeout)
}
