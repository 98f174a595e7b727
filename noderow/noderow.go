// Package noderow is where an agent publishes its row: its readiness status (node ID, key
// digest, bucket digests of the peers its kernel holds inbound SAs from and sends ESP to,
// refused peers) as a NodeRow object (secureoverlay.io/v1alpha1, namespaced in the agents'
// namespace, named after the Node, owned by it), which every agent reads to confirm its
// pairs with a peer that re-keyed (docs/keys.md §12; docs/protocol-v2.md §9 step 3). Node
// IDs and digests of public data only. Only the agent of that Node may write it (the
// admission policy secureoverlay-agent-nodereport).
package noderow

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/internal/objcache"
	"github.com/secureoverlay/secureoverlay/internal/upsert"
	"github.com/secureoverlay/secureoverlay/readiness"
)

// The NodeRow API (manifests/secureoverlay.yaml, CRD noderows.secureoverlay.io).
const (
	Group    = "secureoverlay.io"
	Version  = "v1alpha1"
	Resource = "noderows"
	Kind     = "NodeRow"
	ListKind = "NodeRowList"
	// FieldManager is the agents' field manager.
	FieldManager = "secureoverlay-agent"
)

// GVR is the NodeRow resource.
var GVR = schema.GroupVersionResource{Group: Group, Version: Version, Resource: Resource}

// Normal is s as a row carries it: readiness.DefaultBuckets buckets each way, at most
// readiness.MaxRefused refused peers (the lowest; the buckets of the rest then differ from
// their peers', which only withholds those buckets' confirmations), ascending, nil if none.
func Normal(s readiness.Status) readiness.Status {
	r := s
	r.In, r.Out = slices.Clone(s.In), slices.Clone(s.Out)
	r.Refused = slices.Clone(s.Refused)
	slices.Sort(r.Refused)
	r.Refused = slices.Compact(r.Refused)
	if len(r.Refused) > readiness.MaxRefused {
		r.Refused = r.Refused[:readiness.MaxRefused]
	}
	if len(r.Refused) == 0 {
		r.Refused = nil
	}
	return r
}

// Equal reports whether two rows are the same.
func Equal(a, b readiness.Status) bool {
	return a.ID == b.ID && a.Self == b.Self && slices.Equal(a.In, b.In) && slices.Equal(a.Out, b.Out) && slices.Equal(a.Refused, b.Refused)
}

// Validate checks what any reader relies on: a node ID above 0, DefaultBuckets digests of
// 48 bits each way, at most MaxRefused refused IDs, above 0 and strictly ascending.
func Validate(r readiness.Status) error {
	switch {
	case r.ID == 0:
		return errors.New("id: want a node ID above 0")
	case len(r.In) != readiness.DefaultBuckets || len(r.Out) != readiness.DefaultBuckets:
		return fmt.Errorf("want %d bucket digests each way", readiness.DefaultBuckets)
	case len(r.Refused) > readiness.MaxRefused:
		return fmt.Errorf("refused: %d, at most %d", len(r.Refused), readiness.MaxRefused)
	}
	for i, id := range r.Refused {
		if id == 0 || (i > 0 && id <= r.Refused[i-1]) {
			return errors.New("refused: want node IDs above 0, strictly ascending")
		}
	}
	for _, d := range append(slices.Clone(r.In), r.Out...) {
		if d>>48 != 0 {
			return errors.New("a bucket digest above 48 bits")
		}
	}
	return nil
}

// fields is r as the object's top-level fields (every field, so that a merge patch empties
// a refused list no longer there).
func fields(r readiness.Status) map[string]any {
	w := readiness.Encode(r)
	var refused any
	if len(w.Refused) > 0 {
		ids := make([]any, 0, len(w.Refused))
		for _, id := range w.Refused {
			ids = append(ids, int64(id))
		}
		refused = ids
	}
	return map[string]any{"id": int64(w.ID), "self": w.Self, "in": w.In, "out": w.Out, "refused": refused}
}

// Object is node's NodeRow in namespace ns holding r, owned by the Node (uid nodeUID: the
// garbage collector deletes it with the Node; "" for no owner).
func Object(ns, node, nodeUID string, r readiness.Status) *unstructured.Unstructured {
	return upsert.NodeObject(Group+"/"+Version, Kind, ns, node, nodeUID, fields(r))
}

// Parse reads a NodeRow object; an object that does not validate is an error (a reader
// then treats the node as publishing no row).
func Parse(u *unstructured.Unstructured) (readiness.Status, error) {
	var w api.ReadinessStatus
	b, err := json.Marshal(map[string]any{"id": u.Object["id"], "self": u.Object["self"], "in": u.Object["in"], "out": u.Object["out"], "refused": u.Object["refused"]})
	if err == nil {
		err = json.Unmarshal(b, &w)
	}
	if err != nil {
		return readiness.Status{}, fmt.Errorf("%s %s: does not parse", Kind, u.GetName())
	}
	r, err := readiness.Decode(&w, readiness.DefaultBuckets)
	if err == nil {
		if len(r.Refused) == 0 {
			r.Refused = nil
		}
		err = Validate(r)
	}
	if err != nil {
		return readiness.Status{}, fmt.Errorf("%s %s: %w", Kind, u.GetName(), err)
	}
	return r, nil
}

// writeTimeout bounds one write (the caller's context bounds it too).
const writeTimeout = 10 * time.Second

// Write stores node's row: a JSON merge patch of the row and the owner, or a create when
// there is no object yet.
func Write(ctx context.Context, dc dynamic.Interface, ns, node, nodeUID string, r readiness.Status) error {
	if err := Validate(r); err != nil {
		return fmt.Errorf("%s %s/%s: %w", Kind, ns, node, err)
	}
	return upsert.WriteNodeObject(ctx, dc, GVR, Object(ns, node, nodeUID, r), FieldManager, writeTimeout)
}

// Cache is an informer over the NodeRows of one namespace, each kept parsed (an object that
// does not parse is kept as its error: that node publishes no row).
type Cache = objcache.Cache[readiness.Status]

// NewCache builds the informer (nothing runs until Start). onChange, if set, is called
// after every change with the node's name; it must be cheap and must not block.
func NewCache(dc dynamic.Interface, ns string, onChange func(node string)) *Cache {
	return objcache.New(dc, GVR, ns, Parse, onChange)
}
