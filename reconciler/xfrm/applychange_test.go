package xfrm

import (
	"fmt"
	"math/rand/v2"
	"reflect"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// TestApplyChangeEqualsApply: over random event sequences (joins, leaves, a peer's key
// incarnation, report changes, mode and generation changes), an applier fed by a
// desired.Memo through ApplyChange leaves its kernel exactly as an applier given every
// whole State through Apply, with the same writes; write failures injected into both and
// a policy flush behind the diff path's back (repaired at the next resync) included.
func TestApplyChangeEqualsApply(t *testing.T) {
	for seed := range uint64(30) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { applyChangeSequence(t, seed) })
	}
}

var randomModes = []api.Mode{api.ModeAccept, api.ModeEncrypt, api.ModeEnforce}

// randomCluster returns the inputs of a random-sequence test (enforce, generations 1
// active and 2 pending, one IPIP pool) and a generator of node i in its incarnation of
// step, whose report is drawn from rng (listing generation 1 only at random when
// varyGens is set).
func randomCluster(rng *rand.Rand, varyGens bool) (desired.Inputs, func(i, step int) desired.Node) {
	in := desired.Inputs{Self: "n000", Ring: desired.Ring{Mode: api.ModeEnforce, Generations: []desired.Generation{active(1), pending(2)}},
		Keys: testKeys, KeysVersion: "test", Pools: []desired.Pool{{Name: "default", IPIPMode: desired.IPIPAlways}}}
	mk := func(i, step int) desired.Node {
		n := desired.Node{Name: fmt.Sprintf("n%03d", i), IPv4Address: fmt.Sprintf("198.18.0.%d/24", i+1),
			Incarnation: fmt.Sprintf("boot-%d-%d", i, step), NodeID: uint32(i + 1)}
		mode, gens := randomModes[rng.IntN(3)], []uint32{1, 2} // drawn in this order
		if varyGens {
			gens = gens[:1+rng.IntN(2)]
		}
		n.Report = &desired.Report{Incarnation: n.Incarnation, Mode: mode, Generations: gens,
			InboundFromSelf: rng.IntN(4) > 0, EncryptsToSelf: rng.IntN(4) > 0}
		return n
	}
	return in, mk
}

func applyChangeSequence(t *testing.T, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 3))
	modes := randomModes
	in, mk := randomCluster(rng, true)
	nodes := map[string]desired.Node{}
	nodes["n000"] = mk(0, 0)
	for i := 1; i <= 8; i++ {
		nodes[fmt.Sprintf("n%03d", i)] = mk(i, 0)
	}
	build := func() {
		in.Nodes = nil
		for _, n := range nodes {
			in.Nodes = append(in.Nodes, n)
		}
		slices.SortFunc(in.Nodes, func(a, b desired.Node) int { return strings.Compare(a.Name, b.Name) })
	}
	memo := desired.NewMemo()
	fd, ff := NewFake(), NewFake() // diff path, full path
	ad, af := NewApplier(fd, desired.Config{}), NewApplier(ff, desired.Config{})
	diffs, faulted := 0, false
	for step := range 120 {
		var touched []string
		switch ev := rng.IntN(10); ev {
		case 0, 1, 2: // join (a new incarnation: a leave and re-join must not reuse keys)
			i := 1 + rng.IntN(20)
			n := mk(i, step)
			nodes[n.Name] = n
			touched = append(touched, n.Name)
		case 3, 4: // leave
			i := 1 + rng.IntN(20)
			name := fmt.Sprintf("n%03d", i)
			delete(nodes, name)
			touched = append(touched, name)
		case 5: // key incarnation
			i := 1 + rng.IntN(20)
			name := fmt.Sprintf("n%03d", i)
			if _, ok := nodes[name]; ok {
				nodes[name] = mk(i, step)
				touched = append(touched, name)
			}
		case 6, 7: // report
			i := 1 + rng.IntN(20)
			name := fmt.Sprintf("n%03d", i)
			if n, ok := nodes[name]; ok {
				r := *n.Report
				r.Mode, r.Generations = modes[rng.IntN(3)], []uint32{1, 2, 2}[rng.IntN(3):]
				r.InboundFromSelf, r.EncryptsToSelf = rng.IntN(4) > 0, rng.IntN(4) > 0
				n.Report = &r
				nodes[name] = n
				touched = append(touched, name)
			}
		case 8: // mode
			in.Ring.Mode = modes[rng.IntN(3)]
			touched = nil
		case 9: // rotation step
			switch in.Ring.Generations[0].ID {
			case 1:
				in.Ring.Generations = []desired.Generation{retiring(1), active(2)}
			default:
				in.Ring.Generations = []desired.Generation{active(1), pending(2)}
			}
		}
		build()
		// Faults: a write that fails on the diff path's kernel only, or a policy flushed
		// from it (the next periodic resync repairs it).
		fd.Fail, ff.Fail = nil, nil
		fault := rng.IntN(12)
		if fault == 0 {
			// The same failure on both kernels. Not a failed delete of a state being
			// replaced: its new key is recorded before, and then never installed, which
			// both paths answer with ErrKeyReuse (a new epoch in the agent).
			op := []string{"add-state", "add-policy", "update-policy", "delete-policy"}[rng.IntN(4)]
			fail := func(o, _ string) error {
				if o == op {
					return fmt.Errorf("injected: %w", syscall.EINVAL) // refused: the key may be retried
				}
				return nil
			}
			fd.Fail, ff.Fail = fail, fail
		}
		if fault == 1 {
			fd.Remove("policy", func(string) bool { return true })
			ad.QueueResync()
			af.QueueResync()
			memo.Reset()
		}
		want, err := desired.Compute(in)
		if err != nil {
			t.Fatalf("step %d: %v", step, err)
		}
		ch, err := memo.Update(in, desired.Hint{})
		if err != nil {
			t.Fatalf("step %d: %v", step, err)
		}
		if !ch.Full && ch.From == ad.at {
			diffs++
		}
		rd, errd := ad.ApplyChange(ch, memo.State)
		rf, errf := af.Apply(want)
		after := faulted
		faulted = fault == 0
		if fault == 0 {
			if (errd == nil) != (errf == nil) {
				t.Fatalf("step %d: diff %v, full %v", step, errd, errf)
			}
			continue // compared after the next step, which repairs
		}
		if errd != nil || errf != nil {
			t.Fatalf("step %d: diff %v, full %v", step, errd, errf)
		}
		ds, dp := fd.Snapshot()
		fs, fp := ff.Snapshot()
		if !reflect.DeepEqual(ds, fs) || !reflect.DeepEqual(dp, fp) {
			t.Fatalf("step %d (change full=%v peers %v): kernels differ: diff path %d SAs %d policies, full %d SAs %d policies",
				step, ch.Full, ch.Peers, len(ds), len(dp), len(fs), len(fp))
		}
		if fault != 1 && !after && rd.Writes() != rf.Writes() {
			t.Fatalf("step %d: diff path wrote %d (%+v), full %d (%+v)", step, rd.Writes(), rd, rf.Writes(), rf)
		}
	}
	if diffs < 40 {
		t.Fatalf("only %d of 120 steps took the diff path", diffs)
	}
}

// TestApplyChangeJoinWritesWithoutWalking: one node joining a 1,000-node cluster through
// the memo and ApplyChange makes the 6 writes and lists nothing; a queued resync makes
// the next ApplyChange walk (and list) again.
func TestApplyChangeJoinWritesWithoutWalking(t *testing.T) {
	gens := []desired.Generation{retiring(1), active(2)}
	in := cluster(1001, api.ModeEnforce, gens, 1, 2)
	in.KeysVersion = "test"
	small := in
	small.Nodes = slices.Clone(in.Nodes[:1000])
	slices.SortFunc(small.Nodes, func(a, b desired.Node) int { return strings.Compare(a.Name, b.Name) })
	slices.SortFunc(in.Nodes, func(a, b desired.Node) int { return strings.Compare(a.Name, b.Name) })
	m := desired.NewMemo()
	f := NewFake()
	a := NewApplier(f, desired.Config{})
	ch, err := m.Update(small, desired.Hint{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.ApplyChange(ch, m.State); err != nil {
		t.Fatal(err)
	}
	lists := f.Lists
	ch, err = m.Update(in, desired.Hint{Known: true, Nodes: []string{"n1001"}})
	if err != nil || ch.Full {
		t.Fatalf("join change full=%v: %v", ch.Full, err)
	}
	res, err := a.ApplyChange(ch, func() desired.State { t.Fatal("the diff path asked for the whole state"); return desired.State{} })
	if err != nil {
		t.Fatal(err)
	}
	if res.Writes() != 6 || res.StatesAdded != 4 || res.PoliciesAdded != 2 || f.Lists != lists || res.Full {
		t.Fatalf("join %+v (lists %d→%d)", res, lists, f.Lists)
	}
	ch, err = m.Update(small, desired.Hint{Known: true, Nodes: []string{"n1001"}})
	if err != nil {
		t.Fatal(err)
	}
	if res, err = a.ApplyChange(ch, m.State); err != nil || res.Writes() != 6 || res.StatesDeleted != 4 || res.PoliciesDeleted != 2 {
		t.Fatalf("leave %+v %v", res, err)
	}
	a.QueueResync()
	ch, err = m.Update(small, desired.Hint{})
	if err != nil {
		t.Fatal(err)
	}
	if res, err = a.ApplyChange(ch, m.State); err != nil || !res.Full || res.Writes() != 0 || f.Lists == lists {
		t.Fatalf("resync %+v %v", res, err)
	}
}
