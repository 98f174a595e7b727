package master

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"reflect"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/nodekeys"
	"github.com/secureoverlay/secureoverlay/nodereport"
	"github.com/secureoverlay/secureoverlay/noderow"
	"github.com/secureoverlay/secureoverlay/nodeview"
	"github.com/secureoverlay/secureoverlay/readiness"
	soagent "github.com/secureoverlay/secureoverlay/reconciler/agent"
	dstate "github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
)

// shadowCluster is n nodes as the master sees them, each with the report its agent would
// write (agent.ReadinessOf over a state that claims the peers claims[node] names, with the
// keys of the peers' reports as that agent's snapshot shows them).
type shadowCluster struct {
	names  []string
	ring   *keys.Ring
	nodes  []*corev1.Node
	epoch  map[string]string // each agent's SA epoch
	seenAs map[string]map[string]string
	// claims[b] lists the peers b holds inbound SAs from and sends ESP to; refuses[b] those
	// it skips.
	claims, refuses map[string][]string
	// staleBoot, when set for a node, is the boot ID its last report was made in.
	staleBoot map[string]string
	// omitLists: the reports say they omit their per-pair lists (protocol v2 step 4).
	omitLists bool
}

func newShadowCluster(n int) *shadowCluster {
	c := &shadowCluster{ring: keys.NewRing(), epoch: map[string]string{}, seenAs: map[string]map[string]string{},
		claims: map[string][]string{}, refuses: map[string][]string{}, staleBoot: map[string]string{}}
	for i := range n {
		name := fmt.Sprintf("node-%d", i)
		c.names = append(c.names, name)
		c.ring.Nodes = append(c.ring.Nodes, keys.NodeID{Name: name, ID: uint32(i + 1)})
		c.nodes = append(c.nodes, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, UID: types.UID("uid-" + name)},
			Status: corev1.NodeStatus{NodeInfo: corev1.NodeSystemInfo{BootID: "boot-" + name}}})
		c.epoch[name] = "e1"
	}
	for _, b := range c.names {
		c.seenAs[b] = map[string]string{}
		for _, x := range c.names {
			c.seenAs[b][x] = c.epoch[x]
			if x != b {
				c.claims[b] = append(c.claims[b], x)
			}
		}
	}
	return c
}

// report is node b's report: its own current epoch, claims made with the epochs b's
// snapshot shows for its peers.
func (c *shadowCluster) report(b string) *api.NodeReport {
	var snap watch.Snapshot
	snap.Ring = c.ring
	for _, n := range c.nodes {
		rep := &watch.Report{NodeReport: api.NodeReport{Mode: api.ModeEnforce, Incarnation: n.Status.NodeInfo.BootID, UID: string(n.UID), Epoch: c.seenAs[b][n.Name]}}
		snap.Nodes = append(snap.Nodes, watch.NodeInfo{Name: n.Name, Incarnation: n.Status.NodeInfo.BootID, UID: string(n.UID), Report: rep})
	}
	slices.SortFunc(snap.Nodes, func(x, y watch.NodeInfo) int {
		if x.Name < y.Name {
			return -1
		}
		return 1
	})
	var st dstate.State
	for _, x := range c.claims[b] {
		st.Peers = append(st.Peers, dstate.PeerStatus{Name: x, Inbound: true, SendGeneration: 1})
	}
	for _, x := range c.refuses[b] {
		st.Skipped = append(st.Skipped, dstate.Skip{Object: "node/" + x, Reason: "test"})
	}
	self := c.nodes[slices.Index(c.names, b)]
	boot := self.Status.NodeInfo.BootID
	if old, ok := c.staleBoot[b]; ok {
		boot = old
	}
	inc := watch.KeyIncarnation(boot, string(self.UID), c.epoch[b])
	return &api.NodeReport{Mode: api.ModeEnforce, Incarnation: boot, UID: string(self.UID), Epoch: c.epoch[b],
		Readiness: soagent.ReadinessOf(st, &snap, b, inc), ListsOmitted: c.omitLists}
}

func (c *shadowCluster) states() []keys.NodeState {
	var out []keys.NodeState
	for _, n := range c.nodes {
		out = append(out, keys.NodeState{Name: n.Name, Ready: true, BootID: n.Status.NodeInfo.BootID, Report: c.report(n.Name)})
	}
	return out
}

// TestShadowReadiness: the master's shadow of protocol v2's readiness, fed the digests
// the agents' own code writes (agent.ReadinessOf), confirms exactly the pairs the agents
// claim for the peers' current keys: every pair in a steady state, none of a node whose
// keys changed until its peers claim the new ones, not a missing claim, not a refused
// peer, and a node with a stale report is out of the view.
func TestShadowReadiness(t *testing.T) {
	c := newShadowCluster(4)
	s := newShadowReadiness()
	check := func(what string, nodes, statuses, in, out int) {
		t.Helper()
		got := s.update(c.ring, c.nodes, c.states())
		got.Views, got.Gone = nil, nil // TestShadowViews
		want := shadowCounts{Nodes: nodes, Statuses: statuses, Unconfirmed: [2]int{in, out}}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s: %+v, want %+v", what, got, want)
		}
	}
	check("steady state", 4, 4, 0, 0)
	check("again, nothing changed", 4, 4, 0, 0)

	// node-2 no longer claims node-0 (its SAs for it are gone: it would need a new epoch).
	c.claims["node-2"] = []string{"node-1", "node-3"}
	check("a claim withdrawn", 4, 4, 0, 0) // confirmations are sticky for the same keys
	c.claims["node-2"] = []string{"node-0", "node-1", "node-3"}

	// node-0's agent takes a new epoch: its peers' claims are about its old keys.
	c.epoch["node-0"], c.seenAs["node-0"]["node-0"] = "e2", "e2"
	check("node-0 re-keyed, peers not yet", 4, 4, 3, 3)
	for _, b := range []string{"node-1", "node-2"} {
		c.seenAs[b]["node-0"] = "e2"
	}
	check("two peers claim node-0's new keys", 4, 4, 1, 1)
	c.seenAs["node-3"]["node-0"] = "e2"
	check("every peer claims node-0's new keys", 4, 4, 0, 0)

	// The peers see node-0's next epoch before the master does (its report reaches the
	// master last): their statuses do not change again, so the master must observe them
	// anew when node-0's keys change in its view.
	for _, b := range []string{"node-1", "node-2", "node-3"} {
		c.seenAs[b]["node-0"] = "e3"
	}
	// Meanwhile the confirmations for node-0's current keys in the master's view stay
	// (sticky; an agent only uses a view whose key digest matches its own, and node-0's
	// own view already has its next keys).
	check("peers claim node-0's next keys before its report shows them", 4, 4, 0, 0)
	c.epoch["node-0"], c.seenAs["node-0"]["node-0"] = "e3", "e3"
	check("node-0's report catches up", 4, 4, 0, 0)

	// A new node whose peers do not claim it yet, and which refuses node-1.
	c.names = append(c.names, "node-4")
	c.ring.Nodes = append(c.ring.Nodes, keys.NodeID{Name: "node-4", ID: 5})
	c.nodes = append(c.nodes, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-4", UID: "uid-node-4"},
		Status: corev1.NodeStatus{NodeInfo: corev1.NodeSystemInfo{BootID: "boot-node-4"}}})
	c.epoch["node-4"] = "e1"
	c.seenAs["node-4"] = map[string]string{}
	for _, x := range c.names {
		c.seenAs["node-4"][x] = c.epoch[x]
		c.seenAs[x]["node-4"] = "e1"
	}
	c.claims["node-4"], c.refuses["node-4"] = []string{"node-0", "node-2", "node-3"}, []string{"node-1"}
	check("node-4 joined, unclaimed by its peers, refusing node-1", 5, 5, 5, 5) // 4 peers' rows lack node-4, node-4's row lacks node-1
	for _, b := range []string{"node-0", "node-1", "node-2", "node-3"} {
		c.claims[b] = append(c.claims[b], "node-4")
	}
	check("node-4 claimed by every peer", 5, 5, 1, 1)

	// node-3 reboots: its Node shows a new boot ID before its agent reports again.
	c.staleBoot["node-3"], c.nodes[3].Status.NodeInfo.BootID = c.nodes[3].Status.NodeInfo.BootID, "boot-node-3-2"
	check("node-3's report stale", 4, 4, 1, 1)
}

// TestShadowReadinessKeysFromNodeKeys: the master takes key incarnations by the agents'
// rule (watch.NodeKeyIncarnation, docs/keys.md §3): a node whose NodeKeys declare
// installed is in the view under the NodeKeys' epoch unless its report lists its claims,
// and its report's status counts only when made for that epoch; NodeKeys without the
// capability, or of another boot, leave the report to decide.
func TestShadowReadinessKeysFromNodeKeys(t *testing.T) {
	c := newShadowCluster(3)
	c.omitLists = true // reports that list decide themselves (rule 1): checked at the end
	s := newShadowReadiness()
	published := map[string]*nodekeys.Keys{}
	s.keysOf = func(node string) *nodekeys.Keys { return published[node] }
	check := func(what string, nodes, statuses, in, out int) {
		t.Helper()
		got := s.update(c.ring, c.nodes, c.states())
		got.Views, got.Gone = nil, nil
		want := shadowCounts{Nodes: nodes, Statuses: statuses, Unconfirmed: [2]int{in, out}}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s: %+v, want %+v", what, got, want)
		}
	}
	keysOf := func(name, boot, epoch string, installed []uint32, caps ...string) *nodekeys.Keys {
		return &nodekeys.Keys{Incarnation: nodekeys.Incarnation{BootID: boot, UID: "uid-" + name, Epoch: epoch}, Capabilities: caps, Installed: installed}
	}
	for _, n := range c.names {
		published[n] = keysOf(n, "boot-"+n, "e1", []uint32{1}, api.CapabilityInstalled)
	}
	check("steady state, NodeKeys and reports agree", 3, 3, 0, 0)

	// node-0's NodeKeys show its next epoch (installed) before its report does: the
	// master's key for node-0 is the new one at once, the peers' claims about its old
	// keys confirm nothing, and node-0's status, made for its old keys, is not observed.
	published["node-0"] = keysOf("node-0", "boot-node-0", "e2", []uint32{1}, api.CapabilityInstalled)
	check("node-0's NodeKeys ahead of its report", 3, 2, 4, 4) // every ordered pair with node-0
	for _, b := range []string{"node-1", "node-2"} {
		c.seenAs[b]["node-0"] = "e2"
	}
	c.epoch["node-0"], c.seenAs["node-0"]["node-0"] = "e2", "e2"
	check("peers and node-0's report catch up", 3, 3, 0, 0)

	// Without the capability (an older agent's NodeKeys) or for another boot, the
	// report decides: e2 here, so the newer NodeKeys epoch is not taken.
	published["node-0"] = keysOf("node-0", "boot-node-0", "e3", []uint32{1})
	check("NodeKeys without installed: the report's epoch", 3, 3, 0, 0)
	published["node-0"] = keysOf("node-0", "boot-old", "e3", []uint32{1}, api.CapabilityInstalled)
	check("NodeKeys of another boot: the report's epoch", 3, 3, 0, 0)

	// A report that lists its claims decides, whatever the NodeKeys say (the claims and
	// the incarnation they were made for come together, as in v1).
	published["node-0"] = keysOf("node-0", "boot-node-0", "e3", []uint32{1}, api.CapabilityInstalled)
	c.omitLists = false
	check("a listing report over newer NodeKeys: the report's epoch", 3, 3, 0, 0)
	c.omitLists = true
	check("the same report without lists: the NodeKeys' epoch", 3, 2, 4, 4)

	// A node whose report is gone but whose NodeKeys decide stays in the view (its agent
	// no longer needs to be read through its report), without a status.
	published["node-0"] = keysOf("node-0", "boot-node-0", "e2", []uint32{1}, api.CapabilityInstalled)
	states := c.states()
	states[0].Report = nil
	got := s.update(c.ring, c.nodes, states)
	if got.Nodes != 3 || got.Statuses != 2 {
		t.Errorf("node-0 without a report: %d nodes, %d statuses; want 3, 2", got.Nodes, got.Statuses)
	}
}

// TestShadowViews: the views the shadow hands to the NodeView writer — each live node's at
// the start, none when nothing changed, every one on a key change (the views' key digest
// covers every node), only the newly confirmed peer's when a status confirms a pair, and
// a node that leaves the view is named gone. Each view lists exactly the peers not
// confirmed for it, and decodes.
func TestShadowViews(t *testing.T) {
	c := newShadowCluster(3)
	s := newShadowReadiness()
	type want struct {
		node          string
		notIn, notOut []uint32
	}
	check := func(what string, views []want, gone ...string) {
		t.Helper()
		got := s.update(c.ring, c.nodes, c.states())
		var keys uint64
		for i, v := range got.Views {
			dec, err := readiness.DecodeView(readiness.EncodeView(v.View))
			if err != nil {
				t.Fatalf("%s: view %d: %v", what, i, err)
			}
			if i == 0 {
				keys = dec.Keys
			} else if dec.Keys != keys {
				t.Errorf("%s: views over different key views in one update", what)
			}
			if i >= len(views) || v.Node != views[i].node || v.UID != "uid-"+v.Node ||
				!slices.Equal(dec.NotIn, views[i].notIn) || !slices.Equal(dec.NotOut, views[i].notOut) {
				t.Errorf("%s: view %d is %s (uid %s) %+v, want %+v", what, i, v.Node, v.UID, dec, views)
			}
		}
		if len(got.Views) != len(views) {
			t.Errorf("%s: %d views, want %d", what, len(got.Views), len(views))
		}
		if !slices.Equal(got.Gone, gone) && len(got.Gone)+len(gone) > 0 {
			t.Errorf("%s: gone %v, want %v", what, got.Gone, gone)
		}
	}
	all := []want{{"node-0", nil, nil}, {"node-1", nil, nil}, {"node-2", nil, nil}}
	check("start", all)
	check("nothing changed", nil)

	// node-0 takes a new epoch: every view changes (key digest), node-0's lists both peers
	// until they claim its new keys.
	c.epoch["node-0"], c.seenAs["node-0"]["node-0"] = "e2", "e2"
	check("node-0 re-keyed", []want{{"node-0", []uint32{2, 3}, []uint32{2, 3}}, {"node-1", nil, nil}, {"node-2", nil, nil}})
	c.seenAs["node-1"]["node-0"] = "e2"
	check("node-1 claims node-0's new keys", []want{{"node-0", []uint32{3}, []uint32{3}}})
	c.seenAs["node-2"]["node-0"] = "e2"
	check("node-2 too", []want{{"node-0", nil, nil}})

	// node-2's report goes stale (reboot): it leaves the view, the others' views change.
	c.staleBoot["node-2"], c.nodes[2].Status.NodeInfo.BootID = c.nodes[2].Status.NodeInfo.BootID, "boot-node-2-2"
	check("node-2 stale", []want{{"node-0", nil, nil}, {"node-1", nil, nil}}, "node-2")
}

// TestNodeViewsAgainstRealAPIServer: the leader writes every live node's NodeView, owned by
// its Node, from the reports' readiness digests, through the manifest's CRD and the
// master's RBAC; a re-keyed node's view lists its peers until they claim its new keys, and
// a view that did not change is not written again.
func TestNodeViewsAgainstRealAPIServer(t *testing.T) { nodeViewsAgainstRealAPIServer(t, false) }

// TestNodeViewsWithRowsAgainstRealAPIServer: as TestNodeViewsAgainstRealAPIServer, with
// every agent declaring in its NodeKeys that it publishes readiness rows, and publishing
// them as agents do: then a re-key writes the re-keyed node's view only (its peers' views
// are skipped: its row gives them their pairs with it), and the peers' views keep the key
// digest they had.
func TestNodeViewsWithRowsAgainstRealAPIServer(t *testing.T) { nodeViewsAgainstRealAPIServer(t, true) }

func nodeViewsAgainstRealAPIServer(t *testing.T, rows bool) {
	if testing.Short() {
		t.Skip("starts a real kube-apiserver; skipped with -short")
	}
	e := newEnv(t)
	c := newShadowCluster(3)
	for i, n := range c.nodes {
		created := kube.CreateNode(t, e.cluster.AdminConfig(), kube.Node{Name: n.Name, IPv4: fmt.Sprintf("198.18.0.%d", i+1), BootID: n.Status.NodeInfo.BootID})
		n.UID = created.UID
	}
	policy := testPolicy()
	policy.ProtocolV2 = rows // the master follows NodeKeys (and their capabilities) under protocol v2
	m := e.startMaster("master-a", policy)
	e.eventually("node IDs in the ring", wait, func() (bool, string) {
		r := e.ring()
		if r == nil {
			return false, "no ring"
		}
		for _, n := range c.names {
			if r.NodeID(n) == 0 {
				return false, n + " has no ID"
			}
		}
		c.ring = r
		return true, ""
	})
	rowSelf := map[string]readiness.K{}
	used := map[string]string{} // what a node's report says of the view its agent used (none: absent)
	publish := func() {
		t.Helper()
		for _, n := range c.nodes {
			if rows {
				nk := nodekeys.Keys{Incarnation: nodekeys.Incarnation{BootID: n.Status.NodeInfo.BootID, UID: string(n.UID), Epoch: c.epoch[n.Name]},
					Capabilities: []string{api.CapabilityReadinessRows}}
				if err := nodekeys.Write(e.ctx, e.dyn(), api.Namespace, n.Name, string(n.UID), nk); err != nil {
					t.Fatal(err)
				}
			}
			rep := c.report(n.Name)
			if rows && rep.Readiness != nil {
				// As an agent does: a row for each new key digest of the node (every
				// status here claims every peer: complete at once, not written again).
				st, err := readiness.Decode(rep.Readiness, readiness.DefaultBuckets)
				if err != nil {
					t.Fatal(err)
				}
				if rowSelf[n.Name] != st.Self {
					if err := noderow.Write(e.ctx, e.dyn(), api.Namespace, n.Name, string(n.UID), noderow.Normal(st)); err != nil {
						t.Fatal(err)
					}
					rowSelf[n.Name] = st.Self
				}
			}
			if u := used[n.Name]; u != "" && rep.Readiness != nil {
				rep.Readiness.Used = u
			}
			raw, err := json.Marshal(rep)
			if err != nil {
				t.Fatal(err)
			}
			if err := nodereport.Write(e.ctx, e.dyn(), api.Namespace, n.Name, string(n.UID), "enforce", raw); err != nil {
				t.Fatal(err)
			}
		}
	}
	views := func() (map[string]readiness.View, string) {
		l, err := e.dyn().Resource(nodeview.GVR).Namespace(api.Namespace).List(e.ctx, metav1.ListOptions{})
		if err != nil {
			return nil, err.Error()
		}
		out := map[string]readiness.View{}
		for i := range l.Items {
			u := &l.Items[i]
			w, err := nodeview.Parse(u)
			if err != nil {
				return nil, err.Error()
			}
			v, err := readiness.DecodeView(&w)
			if err != nil {
				return nil, err.Error()
			}
			if refs := u.GetOwnerReferences(); len(refs) != 1 || refs[0].Kind != "Node" || refs[0].Name != u.GetName() {
				return nil, fmt.Sprintf("%s owned by %+v", u.GetName(), refs)
			}
			out[u.GetName()] = v
		}
		return out, fmt.Sprint(out)
	}
	// expect waits for every view to list notIn's peers (both ways) and for also (nil:
	// nothing more) to hold: which views must be over a new key view, since the lists
	// alone also match a view not yet rewritten (the test once read an old view of
	// node-0's, listing nothing, as the new one, and counted its rewrite as needless).
	expect := func(what string, notIn map[string][]uint32, also func(map[string]readiness.View) bool) {
		t.Helper()
		e.eventually(what, wait, func() (bool, string) {
			got, why := views()
			if len(got) != len(c.names) {
				return false, why
			}
			for _, n := range c.names {
				if !slices.Equal(got[n].NotIn, notIn[n]) || !slices.Equal(got[n].NotOut, notIn[n]) {
					return false, why
				}
			}
			if also != nil && !also(got) {
				return false, why
			}
			return true, ""
		})
	}
	id := func(n string) uint32 { return c.ring.NodeID(n) }
	publish()
	expect("every pair confirmed", nil, nil)
	writes := value(m.metrics.ViewWrites.WithLabelValues("ok"))
	if writes < 3 {
		t.Fatalf("%v view writes, want ≥ 3", writes)
	}

	before, _ := views()
	c.epoch["node-0"], c.seenAs["node-0"]["node-0"] = "e2", "e2"
	if rows {
		// As an agent does, node-0 publishes the row of its new keys after a sync and
		// its report; the master may see them in either order, and writes views it sees
		// no row for yet (a wasted write, not a wrong one). The test makes the order
		// certain: the row first, and the master has read it (the old K's row counts no
		// more), then the reports.
		rowsNow := func() float64 { return value(m.metrics.ShadowNodes.WithLabelValues("row")) }
		e.eventually("every row current", wait, func() (bool, string) { return rowsNow() == 3, fmt.Sprint(rowsNow()) })
		rep := c.report("node-0")
		st, err := readiness.Decode(rep.Readiness, readiness.DefaultBuckets)
		if err != nil {
			t.Fatal(err)
		}
		if err := noderow.Write(e.ctx, e.dyn(), api.Namespace, "node-0", string(c.nodes[0].UID), noderow.Normal(st)); err != nil {
			t.Fatal(err)
		}
		rowSelf["node-0"] = st.Self
		e.eventually("node-0's new row read by the master", wait, func() (bool, string) { return rowsNow() == 2, fmt.Sprint(rowsNow()) })
	}
	publish()
	peers := []uint32{id("node-1"), id("node-2")}
	slices.Sort(peers)
	rekeyed := func(got map[string]readiness.View) bool {
		if got["node-0"].Keys == before["node-0"].Keys {
			return false // node-0's view not rewritten yet
		}
		// Without rows every view is over the new key view; with rows the peers' are not
		// rewritten (checked below, once the master has settled).
		return rows || (got["node-1"].Keys == got["node-0"].Keys && got["node-2"].Keys == got["node-0"].Keys)
	}
	if !rows {
		expect("node-0 re-keyed: its view lists both peers", map[string][]uint32{"node-0": peers}, rekeyed)
	} // with rows that view gives node-0 nothing: not written

	c.seenAs["node-1"]["node-0"], c.seenAs["node-2"]["node-0"] = "e2", "e2"
	publish()
	expect("the peers claim node-0's new keys", nil, rekeyed)
	after, why := views()
	skipped := value(m.metrics.ViewsSkipped)
	for _, n := range []string{"node-1", "node-2"} {
		switch {
		case rows && after[n].Keys != before[n].Keys:
			t.Errorf("every agent publishes rows, node-0 re-keyed: %s's view was rewritten (%s)", n, why)
		case !rows && after[n].Keys != after["node-0"].Keys:
			t.Errorf("without rows, node-0 re-keyed: %s's view is over another key view than node-0's (%s)", n, why)
		}
	}
	if after["node-0"].Keys == before["node-0"].Keys {
		t.Errorf("node-0 re-keyed: its view was not rewritten (%s)", why)
	}
	if rows != (skipped > 0) {
		t.Errorf("views skipped: %v (every agent publishes rows: %v)", skipped, rows)
	}
	t.Logf("rows %v: views skipped %v", rows, skipped)

	if rows {
		// node-1's agent restarts: it has used no view since, and says so. The view the
		// API holds for it (over the key view before node-0 re-keyed) gives it nothing,
		// so the master writes it the current one, though the rows cover every pair
		// (docs/keys.md §12; readiness.TestModelRestartsRandomInterleavings).
		used["node-1"] = api.UsedNone
		publish()
		e.eventually("node-1's view rewritten for its restarted agent", wait, func() (bool, string) {
			got, why := views()
			return got["node-1"].Keys == after["node-0"].Keys, why
		})
		// It takes that view and says so.
		got, _ := views()
		used["node-1"] = readiness.EncodeUsed(got["node-1"].Digest(), true)
		publish()
	}

	// Nothing changes: no view is written again (reconciles run every 300 ms).
	settled := value(m.metrics.ViewWrites.WithLabelValues("ok"))
	time.Sleep(2 * time.Second)
	if got := value(m.metrics.ViewWrites.WithLabelValues("ok")); got != settled {
		t.Errorf("views written %v times more with nothing changed", got-settled)
	}
	if got := value(m.metrics.ViewWrites.WithLabelValues("error")); got != 0 {
		t.Errorf("%v view writes failed", got)
	}

	// An operator deletes a NodeView: the master writes it again (its informer, under
	// the manifest's RBAC, sees the deletion), though the view it wants did not change.
	if err := e.dyn().Resource(nodeview.GVR).Namespace(api.Namespace).Delete(e.ctx, "node-1", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	expect("node-1's view deleted by hand, written again", nil, nil)
}

// TestShadowNarrowedReobservation: after a key change the shadow observes an unchanged
// status again only in the buckets whose key view changed; over random re-keys, lagging
// peers, withdrawn and restored claims and stale reports, its confirmations and views equal
// those of a shadow that observes every status wholly.
func TestShadowNarrowedReobservation(t *testing.T) {
	for seed := uint64(1); seed <= 40; seed++ {
		rng := rand.New(rand.NewPCG(seed, 11))
		n := 3 + rng.IntN(6)
		c := newShadowCluster(n)
		narrow, full := newShadowReadiness(), newShadowReadiness()
		full.observeAll = true
		epochs := 1
		next := map[string]string{} // a node's next epoch, which peers may see before the master does
		for step := range 80 {
			b := c.names[rng.IntN(n)]
			what := ""
			if next[b] == "" {
				epochs++
				next[b] = fmt.Sprint("e", epochs)
			}
			switch r := rng.IntN(6); r {
			case 0:
				c.epoch[b], next[b] = next[b], ""
				c.seenAs[b][b] = c.epoch[b]
				what = "re-key " + b
			case 1, 2: // a peer catches up with b's keys, or sees its next ones first
				x := c.names[rng.IntN(n)]
				c.seenAs[x][b] = c.epoch[b]
				if rng.IntN(2) == 0 {
					c.seenAs[x][b] = next[b]
				}
				what = x + " sees " + b + " at " + c.seenAs[x][b]
			case 3: // a claim withdrawn or restored
				x := c.names[rng.IntN(n)]
				if i := slices.Index(c.claims[x], b); i >= 0 {
					c.claims[x] = slices.Delete(c.claims[x], i, i+1)
				} else if x != b {
					c.claims[x] = append(c.claims[x], b)
				}
				what = x + " toggles " + b
			case 4: // b's report goes stale (Node shows a new boot), or catches up
				i := slices.Index(c.names, b)
				if old, ok := c.staleBoot[b]; ok {
					c.nodes[i].Status.NodeInfo.BootID = old
					delete(c.staleBoot, b)
				} else {
					c.staleBoot[b] = c.nodes[i].Status.NodeInfo.BootID
					c.nodes[i].Status.NodeInfo.BootID += "-next"
				}
				what = "stale/fresh " + b
			default:
				what = "nothing"
			}
			states := c.states()
			got, want := narrow.update(c.ring, c.nodes, states), full.update(c.ring, c.nodes, states)
			if got.Unconfirmed != want.Unconfirmed || got.Nodes != want.Nodes {
				t.Fatalf("seed %d step %d (%s): narrowed %+v, full %+v", seed, step, what, got.Unconfirmed, want.Unconfirmed)
			}
			for _, id := range full.m.IDs() {
				if a, b := narrow.m.ViewFor(id), full.m.ViewFor(id); !slices.Equal(a.NotIn, b.NotIn) || !slices.Equal(a.NotOut, b.NotOut) || a.Keys != b.Keys {
					t.Fatalf("seed %d step %d (%s): view of %d narrowed %+v, full %+v", seed, step, what, id, a, b)
				}
			}
		}
	}
}
