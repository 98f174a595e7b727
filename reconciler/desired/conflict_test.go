package desired

import (
	"slices"
	"strings"
	"testing"

	"github.com/secureoverlay/secureoverlay/api"
)

// peerState is everything a state holds for one peer, as text.
func peerState(st State, peer string) string {
	var b strings.Builder
	for _, sa := range st.SAs {
		if sa.Peer == peer {
			b.WriteString(sa.String() + "\n")
		}
	}
	for _, p := range st.Policies {
		if p.Peer == peer {
			b.WriteString(p.String() + "\n")
		}
	}
	for _, r := range st.Rules {
		if r.Peer == peer {
			b.WriteString("rule " + r.ID() + "\n")
		}
	}
	return b.String()
}

// The adversarial review's case: node a-evil writes p's address into its own Calico
// annotation (its kubelet credentials allow it). Before, every honest node kept the first
// claimant by name: a-evil. p's drops and required policies went, its pair ran in
// plaintext in enforce, and a ready a-evil received p's traffic encrypted to its own keys.
func TestComputeAddressConflicts(t *testing.T) {
	base := func(mode api.Mode) Inputs {
		return Inputs{Self: "a",
			Nodes: []Node{node("a", "198.18.0.1/24", 1),
				withReport(node("p", "198.18.0.5/24", 5), api.ModeEncrypt, 1),
				withReport(node("q", "198.18.0.6/24", 6), api.ModeEncrypt, 1)},
			Pools: []Pool{{Name: "default", CIDR: mustPrefix("10.244.0.0/16"), IPIPMode: IPIPAlways}},
			Ring:  ring(mode, active(1)), Keys: testKeys}
	}
	evil := withReport(node("a-evil", "198.18.0.5/24", 66), api.ModeEnforce, 1, 2)
	for _, mode := range []api.Mode{api.ModeEncrypt, api.ModeEnforce} {
		t.Run(string(mode), func(t *testing.T) {
			before, err := Compute(base(mode))
			if err != nil {
				t.Fatal(err)
			}
			if peerState(before, "p") == "" {
				t.Fatal("p has nothing before the conflict")
			}
			in := base(mode)
			in.Nodes = append(in.Nodes, evil)
			in.Previous = &before
			st, err := Compute(in)
			if err != nil {
				t.Fatal(err)
			}
			// p is kept exactly as it was; a-evil gets nothing; q is untouched.
			if got, want := peerState(st, "p"), peerState(before, "p"); got != want {
				t.Errorf("p changed during the conflict:\n got:\n%s\nwant:\n%s", got, want)
			}
			if got := peerState(st, "a-evil"); got != "" {
				t.Errorf("a-evil got state:\n%s", got)
			}
			for _, sa := range st.SAs {
				if sa.Peer != "p" && (sa.Src.String() == "198.18.0.5" || sa.Dst.String() == "198.18.0.5") {
					t.Errorf("SA toward the conflicted address for %s: %s", sa.Peer, sa)
				}
			}
			if got, want := peerState(st, "q"), peerState(before, "q"); got != want {
				t.Errorf("q changed:\n got:\n%s\nwant:\n%s", got, want)
			}
			if len(st.Conflicts) != 1 || st.Conflicts[0].Holder != "p" || !slices.Equal(st.Conflicts[0].Nodes, []string{"a-evil", "p"}) {
				t.Errorf("conflicts %+v", st.Conflicts)
			}
			if s := st.Conflicts[0].String(); !strings.Contains(s, "a-evil") || !strings.Contains(s, "p") {
				t.Errorf("conflict text %q does not name both nodes", s)
			}
			if mode == api.ModeEnforce && !slices.ContainsFunc(st.Rules, func(r Rule) bool { return r.Peer == "p" && r.Action == Drop && r.Hook == HookIn }) {
				t.Errorf("p lost its enforce drop:\n%s", render(st))
			}

			// A rotation during the conflict: q gets the new generation, p stays frozen,
			// and the node does not claim the new generation installed for every peer.
			in.Ring = ring(mode, active(1), pending(2))
			rot, err := Compute(in)
			if err != nil {
				t.Fatal(err)
			}
			if got, want := peerState(rot, "p"), peerState(before, "p"); got != want {
				t.Errorf("p changed in the rotation:\n%s", got)
			}
			if slices.Contains(rot.Generations, 2) || !slices.Contains(rot.Generations, 1) {
				t.Errorf("generations claimed %v, want [1] (p has no generation 2)", rot.Generations)
			}

			// Conflict resolved (a-evil gives the address back): p is computed normally.
			in.Nodes = base(mode).Nodes
			in.Ring = ring(mode, active(1))
			in.Previous = &st
			after, err := Compute(in)
			if err != nil {
				t.Fatal(err)
			}
			if got, want := peerState(after, "p"), peerState(before, "p"); got != want || len(after.Conflicts) != 0 {
				t.Errorf("after the conflict: %v\n%s", after.Conflicts, got)
			}
		})
	}

	// No holder (a restart in the middle of a conflict, or two new nodes): neither gets
	// anything.
	in := base(api.ModeEnforce)
	in.Nodes = append(in.Nodes, evil)
	st, err := Compute(in)
	if err != nil {
		t.Fatal(err)
	}
	if peerState(st, "p") != "" || peerState(st, "a-evil") != "" || len(st.Conflicts) != 1 || st.Conflicts[0].Holder != "" {
		t.Errorf("no holder: p %q, a-evil %q, conflicts %+v", peerState(st, "p"), peerState(st, "a-evil"), st.Conflicts)
	}
	// Someone claims this node's own address: it is skipped, this node is unchanged.
	in = base(api.ModeEnforce)
	clean, _ := Compute(in)
	in.Nodes = append(in.Nodes, withReport(node("a-evil", "198.18.0.1/24", 66), api.ModeEnforce, 1))
	st, err = Compute(in)
	if err != nil {
		t.Fatal(err)
	}
	if render(clean) == render(st) || peerState(st, "a-evil") != "" || len(st.Conflicts) != 1 || st.Conflicts[0].Holder != "a" {
		t.Errorf("own address claimed: conflicts %+v\n%s", st.Conflicts, render(st))
	}
	for _, p := range []string{"p", "q"} {
		if peerState(st, p) != peerState(clean, p) {
			t.Errorf("%s changed when another node claimed this node's address", p)
		}
	}
}
