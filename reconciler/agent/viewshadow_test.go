package agent

import (
	"slices"
	"testing"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/readiness"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// TestViewShadow: the agent's comparison of protocol v2's rule on its NodeView with v1's
// lists, step by step as a cluster goes: no view yet, a view that agrees, a peer the view
// lists, a view over other keys (ignored, confirmations kept), a peer re-keyed (its
// confirmation does not carry over), a peer the lists deny but the view confirms, a peer
// without lists (the rule's answer alone).
func TestViewShadow(t *testing.T) {
	type peer struct {
		id            uint32
		inc           string
		inFrom, encTo bool // the peer's v1 claims about this node
		omitted       bool // its report omits the lists (§9 step 4)
	}
	peers := map[string]*peer{"b": {2, "boot-b/uid-b/e1", true, true, false}, "c": {3, "boot-c/uid-c/e1", true, true, false}, "d": {4, "boot-d/uid-d/e1", true, true, false}}
	inputs := func() *desired.Inputs {
		in := &desired.Inputs{Self: "a", Nodes: []desired.Node{{Name: "a", NodeID: 1, Incarnation: "boot-a/uid-a/e1"}}}
		for _, name := range []string{"b", "c", "d"} {
			p := peers[name]
			in.Nodes = append(in.Nodes, desired.Node{Name: name, NodeID: p.id, Incarnation: p.inc,
				Report: &desired.Report{Incarnation: p.inc, InboundFromSelf: p.inFrom, EncryptsToSelf: p.encTo, ListsOmitted: p.omitted}})
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
		inp := inputs()
		got := s.compare(inp, s.keys(inp), w, have, nil)
		if got.View != have || got.Consistent != consistent || got.In != in || got.Out != out {
			t.Errorf("%s: %+v, want view %v consistent %v in %v out %v", what, got, have, consistent, in, out)
		}
	}
	step("no view yet", api.ReadinessView{}, false, false, [numVerdicts]int{0, 0, 3}, [numVerdicts]int{0, 0, 3})
	ks := keysOf(inputs())
	step("a view confirming every pair", view(ks, nil, nil), true, true, [numVerdicts]int{3, 0, 0}, [numVerdicts]int{3, 0, 0})

	step("a view over other keys: ignored, confirmations kept", view(readiness.Keys{1: 9}, []uint32{2, 3, 4}, []uint32{2, 3, 4}), true, false,
		[numVerdicts]int{3, 0, 0}, [numVerdicts]int{3, 0, 0})

	// c re-keys: its v1 claims are about a's keys and hold (c installed a's SAs under its
	// new keys), but no view has confirmed the pair for c's new keys.
	peers["c"].inc = "boot-c/uid-c/e2"
	step("c re-keyed, no new view", view(ks, nil, nil), true, false, [numVerdicts]int{2, 0, 1}, [numVerdicts]int{2, 0, 1})
	ks = keysOf(inputs())
	step("a new view lists c inbound only", view(ks, []uint32{3}, nil), true, true, [numVerdicts]int{2, 0, 1}, [numVerdicts]int{3, 0, 0})
	step("and then confirms it", view(ks, nil, nil), true, true, [numVerdicts]int{3, 0, 0}, [numVerdicts]int{3, 0, 0})

	// d's lists no longer name a (its report lags, or it withdrew): the sticky view is ahead.
	peers["d"].inFrom = false
	step("d's list lags the view", view(ks, nil, nil), true, true, [numVerdicts]int{2, 1, 0}, [numVerdicts]int{3, 0, 0})

	// d's agent omits its lists: the rule's answer alone, confirmed; then d re-keys and a
	// view lists it inbound: unconfirmed inbound, confirmed outbound.
	peers["d"].omitted, peers["d"].inFrom, peers["d"].encTo = true, false, false
	step("d omits its lists", view(ks, nil, nil), true, true, [numVerdicts]int{2, 0, 0, 1, 0}, [numVerdicts]int{2, 0, 0, 1, 0})
	peers["d"].inc = "boot-d/uid-d/e2"
	ks = keysOf(inputs())
	step("d re-keyed, a view lists it inbound", view(ks, []uint32{4}, nil), true, true, [numVerdicts]int{2, 0, 0, 0, 1}, [numVerdicts]int{2, 0, 0, 1, 0})

	// This node is not in the inputs with an ID: nothing to compare.
	var empty viewShadow
	none := &desired.Inputs{Self: "a"}
	if got := empty.compare(none, empty.keys(none), view(ks, nil, nil), true, nil); got != (ViewShadowResult{}) {
		t.Errorf("no self: %+v", got)
	}
}

// rowSource is a RowSource over fixed rows by node name.
type rowSource map[string]readiness.Status

func (r rowSource) ReadinessRows(f func(string, readiness.Status)) {
	for name, row := range r {
		f(name, row)
	}
}

// TestViewShadowRows: the peers' rows confirm, beside the view, what they claim about this
// node for both ends' current keys, and only that: a row of a peer's old keys, a row whose
// ID is not its node's, a row that leaves this node out, confirm nothing; the rows-only
// rule counts apart.
func TestViewShadowRows(t *testing.T) {
	incs := map[string]string{"a": "boot-a/uid-a/e1", "b": "boot-b/uid-b/e1", "c": "boot-c/uid-c/e1"}
	ids := map[string]uint32{"a": 1, "b": 2, "c": 3}
	reported := map[string]string{} // a peer's report's incarnation, when it lags its keys
	inputs := func() *desired.Inputs {
		in := &desired.Inputs{Self: "a"}
		for _, name := range []string{"a", "b", "c"} {
			n := desired.Node{Name: name, NodeID: ids[name], Incarnation: incs[name]}
			if name != "a" {
				r := incs[name]
				if lag, ok := reported[name]; ok {
					r = lag
				}
				n.Report = &desired.Report{Incarnation: r, InboundFromSelf: true, EncryptsToSelf: true}
			}
			in.Nodes = append(in.Nodes, n)
		}
		return in
	}
	// rowOf is node x's row claiming every other node (less those in without) with the
	// Ks of now, for x's key incarnation inc.
	rowOf := func(x, inc string, without ...string) readiness.Status {
		claims := readiness.Keys{}
		for name, i := range incs {
			if name != x && !slices.Contains(without, name) {
				claims[ids[name]] = readiness.KeyDigest(i)
			}
		}
		return readiness.NewStatus(ids[x], readiness.KeyDigest(inc), claims, claims, nil, readiness.DefaultBuckets)
	}
	var s viewShadow
	step := func(what string, rows rowSource, taken int, both, alone [numVerdicts]int) {
		t.Helper()
		in := inputs()
		got := s.compare(in, s.keys(in), api.ReadinessView{}, false, peerRows(rows, in))
		if got.Rows != taken || got.In != both || got.Out != both || got.RowIn != alone || got.RowOut != alone {
			t.Errorf("%s: rows %d in %v out %v, rows alone %v %v; want rows %d, %v both ways, rows alone %v",
				what, got.Rows, got.In, got.Out, got.RowIn, got.RowOut, taken, both, alone)
		}
	}
	step("no rows", nil, 0, [numVerdicts]int{0, 0, 2}, [numVerdicts]int{0, 0, 2})
	step("b's row names b's ID under c's name: dropped", rowSource{"c": rowOf("b", incs["b"])}, 0, [numVerdicts]int{0, 0, 2}, [numVerdicts]int{0, 0, 2})
	step("c's row leaves a out", rowSource{"c": rowOf("c", incs["c"], "a")}, 1, [numVerdicts]int{0, 0, 2}, [numVerdicts]int{0, 0, 2})
	step("b's and c's rows", rowSource{"b": rowOf("b", incs["b"]), "c": rowOf("c", incs["c"])}, 2, [numVerdicts]int{2, 0, 0}, [numVerdicts]int{2, 0, 0})
	// c re-keys; its row of the old keys confirms nothing for the new ones.
	old := incs["c"]
	incs["c"] = "boot-c/uid-c/e2"
	step("c re-keyed, its old row", rowSource{"b": rowOf("b", incs["b"]), "c": rowOf("c", old)}, 1, [numVerdicts]int{1, 0, 1}, [numVerdicts]int{1, 0, 1})
	step("c's row of its new keys", rowSource{"b": rowOf("b", incs["b"]), "c": rowOf("c", incs["c"])}, 2, [numVerdicts]int{2, 0, 0}, [numVerdicts]int{2, 0, 0})
	// A row confirms what the lists deny: ahead (must stay 0 in every scenario).
	reported["b"] = incs["b"]
	incs["b"] = "boot-b/uid-b/e2"
	step("b re-keyed and its row claims a before its report does", rowSource{"b": rowOf("b", incs["b"]), "c": rowOf("c", incs["c"])}, 2, [numVerdicts]int{1, 1, 0}, [numVerdicts]int{1, 1, 0})
}
