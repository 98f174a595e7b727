package watch

import (
	"fmt"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/bench"
	"github.com/secureoverlay/secureoverlay/bench/cluster"
	"github.com/secureoverlay/secureoverlay/nodereport"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// TestBenchEventPath: the agent's per-event path from the watcher's caches to the desired
// state, for one node joining clusters of 1,000 and 5,000 nodes (every peer reporting
// ready, Always pool, enforce, the real key derivation): the node view's snapshot,
// Watcher.Inputs (only the changed nodes converted), the watcher's Hint, Memo.Update and
// Memo.State — and, as "scan", what the agent did before: Inputs converting every node
// and the zero Hint (every Node compared), on a second memo. The snapshot is taken once
// per event and counted in both totals. Each round adds the joiner's Node and
// NodeReport to the view (untimed), times the path, and removes the joiner again
// (untimed, the memo following). Medians of the rounds; run with SECUREOVERLAY_BENCH=1.
func TestBenchEventPath(t *testing.T) {
	bench.Gate(t, false)
	const rounds = 41
	sizes := []int{1000, 5000}
	totals := map[string]map[int]time.Duration{"hint": {}, "scan": {}}
	for _, n := range sizes {
		names := make([]string, n+rounds)
		for i := range names {
			names[i] = cluster.Name(i)
		}
		ring := testRing(t, api.ModeEnforce, 8, names...)
		self, epoch := names[0], "e0"
		selfTag := IncarnationTag(KeyIncarnation("boot-0", "uid-0", epoch))
		v := newNodeView()
		add := func(i, r int) {
			name := names[i]
			v.setNode(NodeInfo{Name: name, IPv4Address: cluster.IP(i).String() + "/24", Incarnation: fmt.Sprintf("boot-%d", i), UID: fmt.Sprintf("uid-%d", i), Ready: true}, self)
			if i == 0 {
				return
			}
			rep := &Report{NodeReport: api.NodeReport{Mode: api.ModeEnforce, Incarnation: fmt.Sprintf("boot-%d", i), UID: fmt.Sprintf("uid-%d", i),
				Epoch: fmt.Sprintf("e%d-%d", i, r), Generations: []uint32{1}}, InboundFrom: map[string]string{self: selfTag}, EncryptingTo: map[string]string{self: selfTag}}
			v.setReport(name, &nodereport.Entry[reportEntry]{Value: reportEntry{Raw: fmt.Sprintf("report %d/%d", i, r), Report: rep}}, self)
		}
		for i := range n {
			add(i, 0)
		}
		w := &Watcher{view: v}
		pools := []desired.Pool{{Name: "default", CIDR: cluster.Block(0, 0).Masked(), IPIPMode: desired.IPIPAlways}}
		snapshot := func() Snapshot {
			var s Snapshot
			s.Nodes, s.NodesSeq = v.snapshot()
			s.Ring, s.Pools = ring, pools
			return s
		}
		inputs := func(s Snapshot) desired.Inputs {
			in, err := Inputs(self, s, desired.Config{}, epoch)
			if err != nil {
				t.Fatal(err)
			}
			return in
		}
		var err error
		memos := map[string]*desired.Memo{"hint": desired.NewMemo(), "scan": desired.NewMemo()}
		for _, m := range memos {
			if _, err := m.Update(inputs(snapshot()), desired.Hint{}); err != nil {
				t.Fatal(err)
			}
			m.State()
		}
		phases := map[string][]time.Duration{}
		runtime.GC()
		for r := range rounds {
			joiner := n + r
			add(joiner, r)
			t0 := time.Now()
			s := snapshot() // one per event: both memos read the same
			snap := time.Since(t0)
			phases["snapshot"] = append(phases["snapshot"], snap)
			for _, kind := range []string{"hint", "scan"} {
				m := memos[kind]
				t1 := time.Now()
				var in desired.Inputs
				if kind == "hint" { // the agent's path: the watcher converts the changed nodes only
					if in, err = w.Inputs(self, s, desired.Config{}, epoch); err != nil {
						t.Fatal(err)
					}
				} else {
					in = inputs(s)
				}
				t2 := time.Now()
				h := desired.Hint{}
				if kind == "hint" {
					h = w.Hint(m.NodesVersion(), in.NodesVersion)
				}
				ch, err := m.Update(in, h)
				t3 := time.Now()
				st := m.State()
				t4 := time.Now()
				if err != nil || ch.Full || len(ch.SAs) != 2*len(st.Generations) || (kind == "hint" && !h.Known) {
					t.Fatalf("%s round %d: full=%v %d SAs hint %v %v", kind, r, ch.Full, len(ch.SAs), h.Known, err)
				}
				phases[kind+".inputs"] = append(phases[kind+".inputs"], t2.Sub(t1))
				phases[kind+".update"] = append(phases[kind+".update"], t3.Sub(t2))
				phases[kind+".state"] = append(phases[kind+".state"], t4.Sub(t3))
				phases[kind+".total"] = append(phases[kind+".total"], snap+t4.Sub(t1))
			}
			v.deleteNode(names[joiner])
			v.setReport(names[joiner], nil, self)
			for _, kind := range []string{"hint", "scan"} {
				m := memos[kind]
				s := snapshot()
				in, h := inputs(s), desired.Hint{}
				if kind == "hint" {
					if in, err = w.Inputs(self, s, desired.Config{}, epoch); err != nil {
						t.Fatal(err)
					}
					h = w.Hint(m.NodesVersion(), in.NodesVersion)
				}
				if _, err := m.Update(in, h); err != nil {
					t.Fatal(err)
				}
				m.State()
			}
		}
		keys := make([]string, 0, len(phases))
		for k := range phases {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			d := median(phases[k])
			bench.Report(fmt.Sprintf("eventpath.%d.%s", n, k), float64(d.Nanoseconds())/1e6, "ms")
			if k == "hint.total" || k == "scan.total" {
				totals[k[:4]][n] = d
			}
		}
	}
	for _, kind := range []string{"hint", "scan"} {
		r := float64(totals[kind][5000]) / float64(totals[kind][1000])
		bench.Report(fmt.Sprintf("eventpath.ratio_5000_1000.%s", kind), r, "x")
		t.Logf("event path (%s): 1,000 nodes %s, 5,000 nodes %s: %.2fx", kind, totals[kind][1000], totals[kind][5000], r)
	}
}

func median(d []time.Duration) time.Duration {
	c := slices.Clone(d)
	slices.Sort(c)
	return c[len(c)/2]
}
