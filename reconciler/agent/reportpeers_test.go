package agent

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"reflect"
	"testing"
	"time"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
)

// TestPeerClaimsMatchBuildReport: the report the agent keeps per changed peer
// (peerClaims, fed with the memo's changes) is, after every build, exactly the report
// BuildReport makes from scratch of the same state and snapshot — over random sequences of
// Node events (reboots, new epochs, reports naming or not naming this node, address
// changes, joins, leaves, stale reports), several events per build (coalesced syncs), full
// Updates, failed ones and Resets — and a report already handed out never changes.
func TestPeerClaimsMatchBuildReport(t *testing.T) {
	const self, epoch = "node-000", "e-self"
	modes := []api.Mode{api.ModeAccept, api.ModeEncrypt, api.ModeEnforce}
	for seed := range uint64(12) {
		rng := rand.New(rand.NewPCG(seed, 16))
		mode := modes[seed%uint64(len(modes))]
		n := 20 + rng.IntN(40)
		names := make([]string, 0, 2*n)
		for i := range 2 * n {
			names = append(names, fmt.Sprintf("node-%03d", i))
		}
		ring := testRing(t, mode, names...)
		selfTag := watch.IncarnationTag(watch.KeyIncarnation("boot-self", "uid-self", epoch))
		ip := func(i int) string { return fmt.Sprintf("198.18.%d.%d/16", 1+i/200, 1+i%200) }
		// nodes: the cluster's Nodes by index (nil: absent).
		nodes := make([]*watch.NodeInfo, 2*n)
		mk := func(i int) *watch.NodeInfo {
			name := names[i]
			ni := &watch.NodeInfo{Name: name, IPv4Address: ip(i), Incarnation: "boot-" + name, UID: "uid-" + name, Ready: true}
			if i == 0 {
				ni.Incarnation, ni.UID = "boot-self", "uid-self"
				return ni
			}
			ni.Report = &watch.Report{NodeReport: api.NodeReport{Mode: mode, Generations: []uint32{1}, Incarnation: ni.Incarnation, UID: ni.UID, Epoch: "e1-" + name}}
			if rng.IntN(2) == 0 {
				ni.Report.InboundFrom = map[string]string{self: selfTag}
			}
			return ni
		}
		for i := range n {
			nodes[i] = mk(i)
		}
		snapshot := func() watch.Snapshot {
			s := watch.Snapshot{Ring: ring, Calico: watch.CalicoAPI{GroupVersion: "crd.projectcalico.org/v1"}}
			for _, ni := range nodes {
				if ni != nil {
					s.Nodes = append(s.Nodes, *ni)
				}
			}
			return s
		}
		// event changes one Node as an informer event would (a new NodeInfo: snapshots
		// taken before keep theirs).
		event := func() {
			i := 1 + rng.IntN(len(nodes)-1)
			if nodes[i] == nil {
				nodes[i] = mk(i) // join
				return
			}
			c := *nodes[i]
			if c.Report != nil {
				r := *c.Report
				c.Report = &r
			}
			switch rng.IntN(7) {
			case 0:
				nodes[i] = nil // leave
				return
			case 1: // reboot: its report is stale until it reports again
				c.Incarnation = fmt.Sprintf("boot-%d", rng.Uint32())
			case 2: // reports for its boot with a new epoch
				if c.Report != nil {
					c.Report.Incarnation, c.Report.Epoch = c.Incarnation, fmt.Sprintf("e-%d", rng.Uint32())
				}
			case 3: // names this node as inbound, or stops
				if c.Report != nil {
					if c.Report.InboundFrom == nil {
						c.Report.InboundFrom = map[string]string{self: selfTag}
					} else {
						c.Report.InboundFrom = nil
					}
				}
			case 4:
				c.IPv4Address = ip(rng.IntN(len(nodes)))
			case 5:
				c.Report = nil
			default:
				c.Ready = !c.Ready
			}
			nodes[i] = &c
		}
		memo := desired.NewMemo()
		var pc peerClaims
		var handed []watch.Report // reports built earlier, with their JSON then
		var handedJSON []string
		for step := range 150 {
			for range 1 + rng.IntN(4) {
				event()
			}
			snap := snapshot()
			switch rng.IntN(20) {
			case 0:
				memo.Reset()
			case 1: // a failed Update: the memo holds nothing, the next one computes all
				bad := snap
				bad.Ring = &keys.Ring{}
				if in, err := watch.Inputs(self, bad, desired.Config{}, epoch); err == nil {
					ch, uerr := memo.Update(in, desired.Hint{})
					pc.Note(ch, uerr)
				} else {
					pc.Invalidate()
					memo.Reset()
				}
			}
			in, err := watch.Inputs(self, snap, desired.Config{}, epoch)
			if err != nil {
				t.Fatalf("seed %d step %d: inputs: %v", seed, step, err)
			}
			ch, err := memo.Update(in, desired.Hint{})
			pc.Note(ch, err)
			if err != nil {
				continue
			}
			if rng.IntN(3) == 0 {
				continue // the sync failed before its report: the changes accumulate
			}
			st := memo.State()
			now := time.Unix(int64(step), 0)
			b := Budget{BudgetMTU: 1400, ExternalMTU: 1500}
			got := pc.Report(st, &snap, "boot-self", b, SeqUse{}, SeqUse{}, now)
			want := BuildReport(st, &snap, "boot-self", b, SeqUse{}, SeqUse{}, now)
			if !reflect.DeepEqual(got, want) {
				gj, _ := json.Marshal(got)
				wj, _ := json.Marshal(want)
				t.Fatalf("seed %d step %d (%s): incremental report\n%s\nfrom scratch\n%s", seed, step, ch.How, gj, wj)
			}
			if len(handed) > 0 && sameClaims(handed[len(handed)-1], got) != sameClaims(handed[len(handed)-1], want) {
				t.Fatalf("seed %d step %d: sameClaims differs between the incremental and the full report", seed, step)
			}
			for k, h := range handed {
				if j, _ := json.Marshal(h); string(j) != handedJSON[k] {
					t.Fatalf("seed %d step %d: a report built at step %d changed after it was handed out", seed, step, k)
				}
			}
			j, _ := json.Marshal(got)
			handed, handedJSON = append(handed, got), append(handedJSON, string(j))
		}
	}
}

// TestSameClaims: the per-peer maps compare by content (nil and empty alike), everything
// but LastSync counts.
func TestSameClaims(t *testing.T) {
	base := func() watch.Report {
		return watch.Report{NodeReport: api.NodeReport{Mode: api.ModeAccept, PeersExpected: 2, LastSync: time.Unix(10, 0)},
			InboundFrom: map[string]string{"a": "t1", "b": "t2"}, EncryptingTo: map[string]string{"a": "t1"}}
	}
	a := base()
	for _, c := range []struct {
		what string
		f    func(*watch.Report)
		same bool
	}{
		{"identical", func(*watch.Report) {}, true},
		{"heartbeat", func(r *watch.Report) { r.LastSync = time.Unix(99, 0) }, true},
		{"same map", func(r *watch.Report) { r.InboundFrom = a.InboundFrom }, true},
		{"tag changed", func(r *watch.Report) { r.InboundFrom["b"] = "t3" }, false},
		{"peer gone", func(r *watch.Report) { delete(r.EncryptingTo, "a") }, false},
		{"peer renamed", func(r *watch.Report) { delete(r.InboundFrom, "b"); r.InboundFrom["c"] = "t2" }, false},
		{"empty vs nil", func(r *watch.Report) { r.EncryptingTo = map[string]string{}; a.EncryptingTo = nil }, true},
		{"count", func(r *watch.Report) { r.PeersExpected = 3 }, false},
	} {
		a = base()
		b := base()
		c.f(&b)
		if got := sameClaims(a, b); got != c.same {
			t.Errorf("%s: sameClaims = %v, want %v", c.what, got, c.same)
		}
	}
}
