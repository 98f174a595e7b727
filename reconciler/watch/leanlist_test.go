package watch

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	v3 "github.com/projectcalico/api/pkg/apis/projectcalico/v3"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// leanCases are IPAMBlocks as the API server sends them: busy blocks, one with addresses
// borrowed by other nodes, a released one (no affinity), a deleted one with v1's string
// "true", one whose allocations do not decode, one whose CIDR does not parse, one whose
// deleted is a number.
func leanCases(t *testing.T) []*unstructured.Unstructured {
	t.Helper()
	var out []*unstructured.Unstructured
	for i := range 3 {
		out = append(out, realBlock(i))
	}
	b := kube.NewIPAMBlock("10.9.0.0/26", "host:node-a")
	kube.Allocate(b, 0, "h0", "node-a", nil)
	kube.Allocate(b, 5, "h5", "node-b", map[string]string{"pod": "p5"})
	kube.Allocate(b, 63, "h63", "node-c", nil)
	out = append(out, calico(CalicoV1, b))
	r := kube.NewIPAMBlock("10.9.1.0/26", "")
	r.Spec.Affinity = nil
	kube.Allocate(r, 1, "h1", "node-b", nil)
	out = append(out, calico(CalicoV1, r))
	d := calico(CalicoV1, kube.NewIPAMBlock("10.9.2.0/26", "host:node-d"))
	if err := unstructured.SetNestedField(d.Object, "true", "spec", "deleted"); err != nil {
		t.Fatal(err)
	}
	out = append(out, d)
	bad := calico(CalicoV1, kube.NewIPAMBlock("10.9.3.0/26", "host:node-e"))
	if err := unstructured.SetNestedField(bad.Object, "not a list", "spec", "allocations"); err != nil {
		t.Fatal(err)
	}
	out = append(out, bad)
	cidr := calico(CalicoV1, kube.NewIPAMBlock("10.9.4.0/26", "host:node-f"))
	if err := unstructured.SetNestedField(cidr.Object, "10.9.4.0/99", "spec", "cidr"); err != nil {
		t.Fatal(err)
	}
	out = append(out, cidr)
	num := calico(CalicoV1, kube.NewIPAMBlock("10.9.5.0/26", "host:node-g"))
	if err := unstructured.SetNestedField(num.Object, int64(7), "spec", "deleted"); err != nil {
		t.Fatal(err)
	}
	out = append(out, num)
	for i, u := range out {
		u.SetResourceVersion(fmt.Sprint(100 + i))
	}
	return out
}

// sameParse compares a lean decode with the unstructured path's (calicoTransform) for one
// block: name, resourceVersion, parsed value, and whether it failed.
func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func sameParse(t *testing.T, u *unstructured.Unstructured, got parsedObject) {
	t.Helper()
	want, err := calicoTransform("ipamblocks")(u)
	if err != nil {
		t.Fatal(err)
	}
	w := want.(*parsedObject)
	if got.objectName != w.objectName || (got.Err == nil) != (w.Err == nil) || !reflect.DeepEqual(got.Value, w.Value) {
		t.Errorf("%s: lean %+v (err %v), unstructured %+v (err %v)", u.GetName(), got, got.Err, *w, w.Err)
	}
}

// TestLeanListMatchesUnstructuredParse: the lean list decoder gives, item by item, what
// the unstructured path gives (ParseIPAMBlock after a full decode), keeps the list's
// resourceVersion and continue token, caches undecodable blocks with their error instead
// of failing the list, and fails on a list that is not JSON.
func TestLeanListMatchesUnstructuredParse(t *testing.T) {
	cases := leanCases(t)
	items := make([]any, len(cases))
	for i, u := range cases {
		items[i] = u.Object
	}
	body, err := json.Marshal(map[string]any{"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlockList",
		"metadata": map[string]any{"resourceVersion": "777", "continue": "next-page"}, "items": items})
	if err != nil {
		t.Fatal(err)
	}
	list, err := decodeLeanList(strings.NewReader(string(body)))
	if err != nil {
		t.Fatal(err)
	}
	if list.ResourceVersion != "777" || list.Continue != "next-page" || len(list.Items) != len(cases) {
		t.Fatalf("list rv %q continue %q, %d items; want 777, next-page, %d", list.ResourceVersion, list.Continue, len(list.Items), len(cases))
	}
	for i, u := range cases {
		sameParse(t, u, list.Items[i])
	}
	// The borrowed addresses really were read (not just equal because both are empty).
	if b, ok := list.Items[3].Value.(desired.Block); !ok || len(b.Borrowed) != 2 {
		t.Errorf("block with two borrowed addresses parsed as %+v", list.Items[3].Value)
	}
	if list.Items[6].Err == nil || list.Items[7].Err == nil || list.Items[8].Err == nil {
		t.Errorf("undecodable allocations / bad CIDR / numeric deleted not reported: %v, %v, %v", list.Items[6].Err, list.Items[7].Err, list.Items[8].Err)
	}
	// A value of the wrong type before the metadata: the decoder reads on, so the block is
	// still cached, by name, with its error (and the items after it are read).
	l, err := decodeLeanList(strings.NewReader(`{"items":[{"spec":{"allocations":"x","cidr":"10.9.3.0/26"},"metadata":{"name":"early","resourceVersion":"3"}},` +
		`{"spec":{"deleted":[1],"cidr":"10.9.6.0/26"},"metadata":{"name":"odd"}},` + string(mustJSON(t, cases[0].Object)) + `]}`))
	if err != nil || len(l.Items) != 3 {
		t.Fatalf("list with undecodable specs: %+v, %v", l, err)
	}
	for i, name := range []string{"early", "odd"} {
		if it := l.Items[i]; it.Name != name || it.Err == nil || !strings.Contains(it.Err.Error(), name) {
			t.Errorf("item %d: %+v (err %v), want %q with its error", i, it, it.Err, name)
		}
	}
	if l.Items[0].ResourceVersion != "3" {
		t.Errorf("item 0's resourceVersion %q, want 3", l.Items[0].ResourceVersion)
	}
	sameParse(t, cases[0], l.Items[2])
	for _, bad := range []string{`[`, `{"items":{}}`, `{"items":[1]}`, `not json`} {
		if _, err := decodeLeanList(strings.NewReader(bad)); err == nil {
			t.Errorf("list %q decoded without an error", bad)
		}
	}
	if l, err := decodeLeanList(strings.NewReader(`{"metadata":{"resourceVersion":"5"},"items":null}`)); err != nil || len(l.Items) != 0 || l.ResourceVersion != "5" {
		t.Errorf("empty list: %+v, %v", l, err)
	}
}

// TestLeanWatchDecoder: watch events decode to parsed blocks (bookmarks keep their
// resourceVersion), an ERROR event to the Status the reflector turns into its error (410
// Expired: relist), an unknown event type to an error.
func TestLeanWatchDecoder(t *testing.T) {
	cases := leanCases(t)
	var stream strings.Builder
	ev := func(typ string, obj any) {
		b, err := json.Marshal(map[string]any{"type": typ, "object": obj})
		if err != nil {
			t.Fatal(err)
		}
		stream.Write(b)
		stream.WriteString("\n")
	}
	ev("ADDED", cases[3].Object)
	ev("MODIFIED", cases[0].Object)
	ev("DELETED", cases[6].Object)
	ev("BOOKMARK", map[string]any{"kind": "IPAMBlock", "apiVersion": "crd.projectcalico.org/v1", "metadata": map[string]any{"resourceVersion": "999"}})
	ev("ERROR", metav1.Status{TypeMeta: metav1.TypeMeta{Kind: "Status", APIVersion: "v1"}, Status: metav1.StatusFailure, Code: 410, Reason: metav1.StatusReasonExpired, Message: "too old resource version"})
	ev("SURPRISE", map[string]any{})
	d := &leanWatchDecoder{body: nopCloser{strings.NewReader(stream.String())}}
	d.dec = json.NewDecoder(d.body)
	var types []watch.EventType
	for i := 0; ; i++ {
		typ, obj, err := d.Decode()
		if err != nil {
			if i != 5 || !strings.Contains(err.Error(), "SURPRISE") {
				t.Fatalf("event %d: %v", i, err)
			}
			break
		}
		types = append(types, typ)
		switch i {
		case 0:
			sameParse(t, cases[3], *obj.(*parsedObject))
		case 1:
			sameParse(t, cases[0], *obj.(*parsedObject))
		case 2:
			sameParse(t, cases[6], *obj.(*parsedObject))
		case 3:
			if p := obj.(*parsedObject); p.ResourceVersion != "999" {
				t.Errorf("bookmark resourceVersion %q", p.ResourceVersion)
			}
		case 4:
			if err := apierrors.FromObject(obj); !apierrors.IsResourceExpired(err) {
				t.Errorf("error event gave %v, want a ResourceExpired error", err)
			}
		}
	}
	if want := []watch.EventType{watch.Added, watch.Modified, watch.Deleted, watch.Bookmark, watch.Error}; !slices.Equal(types, want) {
		t.Errorf("event types %v, want %v", types, want)
	}
}

type nopCloser struct{ *strings.Reader }

func (nopCloser) Close() error { return nil }

// TestLeanIPAMBlocksAgainstRealAPIServer: a Watcher given the REST config reads Calico's
// IPAMBlocks from a real API server through the lean path — the list (600 blocks), then a
// create, an update and a delete through the watch — and its blocks equal what the
// dynamic path's Watcher reads; with Calico's real CRDs of either group
// (crd.projectcalico.org/v1, and the native projectcalico.org/v3 of Calico 3.32).
func TestLeanIPAMBlocksAgainstRealAPIServer(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a real API server")
	}
	for _, api := range []kube.CalicoAPI{kube.CalicoV1, kube.CalicoV3} {
		t.Run(api.String(), func(t *testing.T) { leanAgainstRealAPIServer(t, api) })
	}
}

func leanAgainstRealAPIServer(t *testing.T, api kube.CalicoAPI) {
	gv := kube.CalicoV1GV
	if api == kube.CalicoV3 {
		gv = kube.CalicoV3GV
	}
	c := kube.Start(t)
	cfg := c.AdminConfig()
	kube.InstallCalicoCRDs(t, cfg, api)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cs := kubernetes.NewForConfigOrDie(cfg)
	dyn := dynamic.NewForConfigOrDie(cfg)
	if _, err := kube.CreateCalico(ctx, dyn, gv, kube.NewIPPool("default-ipv4-ippool", "10.0.0.0/8", v3.IPIPModeAlways)); err != nil {
		t.Fatal(err)
	}
	// 600 blocks: more than the reflector's first page (500).
	const n = 600
	if err := kube.Parallel(n, 16, func(i int) error {
		b := kube.NewIPAMBlock(fmt.Sprintf("10.%d.%d.0/26", 1+i/256, i%256), fmt.Sprintf("host:node-%d", i))
		if i%7 == 0 {
			kube.Allocate(b, 3, "h", fmt.Sprintf("node-%d", i+1), nil)
		}
		_, err := kube.CreateCalico(ctx, dyn, gv, b)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	lean := New(Config{Client: cs, Dynamic: dyn, REST: cfg, Self: "node-0", DiscoveryRetry: 100 * time.Millisecond})
	plain := New(Config{Client: cs, Dynamic: dyn, Self: "node-0", DiscoveryRetry: 100 * time.Millisecond})
	if lean.leanREST == nil {
		t.Fatal("Watcher with a REST config has no lean client")
	}
	for _, w := range []*Watcher{lean, plain} {
		go w.Run(ctx)
	}
	blocks := func(w *Watcher) []string {
		w.mu.Lock()
		set := w.cur
		w.mu.Unlock()
		if !set.synced() {
			return nil
		}
		var out []string
		for _, b := range set.read().blocks {
			out = append(out, fmt.Sprintf("%v %s deleted=%v borrowed=%v", b.CIDR, b.Affinity, b.Deleted, b.Borrowed))
		}
		slices.Sort(out)
		return out
	}
	// agree waits until both Watchers read want blocks, the same ones, and cond holds for
	// them.
	agree := func(what string, want int, cond func([]string) bool) {
		t.Helper()
		var l, p []string
		for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			l, p = blocks(lean), blocks(plain)
			if len(l) == want && slices.Equal(l, p) && cond(l) {
				t.Logf("%s: both Watchers read the same %d blocks", what, want)
				return
			}
		}
		t.Fatalf("%s: lean path read %d blocks, dynamic path %d, want %d, equal, and the changes seen", what, len(l), len(p), want)
	}
	agree("list", n, func([]string) bool { return true })
	lean.mu.Lock()
	leanInformers, read := len(lean.cur.lean), lean.cur.api.IPAMBlocks
	lean.mu.Unlock()
	if leanInformers != 1 || read != gv.WithResource("ipamblocks") {
		t.Fatalf("the lean Watcher has %d lean informers reading %v, want 1 reading %v", leanInformers, read, gv.WithResource("ipamblocks"))
	}
	// Watch: a new block with a borrowed address, one block changed to deleted, one gone.
	nb := kube.NewIPAMBlock("10.200.0.0/26", "host:node-x")
	kube.Allocate(nb, 9, "h9", "node-y", nil)
	if _, err := kube.CreateCalico(ctx, dyn, gv, nb); err != nil {
		t.Fatal(err)
	}
	gvr := gv.WithResource("ipamblocks")
	first := kube.BlockName("10.1.0.0/26")
	u, err := dyn.Resource(gvr).Get(ctx, first, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := unstructured.SetNestedField(u.Object, true, "spec", "deleted"); err != nil {
		t.Fatal(err)
	}
	if _, err := dyn.Resource(gvr).Update(ctx, u, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := dyn.Resource(gvr).Delete(ctx, kube.BlockName("10.1.1.0/26"), metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	agree("watch", n, func(bs []string) bool {
		var added, updated, deleted bool
		deleted = true
		for _, s := range bs {
			added = added || strings.HasPrefix(s, "10.200.0.0/26 host:node-x deleted=false borrowed=[{10.200.0.9 node-y}]")
			updated = updated || strings.HasPrefix(s, "10.1.0.0/26 host:node-0 deleted=true")
			deleted = deleted && !strings.HasPrefix(s, "10.1.1.0/26 ")
		}
		return added && updated && deleted
	})
}

// BenchmarkDecodeLeanList: a list of 2,000 busy blocks (realBlock: 41 pods each, as the
// API server sends them) decoded by the lean path, per list.
func BenchmarkDecodeLeanList(b *testing.B) {
	items := make([]any, 2000)
	for i := range items {
		items[i] = realBlock(i).Object
	}
	body, err := json.Marshal(map[string]any{"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlockList",
		"metadata": map[string]any{"resourceVersion": "777"}, "items": items})
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	for b.Loop() {
		l, err := decodeLeanList(bytes.NewReader(body))
		if err != nil || len(l.Items) != len(items) {
			b.Fatalf("%d items, %v", len(l.Items), err)
		}
	}
}
