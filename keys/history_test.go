package keys

import (
	"errors"
	"strings"
	"testing"

	"github.com/secureoverlay/secureoverlay/api"
)

// histRing is a ring with lastGeneration last and the given live generations (roots from
// secretRoot(number)).
func histRing(last uint32, live ...uint32) *Ring {
	r := NewRing()
	r.LastGeneration = last
	for _, n := range live {
		r.Generations = append(r.Generations, Generation{Number: n, Root: secretRoot(byte(n))})
	}
	return r
}

func TestHistoryRules(t *testing.T) {
	edited := histRing(5, 4, 5)
	edited.Generations[1].Root = secretRoot(0xee)
	cases := []struct {
		name string
		seen []*Ring // accepted in this order
		ring *Ring
		want string // "" accepted; else a substring of the error
	}{
		{"nothing seen accepts anything", nil, histRing(7, 6, 7), ""},
		{"same ring again", []*Ring{histRing(2, 1, 2)}, histRing(2, 1, 2), ""},
		{"rotation forward", []*Ring{histRing(2, 1, 2)}, histRing(3, 1, 2, 3), ""},
		{"old generation removed", []*Ring{histRing(3, 1, 2, 3)}, histRing(3, 2, 3), ""},
		{"disable drops every generation", []*Ring{histRing(3, 2, 3)}, histRing(3), ""},
		{"re-enable after off", []*Ring{histRing(3, 2, 3), histRing(3)}, histRing(4, 4), ""},
		{"skipped versions are fine", []*Ring{histRing(1, 1)}, histRing(9, 8, 9), ""},
		{"restored: lastGeneration went down", []*Ring{histRing(1, 1), histRing(2, 1, 2)}, histRing(1, 1), "lastGeneration 1 is below 2"},
		{"restored: removed generation comes back", []*Ring{histRing(2, 1, 2), histRing(2, 2)}, histRing(2, 1, 2), "generation 1) left the ring"},
		{"restored after disable", []*Ring{histRing(3, 2, 3), histRing(3)}, histRing(3, 3), "generation 3) left the ring"},
		{"root of a live generation changed", []*Ring{histRing(5, 4, 5)}, edited, "generations[1] (generation 5) has another root"},
		{"root of a forgotten generation is not checked", []*Ring{histRing(5, 4, 5), histRing(6, 6)}, histRing(7, 6, 7), ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var h History
			for _, r := range c.seen {
				if err := h.Check(r); err != nil {
					t.Fatalf("setup ring %d refused: %v", r.LastGeneration, err)
				}
				h = h.Observe(r)
			}
			err := h.Check(c.ring)
			switch {
			case c.want == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case c.want != "" && err == nil:
				t.Fatalf("accepted, want an error containing %q", c.want)
			case c.want != "" && !strings.Contains(err.Error(), c.want):
				t.Fatalf("error %q, want it to contain %q", err, c.want)
			case err != nil && !errors.Is(err, ErrRingWentBackwards):
				t.Fatalf("error %v does not wrap ErrRingWentBackwards", err)
			}
			if err != nil {
				assertNoKey(t, "history error", err.Error(), c.ring.Generations[0].Root)
			}
		})
	}
}

func TestHistoryObserveForgetsRootsBelowTheFloor(t *testing.T) {
	var h History
	for _, r := range []*Ring{histRing(1, 1), histRing(2, 1, 2), histRing(3, 1, 2, 3), histRing(3, 2, 3), histRing(4, 2, 3, 4), histRing(4, 3, 4)} {
		if err := h.Check(r); err != nil {
			t.Fatal(err)
		}
		h = h.Observe(r)
	}
	if h.High != 4 || h.Floor != 3 || len(h.Roots) != 2 || h.Generations()[0] != 3 {
		t.Fatalf("history %+v, want high 4, floor 3, roots of 3 and 4", h)
	}
}

func TestHistoryMerge(t *testing.T) {
	a := History{}.Observe(histRing(3, 2, 3))
	b := History{}.Observe(histRing(5, 5))
	m := a.Merge(b)
	if m.High != 5 || m.Floor != 5 || len(m.Roots) != 1 {
		t.Fatalf("merge %+v", m)
	}
	if !m.Equal(b.Merge(a)) {
		t.Fatal("merge is not symmetric without conflicts")
	}
	if err := m.Check(histRing(3, 2, 3)); err == nil {
		t.Fatal("merged history accepts a ring one of its parts refuses")
	}
}

func TestReportedHigh(t *testing.T) {
	rep := func(gens ...uint32) NodeState { return NodeState{Report: &api.NodeReport{Generations: gens}} }
	for _, c := range []struct {
		name  string
		nodes []NodeState
		want  uint32
	}{
		{"none", nil, 0},
		{"no usable reports", []NodeState{{Name: "x"}, {ReportError: "bad"}}, 0},
		{"one node", []NodeState{rep(3, 4)}, 4},
		{"majority", []NodeState{rep(4), rep(4), rep(2)}, 4},
		{"one liar cannot raise it", []NodeState{rep(4), rep(4), rep(4000000)}, 4},
		{"two of four is not more than half", []NodeState{rep(9), rep(9), rep(4), rep(4)}, 4},
		{"lagging nodes", []NodeState{rep(), rep(5), rep(5)}, 5},
	} {
		if got := ReportedHigh(c.nodes); got != c.want {
			t.Errorf("%s: %d, want %d", c.name, got, c.want)
		}
	}
}
