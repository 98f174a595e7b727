package nodeview

import (
	"context"
	"encoding/json"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	dynamicfake "k8s.io/client-go/dynamic/fake"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/readiness"
)

func view(keys uint64, notIn, notOut []uint32) api.ReadinessView {
	return *readiness.EncodeView(readiness.View{Keys: keys, NotIn: notIn, NotOut: notOut})
}

func TestObjectRoundTrip(t *testing.T) {
	v := view(0xabcdef, []uint32{1, 5, 300}, []uint32{2})
	u := Object("ns", "node-1", "uid-1", v)
	if u.GetName() != "node-1" || u.GetNamespace() != "ns" || u.GetKind() != Kind {
		t.Fatalf("object %+v", u.Object)
	}
	if refs := u.GetOwnerReferences(); len(refs) != 1 || refs[0].Kind != "Node" || refs[0].Name != "node-1" || refs[0].UID != "uid-1" {
		t.Fatalf("owners %+v", refs)
	}
	if got, err := Parse(u); err != nil || got != v {
		t.Fatalf("Parse = %+v, %v; want %+v", got, err, v)
	}
	if refs := Object("ns", "n", "", v).GetOwnerReferences(); len(refs) != 0 {
		t.Fatalf("no uid, owners %+v", refs)
	}
}

func TestParseRejects(t *testing.T) {
	for _, c := range []struct {
		name string
		edit func(u *unstructured.Unstructured)
		want string
	}{
		{"no view", func(u *unstructured.Unstructured) { delete(u.Object, "view") }, "no view"},
		{"view not an object", func(u *unstructured.Unstructured) { u.Object["view"] = "x" }, "no view"},
		{"keys a number", func(u *unstructured.Unstructured) { u.Object["view"].(map[string]any)["keys"] = int64(3) }, "not a string"},
		{"notIn too long", func(u *unstructured.Unstructured) {
			u.Object["view"].(map[string]any)["notIn"] = strings.Repeat("A", maxField+1)
		}, "at most"},
	} {
		u := Object("ns", "n", "", view(1, nil, nil))
		c.edit(u)
		if _, err := Parse(u); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error containing %q", c.name, err, c.want)
		}
	}
}

// TestWriteCreatesThenPatches: the first write creates the object, later ones patch it,
// and a list that became empty is emptied (a merge patch leaves an omitted field as it was).
func TestWriteCreatesThenPatches(t *testing.T) {
	dc := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), map[schema.GroupVersionResource]string{GVR: ListKind})
	writeRead(t, dc)
}

func writeRead(t *testing.T, dc dynamic.Interface) {
	t.Helper()
	ctx := context.Background()
	for i, v := range []api.ReadinessView{
		view(0x1234, []uint32{1, 2, 3}, []uint32{1, 2, 3}),
		view(0x1234, []uint32{2}, nil),
		view(0xffffffffffff, nil, nil),
	} {
		if err := Write(ctx, dc, "secureoverlay", "node-a", "uid-a", v); err != nil {
			t.Fatal(err)
		}
		u, err := dc.Resource(GVR).Namespace("secureoverlay").Get(ctx, "node-a", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if got, err := Parse(u); err != nil || got != v {
			t.Fatalf("write %d: read back %+v, %v; want %+v", i, got, err, v)
		}
	}
}

// TestCRDAgainstRealAPIServer: the manifest's CRD takes what Write sends (a view listing
// 5,000 peers with 40-character names elsewhere) and refuses a malformed key digest.
func TestCRDAgainstRealAPIServer(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a real kube-apiserver; skipped with -short")
	}
	c := kube.Start(t)
	dc := dynamic.NewForConfigOrDie(c.AdminConfig())
	writeRead(t, dc)
	ctx := context.Background()
	var all []uint32
	for id := uint32(1); id <= 5000; id++ {
		all = append(all, id)
	}
	name := "ip-10-0-12-34.eu-west-1.compute.internal"
	big := view(7, all, all)
	if err := Write(ctx, dc, "secureoverlay", name, "1d3b5f79-2c4e-4a6b-8d0f-2a4c6e8f0b13", big); err != nil {
		t.Fatal(err)
	}
	u, err := dc.Resource(GVR).Namespace("secureoverlay").Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := Parse(u); err != nil || got != big {
		t.Fatalf("Parse: %v", err)
	}
	b, _ := json.Marshal(u.Object)
	t.Logf("a NodeView listing 5,000 peers both ways: %d bytes", len(b))
	bad := Object("secureoverlay", "bad", "", view(1, nil, nil))
	bad.Object["view"].(map[string]any)["keys"] = "NOTHEX0000000000"
	if _, err := dc.Resource(GVR).Namespace("secureoverlay").Create(ctx, bad, metav1.CreateOptions{}); err == nil || !strings.Contains(err.Error(), "Invalid value") {
		t.Errorf("a malformed key digest: %v, want refused by the schema", err)
	}
}
