//go:build linux

package xfrm_test

import (
	"fmt"
	"net"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/bench"
	"github.com/secureoverlay/secureoverlay/bench/cluster"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/xfrm"
)

// The measurements here run only with SECUREOVERLAY_BENCH=1 (hack/bench.sh sets it): they
// need root, create network namespaces and take seconds. Each prints "BENCH name value
// unit" lines that bench/cmd/benchreport collects into bench/RESULTS.md.

// benchNetNS runs f in a fresh network namespace, removed afterwards.
func benchNetNS(t *testing.T, f func()) {
	t.Helper()
	n, err := testutils.NewNS()
	if err != nil {
		t.Fatalf("create network namespace: %v", err)
	}
	defer func() {
		_ = n.Close()
		_ = testutils.UnmountNS(n)
	}()
	if err := n.Do(func(ns.NetNS) error { f(); return nil }); err != nil {
		t.Fatal(err)
	}
}

// policiesOnly keeps states in a fake (this host's kernel has no esp4; the lab VM has)
// and policies in the real kernel of the calling thread's namespace.
type policiesOnly struct {
	*xfrm.Fake
	xfrm.Netlink
}

func (h policiesOnly) ListStates() ([]xfrm.KernelSA, error)       { return h.Fake.ListStates() }
func (h policiesOnly) AddState(sa desired.SA) error               { return h.Fake.AddState(sa) }
func (h policiesOnly) DeleteState(sa desired.SA) error            { return h.Fake.DeleteState(sa) }
func (h policiesOnly) ListPolicies() ([]xfrm.KernelPolicy, error) { return h.Netlink.ListPolicies() }
func (h policiesOnly) AddPolicy(p desired.Policy) error           { return h.Netlink.AddPolicy(p) }
func (h policiesOnly) UpdatePolicy(p desired.Policy) error        { return h.Netlink.UpdatePolicy(p) }
func (h policiesOnly) DeletePolicy(p desired.Policy) error        { return h.Netlink.DeletePolicy(p) }

// discardSAs takes the applier's SAs and keeps nothing (the host has no esp4), so the
// applier and the raw loop write the same thing to the kernel: the policies.
type discardSAs struct{ xfrm.Netlink }

func (discardSAs) ListStates() ([]xfrm.KernelSA, error) { return nil, nil }
func (discardSAs) AddState(desired.SA) error            { return nil }
func (discardSAs) DeleteState(desired.SA) error         { return nil }

func compute(t *testing.T, in desired.Inputs) desired.State {
	t.Helper()
	st, err := desired.Compute(in)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// rawPolicy is the netlink form of p, built the way any netlink program would.
func rawPolicy(p desired.Policy) *netlink.XfrmPolicy {
	ipn := func(x interface {
		Bits() int
	}, ip []byte) *net.IPNet {
		return &net.IPNet{IP: ip, Mask: net.CIDRMask(x.Bits(), 32)}
	}
	np := &netlink.XfrmPolicy{Src: ipn(p.Src, p.Src.Addr().AsSlice()), Dst: ipn(p.Dst, p.Dst.Addr().AsSlice()),
		Proto: netlink.Proto(p.Proto), Dir: netlink.Dir(p.Dir), Priority: int(p.Priority), Action: netlink.XFRM_POLICY_ALLOW}
	if !p.Tmpl.IsZero() {
		m := netlink.XFRM_MODE_TRANSPORT
		if p.Tmpl.Kind == desired.Tunnel {
			m = netlink.XFRM_MODE_TUNNEL
		}
		t := netlink.XfrmPolicyTmpl{Src: p.Tmpl.Src.AsSlice(), Dst: p.Tmpl.Dst.AsSlice(), Proto: netlink.XFRM_PROTO_ESP,
			Mode: m, Spi: int(p.Tmpl.SPI), Reqid: int(p.Tmpl.ReqID)}
		if p.Tmpl.Optional {
			t.Optional = 1
		}
		np.Tmpls = []netlink.XfrmPolicyTmpl{t}
	}
	return np
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

// TestBenchProgramPolicies: the applier programming one node's policies toward 1,000
// peers (1,998 policies, enforce, two generations) into a fresh network namespace, versus
// a minimal loop writing the same policies through one netlink socket. Rounds alternate
// (raw, applier) in fresh namespaces so both see the same machine load; the ratio is of
// the medians. The applier's time includes its initial kernel listing, the diff and the
// bookkeeping of the SAs, which go nowhere (no esp4 on this host; the lab VM measures them:
// TestBenchProgramStatesLab). Like the agent, the applier uses one netlink handle
// (xfrm.OpenNetlink); the per-call loop shows what a socket per call costs.
func TestBenchProgramPolicies(t *testing.T) {
	bench.Gate(t, true)
	const peers, rounds = 1000, 7
	st := compute(t, cluster.Inputs(cluster.Options{Nodes: peers + 1, Mode: api.ModeEnforce}))
	var raw, rawPkg, app []time.Duration
	for range rounds {
		benchNetNS(t, func() {
			h, err := netlink.NewHandle(unix.NETLINK_XFRM)
			if err != nil {
				t.Fatal(err)
			}
			defer h.Close()
			t0 := time.Now()
			for _, p := range st.Policies {
				if err := h.XfrmPolicyAdd(rawPolicy(p)); err != nil {
					t.Fatalf("raw add %s: %v", p, err)
				}
			}
			raw = append(raw, time.Since(t0))
		})
		benchNetNS(t, func() {
			t0 := time.Now()
			for _, p := range st.Policies {
				if err := netlink.XfrmPolicyAdd(rawPolicy(p)); err != nil {
					t.Fatalf("raw add %s: %v", p, err)
				}
			}
			rawPkg = append(rawPkg, time.Since(t0))
		})
		benchNetNS(t, func() {
			k, err := xfrm.OpenNetlink() // as the agent: one handle, opened before the clock starts
			if err != nil {
				t.Fatal(err)
			}
			defer k.Close()
			a := xfrm.NewApplier(discardSAs{k}, desired.Config{})
			t0 := time.Now()
			res, err := a.Apply(st)
			d := time.Since(t0)
			if err != nil || res.PoliciesAdded != len(st.Policies) {
				t.Fatalf("apply: %+v %v", res, err)
			}
			app = append(app, d)
		})
	}
	r, rp, ap := median(raw), median(rawPkg), median(app)
	t.Logf("%d policies: raw one socket %s, raw socket per call %s, applier %s", len(st.Policies), r, rp, ap)
	bench.Report("program.policies", float64(len(st.Policies)), "count")
	bench.Report("program.raw_handle", float64(r.Microseconds())/1000, "ms")
	bench.Report("program.raw_per_call", float64(rp.Microseconds())/1000, "ms")
	bench.Report("program.applier", float64(ap.Microseconds())/1000, "ms")
	bench.Report("program.ratio_applier_raw", float64(ap)/float64(r), "x")
	bench.Report("program.ratio_applier_raw_per_call", float64(ap)/float64(rp), "x")
}

// joinRounds is how many join/leave rounds TestBenchJoin times (the median is reported):
// one join takes microseconds, too little for a single reading on a shared machine.
const joinRounds = 101

// TestBenchJoin: kernel writes and time for one node joining clusters of 100, 1,000 and
// 5,000 nodes, as the agent's event-driven sync makes it: desired.Memo.Update with the
// joining node named (Compute of that peer only) and xfrm.Applier.ApplyChange (the
// changed peer's objects only), against the fake (SAs and policies) and against the real
// kernel (policies; SAs in the fake). Each round joins a node with a fresh key
// incarnation and removes it again (untimed); the writes are the first round's and every
// round must make the same. For comparison, the whole-state path of before: a full
// Compute and an Apply that walks everything.
func TestBenchJoin(t *testing.T) {
	bench.Gate(t, true)
	for _, n := range []int{100, 1000, 5000} {
		before := cluster.Inputs(cluster.Options{Nodes: n, Mode: api.ModeEnforce})
		before.NodesVersion = -1 // round r's join is version r (as the agent's watcher numbers them)
		after := func(r int) desired.Inputs {
			in := cluster.Join(before, r) // the joiner sorts last
			in.NodesVersion = r
			return in
		}
		joiner := []string{cluster.Name(n)}
		joined := desired.Hint{Known: true, Nodes: joiner, Since: -1}
		left := func(r int) desired.Hint { return desired.Hint{Known: true, Nodes: joiner, Since: r} }
		// The whole-state path (what the agent did for every event before the memo).
		t0 := time.Now()
		full := compute(t, after(0))
		compFull := time.Since(t0)
		{
			a := xfrm.NewApplier(xfrm.NewFake(), desired.Config{})
			if _, err := a.Apply(compute(t, before)); err != nil {
				t.Fatal(err)
			}
			t0 = time.Now()
			if _, err := a.Apply(full); err != nil {
				t.Fatal(err)
			}
			bench.Report(fmt.Sprintf("join.%d.fake_apply_walk", n), float64(time.Since(t0).Microseconds())/1000, "ms")
		}
		bench.Report(fmt.Sprintf("join.%d.compute_full", n), float64(compFull.Microseconds())/1000, "ms")

		m := desired.NewMemo()
		ch0, err := m.Update(before, desired.Hint{})
		if err != nil {
			t.Fatal(err)
		}
		// Compute: the memo told which node joined, and (what the agent's sync does today)
		// comparing every Node to find it, on a memo of its own. The garbage of the setup
		// is collected first, so that no collection of the cluster-sized heap runs in the
		// microseconds timed (a size effect of the benchmark, not of the join).
		m2 := desired.NewMemo()
		if _, err := m2.Update(before, desired.Hint{}); err != nil {
			t.Fatal(err)
		}
		var comp, scan, state []time.Duration
		var changes []desired.Change // per round: join, leave
		runtime.GC()
		for r := range joinRounds {
			in := after(r)
			t0 := time.Now()
			join, err := m.Update(in, joined)
			comp = append(comp, time.Since(t0))
			if err != nil || join.Full {
				t.Fatalf("join round %d: full=%v %v", r, join.Full, err)
			}
			leave, err := m.Update(before, left(r))
			if err != nil || leave.Full {
				t.Fatalf("leave round %d: full=%v %v", r, leave.Full, err)
			}
			changes = append(changes, join, leave)
			t0 = time.Now()
			if ch, err := m2.Update(in, desired.Hint{}); err != nil || ch.Full {
				t.Fatalf("scan round %d: full=%v %v", r, ch.Full, err)
			}
			scan = append(scan, time.Since(t0))
			if ch, err := m2.Update(before, desired.Hint{}); err != nil || ch.Full {
				t.Fatalf("scan round %d: leave full=%v %v", r, ch.Full, err)
			}
		}
		for r := range 5 { // the whole State after a join, O(N log N): a few readings
			if _, err := m.Update(after(joinRounds+r), joined); err != nil {
				t.Fatal(err)
			}
			t0 := time.Now()
			_ = m.State()
			state = append(state, time.Since(t0))
			if _, err := m.Update(before, left(joinRounds+r)); err != nil {
				t.Fatal(err)
			}
		}
		bench.Report(fmt.Sprintf("join.%d.compute", n), float64(median(comp).Nanoseconds())/1e6, "ms")
		bench.Report(fmt.Sprintf("join.%d.compute_scan", n), float64(median(scan).Nanoseconds())/1e6, "ms")
		bench.Report(fmt.Sprintf("join.%d.state", n), float64(median(state).Nanoseconds())/1e6, "ms")

		st0 := compute(t, before)
		// rounds applies every round's join (timed) and leave to a, which holds ch0.
		// logLen, if set, counts the kernel's logged writes (the fake's).
		rounds := func(a *xfrm.Applier, logLen func() int) (first xfrm.Result, logged int, apply time.Duration) {
			var ds []time.Duration
			runtime.GC()
			for r := range joinRounds {
				join, leave := changes[2*r], changes[2*r+1]
				before := 0
				if logLen != nil {
					before = logLen()
				}
				t0 := time.Now()
				res, err := a.ApplyChange(join, func() desired.State { t.Fatal("join took the whole-state path"); return desired.State{} })
				ds = append(ds, time.Since(t0))
				if err != nil {
					t.Fatal(err)
				}
				if r == 0 {
					first = res
					if logLen != nil {
						logged = logLen() - before
					}
				} else if res.Writes() != first.Writes() {
					t.Fatalf("round %d: %d writes, round 0 %d", r, res.Writes(), first.Writes())
				}
				if _, err := a.ApplyChange(leave, func() desired.State { t.Fatal("leave took the whole-state path"); return desired.State{} }); err != nil {
					t.Fatal(err)
				}
			}
			return first, logged, median(ds)
		}
		fk := xfrm.NewFake()
		a := xfrm.NewApplier(fk, desired.Config{})
		if _, err := a.ApplyChange(ch0, func() desired.State { return st0 }); err != nil {
			t.Fatal(err)
		}
		res, logged, fakeJoin := rounds(a, func() int { return len(fk.Log) })
		bench.Report(fmt.Sprintf("join.%d.fake_writes", n), float64(res.Writes()), "count")
		bench.Report(fmt.Sprintf("join.%d.fake_log_writes", n), float64(logged), "count")
		bench.Report(fmt.Sprintf("join.%d.fake_apply", n), float64(fakeJoin.Nanoseconds())/1e6, "ms")

		benchNetNS(t, func() {
			k, err := xfrm.OpenNetlink() // as the agent: one handle, opened before the clock starts
			if err != nil {
				t.Fatal(err)
			}
			defer k.Close()
			a := xfrm.NewApplier(discardSAs{k}, desired.Config{})
			t0 := time.Now()
			res, err := a.ApplyChange(ch0, func() desired.State { return st0 }) // a full apply
			initial := time.Since(t0)
			if err != nil {
				t.Fatal(err)
			}
			bench.Report(fmt.Sprintf("join.%d.kernel_initial", n), float64(initial.Microseconds())/1000, "ms")
			bench.Report(fmt.Sprintf("join.%d.kernel_initial_writes", n), float64(res.Writes()), "count")
			jres, _, join := rounds(a, nil)
			bench.Report(fmt.Sprintf("join.%d.kernel_policy_writes", n), float64(jres.PoliciesAdded+jres.PoliciesUpdated+jres.PoliciesDeleted), "count")
			bench.Report(fmt.Sprintf("join.%d.kernel_writes", n), float64(jres.Writes()), "count")
			bench.Report(fmt.Sprintf("join.%d.kernel_apply", n), float64(join.Nanoseconds())/1e6, "ms")
		})
	}
}

// BenchmarkApplyJoin is the ApplyChange that absorbs one node joining (fake kernel): the
// applier's cost per event-driven sync, as a function of cluster size. Each iteration
// joins a node with a fresh key incarnation (timed) and removes it again (untimed).
func BenchmarkApplyJoin(b *testing.B) {
	for _, n := range []int{100, 1000, 5000} {
		b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) {
			before := cluster.Inputs(cluster.Options{Nodes: n, Mode: api.ModeEnforce})
			joiner := desired.Hint{Known: true, Nodes: []string{cluster.Name(n)}}
			m := desired.NewMemo()
			ch, err := m.Update(before, desired.Hint{})
			if err != nil {
				b.Fatal(err)
			}
			a := xfrm.NewApplier(xfrm.NewFake(), desired.Config{})
			if _, err := a.ApplyChange(ch, m.State); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			r := 0
			for b.Loop() {
				b.StopTimer()
				r++
				in := cluster.Join(before, r)
				join, err := m.Update(in, joiner)
				if err != nil || join.Full {
					b.Fatalf("join full=%v %v", join.Full, err)
				}
				b.StartTimer()
				res, err := a.ApplyChange(join, m.State)
				if err != nil || res.Full || res.Writes() != 6 {
					b.Fatalf("join %+v %v", res, err)
				}
				b.StopTimer()
				leave, err := m.Update(before, joiner)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := a.ApplyChange(leave, m.State); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}
