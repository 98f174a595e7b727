package agent

import (
	"testing"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/readiness"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// TestViewShadow: the agent's comparison of protocol v2's rule on its NodeView with v1's
// lists, step by step as a cluster goes: no view yet, a view that agrees, a peer the view
// lists, a view over other keys (ignored, confirmations kept), a peer re-keyed (its
// confirmation does not carry over), a peer the lists deny but the view confirms.
func TestViewShadow(t *testing.T) {
	type peer struct {
		id            uint32
		inc           string
		inFrom, encTo bool // the peer's v1 claims about this node
	}
	peers := map[string]*peer{"b": {2, "boot-b/uid-b/e1", true, true}, "c": {3, "boot-c/uid-c/e1", true, true}, "d": {4, "boot-d/uid-d/e1", true, true}}
	inputs := func() *desired.Inputs {
		in := &desired.Inputs{Self: "a", Nodes: []desired.Node{{Name: "a", NodeID: 1, Incarnation: "boot-a/uid-a/e1"}}}
		for _, name := range []string{"b", "c", "d"} {
			p := peers[name]
			in.Nodes = append(in.Nodes, desired.Node{Name: name, NodeID: p.id, Incarnation: p.inc,
				Report: &desired.Report{Incarnation: p.inc, InboundFromSelf: p.inFrom, EncryptsToSelf: p.encTo}})
		}
		return in
	}
	keysOf := func(in *desired.Inputs) readiness.Keys {
		ks := readiness.Keys{}
		for _, n := range in.Nodes {
			ks[n.NodeID] = readiness.KeyDigest(n.Incarnation)
		}
		return ks
	}
	view := func(ks readiness.Keys, notIn, notOut []uint32) api.ReadinessView {
		return *readiness.EncodeView(readiness.View{Keys: ks.Digest(nil), NotIn: notIn, NotOut: notOut})
	}
	var s viewShadow
	step := func(what string, w api.ReadinessView, have bool, consistent bool, in, out [numVerdicts]int) {
		t.Helper()
		got := s.compare(inputs(), w, have)
		if got.View != have || got.Consistent != consistent || got.In != in || got.Out != out {
			t.Errorf("%s: %+v, want view %v consistent %v in %v out %v", what, got, have, consistent, in, out)
		}
	}
	step("no view yet", api.ReadinessView{}, false, false, [3]int{0, 0, 3}, [3]int{0, 0, 3})
	ks := keysOf(inputs())
	step("a view confirming every pair", view(ks, nil, nil), true, true, [3]int{3, 0, 0}, [3]int{3, 0, 0})

	step("a view over other keys: ignored, confirmations kept", view(readiness.Keys{1: 9}, []uint32{2, 3, 4}, []uint32{2, 3, 4}), true, false,
		[3]int{3, 0, 0}, [3]int{3, 0, 0})

	// c re-keys: its v1 claims are about a's keys and hold (c installed a's SAs under its
	// new keys), but no view has confirmed the pair for c's new keys.
	peers["c"].inc = "boot-c/uid-c/e2"
	step("c re-keyed, no new view", view(ks, nil, nil), true, false, [3]int{2, 0, 1}, [3]int{2, 0, 1})
	ks = keysOf(inputs())
	step("a new view lists c inbound only", view(ks, []uint32{3}, nil), true, true, [3]int{2, 0, 1}, [3]int{3, 0, 0})
	step("and then confirms it", view(ks, nil, nil), true, true, [3]int{3, 0, 0}, [3]int{3, 0, 0})

	// d's lists no longer name a (its report lags, or it withdrew): the sticky view is ahead.
	peers["d"].inFrom = false
	step("d's list lags the view", view(ks, nil, nil), true, true, [3]int{2, 1, 0}, [3]int{3, 0, 0})

	// This node is not in the inputs with an ID: nothing to compare.
	var empty viewShadow
	if got := empty.compare(&desired.Inputs{Self: "a"}, view(ks, nil, nil), true); got != (ViewShadowResult{}) {
		t.Errorf("no self: %+v", got)
	}
}
