//go:build linux

package xfrm

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// TestApplyChangeRealKernel: the diff path against the real kernel's policies (SAs in the
// fake: this host has no esp4), in a fresh network namespace. Over random joins, leaves,
// key incarnations, report and mode changes, ApplyChange leaves exactly Compute's policies
// in the kernel after every step, most steps by their difference alone; a policy flushed
// behind its back comes back at the next resync.
func TestApplyChangeRealKernel(t *testing.T) {
	inNetNS(t, func() {
		rng := rand.New(rand.NewPCG(5, 5))
		modes := randomModes
		in, mk := randomCluster(rng, false)
		nodes := map[string]desired.Node{}
		for i := range 10 {
			nodes[fmt.Sprintf("n%03d", i)] = mk(i, 0)
		}
		f := NewFake()
		a := NewApplier(hybrid{Fake: f, Netlink: Netlink{}}, desired.Config{})
		m := desired.NewMemo()
		diffs := 0
		for step := range 80 {
			i := 1 + rng.IntN(15)
			name := fmt.Sprintf("n%03d", i)
			switch rng.IntN(6) {
			case 0, 1:
				nodes[name] = mk(i, step)
			case 2:
				delete(nodes, name)
			case 3:
				if n, ok := nodes[name]; ok {
					r := *n.Report
					r.Mode, r.InboundFromSelf, r.EncryptsToSelf = modes[rng.IntN(3)], rng.IntN(4) > 0, rng.IntN(4) > 0
					n.Report = &r
					nodes[name] = n
				}
			case 4:
				in.Ring.Mode = modes[rng.IntN(3)]
			case 5:
				if rng.IntN(3) == 0 {
					if err := (Netlink{}).DeletePolicy(desired.Policy{Dir: desired.In, Src: mustPrefix("198.18.0.2/32"), Dst: mustPrefix("198.18.0.1/32"), Proto: 4}); err == nil {
						a.QueueResync()
						m.Reset()
					}
				}
			}
			in.Nodes = in.Nodes[:0]
			for _, n := range nodes {
				in.Nodes = append(in.Nodes, n)
			}
			slices.SortFunc(in.Nodes, func(a, b desired.Node) int { return strings.Compare(a.Name, b.Name) })
			want, err := desired.Compute(in)
			if err != nil {
				t.Fatal(err)
			}
			ch, err := m.Update(in, desired.Hint{})
			if err != nil {
				t.Fatal(err)
			}
			if !ch.Full && ch.From == a.at {
				diffs++
			}
			if _, err := a.ApplyChange(ch, m.State); err != nil {
				t.Fatalf("step %d: %v", step, err)
			}
			assertKernelPolicies(t, want, 0)
			states, _ := f.Snapshot()
			if len(states) != len(want.SAs) {
				t.Fatalf("step %d: %d states, want %d", step, len(states), len(want.SAs))
			}
			if t.Failed() {
				t.Fatalf("step %d: kernel differs from Compute", step)
			}
		}
		if diffs < 40 {
			t.Fatalf("only %d of 80 steps took the diff path", diffs)
		}
	})
}
