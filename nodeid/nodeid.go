// Package nodeid is the node table outside the ring (docs/keys.md §13; docs/protocol-v2.md
// §9 step 6): one NodeID object (secureoverlay.io/v1alpha1, namespaced in the agents'
// namespace, named id-<ID>) per live entry of the Secret's table, written only by the
// master, so that the ring every agent watches can leave its table out and a step costs
// N × ≈ 1 KB through the watches instead of N × ≈ 88 bytes × N.
//
// Here: the object's encoding, the master's plan (which objects to write and delete for a
// ring), the agents' rule (which ID a node has, from the ring or from the objects) and the
// informer. Node names and IDs only: nothing secret.
package nodeid

import (
	"cmp"
	"crypto/sha256"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/dynamic"

	"github.com/secureoverlay/secureoverlay/internal/objcache"
	"github.com/secureoverlay/secureoverlay/keys"
)

// The NodeID API (docs/keys.md §13).
const (
	Group    = "secureoverlay.io"
	Version  = "v1alpha1"
	Resource = "nodeids"
	Kind     = "NodeID"
	ListKind = "NodeIDList"
)

// GVR is the NodeID resource.
var GVR = schema.GroupVersionResource{Group: Group, Version: Version, Resource: Resource}

// Entry is one NodeID: ID is assigned to Node.
type Entry struct {
	ID   uint32
	Node string
}

// namePrefix starts every NodeID's name; the ID in decimal follows.
const namePrefix = "id-"

// Name is the object name of ID id.
func Name(id uint32) string { return namePrefix + strconv.FormatUint(uint64(id), 10) }

// Validate checks what every reader relies on: an ID in 1..keys.MaxNodeID and a node name
// that is a Kubernetes node name (a lowercase RFC 1123 subdomain).
func Validate(e Entry) error {
	if e.ID == 0 || e.ID > keys.MaxNodeID {
		return fmt.Errorf("id: outside 1..%d", keys.MaxNodeID)
	}
	if len(validation.IsDNS1123Subdomain(e.Node)) > 0 {
		return errors.New("node: not a Kubernetes node name")
	}
	return nil
}

// Object is e as a NodeID in namespace ns (no owner: a Node's deletion must not take its
// ID away before the master releases it).
func Object(ns string, e Entry) *unstructured.Unstructured {
	u := &unstructured.Unstructured{Object: map[string]any{"id": int64(e.ID), "node": e.Node}}
	u.SetAPIVersion(Group + "/" + Version)
	u.SetKind(Kind)
	u.SetNamespace(ns)
	u.SetName(Name(e.ID))
	return u
}

// Parse reads a NodeID. An object whose name is not id-<its id>, or that does not
// validate, is an error (a reader then takes nothing from it); errors name the object and
// the field, never a value.
func Parse(u *unstructured.Unstructured) (Entry, error) {
	bad := func(format string, a ...any) (Entry, error) {
		return Entry{}, fmt.Errorf("%s %s: "+format, append([]any{Kind, u.GetName()}, a...)...)
	}
	num := func(field string) (uint32, bool) {
		switch v := u.Object[field].(type) {
		case int64:
			return uint32(v), v >= 0 && v <= 1<<32-1
		case float64: // JSON decoded without the API machinery's integer handling
			return uint32(v), v >= 0 && v <= 1<<32-1 && v == float64(uint32(v))
		}
		return 0, false
	}
	id, ok := num("id")
	if !ok {
		return bad("id: want an integer")
	}
	node, ok := u.Object["node"].(string)
	if !ok {
		return bad("node: want a string")
	}
	e := Entry{ID: id, Node: node}
	if err := Validate(e); err != nil {
		return bad("%w", err)
	}
	if u.GetName() != Name(id) {
		return bad("the name is not %s followed by its id", namePrefix)
	}
	return e, nil
}

// Plan is what the master writes so that the NodeIDs equal the live entries of r's table,
// given the NodeIDs it has (by ID): put (create or update, ascending ID) and del (IDs,
// ascending). Objects change only when IDs are assigned, moved or freed, never at a step
// or a rotation.
func Plan(r *keys.Ring, have map[uint32]Entry) (put []Entry, del []uint32) {
	want := map[uint32]string{}
	for name, id := range ringIDs(r) {
		want[id] = name
	}
	for _, id := range slices.Sorted(maps.Keys(want)) {
		if e := (Entry{ID: id, Node: want[id]}); have[id] != e {
			put = append(put, e)
		}
	}
	for _, id := range slices.Sorted(maps.Keys(have)) {
		if _, ok := want[id]; !ok {
			del = append(del, id)
		}
	}
	return put, del
}

// ringIDs is r.NodeID for every node with an ID, as a map: the first unreleased entry of
// each name (Ring.NodeID walks the table once per call: O(N²) for all of them).
func ringIDs(r *keys.Ring) map[string]uint32 {
	ids := make(map[string]uint32, len(r.Nodes))
	for _, n := range r.Nodes {
		if _, ok := ids[n.Name]; !ok && !n.Released {
			ids[n.Name] = n.ID
		}
	}
	return ids
}

// Digest names a table (node → ID): the number of entries and 16 bytes of SHA-256 over
// "ID node\n" lines in ascending ID, in hex. The public ring's ConfigMap carries the digest
// of the table its ring leaves out (data key api.RingNodesDataKey), so that an agent uses
// NodeIDs only together with the ring they belong to.
func Digest(ids map[string]uint32) string {
	byID := make(map[uint32]string, len(ids))
	for name, id := range ids {
		byID[id] = name
	}
	h := sha256.New()
	for _, id := range slices.Sorted(maps.Keys(byID)) {
		fmt.Fprintf(h, "%d %s\n", id, byID[id])
	}
	return fmt.Sprintf("%d:%x", len(ids), h.Sum(nil)[:16])
}

// TableDigest is the Digest of r's table (its live entries).
func TableDigest(r *keys.Ring) string { return Digest(ringIDs(r)) }

// IDs is the agents' rule for the node table of ring r: the ring's own table when it lists
// any node or its ConfigMap names no digest (want ""; a ring that leaves its table out
// always comes with one); otherwise the NodeIDs (entries), only if they are exactly the
// table whose digest the ring's ConfigMap names. ok is false when they are not (yet):
// the NodeIDs and the ring are two objects, seen through two watches in either order, and
// an agent must act on a ring only with the table the master wrote with it — a NodeID
// moved to another node while the ring still holds a generation under which the previous
// holder had that ID would give one SPI two senders (docs/keys.md §2, §13). Entries that
// name one node twice are never that table.
func IDs(r *keys.Ring, entries []Entry, want string) (ids map[string]uint32, ok bool) {
	if len(r.Nodes) > 0 || want == "" {
		return ringIDs(r), true
	}
	ids = make(map[string]uint32, len(entries))
	for _, e := range entries {
		if _, dup := ids[e.Node]; dup {
			return nil, false
		}
		ids[e.Node] = e.ID
	}
	if Digest(ids) != want {
		return nil, false
	}
	return ids, true
}

// Cache is an informer over the NodeIDs of one namespace, each kept parsed (an object that
// does not parse is kept as its error and is not an entry).
type Cache = objcache.Cache[Entry]

// NewCache builds the informer (nothing runs until Start). onChange, if set, is called
// after every change with the object's name; it must be cheap and must not block.
func NewCache(dc dynamic.Interface, ns string, onChange func(name string)) *Cache {
	return objcache.New(dc, GVR, ns, Parse, onChange)
}

// Fill is ring r with the node table the rule IDs gives it: r itself when that is r's own
// table (it lists nodes, or want is ""); otherwise a copy of r whose table is the NodeIDs
// (entries, in ascending ID), when they are exactly the table want names. ok is false when
// they are not (yet): the reader then acts on the last ring it could fill (docs/keys.md
// §13). A filled ring reads like one written with its table (Ring.NodeID, desired.Compute).
func Fill(r *keys.Ring, entries []Entry, want string) (filled *keys.Ring, ok bool) {
	if len(r.Nodes) > 0 || want == "" {
		return r, true
	}
	if _, ok := IDs(r, entries, want); !ok {
		return nil, false
	}
	filled = r.Clone()
	filled.Nodes = make([]keys.NodeID, 0, len(entries))
	for _, e := range slices.SortedFunc(slices.Values(entries), func(a, b Entry) int { return cmp.Compare(a.ID, b.ID) }) {
		filled.Nodes = append(filled.Nodes, keys.NodeID{Name: e.Node, ID: e.ID})
	}
	return filled, true
}

// Strip is what the master writes to the public ring once every agent reads NodeIDs: r
// without its table (a copy; r is the Secret's ring and keeps it), and the digest of the
// live table to name beside it (data key api.RingNodesDataKey).
func Strip(r *keys.Ring) (stripped *keys.Ring, digest string) {
	stripped = r.Clone()
	stripped.Nodes = []keys.NodeID{}
	return stripped, TableDigest(r)
}
