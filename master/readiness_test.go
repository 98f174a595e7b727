package master

import (
	"fmt"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
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
		Readiness: soagent.ReadinessOf(st, &snap, b, inc)}
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
		want := shadowCounts{Nodes: nodes, Statuses: statuses, Unconfirmed: [2]int{in, out}}
		if got != want {
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
