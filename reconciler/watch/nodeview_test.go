package watch

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"reflect"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	fakediscovery "k8s.io/client-go/discovery/fake"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/internal/testkinds"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/nodekeys"
	"github.com/secureoverlay/secureoverlay/nodereport"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// TestNodeViewLog: random Node and NodeReport events; between any two snapshots of the
// view, every node whose inputs differ is among the names the log gives for their
// sequence numbers (self's own report excepted: not an input), and a range the log no
// longer reaches is refused.
func TestNodeViewLog(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	v := newNodeView()
	const self = "n0"
	type snap struct {
		seq   uint64
		nodes map[string]NodeInfo
	}
	var snaps []snap
	take := func() {
		ns, seq := v.snapshot()
		v.mu.Lock()
		full := v.fullLocked()
		v.mu.Unlock()
		if !reflect.DeepEqual(ns, full) && (len(ns) > 0 || len(full) > 0) {
			t.Fatalf("snapshot at %d differs from the view rebuilt whole", seq)
		}
		m := map[string]NodeInfo{}
		for _, n := range ns {
			if n.Name == self { // its own report is not an input
				n.RawReport, n.Report, n.ReportErr, n.FromAnnotation, n.ObjectReport = "", nil, "", false, false
			}
			m[n.Name] = n
		}
		snaps = append(snaps, snap{seq, m})
	}
	report := func(name string, i int) *Report {
		return &Report{NodeReport: api.NodeReport{Mode: api.ModeEnforce, Incarnation: fmt.Sprintf("boot-%s-%d", name, i%3)}}
	}
	for range 20000 {
		name := fmt.Sprintf("n%d", rng.IntN(8))
		switch rng.IntN(6) {
		case 0, 1:
			ni := NodeInfo{Name: name, IPv4Address: fmt.Sprintf("198.18.0.%d", rng.IntN(3)), Incarnation: fmt.Sprint(rng.IntN(2)), Ready: true}
			if rng.IntN(2) == 0 {
				ni.RawReport = fmt.Sprintf(`{"i":%d}`, rng.IntN(3))
				ni.Report, ni.AnnotationReport, ni.FromAnnotation = report(name, rng.IntN(3)), true, true
			}
			v.setNode(ni, self)
		case 2:
			v.deleteNode(name)
		case 3, 4:
			j := rng.IntN(3)
			v.setReport(name, &nodereport.Entry[reportEntry]{Value: reportEntry{Raw: fmt.Sprintf(`{"o":%d}`, j), Report: report(name, j)}, Deleted: rng.IntN(4) == 0}, self)
		default:
			v.setReport(name, nil, self)
		}
		if rng.IntN(50) == 0 {
			take()
		}
		if rng.IntN(500) == 0 { // many changes: the next snapshot is rebuilt whole
			for j := range 30 {
				v.setNode(NodeInfo{Name: fmt.Sprintf("x%02d", j), Incarnation: fmt.Sprint(rng.IntN(2))}, self)
			}
		}
	}
	checked, refused := 0, 0
	for i := range snaps {
		for j := i; j < len(snaps) && j < i+40; j++ {
			a, b := snaps[i], snaps[j]
			names, ok := v.changed(a.seq, b.seq)
			if !ok {
				refused++
				if a.seq >= v.logFrom {
					t.Fatalf("changed(%d, %d) refused while the log reaches back to %d", a.seq, b.seq, v.logFrom)
				}
				continue
			}
			checked++
			for n := range 8 {
				name := fmt.Sprintf("n%d", n)
				x, inA := a.nodes[name]
				y, inB := b.nodes[name]
				if (inA != inB || !reflect.DeepEqual(x, y)) && !slices.Contains(names, name) {
					t.Fatalf("snapshots %d → %d: %s differs but the log names only %v", a.seq, b.seq, name, names)
				}
			}
		}
	}
	if checked < 1000 || refused == 0 {
		t.Fatalf("checked %d ranges, %d refused: too little of one case", checked, refused)
	}
	if _, ok := v.changed(v.seq, v.seq+1); ok {
		t.Fatal("a range past the last change was accepted")
	}
}

// TestWatcherHint: after Node events the watcher's hint names exactly the Nodes they
// touched, a memo given it reaches Compute's state, and a hint across an epoch or ring
// change, or from no version, is the zero Hint.
func TestWatcherHint(t *testing.T) {
	ring := testRing(t, api.ModeEnforce, 8, "a", "b", "c", "d")
	data, err := keys.Marshal(ring)
	if err != nil {
		t.Fatal(err)
	}
	secret := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: api.Namespace, Name: api.SecretName, ResourceVersion: "1"},
		Data: map[string][]byte{api.SecretDataKey: data}}
	cs := fake.NewClientset(node("a", "198.18.0.1/24", "boot-a", nil), node("b", "198.18.0.2/24", "boot-b", nil), node("c", "198.18.0.3/24", "boot-c", nil), secret)
	cs.Discovery().(*fakediscovery.FakeDiscovery).Resources = []*metav1.APIResourceList{
		resources("crd.projectcalico.org/v1", "ipamblocks", "blockaffinities", "ippools", "bgppeers")}
	dc := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), testkinds.With(map[schema.GroupVersionResource]string{gvBlocks: "IPAMBlockList", gvAffs: "BlockAffinityList", gvPools: "IPPoolList", gvPeers: "BGPPeerList"}),
		calico(CalicoV1, ipPool("default", "10.65.0.0/16", "Always", nil)))
	w := New(Config{Client: cs, Dynamic: dc, Self: "a", DiscoveryRetry: 10 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go w.Run(ctx)
	waitFor(t, "caches to sync", w.HasSynced)
	inputs := func(epoch string) desired.Inputs {
		in, err := Inputs("a", w.Snapshot(), desired.Config{}, epoch)
		if err != nil {
			t.Fatal(err)
		}
		return in
	}
	in1 := inputs("e1")
	if in1.NodesVersion == nil || len(in1.Nodes) != 3 {
		t.Fatalf("inputs: version %v, %d nodes", in1.NodesVersion, len(in1.Nodes))
	}
	m := desired.NewMemo()
	if _, err := m.Update(in1, desired.Hint{}); err != nil {
		t.Fatal(err)
	}
	// c moves, d joins, b leaves.
	c, _ := cs.CoreV1().Nodes().Get(ctx, "c", metav1.GetOptions{})
	c.Annotations[api.CalicoIPv4AddressAnnotation] = "198.18.0.9/24"
	if _, err := cs.CoreV1().Nodes().Update(ctx, c, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := cs.CoreV1().Nodes().Create(ctx, node("d", "198.18.0.4/24", "boot-d", nil), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := cs.CoreV1().Nodes().Delete(ctx, "b", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the three events", func() bool {
		s := w.Snapshot()
		return s.Node("b") == nil && s.Node("d") != nil && s.Node("c").IPv4Address == "198.18.0.9/24"
	})
	in2 := inputs("e1")
	h := w.Hint(m.NodesVersion(), in2.NodesVersion)
	if got := slices.Sorted(slices.Values(h.Nodes)); !h.Known || !slices.Equal(got, []string{"b", "c", "d"}) || h.Since != in1.NodesVersion {
		t.Fatalf("hint %+v, want b, c and d since %v", h, in1.NodesVersion)
	}
	ch, err := m.Update(in2, h)
	if err != nil || ch.Full {
		t.Fatalf("hinted update: full=%v %v", ch.Full, err)
	}
	want, err := desired.Compute(in2)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(m.State(), want) {
		t.Fatal("the hinted memo's state differs from Compute's")
	}
	if h := w.Hint(in2.NodesVersion, in2.NodesVersion); !h.Known || len(h.Nodes) != 0 {
		t.Errorf("hint with no event in between: %+v", h)
	}
	for name, since := range map[string]any{
		"another epoch": inputs("e2").NodesVersion,
		"another ring":  NodesVersion{Seq: in1.NodesVersion.(NodesVersion).Seq, Ring: testRing(t, api.ModeEnforce, 8, "a"), Epoch: "e1"},
		"no version":    nil,
		"not a version": "v1",
		"a later one":   NodesVersion{Seq: in2.NodesVersion.(NodesVersion).Seq + 1, Ring: in2.NodesVersion.(NodesVersion).Ring, Epoch: "e1"},
	} {
		if h := w.Hint(since, in2.NodesVersion); h.Known {
			t.Errorf("%s: hint %+v, want the zero Hint", name, h)
		}
	}
}

// TestWatcherInputsEqualsInputs: random Node and NodeReport events (peers' reports,
// addresses, reboots, joins and leaves, this node's own changes, a new ring, a new epoch);
// after each snapshot the watcher's incremental Inputs has exactly the Nodes of Inputs.
func TestWatcherInputsEqualsInputs(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	const self = "n0"
	names := []string{"n0", "n1", "n2", "n3", "n4", "n5", "n6", "n7", "n8", "n9"}
	reversed := slices.Clone(names)
	slices.Reverse(reversed)
	rings := []*keys.Ring{testRing(t, api.ModeEnforce, 8, names...), testRing(t, api.ModeEnforce, 8, reversed...)}
	w := &Watcher{view: newNodeView()}
	epoch, ring := "e0", rings[0]
	info := func(name string) NodeInfo {
		return NodeInfo{Name: name, IPv4Address: fmt.Sprintf("198.18.0.%d/24", 1+rng.IntN(12)), Incarnation: fmt.Sprintf("boot-%s-%d", name, rng.IntN(2)), UID: "uid-" + name, Ready: true}
	}
	for _, n := range names {
		w.view.setNode(info(n), self)
	}
	for step := range 3000 {
		name := names[rng.IntN(len(names))]
		switch rng.IntN(10) {
		case 0, 1:
			w.view.setNode(info(name), self)
		case 2:
			w.view.deleteNode(name)
		case 3, 4, 5:
			ni, ok := w.view.nodes[name]
			if !ok {
				continue
			}
			selfInc := KeyIncarnation(w.view.nodes[self].Incarnation, "uid-"+self, epoch)
			rep := &Report{NodeReport: api.NodeReport{Mode: api.ModeEnforce, Incarnation: ni.Incarnation, UID: ni.UID, Epoch: fmt.Sprint(rng.IntN(3)), Generations: []uint32{1}},
				InboundFrom: map[string]string{self: IncarnationTag(selfInc)}}
			w.view.setReport(name, &nodereport.Entry[reportEntry]{Value: reportEntry{Raw: fmt.Sprintf("%s/%d", rep.Epoch, step), Report: rep}}, self)
		case 6:
			w.view.setReport(name, nil, self)
		case 7:
			if rng.IntN(10) == 0 {
				ring = rings[rng.IntN(2)]
			}
			if rng.IntN(10) == 0 {
				epoch = fmt.Sprint("e", rng.IntN(3))
			}
		}
		if _, ok := w.view.nodes[self]; !ok {
			w.view.setNode(info(self), self)
		}
		if rng.IntN(3) > 0 {
			continue
		}
		var s Snapshot
		s.Nodes, s.NodesSeq = w.view.snapshot()
		s.Ring = ring
		got, err := w.Inputs(self, s, desired.Config{}, epoch)
		if err != nil {
			t.Fatal(err)
		}
		want, err := Inputs(self, s, desired.Config{}, epoch)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got.Nodes, want.Nodes) || got.NodesVersion != want.NodesVersion {
			t.Fatalf("step %d: the watcher's Inputs differ:\n%+v\n%+v", step, got.Nodes, want.Nodes)
		}
	}
	if w.inPatched < 200 {
		t.Fatalf("only %d Inputs were patched", w.inPatched)
	}
}

// TestSupersededReport: a superseded NodeReport (its agent writes NodeStatuses, which
// agents do not read; docs/keys.md §6) omits its lists, so the node's NodeKeys decide its
// key incarnation as soon as they are there (rule 2: here a later epoch than the report's);
// until then it is the report's, not none: peers that see the marker before the NodeKeys
// keep the node (an empty incarnation would take it out of their state, plaintext in
// between). An annotation written later still wins (0.1 again).
func TestSupersededReport(t *testing.T) {
	at := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	raw := func(mode api.Mode, lastSync time.Time, superseded bool) string {
		b, _ := json.Marshal(api.NodeReport{Mode: mode, Incarnation: "boot-b", UID: "uid-b", Epoch: "e1", LastSync: lastSync,
			Superseded: superseded, ListsOmitted: true})
		return string(b)
	}
	entry := func(s string) reportEntry {
		var e reportEntry
		e.Raw, e.Report, e.Err = cacheReport("b", s, "a")
		return e
	}
	keys := &nodekeys.Keys{Incarnation: nodekeys.Incarnation{BootID: "boot-b", UID: "uid-b", Epoch: "e2"}, Capabilities: []string{api.CapabilityInstalled}}
	for _, tc := range []struct {
		name, annotation string
		keys             *nodekeys.Keys
		wantMode         api.Mode
		wantInc          string
	}{
		{"no NodeKeys yet: the report's", "", nil, api.ModeAccept, KeyIncarnation("boot-b", "uid-b", "e1")},
		{"NodeKeys decide", "", keys, api.ModeAccept, KeyIncarnation("boot-b", "uid-b", "e2")},
		{"a later annotation (0.1 again)", raw(api.ModeEncrypt, at.Add(time.Hour), false), nil, api.ModeEncrypt, KeyIncarnation("boot-b", "uid-b", "e1")},
	} {
		ni := NodeInfo{Name: "b", Incarnation: "boot-b", UID: "uid-b", Keys: tc.keys}
		if tc.annotation != "" {
			ni.RawReport, ni.Report, ni.ReportErr = cacheReport("b", tc.annotation, "a")
			ni.FromAnnotation = true
		}
		ni = withObject(ni, entry(raw(api.ModeAccept, at, true)), true)
		r := ni.CurrentReport()
		if r == nil || r.Mode != tc.wantMode || ni.KeyIncarnation() != tc.wantInc || !ni.ObjectReport {
			t.Errorf("%s: report %+v, key incarnation %q; want mode %s, %q", tc.name, r, ni.KeyIncarnation(), tc.wantMode, tc.wantInc)
		}
	}
}
