// Package nodekeys is where an agent publishes its protocol v2 public keys: a NodeKeys
// object (secureoverlay.io/v1alpha1, namespaced in the agents' namespace, named after the
// Node, owned by it) holding the key incarnation the keys belong to and one X25519 public
// key per published generation (docs/keys.md §10, "Published keys"; docs/protocol-v2.md
// §4). Public keys only: the private halves never leave the node (its ledger). Only the
// agent of that Node may write it (the admission policy secureoverlay-agent-nodereport).
package nodekeys

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"time"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"

	"github.com/secureoverlay/secureoverlay/internal/upsert"
	"github.com/secureoverlay/secureoverlay/keys"
)

// The NodeKeys API (manifests/secureoverlay.yaml, CRD nodekeys.secureoverlay.io).
const (
	Group    = "secureoverlay.io"
	Version  = "v1alpha1"
	Resource = "nodekeys"
	Kind     = "NodeKeys"
	ListKind = "NodeKeysList"
	// FieldManager is the agents' field manager.
	FieldManager = "secureoverlay-agent"
	// maxField bounds each incarnation field (a boot ID and a UID are 36 characters, an
	// epoch 32; the CRD's schema says the same).
	maxField = 64
)

// GVR is the NodeKeys resource.
var GVR = schema.GroupVersionResource{Group: Group, Version: Version, Resource: Resource}

// Incarnation is the key incarnation the keys belong to (docs/keys.md §3): the node's boot
// ID, its Node object's UID and the agent's SA epoch.
type Incarnation struct {
	BootID string `json:"bootID"`
	UID    string `json:"uid"`
	Epoch  string `json:"epoch"`
}

// Key is one published public key.
type Key struct {
	Generation uint32         `json:"generation"`
	X25519     keys.PublicKey `json:"-"`
}

// Keys is a NodeKeys object's content.
type Keys struct {
	Incarnation Incarnation
	Keys        []Key // ascending generation
	// Capabilities are what the agent does beyond publishing keys, e.g.
	// api.CapabilityRingConfigMap (it reads the public ring: the master may take its
	// Secret access away, docs/keys.md §11). Readers ignore names they do not know.
	Capabilities []string
	// Installed are the generations whose inbound SAs the agent's kernel holds for this
	// incarnation, ascending (api.CapabilityInstalled; docs/keys.md §10): written only
	// after the kernel holds them.
	Installed []uint32
	// Lanes is the number of per-CPU outbound lanes the agent sends on in this
	// incarnation (api.CapabilityLanes, which also says it installs inbound states for its
	// peers' lanes; docs/dataplane.md §10): it never grows within an incarnation. At most
	// keys.MaxCPULanes; read only with the capability.
	Lanes uint16
}

// Has reports whether the agent declares capability c.
func (k Keys) Has(c string) bool { return slices.Contains(k.Capabilities, c) }

// Equal reports whether k and o publish the same keys for the same incarnation.
func (k Keys) Equal(o Keys) bool {
	return k.Incarnation == o.Incarnation && slices.Equal(k.Keys, o.Keys) && slices.Equal(k.Capabilities, o.Capabilities) &&
		slices.Equal(k.Installed, o.Installed) && k.Lanes == o.Lanes
}

// Validate checks what any reader relies on: a whole incarnation, at most
// keys.MaxPublishedKeys keys, generations strictly ascending and non-zero.
func (k Keys) Validate() error {
	inc := k.Incarnation
	for _, f := range []struct{ name, v string }{{"bootID", inc.BootID}, {"uid", inc.UID}, {"epoch", inc.Epoch}} {
		if f.v == "" || len(f.v) > maxField {
			return fmt.Errorf("incarnation.%s: want 1 to %d characters", f.name, maxField)
		}
	}
	if len(k.Capabilities) > maxCapabilities {
		return fmt.Errorf("capabilities: %d, at most %d", len(k.Capabilities), maxCapabilities)
	}
	for i, c := range k.Capabilities {
		if !validCapability(c) {
			return fmt.Errorf("capabilities[%d]: want 1 to %d characters of a-z, 0-9 and -", i, maxCapability)
		}
	}
	if len(k.Keys) > keys.MaxPublishedKeys {
		return fmt.Errorf("keys: %d, at most %d", len(k.Keys), keys.MaxPublishedKeys)
	}
	for i, e := range k.Keys {
		if e.Generation == 0 || (i > 0 && e.Generation <= k.Keys[i-1].Generation) {
			return fmt.Errorf("keys[%d]: generation %d is zero or not above the previous one", i, e.Generation)
		}
	}
	if k.Lanes > keys.MaxCPULanes {
		return fmt.Errorf("lanes: %d, at most %d", k.Lanes, keys.MaxCPULanes)
	}
	if len(k.Installed) > maxInstalled {
		return fmt.Errorf("installed: %d, at most %d", len(k.Installed), maxInstalled)
	}
	for i, g := range k.Installed {
		if g == 0 || (i > 0 && g <= k.Installed[i-1]) {
			return fmt.Errorf("installed[%d]: generation %d is zero or not above the previous one", i, g)
		}
	}
	return nil
}

// maxInstalled bounds Keys.Installed (the CRD's schema says the same): a ring holds at
// most one active, one pending and a retiring generation or two.
const maxInstalled = 4

// maxCapabilities bounds Keys.Capabilities and maxCapability each name (the CRD's schema
// says the same): the largest object the schema admits stays within 2 KiB as the API
// server stores it (TestLargestObjectBounded; 64-character names took it to 2,123 bytes).
const (
	maxCapabilities = 8
	maxCapability   = 32
)

func validCapability(c string) bool {
	if c == "" || len(c) > maxCapability {
		return false
	}
	for i := 0; i < len(c); i++ {
		if b := c[i]; !(b >= 'a' && b <= 'z' || b >= '0' && b <= '9' || b == '-') {
			return false
		}
	}
	return true
}

// Key returns the public key of generation g.
func (k Keys) Key(g uint32) (keys.PublicKey, bool) {
	for _, e := range k.Keys {
		if e.Generation == g {
			return e.X25519, true
		}
	}
	return keys.PublicKey{}, false
}

// fields is k as the object's top-level fields.
func (k Keys) fields() map[string]any {
	list := make([]any, 0, len(k.Keys))
	for _, e := range k.Keys {
		list = append(list, map[string]any{"generation": int64(e.Generation), "x25519": e.X25519.String()})
	}
	caps := make([]any, 0, len(k.Capabilities))
	for _, c := range k.Capabilities {
		caps = append(caps, c)
	}
	installed := make([]any, 0, len(k.Installed))
	for _, g := range k.Installed {
		installed = append(installed, int64(g))
	}
	return map[string]any{
		"incarnation":  map[string]any{"bootID": k.Incarnation.BootID, "uid": k.Incarnation.UID, "epoch": k.Incarnation.Epoch},
		"keys":         list,
		"capabilities": caps,
		"installed":    installed,
		"lanes":        int64(k.Lanes),
	}
}

// Object is node's NodeKeys in namespace ns holding k, owned by the Node (uid nodeUID: the
// garbage collector deletes it with the Node; "" for no owner).
func Object(ns, node, nodeUID string, k Keys) *unstructured.Unstructured {
	return upsert.NodeObject(Group+"/"+Version, Kind, ns, node, nodeUID, k.fields())
}

// Parse reads a NodeKeys object; an object that does not validate is an error (a reader
// then treats the node as publishing no keys).
func Parse(u *unstructured.Unstructured) (Keys, error) {
	var w struct {
		Incarnation Incarnation `json:"incarnation"`
		Keys        []struct {
			Generation uint32 `json:"generation"`
			X25519     string `json:"x25519"`
		} `json:"keys"`
		Capabilities []string `json:"capabilities"`
		Installed    []uint32 `json:"installed"`
		Lanes        uint16   `json:"lanes"`
	}
	b, err := json.Marshal(map[string]any{"incarnation": u.Object["incarnation"], "keys": u.Object["keys"], "capabilities": u.Object["capabilities"],
		"installed": u.Object["installed"], "lanes": u.Object["lanes"]})
	if err == nil {
		err = json.Unmarshal(b, &w)
	}
	if err != nil {
		return Keys{}, fmt.Errorf("%s %s: does not parse", Kind, u.GetName())
	}
	k := Keys{Incarnation: w.Incarnation, Capabilities: w.Capabilities, Installed: w.Installed, Lanes: w.Lanes}
	if len(k.Installed) == 0 {
		k.Installed = nil // absent and empty alike: the capability says which
	}
	for i, e := range w.Keys {
		p, err := keys.ParsePublicKey(e.X25519)
		if err != nil {
			return Keys{}, fmt.Errorf("%s %s: keys[%d]: %w", Kind, u.GetName(), i, err)
		}
		k.Keys = append(k.Keys, Key{Generation: e.Generation, X25519: p})
	}
	if err := k.Validate(); err != nil {
		return Keys{}, fmt.Errorf("%s %s: %w", Kind, u.GetName(), err)
	}
	return k, nil
}

// writeTimeout bounds one write (the caller's context bounds it too).
const writeTimeout = 10 * time.Second

// Write stores node's keys: a JSON merge patch of the keys and the owner, or a create when
// there is no object yet.
func Write(ctx context.Context, dc dynamic.Interface, ns, node, nodeUID string, k Keys) error {
	if err := k.Validate(); err != nil {
		return fmt.Errorf("%s %s/%s: %w", Kind, ns, node, err)
	}
	return upsert.WriteNodeObject(ctx, dc, GVR, Object(ns, node, nodeUID, k), FieldManager, writeTimeout)
}
