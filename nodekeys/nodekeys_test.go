package nodekeys

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	dynamicfake "k8s.io/client-go/dynamic/fake"

	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/keys"
)

func pub(t *testing.T) keys.PublicKey {
	t.Helper()
	k, err := keys.GeneratePrivateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k.Public()
}

func sample(t *testing.T, gens ...uint32) Keys {
	k := Keys{Incarnation: Incarnation{BootID: "8f1c2a9e-5b7d-4e3f-9a61-0c2d4e6f8a10", UID: "1d3b5f79-2c4e-4a6b-8d0f-2a4c6e8f0b13", Epoch: "6f2c9d0e4a8b1c3d"}}
	for _, g := range gens {
		k.Keys = append(k.Keys, Key{Generation: g, X25519: pub(t)})
	}
	return k
}

func TestObjectRoundTrip(t *testing.T) {
	k := sample(t, 7, 8)
	k.Capabilities, k.Installed, k.Lanes = []string{"installed", "lanes"}, []uint32{6, 7}, 4
	u := Object("ns", "node-1", "uid-1", k)
	if u.GetName() != "node-1" || u.GetNamespace() != "ns" || u.GetKind() != Kind {
		t.Fatalf("object %+v", u.Object)
	}
	if refs := u.GetOwnerReferences(); len(refs) != 1 || refs[0].Kind != "Node" || refs[0].Name != "node-1" || refs[0].UID != "uid-1" {
		t.Fatalf("owners %+v", refs)
	}
	got, err := Parse(u)
	if err != nil || !got.Equal(k) {
		t.Fatalf("Parse = %+v, %v; want %+v", got, err, k)
	}
	if p, ok := got.Key(8); !ok || p != k.Keys[1].X25519 {
		t.Fatal("Key(8)")
	}
	if _, ok := got.Key(9); ok {
		t.Fatal("Key(9) found")
	}
	if refs := Object("ns", "n", "", k).GetOwnerReferences(); len(refs) != 0 {
		t.Fatalf("no uid, owners %+v", refs)
	}
	// Installed changes the content (the writer writes again), and none installed parses
	// as nil whether the field is empty or absent (older agents).
	o := k
	o.Installed = []uint32{7}
	if o.Equal(k) {
		t.Fatal("keys with other installed generations are Equal")
	}
	o.Installed = nil
	u = Object("ns", "node-1", "uid-1", o)
	if got, err := Parse(u); err != nil || got.Installed != nil || !got.Equal(o) {
		t.Fatalf("none installed: %+v, %v", got.Installed, err)
	}
	delete(u.Object, "installed")
	if got, err := Parse(u); err != nil || got.Installed != nil {
		t.Fatalf("installed absent: %+v, %v", got.Installed, err)
	}
	// Another lane count is other content; absent (older agents) reads as 0.
	o = k
	o.Lanes = 2
	if o.Equal(k) {
		t.Fatal("keys with another lane count are Equal")
	}
	u = Object("ns", "node-1", "uid-1", k)
	delete(u.Object, "lanes")
	if got, err := Parse(u); err != nil || got.Lanes != 0 {
		t.Fatalf("lanes absent: %d, %v", got.Lanes, err)
	}
}

func TestParseRejects(t *testing.T) {
	good := func() *unstructured.Unstructured { return Object("ns", "n", "u", sample(t, 3)) }
	for _, tc := range []struct {
		name, want string
		edit       func(u *unstructured.Unstructured)
	}{
		{"no incarnation", "incarnation.bootID", func(u *unstructured.Unstructured) { delete(u.Object, "incarnation") }},
		{"empty epoch", "incarnation.epoch", func(u *unstructured.Unstructured) {
			u.Object["incarnation"].(map[string]any)["epoch"] = ""
		}},
		{"long uid", "incarnation.uid", func(u *unstructured.Unstructured) {
			u.Object["incarnation"].(map[string]any)["uid"] = strings.Repeat("u", 65)
		}},
		{"short key", "keys[0]: public key", func(u *unstructured.Unstructured) {
			u.Object["keys"].([]any)[0].(map[string]any)["x25519"] = "00ff"
		}},
		{"not hex", "keys[0]: public key", func(u *unstructured.Unstructured) {
			u.Object["keys"].([]any)[0].(map[string]any)["x25519"] = strings.Repeat("zz", 32)
		}},
		{"generation zero", "keys[0]: generation 0", func(u *unstructured.Unstructured) {
			u.Object["keys"].([]any)[0].(map[string]any)["generation"] = int64(0)
		}},
		{"descending", "keys[1]: generation 3", func(u *unstructured.Unstructured) {
			k := sample(t, 4, 3)
			u.Object["keys"] = k.fields()["keys"]
		}},
		{"too many", "keys: 5, at most 4", func(u *unstructured.Unstructured) {
			u.Object["keys"] = sample(t, 1, 2, 3, 4, 5).fields()["keys"]
		}},
		{"wrong type", "does not parse", func(u *unstructured.Unstructured) { u.Object["keys"] = "x" }},
		{"installed descending", "installed[1]: generation 3", func(u *unstructured.Unstructured) {
			u.Object["installed"] = []any{int64(4), int64(3)}
		}},
		{"installed zero", "installed[0]: generation 0", func(u *unstructured.Unstructured) { u.Object["installed"] = []any{int64(0)} }},
		{"installed too many", "installed: 5, at most 4", func(u *unstructured.Unstructured) {
			u.Object["installed"] = []any{int64(1), int64(2), int64(3), int64(4), int64(5)}
		}},
		{"lanes too many", "lanes: 127, at most 126", func(u *unstructured.Unstructured) { u.Object["lanes"] = int64(127) }},
		{"lanes negative", "does not parse", func(u *unstructured.Unstructured) { u.Object["lanes"] = int64(-1) }},
	} {
		u := good()
		tc.edit(u)
		if _, err := Parse(u); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: Parse error %v, want %q", tc.name, err, tc.want)
		}
	}
	if _, err := Parse(good()); err != nil {
		t.Fatal(err)
	}
}

// TestWriteCreatesThenPatches: the first write creates the object, later ones patch it
// (keys replaced, not merged), and invalid keys are never sent.
func TestWriteCreatesThenPatches(t *testing.T) {
	dc := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), map[schema.GroupVersionResource]string{GVR: ListKind})
	writeRead(t, dc)
}

func writeRead(t *testing.T, dc dynamic.Interface) {
	t.Helper()
	ctx := context.Background()
	read := func() Keys {
		t.Helper()
		u, err := dc.Resource(GVR).Namespace("secureoverlay").Get(ctx, "node-a", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		k, err := Parse(u)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	first := sample(t, 5)
	if err := Write(ctx, dc, "secureoverlay", "node-a", "uid-a", first); err != nil {
		t.Fatal(err)
	}
	if got := read(); !got.Equal(first) {
		t.Fatalf("after create: %+v", got)
	}
	second := sample(t, 5, 6)
	second.Incarnation.Epoch = "other-epoch"
	if err := Write(ctx, dc, "secureoverlay", "node-a", "uid-a", second); err != nil {
		t.Fatal(err)
	}
	if got := read(); !got.Equal(second) {
		t.Fatalf("after patch: %+v", got)
	}
	third := sample(t, 6)
	if err := Write(ctx, dc, "secureoverlay", "node-a", "uid-a", third); err != nil {
		t.Fatal(err)
	}
	if got := read(); !got.Equal(third) {
		t.Fatalf("after a patch with fewer keys: %+v", got)
	}
	if err := Write(ctx, dc, "secureoverlay", "node-a", "uid-a", sample(t, 2, 1)); err == nil {
		t.Fatal("invalid keys written")
	}
}

// TestCRDAgainstRealAPIServer: the manifest's CRD accepts what Write sends and refuses
// what Parse refuses (so a reader never meets most malformed objects).
func TestCRDAgainstRealAPIServer(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a real kube-apiserver; skipped with -short")
	}
	c := kube.Start(t)
	dc := dynamic.NewForConfigOrDie(c.AdminConfig())
	writeRead(t, dc)
	ctx := context.Background()
	r := dc.Resource(GVR).Namespace("secureoverlay")
	for _, tc := range []struct {
		name string
		edit func(u *unstructured.Unstructured)
	}{
		{"short key", func(u *unstructured.Unstructured) { u.Object["keys"].([]any)[0].(map[string]any)["x25519"] = "00ff" }},
		{"upper-case hex", func(u *unstructured.Unstructured) {
			u.Object["keys"].([]any)[0].(map[string]any)["x25519"] = strings.Repeat("AB", 32)
		}},
		{"generation zero", func(u *unstructured.Unstructured) {
			u.Object["keys"].([]any)[0].(map[string]any)["generation"] = int64(0)
		}},
		{"five keys", func(u *unstructured.Unstructured) { u.Object["keys"] = sample(t, 1, 2, 3, 4, 5).fields()["keys"] }},
		{"no epoch", func(u *unstructured.Unstructured) { delete(u.Object["incarnation"].(map[string]any), "epoch") }},
		{"no keys field", func(u *unstructured.Unstructured) { delete(u.Object, "keys") }},
		{"long capability", func(u *unstructured.Unstructured) {
			u.Object["capabilities"] = []any{strings.Repeat("c", maxCapability+1)}
		}},
		{"installed zero", func(u *unstructured.Unstructured) { u.Object["installed"] = []any{int64(0)} }},
		{"five installed", func(u *unstructured.Unstructured) {
			u.Object["installed"] = []any{int64(1), int64(2), int64(3), int64(4), int64(5)}
		}},
		{"lanes 127", func(u *unstructured.Unstructured) { u.Object["lanes"] = int64(127) }},
		{"lanes negative", func(u *unstructured.Unstructured) { u.Object["lanes"] = int64(-1) }},
	} {
		u := Object("secureoverlay", "bad-"+strings.ReplaceAll(tc.name, " ", "-"), "", sample(t, 3))
		tc.edit(u)
		if _, err := r.Create(ctx, u, metav1.CreateOptions{}); err == nil {
			t.Errorf("%s: the CRD accepted it", tc.name)
		} else if !strings.Contains(err.Error(), "Invalid value") && !strings.Contains(err.Error(), "Required value") && !strings.Contains(err.Error(), "Too many") {
			t.Errorf("%s: %v", tc.name, err)
		}
	}
}

// TestLargestObjectBounded: the largest NodeKeys the schema admits — every incarnation
// field at its limit, keys.MaxPublishedKeys keys, maxCapabilities capabilities at their
// limit — as the real API server stores and serves it (managed fields included), for a
// 40-character node name (issue 16's measure), stays within 2 KiB: protocol v2 adds a
// constant per node, whatever the cluster's size.
func TestLargestObjectBounded(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a real kube-apiserver; skipped with -short")
	}
	c := kube.Start(t)
	dc := dynamic.NewForConfigOrDie(c.AdminConfig())
	ctx := context.Background()
	k := Keys{Incarnation: Incarnation{BootID: strings.Repeat("b", maxField), UID: strings.Repeat("u", maxField), Epoch: strings.Repeat("e", maxField)}}
	for g := uint32(0); g < keys.MaxPublishedKeys; g++ {
		k.Keys = append(k.Keys, Key{Generation: 4294967291 + g, X25519: pub(t)})
	}
	for i := 0; i < maxCapabilities; i++ {
		k.Capabilities = append(k.Capabilities, fmt.Sprintf("%d%s", i, strings.Repeat("c", maxCapability-1)))
	}
	for g := uint32(0); g < maxInstalled; g++ {
		k.Installed = append(k.Installed, 4294967291+g)
	}
	k.Lanes = keys.MaxCPULanes
	name := "ip-10-0-12-34.eu-west-1.compute.internal"
	if len(name) != 40 {
		t.Fatalf("name has %d characters", len(name))
	}
	if err := Write(ctx, dc, "secureoverlay", name, "1d3b5f79-2c4e-4a6b-8d0f-2a4c6e8f0b13", k); err != nil {
		t.Fatal(err)
	}
	u, err := dc.Resource(GVR).Namespace("secureoverlay").Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := Parse(u); err != nil || !got.Equal(k) {
		t.Fatalf("Parse = %v; want the object written", err)
	}
	b, err := json.Marshal(u.Object)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("largest NodeKeys as served (managed fields included), 40-character name: %d bytes", len(b))
	if len(b) > 2048 {
		t.Errorf("largest NodeKeys is %d bytes as served, want ≤ 2048", len(b))
	}
}

// TestCacheAgainstRealAPIServer: the cache sees NodeKeys written, changed and deleted,
// keeps an object the CRD accepts but Parse refuses as its error, and counts changes.
func TestCacheAgainstRealAPIServer(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a real kube-apiserver; skipped with -short")
	}
	c := kube.Start(t)
	dc := dynamic.NewForConfigOrDie(c.AdminConfig())
	ctx := context.Background()
	changes := make(chan string, 16)
	kc := NewCache(dc, "secureoverlay", func(n string) { changes <- n })
	stop := make(chan struct{})
	defer close(stop)
	kc.Start(stop)
	wait := func(what string, f func() bool) {
		t.Helper()
		for deadline := time.Now().Add(30 * time.Second); !f(); time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
		}
	}
	wait("synced", kc.HasSynced)
	v0 := kc.Version()
	a := sample(t, 5)
	if err := Write(ctx, dc, "secureoverlay", "node-a", "", a); err != nil {
		t.Fatal(err)
	}
	wait("node-a", func() bool { k, ok, err := kc.Get("node-a"); return ok && err == nil && k.Equal(a) })
	if <-changes != "node-a" || kc.Version() == v0 {
		t.Fatal("no change seen")
	}
	// Keys out of order pass the CRD's schema (it cannot compare items) but not Parse.
	bad := Object("secureoverlay", "node-b", "", sample(t, 5))
	bad.Object["keys"] = sample(t, 6, 5).fields()["keys"]
	if _, err := dc.Resource(GVR).Namespace("secureoverlay").Create(ctx, bad, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	wait("node-b as an error", func() bool { _, ok, err := kc.Get("node-b"); return ok && err != nil })
	if err := dc.Resource(GVR).Namespace("secureoverlay").Delete(ctx, "node-a", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	wait("node-a gone", func() bool { _, ok, _ := kc.Get("node-a"); return !ok })
	if _, ok, _ := kc.Get("node-c"); ok {
		t.Fatal("node-c found")
	}
}
