//go:build linux

package xfrm_test

import (
	"fmt"
	"net"
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

// TestBenchJoin: kernel writes and time for one node joining clusters of 100, 1,000 and
// 5,000 nodes, against the fake (SAs and policies) and against the real kernel (policies;
// SAs in the fake). The writes are counts; the times are the Apply of the join only
// (plus, separately, the full Compute the agent runs for it).
func TestBenchJoin(t *testing.T) {
	bench.Gate(t, true)
	for _, n := range []int{100, 1000, 5000} {
		before := compute(t, cluster.Inputs(cluster.Options{Nodes: n, Mode: api.ModeEnforce}))
		inAfter := cluster.Inputs(cluster.Options{Nodes: n + 1, Mode: api.ModeEnforce})
		t0 := time.Now()
		after := compute(t, inAfter)
		comp := time.Since(t0)

		fk := xfrm.NewFake()
		a := xfrm.NewApplier(fk, desired.Config{})
		if _, err := a.Apply(before); err != nil {
			t.Fatal(err)
		}
		logged := len(fk.Log)
		t0 = time.Now()
		res, err := a.Apply(after)
		fakeJoin := time.Since(t0)
		if err != nil {
			t.Fatal(err)
		}
		bench.Report(fmt.Sprintf("join.%d.fake_writes", n), float64(res.Writes()), "count")
		bench.Report(fmt.Sprintf("join.%d.fake_log_writes", n), float64(len(fk.Log)-logged), "count")
		bench.Report(fmt.Sprintf("join.%d.fake_apply", n), float64(fakeJoin.Microseconds())/1000, "ms")
		bench.Report(fmt.Sprintf("join.%d.compute", n), float64(comp.Microseconds())/1000, "ms")

		benchNetNS(t, func() {
			k, err := xfrm.OpenNetlink() // as the agent: one handle, opened before the clock starts
			if err != nil {
				t.Fatal(err)
			}
			defer k.Close()
			a := xfrm.NewApplier(discardSAs{k}, desired.Config{})
			t0 := time.Now()
			res, err := a.Apply(before)
			full := time.Since(t0)
			if err != nil {
				t.Fatal(err)
			}
			t0 = time.Now()
			jres, err := a.Apply(after)
			join := time.Since(t0)
			if err != nil {
				t.Fatal(err)
			}
			bench.Report(fmt.Sprintf("join.%d.kernel_policy_writes", n), float64(jres.PoliciesAdded+jres.PoliciesUpdated+jres.PoliciesDeleted), "count")
			bench.Report(fmt.Sprintf("join.%d.kernel_writes", n), float64(jres.Writes()), "count")
			bench.Report(fmt.Sprintf("join.%d.kernel_apply", n), float64(join.Microseconds())/1000, "ms")
			bench.Report(fmt.Sprintf("join.%d.kernel_initial", n), float64(full.Microseconds())/1000, "ms")
			bench.Report(fmt.Sprintf("join.%d.kernel_initial_writes", n), float64(res.Writes()), "count")
		})
	}
}

// BenchmarkApplyJoin is the Apply that absorbs one node joining (fake kernel): the
// applier's cost per sync when the writes are constant, as a function of cluster size.
func BenchmarkApplyJoin(b *testing.B) {
	for _, n := range []int{100, 1000, 5000} {
		b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) {
			before, err := desired.Compute(cluster.Inputs(cluster.Options{Nodes: n, Mode: api.ModeEnforce}))
			if err != nil {
				b.Fatal(err)
			}
			after, err := desired.Compute(cluster.Inputs(cluster.Options{Nodes: n + 1, Mode: api.ModeEnforce}))
			if err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				b.StopTimer() // a fresh applier holding the cluster (leave + re-join would reuse keys)
				a := xfrm.NewApplier(xfrm.NewFake(), desired.Config{})
				if _, err := a.Apply(before); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				if _, err := a.Apply(after); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
