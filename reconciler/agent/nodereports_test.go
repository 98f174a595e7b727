package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/nodekeys"
	"github.com/secureoverlay/secureoverlay/nodereport"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
)

// TestNodeReportsGate: the report goes to the NodeReport as well as the NodeStatus while a
// live peer's agent lacks node-status (docs/protocol-v2.md §9 step 5): one that declares
// only readiness-decide, a 0.1 peer (annotation only), one that has not said what it is
// once the grace is over; --node-reports=always keeps it.
func TestNodeReportsGate(t *testing.T) {
	t0 := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	all := []string{api.CapabilityReadinessDecide, api.CapabilityInstalled, api.CapabilityNodeStatus}
	older := []string{api.CapabilityReadinessDecide, api.CapabilityInstalled}
	node := func(name string, caps []string, withKeys, annotation bool) watch.NodeInfo {
		n := watch.NodeInfo{Name: name, Incarnation: "boot-" + name, UID: "uid-" + name, FromAnnotation: annotation,
			Report: &watch.Report{NodeReport: api.NodeReport{Mode: api.ModeEnforce, Incarnation: "boot-" + name, UID: "uid-" + name, Epoch: "e"}}}
		if withKeys {
			n.Keys = &nodekeys.Keys{Incarnation: nodekeys.Incarnation{BootID: "boot-" + name, UID: "uid-" + name, Epoch: "e"}, Capabilities: caps}
		}
		return n
	}
	for _, tc := range []struct {
		name  string
		peers []watch.NodeInfo
		mode  string
		after time.Duration
		want  bool
	}{
		{name: "every peer declares node-status", peers: []watch.NodeInfo{node("b", all, true, false), node("c", all, true, false)}},
		{name: "an older agent", peers: []watch.NodeInfo{node("b", all, true, false), node("c", older, true, false)}, want: true},
		{name: "a 0.1 agent", peers: []watch.NodeInfo{node("b", all, true, false), node("c", nil, false, true)}, want: true},
		{name: "unknown, in its grace", peers: []watch.NodeInfo{node("b", all, true, false), node("c", nil, false, false)}},
		{name: "unknown, after its grace", peers: []watch.NodeInfo{node("c", nil, false, false)}, after: ListsUnknownGrace, want: true},
		{name: "always", mode: NodeReportsAlways, peers: []watch.NodeInfo{node("b", all, true, false)}, want: true},
	} {
		g := listsGate{capability: api.CapabilityNodeStatus}
		snap := &watch.Snapshot{Nodes: append([]watch.NodeInfo{node("a", all, true, false)}, tc.peers...)}
		mode := tc.mode
		if mode == "" {
			mode = NodeReportsAuto
		}
		need, _, _ := g.decide(snap, "a", mode, t0)
		if tc.after > 0 {
			need, _, _ = g.decide(snap, "a", mode, t0.Add(tc.after))
		}
		if need != tc.want {
			t.Errorf("%s: NodeReport needed %v, want %v", tc.name, need, tc.want)
		}
	}
}

// TestAgentsSupersedeNodeReports: three real agents (watchers, desired state, fake kernels,
// ledgers) on one fake API, every one declaring node-status: each writes its report to its
// NodeStatus and leaves a superseded NodeReport, which its peers read without lists (the
// NodeKeys decide) — and every pair is still programmed both ways (ESP and enforce's plaintext drops), from the peers'
// NodeKeys, rows and views. A peer whose agent reads NodeReports (its NodeKeys lack
// node-status) appears: every agent writes its NodeReport again; when it goes, they stop.
func TestAgentsSupersedeNodeReports(t *testing.T) {
	ring := testRing(t, api.ModeEnforce, "a", "b", "c", "d")
	cs, dc := fakeAPI(t, ring, testNode("a", "198.18.0.1", "boot-a"), testNode("b", "198.18.0.2", "boot-b"), testNode("c", "198.18.0.3", "boot-c"))
	publishRing(t, cs, ring, api.MasterReadsNodeStatuses)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	names := []string{"a", "b", "c"}
	nodes := startAgents(t, ctx, cs, dc, names...)
	// state is "" when every agent's NodeReport is superseded (or current, superseded
	// false) and its NodeStatus holds its last report, its metric says so, and it
	// encrypts to and drops the plaintext of both other agents.
	state := func(superseded bool) string {
		for _, name := range names {
			n := nodes[name]
			pub := n.a.Published()
			if pub == nil {
				return name + ": no report yet"
			}
			st, err := nodereport.ReadStatus(ctx, dc, api.Namespace, name)
			if err != nil || st == "" {
				return fmt.Sprintf("%s: NodeStatus %q, %v", name, st, err)
			}
			sr, err := watch.ParseReport(st)
			if err != nil || !sr.LastSync.Equal(pub.LastSync) || sr.Superseded {
				return fmt.Sprintf("%s: NodeStatus %s is not its last report (%v)", name, st, err)
			}
			u, err := dc.Resource(nodereport.GVR).Namespace(api.Namespace).Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return fmt.Sprintf("%s: NodeReport: %v", name, err)
			}
			rr, err := watch.ParseReport(nodereport.Raw(u))
			switch {
			case err != nil:
				return fmt.Sprintf("%s: NodeReport: %v", name, err)
			case rr.Superseded != superseded:
				return fmt.Sprintf("%s: NodeReport superseded %v, want %v", name, rr.Superseded, superseded)
			case superseded && (!rr.ListsOmitted || len(rr.EncryptingTo) > 0):
				return fmt.Sprintf("%s: a superseded NodeReport with lists", name)
			case !superseded && !rr.LastSync.Equal(pub.LastSync):
				return fmt.Sprintf("%s: NodeReport is not its last report", name)
			case value(n.a.d.Metrics.NodeReport) != map[bool]float64{false: 1}[superseded]:
				return fmt.Sprintf("%s: report_nodereport %v", name, value(n.a.d.Metrics.NodeReport))
			}
			if why := pairsProgrammed(n, 2); why != "" {
				return why
			}
		}
		return ""
	}
	var why string
	if !waitUntil(30*time.Second, func() bool { why = state(true); return why == "" }) {
		t.Fatalf("every agent declares node-status, NodeReports superseded: %s", why)
	}
	// The superseded NodeReports stay as they are: no agent writes them again, while
	// the NodeStatuses take the heartbeats and changes (resyncs every 200 ms here).
	before := nodeReportWrites(dc)
	time.Sleep(time.Second)
	if after := nodeReportWrites(dc); after != before {
		t.Errorf("superseded NodeReports written again: %d writes in a second", after-before)
	}

	// d's agent reads NodeReports: its NodeKeys lack node-status, and it reports as a
	// NodeReport.
	if _, err := cs.CoreV1().Nodes().Create(ctx, testNode("d", "198.18.0.4", "boot-d"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var pub [32]byte
	pub[0] = 4
	if err := nodekeys.Write(ctx, dc, api.Namespace, "d", "", nodekeys.Keys{Incarnation: nodekeys.Incarnation{BootID: "boot-d", UID: "uid-d", Epoch: "e-d"},
		Keys: []nodekeys.Key{{Generation: 1, X25519: pub}}, Capabilities: []string{api.CapabilityReadinessDecide, api.CapabilityInstalled}}); err != nil {
		t.Fatal(err)
	}
	if err := nodereport.Write(ctx, dc, api.Namespace, "d", "", "off", []byte(`{"mode":"off","incarnation":"boot-d","uid":"uid-d","epoch":"e-d","listsOmitted":true}`)); err != nil {
		t.Fatal(err)
	}
	current := func() string { // every agent writes a current NodeReport
		for _, name := range names {
			u, err := dc.Resource(nodereport.GVR).Namespace(api.Namespace).Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return err.Error()
			}
			if r, err := watch.ParseReport(nodereport.Raw(u)); err != nil || r.Superseded || value(nodes[name].a.d.Metrics.NodeReport) != 1 {
				return name + "'s NodeReport stays superseded"
			}
		}
		return ""
	}
	if !waitUntil(30*time.Second, func() bool { why = current(); return why == "" }) {
		t.Fatal(why)
	}
	if err := cs.CoreV1().Nodes().Delete(ctx, "d", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if !waitUntil(30*time.Second, func() bool { why = state(true); return why == "" }) {
		t.Fatalf("the older peer gone: %s", why)
	}

	// The master rolled back to a version that reads only NodeReports: its public ring
	// says nothing of NodeStatuses (it rewrites the ConfigMap's data whole). Every agent
	// writes its NodeReport again, current; when the newer master is back, they stop.
	publishRing(t, cs, ring, "")
	if !waitUntil(30*time.Second, func() bool { why = current(); return why == "" }) {
		t.Fatalf("under a master that does not read NodeStatuses: %s", why)
	}
	publishRing(t, cs, ring, api.MasterReadsNodeStatuses)
	if !waitUntil(30*time.Second, func() bool { why = state(true); return why == "" }) {
		t.Fatalf("the newer master back: %s", why)
	}
	for _, n := range nodes {
		noKeyReused(t, n.xk)
	}
}

// publishRing writes the public ring ConfigMap as a master does: ring without its v1
// roots and, beside it, what the master reads (api.RingMasterDataKey; "": a master that
// says nothing, as one that reads only NodeReports).
func publishRing(t *testing.T, cs *fake.Clientset, ring *keys.Ring, reads string) {
	t.Helper()
	b, err := keys.MarshalPublic(ring)
	if err != nil {
		t.Fatal(err)
	}
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: api.Namespace, Name: api.RingConfigMapName},
		Data: map[string]string{api.RingDataKey: string(b)}}
	if reads != "" {
		cm.Data[api.RingMasterDataKey] = reads
	}
	cms := cs.CoreV1().ConfigMaps(api.Namespace)
	_, err = cms.Update(context.Background(), cm, metav1.UpdateOptions{})
	if apierrors.IsNotFound(err) {
		_, err = cms.Create(context.Background(), cm, metav1.CreateOptions{})
	}
	if err != nil {
		t.Fatal(err)
	}
}

// startAgents runs a real agent for each of names (startNode, with a ledger of its boot
// seeded) on the fake API until ctx ends or the test does.
func startAgents(t *testing.T, ctx context.Context, cs *fake.Clientset, dc *dynamicfake.FakeDynamicClient, names ...string) map[string]*v2node {
	t.Helper()
	nodes := map[string]*v2node{}
	for _, name := range names {
		nodes[name] = startNode(t, ctx, cs, dc, name, seededLedger(t, name, "boot-"+name))
	}
	return nodes
}

// pairsProgrammed is "" when n's agent encrypts to peers peers and drops the plaintext of
// as many (enforce), else what it does.
func pairsProgrammed(n *v2node, peers int) string {
	enc, drop := value(n.a.d.Metrics.Peers.WithLabelValues("encrypted")), value(n.a.d.Metrics.Peers.WithLabelValues("dropping"))
	if enc != float64(peers) || drop != float64(peers) {
		return fmt.Sprintf("%s: encrypts to %v peers, drops the plaintext of %v (want %d, %d)", n.name, enc, drop, peers, peers)
	}
	return ""
}

// nodeReportWrites counts the writes (create, patch, update) of NodeReports dc has seen.
func nodeReportWrites(dc *dynamicfake.FakeDynamicClient) int {
	n := 0
	for _, a := range dc.Actions() {
		if a.GetResource() == nodereport.GVR && (a.GetVerb() == "create" || a.GetVerb() == "patch" || a.GetVerb() == "update") {
			n++
		}
	}
	return n
}

// TestAgentsWithoutNodeStatuses: under a manifest that predates NodeStatuses (the API
// refuses them: no CRD or no RBAC), agents that all declare node-status keep writing
// their NodeReports, current (never superseded), stay ready, and every pair is programmed.
func TestAgentsWithoutNodeStatuses(t *testing.T) {
	ring := testRing(t, api.ModeEnforce, "a", "b", "c")
	cs, dc := fakeAPI(t, ring, testNode("a", "198.18.0.1", "boot-a"), testNode("b", "198.18.0.2", "boot-b"), testNode("c", "198.18.0.3", "boot-c"))
	refuse := func(action k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewForbidden(nodereport.StatusGVR.GroupResource(), "", errors.New("RBAC: no nodestatuses"))
	}
	for _, verb := range []string{"create", "patch", "update", "get"} {
		dc.PrependReactor(verb, nodereport.StatusResource, refuse)
	}
	var superseded atomic.Int32 // NodeReport writes that supersede: there must be none
	watchWrites := func(action k8stesting.Action) (bool, runtime.Object, error) {
		var body []byte
		switch a := action.(type) {
		case k8stesting.PatchAction:
			body = a.GetPatch()
		case k8stesting.CreateAction:
			body, _ = json.Marshal(a.GetObject())
		}
		if strings.Contains(string(body), `\"superseded\":true`) {
			superseded.Add(1)
		}
		return false, nil, nil
	}
	for _, verb := range []string{"create", "patch"} {
		dc.PrependReactor(verb, nodereport.Resource, watchWrites)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	names := []string{"a", "b", "c"}
	nodes := startAgents(t, ctx, cs, dc, names...)
	state := func() string {
		for _, name := range names {
			n := nodes[name]
			pub := n.a.Published()
			if pub == nil {
				return name + ": no report yet"
			}
			if st := n.a.Status(); !st.Ready {
				return fmt.Sprintf("%s: not ready: %s", name, st.Error)
			}
			u, err := dc.Resource(nodereport.GVR).Namespace(api.Namespace).Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return fmt.Sprintf("%s: NodeReport: %v", name, err)
			}
			if r, err := watch.ParseReport(nodereport.Raw(u)); err != nil || r.Superseded || !r.LastSync.Equal(pub.LastSync) {
				return fmt.Sprintf("%s: NodeReport %.200s is not its last report", name, nodereport.Raw(u))
			}
			if why := pairsProgrammed(n, 2); why != "" {
				return why
			}
		}
		return ""
	}
	var why string
	if !waitUntil(30*time.Second, func() bool { why = state(); return why == "" }) {
		t.Fatalf("NodeStatuses refused: %s", why)
	}
	time.Sleep(500 * time.Millisecond) // resyncs every 200 ms: the NodeReports stay current
	if why := state(); why != "" {
		t.Fatalf("NodeStatuses refused, after resyncs: %s", why)
	}
	if n := superseded.Load(); n != 0 {
		t.Errorf("%d superseded NodeReports written while NodeStatuses are refused", n)
	}
}

// TestNoSupersedeBeforeTheStatus: while NodeStatus writes fail (a transient API error, not a
// refusal), no agent leaves a superseded NodeReport — the master would have neither — and
// once they succeed, the NodeReports are superseded.
func TestNoSupersedeBeforeTheStatus(t *testing.T) {
	ring := testRing(t, api.ModeEnforce, "a", "b", "c")
	cs, dc := fakeAPI(t, ring, testNode("a", "198.18.0.1", "boot-a"), testNode("b", "198.18.0.2", "boot-b"), testNode("c", "198.18.0.3", "boot-c"))
	publishRing(t, cs, ring, api.MasterReadsNodeStatuses)
	var failing atomic.Bool
	failing.Store(true)
	fail := func(action k8stesting.Action) (bool, runtime.Object, error) {
		if failing.Load() {
			return true, nil, apierrors.NewInternalError(errors.New("etcd leader changed"))
		}
		return false, nil, nil
	}
	for _, verb := range []string{"create", "patch"} {
		dc.PrependReactor(verb, nodereport.StatusResource, fail)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	names := []string{"a", "b", "c"}
	nodes := startAgents(t, ctx, cs, dc, names...)
	superseded := func() (int, error) {
		n := 0
		for _, name := range names {
			u, err := dc.Resource(nodereport.GVR).Namespace(api.Namespace).Get(ctx, name, metav1.GetOptions{})
			if apierrors.IsNotFound(err) {
				continue
			}
			if err != nil {
				return 0, err
			}
			if r, err := watch.ParseReport(nodereport.Raw(u)); err == nil && r.Superseded {
				n++
			}
		}
		return n, nil
	}
	// An agent has decided that no peer reads NodeReports and failed to write. (Not
	// necessarily every agent: a node whose only report is its Node's annotation, as
	// testNode makes it, is a 0.1 peer to the others until it writes a NodeReport.)
	closed := func() string {
		for _, name := range names {
			if value(nodes[name].a.d.Metrics.NodeReport) == 0 && nodes[name].a.Status().Error != "" {
				return name
			}
		}
		return ""
	}
	if !waitUntil(30*time.Second, func() bool { return closed() != "" }) {
		for _, name := range names {
			t.Logf("%s: report_nodereport %v, status %+v", name, value(nodes[name].a.d.Metrics.NodeReport), nodes[name].a.Status())
		}
		t.Fatal("no agent closed the NodeReport gate with its NodeStatus writes failing")
	}
	time.Sleep(500 * time.Millisecond)
	if n, err := superseded(); err != nil || n != 0 {
		t.Fatalf("%d superseded NodeReports (%v) while no NodeStatus could be written", n, err)
	}
	failing.Store(false)
	if !waitUntil(30*time.Second, func() bool { n, err := superseded(); return err == nil && n == len(names) }) {
		n, err := superseded()
		t.Fatalf("NodeStatuses written: %d of %d NodeReports superseded (%v)", n, len(names), err)
	}
}
