package watch

import (
	"context"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	v3 "github.com/projectcalico/api/pkg/apis/projectcalico/v3"
	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/internal/testkinds"
	"k8s.io/client-go/tools/cache"
	"maps"
	"net/netip"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	fakediscovery "k8s.io/client-go/discovery/fake"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

func resources(gv string, names ...string) *metav1.APIResourceList {
	l := &metav1.APIResourceList{GroupVersion: gv}
	for _, n := range names {
		l.APIResources = append(l.APIResources, metav1.APIResource{Name: n})
	}
	return l
}

func TestDiscoverCalico(t *testing.T) {
	all := []string{"ipamblocks", "blockaffinities", "ippools", "bgppeers"}
	for _, tc := range []struct {
		name  string
		lists []*metav1.APIResourceList
		want  string
		err   error
	}{
		{"v1 CRDs", []*metav1.APIResourceList{resources("crd.projectcalico.org/v1", all...)}, "crd.projectcalico.org/v1", nil},
		{"v3 CRDs only", []*metav1.APIResourceList{resources("projectcalico.org/v3", all...)}, "projectcalico.org/v3", nil},
		{"aggregated v3 without ipamblocks and v1 CRDs", []*metav1.APIResourceList{
			resources("projectcalico.org/v3", "ippools", "bgppeers", "blockaffinities"), resources("crd.projectcalico.org/v1", all...)}, "crd.projectcalico.org/v1", nil},
		{"neither", nil, "", ErrNoCalico},
		{"incomplete", []*metav1.APIResourceList{resources("crd.projectcalico.org/v1", "ippools")}, "", ErrNoCalico},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cs := fake.NewClientset()
			cs.Discovery().(*fakediscovery.FakeDiscovery).Resources = tc.lists
			got, err := DiscoverCalico(cs.Discovery())
			if !errors.Is(err, tc.err) || got.GroupVersion != tc.want {
				t.Fatalf("got %q, %v; want %q, %v", got.GroupVersion, err, tc.want, tc.err)
			}
			if err == nil && (got.IPAMBlocks.Resource != "ipamblocks" || got.BGPPeers.Resource != "bgppeers") {
				t.Errorf("resources = %+v", got)
			}
		})
	}
	// Optional kinds may be missing.
	cs := fake.NewClientset()
	cs.Discovery().(*fakediscovery.FakeDiscovery).Resources = []*metav1.APIResourceList{resources("crd.projectcalico.org/v1", "ipamblocks", "ippools")}
	got, err := DiscoverCalico(cs.Discovery())
	if err != nil || got.BGPPeers.Resource != "" || got.BlockAffinities.Resource != "" {
		t.Errorf("optional kinds: %+v %v", got, err)
	}
}

var (
	gvBlocks = schema.GroupVersionResource{Group: "crd.projectcalico.org", Version: "v1", Resource: "ipamblocks"}
	gvAffs   = schema.GroupVersionResource{Group: "crd.projectcalico.org", Version: "v1", Resource: "blockaffinities"}
	gvPools  = schema.GroupVersionResource{Group: "crd.projectcalico.org", Version: "v1", Resource: "ippools"}
	gvPeers  = schema.GroupVersionResource{Group: "crd.projectcalico.org", Version: "v1", Resource: "bgppeers"}
)

// calico is a typed Calico object as group-version gv serves it (kube.CalicoObject: the
// JSON a client sends to Calico's real CRDs, v1's string-typed fields included), for the
// fake dynamic client.
func calico(gv schema.GroupVersion, obj runtime.Object) *unstructured.Unstructured {
	u, _, err := kube.CalicoObject(gv, obj)
	if err != nil {
		panic(err)
	}
	return u
}

// ipamBlock is an empty block of cidr named name (kube.NewIPAMBlock), changed by edit.
func ipamBlock(name, cidr, affinity string, edit func(*v3.IPAMBlockSpec)) *v3.IPAMBlock {
	b := kube.NewIPAMBlock(cidr, affinity)
	b.Name = name
	if edit != nil {
		edit(&b.Spec)
	}
	return b
}

// ipPool is kube.NewIPPool changed by edit.
func ipPool(name, cidr string, ipip v3.IPIPMode, edit func(*v3.IPPoolSpec)) *v3.IPPool {
	p := kube.NewIPPool(name, cidr, ipip)
	if edit != nil {
		edit(&p.Spec)
	}
	return p
}

func node(name, addr, boot string, ann map[string]string) *corev1.Node {
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: map[string]string{api.CalicoIPv4AddressAnnotation: addr}}}
	for k, v := range ann {
		n.Annotations[k] = v
	}
	n.Status.NodeInfo.BootID = boot
	n.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue}}
	return n
}

type events struct {
	mu sync.Mutex
	n  map[string]int
}

func (e *events) add(k string) { e.mu.Lock(); e.n[k]++; e.mu.Unlock() }
func (e *events) get(k string) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.n[k]
}

func waitFor(t *testing.T, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestWatcherWithFakeClients(t *testing.T) {
	ring := testRing(t, api.ModeAccept, 8, "a", "b")
	data, err := keys.Marshal(ring)
	if err != nil {
		t.Fatal(err)
	}
	secret := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: api.Namespace, Name: api.SecretName, ResourceVersion: "1"},
		Data: map[string][]byte{api.SecretDataKey: data}}
	cs := fake.NewClientset(node("a", "198.18.0.1/24", "boot-a", nil), node("b", "198.18.0.2", "boot-b", nil), secret)
	cs.Discovery().(*fakediscovery.FakeDiscovery).Resources = []*metav1.APIResourceList{
		resources("crd.projectcalico.org/v1", "ipamblocks", "blockaffinities", "ippools", "bgppeers")}
	dc := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), testkinds.With(map[schema.GroupVersionResource]string{gvBlocks: "IPAMBlockList", gvAffs: "BlockAffinityList", gvPools: "IPPoolList", gvPeers: "BGPPeerList"}),
		calico(CalicoV1, ipamBlock("blk-a", "10.65.1.0/26", "host:a", nil)),
		calico(CalicoV1, ipamBlock("blk-gone", "10.65.9.0/26", "host:b", func(s *v3.IPAMBlockSpec) { s.Deleted = true })),
		calico(CalicoV1, &v3.IPAMBlock{ObjectMeta: metav1.ObjectMeta{Name: "blk-bad"}, Spec: v3.IPAMBlockSpec{CIDR: "not-a-cidr"}}),
		calico(CalicoV1, kube.NewBlockAffinity("b", "10.65.2.0/26")),
		calico(CalicoV1, ipPool("default", "10.65.0.0/16", v3.IPIPModeAlways, nil)),
		calico(CalicoV1, ipPool("off", "10.66.0.0/16", v3.IPIPModeAlways, func(s *v3.IPPoolSpec) { s.Disabled = true })),
		calico(CalicoV1, kube.NewBGPPeer("tor", "198.18.1.1")),
	)
	ev := &events{n: map[string]int{}}
	w := New(Config{Client: cs, Dynamic: dc, OnChange: ev.add, DiscoveryRetry: 10 * time.Millisecond})
	if w.HasSynced() {
		t.Fatal("synced before Run")
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go w.Run(ctx)
	waitFor(t, "caches to sync", w.HasSynced)
	if w.Err() != nil {
		t.Fatal(w.Err())
	}
	s := w.Snapshot()
	if len(s.Nodes) != 2 || s.Nodes[0].Name != "a" || s.Nodes[1].IPv4Address != "198.18.0.2" || !s.Nodes[0].Ready || s.Nodes[0].Incarnation != "boot-a" {
		t.Errorf("nodes = %+v", s.Nodes)
	}
	if s.Ring == nil || s.RingErr != nil || s.Ring.Mode != api.ModeAccept || s.Ring.NodeID("b") != 2 {
		t.Errorf("ring = %v, %v", s.Ring, s.RingErr)
	}
	if len(s.Blocks) != 2 || s.Blocks[0].CIDR != netip.MustParsePrefix("10.65.1.0/26") || !s.Blocks[1].Deleted {
		t.Errorf("blocks = %+v", s.Blocks)
	}
	if len(s.Pools) != 1 || s.Pools[0].Name != "default" {
		t.Errorf("pools (disabled ones dropped) = %+v", s.Pools)
	}
	if len(s.BGPPeers) != 1 || s.BGPPeers[0].PeerIP != netip.MustParseAddr("198.18.1.1") {
		t.Errorf("bgp peers = %+v", s.BGPPeers)
	}
	if len(s.Skipped) != 1 || s.Skipped[0].Object != "ipamblock/blk-bad" {
		t.Errorf("skipped = %+v", s.Skipped)
	}
	if s.Calico.GroupVersion != "crd.projectcalico.org/v1" {
		t.Errorf("calico = %+v", s.Calico)
	}

	// A kubelet-style status heartbeat does not trigger a sync; a report change does.
	before := ev.get("node")
	n, _ := cs.CoreV1().Nodes().Get(ctx, "b", metav1.GetOptions{})
	n.Status.Conditions[0].LastHeartbeatTime = metav1.Now()
	n.Labels = map[string]string{"x": "y"}
	if _, err := cs.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	n, _ = cs.CoreV1().Nodes().Get(ctx, "b", metav1.GetOptions{})
	n.Annotations[api.ReportAnnotation] = `{"mode":"accept","incarnation":"boot-b","peersEncrypted":0,"peersExpected":1,"inboundFrom":{"a":"` + IncarnationTag("boot-a") + `"}}`
	if _, err := cs.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "report update seen", func() bool { sn := w.Snapshot(); return sn.Node("b").Report != nil })
	// The informer updates its store before it calls the handlers, so the snapshot can
	// show the report a moment before OnChange has counted it. Handlers run in event
	// order: once the report's event is counted, a heartbeat event would have been too.
	waitFor(t, "report event counted", func() bool { return ev.get("node") > before })
	if got := ev.get("node") - before; got != 1 {
		t.Errorf("node events after a heartbeat and a report change: %d, want 1", got)
	}

	// A new block and a ring update reach the snapshot.
	if _, err := dc.Resource(gvBlocks).Create(ctx, calico(CalicoV1, ipamBlock("blk-b", "10.65.2.0/26", "host:b", nil)), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "new block", func() bool { return len(w.Snapshot().Blocks) == 3 })
	waitFor(t, "ipamblocks event", func() bool { return ev.get("ipamblocks") > 0 }) // counted just after the store update
	// An invalid ring is refused. Its error, which the agent logs and publishes in the
	// report on its Node (readable far more widely than the Secret), names the field and
	// never its content: here key material pasted as a field name, then as the mode.
	planted := make([]byte, 32)
	for i := range planted {
		planted[i] = byte(i*29 + 101)
	}
	prev := ""
	for i, c := range []struct{ data, want string }{
		{`{"schemaVersion":1,"` + base64.StdEncoding.EncodeToString(planted) + `":1}`, "unknown field at byte offset 19 (at the top level)"},
		{`{"schemaVersion":1,"mode":"` + hex.EncodeToString(planted) + `"}`, "mode is not one of off, accept, encrypt, enforce"},
	} {
		secret.Data[api.SecretDataKey] = []byte(c.data)
		secret.ResourceVersion = fmt.Sprint(2 + i)
		if _, err := cs.CoreV1().Secrets(api.Namespace).Update(ctx, secret, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "invalid ring", func() bool { err := w.Snapshot().RingErr; return err != nil && err.Error() != prev })
		s := w.Snapshot()
		prev = s.RingErr.Error()
		_, ierr := Inputs("a", s, desired.Config{}, "e")
		for _, text := range []string{fmt.Sprintf("%v %+v %#v", s.RingErr, s.RingErr, s.RingErr), fmt.Sprint(ierr)} {
			for _, enc := range []string{hex.EncodeToString(planted), base64.StdEncoding.EncodeToString(planted)} {
				if strings.Contains(text, enc[:16]) || strings.Contains(text, enc[16:32]) {
					t.Fatalf("case %d: the ring error reveals the key material pasted into the Secret", i)
				}
			}
		}
		if !errors.Is(s.RingErr, keys.ErrInvalid) || s.Ring != nil || !strings.Contains(s.RingErr.Error(), c.want) {
			t.Errorf("case %d: invalid ring: %v, want an ErrInvalid naming %q", i, s.RingErr, c.want)
		}
	}
	if err := cs.CoreV1().Secrets(api.Namespace).Delete(ctx, api.SecretName, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "secret gone", func() bool { return errors.Is(w.Snapshot().RingErr, ErrNoSecret) })
}

func TestWatcherWithoutCalicoRetriesDiscovery(t *testing.T) {
	cs := fake.NewClientset(node("a", "198.18.0.1/24", "boot-a", nil))
	fd := cs.Discovery().(*fakediscovery.FakeDiscovery)
	dc := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), testkinds.With(map[schema.GroupVersionResource]string{CalicoV3.WithResource("ipamblocks"): "IPAMBlockList", CalicoV3.WithResource("ippools"): "IPPoolList"}),
		calico(CalicoV3, ipPool("v3pool", "10.70.0.0/16", v3.IPIPModeCrossSubnet, nil)))
	ev := &events{n: map[string]int{}}
	w := New(Config{Client: cs, Dynamic: dc, OnChange: ev.add, DiscoveryRetry: 20 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go w.Run(ctx)
	waitFor(t, "discovery error", func() bool { return ev.get("discovery") > 0 })
	if w.HasSynced() || !errors.Is(w.Err(), ErrNoCalico) {
		t.Fatalf("synced=%v err=%v", w.HasSynced(), w.Err())
	}
	waitFor(t, "node cache", w.NodeCacheSynced)
	fd.Lock()
	fd.Resources = []*metav1.APIResourceList{resources("projectcalico.org/v3", "ipamblocks", "ippools")}
	fd.Unlock()
	// Calico appears later (projectcalico.org/v3 CRDs, without the optional kinds).
	waitFor(t, "caches to sync after discovery", w.HasSynced)
	s := w.Snapshot()
	if s.Calico.GroupVersion != "projectcalico.org/v3" || len(s.Pools) != 1 || s.Pools[0].IPIPMode != "CrossSubnet" {
		t.Errorf("after discovery: %+v pools %+v", s.Calico, s.Pools)
	}
}

func TestRelevantChange(t *testing.T) {
	rep := func(mut func(r *Report)) string {
		r := Report{NodeReport: api.NodeReport{Mode: api.ModeEncrypt, Incarnation: "boot-b", Generations: []uint32{1},
			LastSync: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)},
			InboundFrom: map[string]string{"a": "11111111", "c": "22222222"}, EncryptingTo: map[string]string{"a": "11111111"}}
		if mut != nil {
			mut(&r)
		}
		b, _ := json.Marshal(r)
		return string(b)
	}
	base := node("b", "198.18.0.2/24", "boot-b", map[string]string{api.ReportAnnotation: rep(nil)})
	for _, tc := range []struct {
		name string
		mut  func(n *corev1.Node)
		self string
		want bool
	}{
		{"nothing", func(*corev1.Node) {}, "a", false},
		{"kubelet heartbeat", func(n *corev1.Node) { n.Status.Conditions[0].LastHeartbeatTime = metav1.Now() }, "a", false},
		{"label", func(n *corev1.Node) { n.Labels = map[string]string{"x": "y"} }, "a", false},
		{"address", func(n *corev1.Node) { n.Annotations[api.CalicoIPv4AddressAnnotation] = "198.18.0.9/24" }, "a", true},
		{"reboot", func(n *corev1.Node) { n.Status.NodeInfo.BootID = "boot-b2" }, "a", true},
		{"not ready", func(n *corev1.Node) { n.Status.Conditions[0].Status = corev1.ConditionFalse }, "a", true},
		{"report heartbeat", func(n *corev1.Node) {
			n.Annotations[api.ReportAnnotation] = rep(func(r *Report) { r.LastSync = r.LastSync.Add(time.Minute) })
		}, "a", false},
		{"report fact about another peer", func(n *corev1.Node) {
			n.Annotations[api.ReportAnnotation] = rep(func(r *Report) { r.InboundFrom["c"] = "33333333" })
		}, "a", false},
		{"report fact about self", func(n *corev1.Node) {
			n.Annotations[api.ReportAnnotation] = rep(func(r *Report) { delete(r.InboundFrom, "a") })
		}, "a", true},
		{"report encrypting to self", func(n *corev1.Node) {
			n.Annotations[api.ReportAnnotation] = rep(func(r *Report) { r.EncryptingTo = nil })
		}, "a", true},
		{"report mode", func(n *corev1.Node) {
			n.Annotations[api.ReportAnnotation] = rep(func(r *Report) { r.Mode = api.ModeEnforce })
		}, "a", true},
		{"report generations", func(n *corev1.Node) {
			n.Annotations[api.ReportAnnotation] = rep(func(r *Report) { r.Generations = []uint32{1, 2} })
		}, "a", true},
		{"report becomes garbage", func(n *corev1.Node) { n.Annotations[api.ReportAnnotation] = "{" }, "a", true},
		{"own report", func(n *corev1.Node) {
			n.Annotations[api.ReportAnnotation] = rep(func(r *Report) { r.Mode = api.ModeEnforce })
		}, "b", false},
	} {
		n := base.DeepCopy()
		tc.mut(n)
		if got := relevantChange(CacheNode(base, tc.self), CacheNode(n, tc.self), tc.self); got != tc.want {
			t.Errorf("%s: relevant = %v, want %v", tc.name, got, tc.want)
		}
	}
}

// The agent's cache keeps of a peer's report only what concerns its own node, its own
// report whole, and no managed fields or image lists.
func TestNodeCacheTrimsPeerReports(t *testing.T) {
	claims := func(n int) map[string]string {
		m := map[string]string{}
		for i := range n {
			m[fmt.Sprintf("node-%04d", i)] = fmt.Sprintf("%08x", i)
		}
		m["a"] = "0000aaaa"
		return m
	}
	rep := func(name string) string {
		b, err := json.Marshal(Report{NodeReport: api.NodeReport{Mode: api.ModeEnforce, Incarnation: "boot-" + name, Generations: []uint32{5}},
			InboundFrom: claims(1000), EncryptingTo: claims(1000)})
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	a := node("a", "198.18.0.1", "boot-a", map[string]string{api.ReportAnnotation: rep("a")})
	b := node("b", "198.18.0.2", "boot-b", map[string]string{api.ReportAnnotation: rep("b")})
	b.ManagedFields = []metav1.ManagedFieldsEntry{{Manager: "kubelet"}}
	b.Status.Images = []corev1.ContainerImage{{Names: []string{"registry.example/image:1"}, SizeBytes: 1}}
	cs := fake.NewClientset(a, b)
	dc := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), testkinds.With(nil))
	w := New(Config{Client: cs, Dynamic: dc, Self: "a", DiscoveryRetry: time.Hour})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go w.Run(ctx)
	waitFor(t, "nodes cached", func() bool { return w.nodes.HasSynced() && len(w.Snapshot().Nodes) == 2 })
	s := w.Snapshot()
	pb := s.Node("b")
	if pb.Report == nil || !maps.Equal(pb.Report.InboundFrom, map[string]string{"a": "0000aaaa"}) ||
		!maps.Equal(pb.Report.EncryptingTo, map[string]string{"a": "0000aaaa"}) ||
		pb.Report.Mode != api.ModeEnforce || pb.Report.Incarnation != "boot-b" || len(pb.Report.Generations) != 1 {
		t.Errorf("peer b's cached report = %+v", pb.Report)
	}
	if len(pb.RawReport) > 300 {
		t.Errorf("peer b's cached report is %d bytes", len(pb.RawReport))
	}
	if self := s.Node("a"); self.Report == nil || len(self.Report.InboundFrom) != 1001 {
		t.Errorf("own report not cached whole: %d claims", len(self.Report.InboundFrom))
	}
	obj, exists, err := w.nodes.GetStore().GetByKey("b")
	if err != nil || !exists {
		t.Fatal(exists, err)
	}
	// The cache holds the parsed form, not the Node (no managed fields, images, labels).
	if n, ok := obj.(*cachedNode); !ok || n.Info.Incarnation != "boot-b" || n.Name != "b" || n.Namespace != "" {
		t.Errorf("cached node b: %T %+v", obj, obj)
	}
	if got := w.Node("b"); got == nil || !reflect.DeepEqual(*got, *pb) {
		t.Errorf("Node(b) = %+v, want %+v", got, pb)
	}
	if got := w.Node("nope"); got != nil {
		t.Errorf("Node(nope) = %+v", got)
	}
	// The objects the client holds are not touched.
	if orig, _ := cs.CoreV1().Nodes().Get(ctx, "b", metav1.GetOptions{}); len(orig.Annotations[api.ReportAnnotation]) < 10000 {
		t.Error("the transform changed the API's copy")
	}
	tomb := cache.DeletedFinalStateUnknown{Key: "b"}
	if got, err := NodeTransform("a")(tomb); err != nil || got != any(tomb) {
		t.Errorf("tombstone: %v %v", got, err)
	}
}

func TestParseAPIGroup(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want schema.GroupVersion
		ok   bool
	}{
		{"", schema.GroupVersion{}, true},
		{"projectcalico.org/v3", CalicoV3, true},
		{"ProjectCalico.org/V3", CalicoV3, true},
		{"crd.projectcalico.org/v1", CalicoV1, true},
		{" crd.projectcalico.org/v1 ", CalicoV1, true},
		{"projectcalico.org", schema.GroupVersion{}, false}, // Calico would read this as v1
		{"v3", schema.GroupVersion{}, false},
	} {
		got, err := ParseAPIGroup(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseAPIGroup(%q) = %v, %v; want %v, ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
		if err != nil && (!strings.Contains(err.Error(), "projectcalico.org/v3") || !strings.Contains(err.Error(), EnvCalicoAPIGroup)) {
			t.Errorf("error %q does not name the setting and its values", err)
		}
	}
}

// TestDecideCalico is Calico's own choice of group (libcalico-go UsingV3CRDs, the
// operator's UseV3CRDS): explicit setting, then a converged migration, then discovery.
func TestDecideCalico(t *testing.T) {
	mig := schema.GroupVersion{Group: MigrationGroup, Version: "v1beta1"}
	phase := func(p string) []Migration { return []Migration{{Name: "v1-to-v3", Phase: p}} }
	for _, tc := range []struct {
		name     string
		explicit schema.GroupVersion
		served   Served
		migs     []Migration
		migErr   error
		saw      bool
		want     schema.GroupVersion
		frozen   bool
		err      string
	}{
		{"v1 only", schema.GroupVersion{}, Served{V1: true}, nil, nil, false, CalicoV1, false, ""},
		{"v3 only", schema.GroupVersion{}, Served{V3: true}, nil, nil, false, CalicoV3, false, ""},
		{"both, no migration: v1 (backs the aggregated v3)", schema.GroupVersion{}, Served{V1: true, V3: true}, nil, nil, false, CalicoV1, false, ""},
		{"both, migration pending", schema.GroupVersion{}, Served{V1: true, V3: true, Migration: mig}, phase(""), nil, false, CalicoV1, false, ""},
		{"both, migrating (v1 locked, v3 partial)", schema.GroupVersion{}, Served{V1: true, V3: true, Migration: mig}, phase("Migrating"), nil, false, CalicoV1, false, ""},
		{"both, waiting for conflicts", schema.GroupVersion{}, Served{V1: true, V3: true, Migration: mig}, phase("WaitingForConflictResolution"), nil, false, CalicoV1, false, ""},
		{"both, converged: v3, v1 frozen", schema.GroupVersion{}, Served{V1: true, V3: true, Migration: mig}, phase("Converged"), nil, false, CalicoV3, true, ""},
		{"both, complete: v3, v1 frozen", schema.GroupVersion{}, Served{V1: true, V3: true, Migration: mig}, phase("Complete"), nil, false, CalicoV3, true, ""},
		{"v1 removed after the migration", schema.GroupVersion{}, Served{V3: true, Migration: mig}, phase("Complete"), nil, false, CalicoV3, false, ""},
		{"both, failed migration", schema.GroupVersion{}, Served{V1: true, V3: true, Migration: mig}, phase("Failed"), nil, false, CalicoV1, false, ""},
		{"both, migrations unreadable: refuse", schema.GroupVersion{}, Served{V1: true, V3: true, Migration: mig}, nil, errors.New("forbidden"), false, schema.GroupVersion{}, false, "cannot tell which one Calico uses"},
		{"explicit v3 beats discovery", CalicoV3, Served{V1: true, V3: true}, nil, nil, false, CalicoV3, false, ""},
		{"explicit v1 beats a converged migration", CalicoV1, Served{V1: true, V3: true, Migration: mig}, phase("Converged"), nil, false, CalicoV1, false, ""},
		{"explicit group not served", CalicoV3, Served{V1: true}, nil, nil, false, CalicoV3, false, "is not served"},
		{"converged but v3 not served", schema.GroupVersion{}, Served{V1: true, Migration: mig}, phase("Converged"), nil, false, CalicoV3, false, "not served"},
		{"neither", schema.GroupVersion{}, Served{}, nil, nil, false, schema.GroupVersion{}, false, "neither"},
		{"migration object gone, v1 still served: stays on v3 once converged", schema.GroupVersion{}, Served{V1: true, V3: true}, nil, nil, true, CalicoV3, true, ""},
		{"... but not without having seen it converge", schema.GroupVersion{}, Served{V1: true, V3: true}, nil, nil, false, CalicoV1, false, ""},
		{"... and never when v3 is gone", schema.GroupVersion{}, Served{V1: true}, nil, nil, true, CalicoV1, false, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, err := DecideCalico(tc.explicit, tc.served, tc.migs, tc.migErr, tc.saw)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil || d.GV != tc.want || d.FrozenV1 != tc.frozen || d.Reason == "" {
				t.Fatalf("got %+v, %v; want %v frozen=%v", d, err, tc.want, tc.frozen)
			}
		})
	}
}

// TestWatcherSwitchesGroupWithoutGap: a cluster mid-migration (both groups served,
// DatastoreMigration Migrating) is read from v1; when the migration converges the watcher
// switches to v3. Until every v3 informer has synced, the snapshot keeps v1's last data —
// even when the v1 copy is emptied meanwhile (its CRDs deleted) — and the watcher stays
// synced; then v3's data is served.
func TestWatcherSwitchesGroupWithoutGap(t *testing.T) {
	cs := fake.NewClientset(node("a", "198.18.0.1/24", "boot-a", nil))
	fd := cs.Discovery().(*fakediscovery.FakeDiscovery)
	migGV := schema.GroupVersion{Group: MigrationGroup, Version: "v1"}
	fd.Resources = []*metav1.APIResourceList{
		resources("crd.projectcalico.org/v1", "ipamblocks", "ippools"),
		resources("projectcalico.org/v3", "ipamblocks", "ippools"),
		resources(migGV.String(), "datastoremigrations"),
	}
	migration := &unstructured.Unstructured{Object: map[string]any{"apiVersion": migGV.String(), "kind": "DatastoreMigration",
		"metadata": map[string]any{"name": "v1-to-v3"}, "spec": map[string]any{"type": "V1ToV3"}, "status": map[string]any{"phase": "Migrating"}}}
	dc := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), testkinds.With(map[schema.GroupVersionResource]string{gvBlocks: "IPAMBlockList", gvPools: "IPPoolList",
		CalicoV3.WithResource("ipamblocks"): "IPAMBlockList", CalicoV3.WithResource("ippools"): "IPPoolList",
		migGV.WithResource("datastoremigrations"): "DatastoreMigrationList"}),
		calico(CalicoV1, ipamBlock("old", "10.65.1.0/26", "host:a", nil)),
		calico(CalicoV1, ipPool("p", "10.65.0.0/16", v3.IPIPModeAlways, nil)),
		calico(CalicoV3, ipamBlock("old", "10.65.1.0/26", "host:a", nil)),
		calico(CalicoV3, ipamBlock("new", "10.65.2.0/26", "host:a", nil)), // allocated in v3 after the copy
		calico(CalicoV3, ipPool("p", "10.65.0.0/16", v3.IPIPModeAlways, nil)),
		migration,
	)
	// v3 IPAMBlocks cannot be listed until released: the v3 informers do not sync.
	var released sync.Once
	release := make(chan struct{})
	dc.PrependReactor("list", "ipamblocks", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if a.GetResource().Group == CalicoV3.Group {
			select {
			case <-release:
			default:
				return true, nil, errors.New("not yet")
			}
		}
		return false, nil, nil
	})
	ev := &events{n: map[string]int{}}
	w := New(Config{Client: cs, Dynamic: dc, OnChange: ev.add, DiscoveryRetry: 20 * time.Millisecond, Recheck: time.Hour})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go w.Run(ctx)
	waitFor(t, "caches to sync", w.HasSynced)
	s := w.Snapshot()
	if s.Calico.GroupVersion != CalicoV1.String() || len(s.Blocks) != 1 || !strings.Contains(s.Calico.Decision.Reason, "Migrating") {
		t.Fatalf("during the migration: %+v blocks %v", s.Calico, s.Blocks)
	}

	// The migration converges: Calico now uses v3 and v1 is frozen.
	if err := unstructured.SetNestedField(migration.Object, "Converged", "status", "phase"); err != nil {
		t.Fatal(err)
	}
	if _, err := dc.Resource(migGV.WithResource("datastoremigrations")).Update(ctx, migration, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "switch started", func() bool { return w.Snapshot().CalicoSwitching == CalicoV3.String() })
	// v1's copy disappears meanwhile: the frozen data stays.
	if err := dc.Resource(gvBlocks).Delete(ctx, "old", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	s = w.Snapshot()
	if !w.HasSynced() || len(s.Blocks) != 1 || s.Blocks[0].CIDR != netip.MustParsePrefix("10.65.1.0/26") || len(s.Pools) != 1 {
		t.Fatalf("while v3 syncs: synced=%v blocks %v pools %v; want v1's last data", w.HasSynced(), s.Blocks, s.Pools)
	}
	before := ev.get("discovery")
	released.Do(func() { close(release) })
	waitFor(t, "v3 served", func() bool { return w.Snapshot().Calico.GroupVersion == CalicoV3.String() })
	s = w.Snapshot()
	if s.CalicoSwitching != "" || len(s.Blocks) != 2 || !s.Calico.Decision.FrozenV1 || !w.HasSynced() {
		t.Fatalf("after the switch: %+v switching %q blocks %v", s.Calico, s.CalicoSwitching, s.Blocks)
	}
	waitFor(t, "an event when the switch completed", func() bool { return ev.get("discovery") > before })
}

func TestCacheNode(t *testing.T) {
	rep := `{"mode":"enforce","incarnation":"boot-b","uid":"u-b","epoch":"e","generations":[3],` +
		`"inboundFrom":{"a":"0000aaaa","c":"0000cccc"},"encryptingTo":{"c":"0000cccc"},"future":1}`
	trimmed := `{"epoch":"e","future":1,"generations":[3],"inboundFrom":{"a":"0000aaaa"},"incarnation":"boot-b","mode":"enforce","uid":"u-b"}`
	b := node("b", "198.18.0.2/24", "boot-b", map[string]string{api.ReportAnnotation: rep, api.CalicoIPIPTunnelAnnotation: "10.0.0.1"})
	b.UID = "u-b"
	b.Labels = map[string]string{"x": "y"}
	b.ManagedFields = []metav1.ManagedFieldsEntry{{Manager: "kubelet"}}
	garbage := node("g", "198.18.0.3/24", "boot-g", map[string]string{api.ReportAnnotation: "{"})
	notReady := node("n", "198.18.0.4", "", nil)
	notReady.Status.Conditions[0].Status = corev1.ConditionUnknown
	want := func(raw string, r *Report, rerr string) NodeInfo {
		return NodeInfo{Name: "b", IPv4Address: "198.18.0.2/24", TunnelAddr: "10.0.0.1", Incarnation: "boot-b", UID: "u-b", Ready: true,
			RawReport: raw, Report: r, ReportErr: rerr, AnnotationReport: true, FromAnnotation: true}
	}
	whole, _ := ParseReport(rep)
	peer, _ := ParseReport(trimmed)
	for _, tc := range []struct {
		name string
		n    *corev1.Node
		self string
		want NodeInfo
	}{
		{"peer: only the claims about self", b, "a", want(trimmed, peer, "")},
		{"peer claiming nothing about self", b, "z", want(`{"epoch":"e","future":1,"generations":[3],"incarnation":"boot-b","mode":"enforce","uid":"u-b"}`,
			&Report{NodeReport: api.NodeReport{Mode: api.ModeEnforce, Incarnation: "boot-b", UID: "u-b", Epoch: "e", Generations: []uint32{3}}}, "")},
		{"own report whole", b, "b", want(rep, whole, "")},
		{"no self: whole (ParseNode)", b, "", want(rep, whole, "")},
		{"unparsable report", garbage, "a", NodeInfo{Name: "g", IPv4Address: "198.18.0.3/24", Incarnation: "boot-g", Ready: true, RawReport: "{",
			ReportErr: "report annotation: unexpected end of JSON input", AnnotationReport: true, FromAnnotation: true}},
		{"no report, not ready", notReady, "a", NodeInfo{Name: "n", IPv4Address: "198.18.0.4"}},
	} {
		got := CacheNode(tc.n, tc.self)
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s:\n got %+v %+v\nwant %+v %+v", tc.name, got, got.Report, tc.want, tc.want.Report)
		}
		// The informer's object and a Node cached whole (no transform) read the same.
		obj, err := NodeTransform(tc.self)(tc.n.DeepCopy())
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range []any{obj, tc.n} {
			if ni, ok := cachedInfo(o, tc.self); !ok || !reflect.DeepEqual(ni, tc.want) {
				t.Errorf("%s: cachedInfo(%T) = %+v, %v", tc.name, o, ni, ok)
			}
		}
	}
	if rep != b.Annotations[api.ReportAnnotation] || len(b.ManagedFields) != 1 {
		t.Error("CacheNode changed its argument")
	}
	if _, ok := cachedInfo(cache.DeletedFinalStateUnknown{Key: "b"}, "a"); ok {
		t.Error("cachedInfo of a tombstone")
	}
}

// TestReportSources: a node's report from its annotation, its NodeReport or both, and
// whether its agent counts as one of 0.1 (Legacy: peers then write annotations too).
func TestReportSources(t *testing.T) {
	rep := func(boot, lastSync string) string {
		return `{"mode":"enforce","incarnation":"` + boot + `","uid":"u-b","epoch":"e","lastSync":"` + lastSync + `"}`
	}
	const t1, t2 = "2026-12-01T00:00:00Z", "2026-12-02T00:00:00Z"
	for _, tc := range []struct {
		name, ann, obj string
		hasObj         bool
		wantRaw        string
		legacy         bool
	}{
		{"annotation only (0.1)", rep("boot-b", t1), "", false, rep("boot-b", t1), true},
		{"annotation only, of an earlier boot", rep("boot-old", t1), "", false, rep("boot-old", t1), false},
		{"NodeReport only", "", rep("boot-b", t1), true, rep("boot-b", t1), false},
		{"both, written together (dual write)", rep("boot-b", t1), rep("boot-b", t1), true, rep("boot-b", t1), false},
		{"NodeReport later", rep("boot-b", t1), rep("boot-b", t2), true, rep("boot-b", t2), false},
		{"annotation later (downgraded to 0.1)", rep("boot-b", t2), rep("boot-b", t1), true, rep("boot-b", t2), true},
		{"NodeReport unparsable", rep("boot-b", t1), "{", true, rep("boot-b", t1), true},
	} {
		anns := map[string]string{}
		if tc.ann != "" {
			anns[api.ReportAnnotation] = tc.ann
		}
		n := node("b", "198.18.0.2/24", "boot-b", anns)
		n.UID = "u-b"
		ni := CacheNode(n, "")
		if tc.hasObj {
			ni = WithReportObject(ni, tc.obj)
		}
		if ni.RawReport != tc.wantRaw || ni.Legacy() != tc.legacy || ni.ObjectReport != tc.hasObj || ni.AnnotationReport != (tc.ann != "") {
			t.Errorf("%s: report %s legacy %v (object %v, annotation %v); want %s legacy %v", tc.name, ni.RawReport, ni.Legacy(),
				ni.ObjectReport, ni.AnnotationReport, tc.wantRaw, tc.legacy)
		}
	}
}
