//go:build linux

package xfrm_test

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/bench"
	"github.com/secureoverlay/secureoverlay/bench/cluster"
	"github.com/secureoverlay/secureoverlay/conformance/lab"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/xfrm"
)

// rawState is the netlink form of sa, built the way any netlink program would.
func rawState(sa desired.SA) *netlink.XfrmState {
	m := netlink.XFRM_MODE_TRANSPORT
	if sa.Kind == desired.Tunnel {
		m = netlink.XFRM_MODE_TUNNEL
	}
	s := &netlink.XfrmState{Src: sa.Src.AsSlice(), Dst: sa.Dst.AsSlice(), Proto: netlink.XFRM_PROTO_ESP,
		Mode: m, Spi: int(sa.SPI), Reqid: int(sa.ReqID), ReplayWindow: int(sa.ReplayWindow), ESN: sa.ESN,
		Limits: netlink.XfrmStateLimits{PacketSoft: sa.SoftPackets, PacketHard: sa.HardPackets},
		Aead:   &netlink.XfrmStateAlgo{Name: "rfc4106(gcm(aes))", Key: sa.Key.Bytes(), ICVLen: sa.ICVBytes * 8}}
	if sa.SelSrc.IsValid() && sa.SelDst.IsValid() {
		s.Selector = &netlink.XfrmPolicy{Src: &net.IPNet{IP: sa.SelSrc.Addr().AsSlice(), Mask: net.CIDRMask(sa.SelSrc.Bits(), 32)},
			Dst: &net.IPNet{IP: sa.SelDst.Addr().AsSlice(), Mask: net.CIDRMask(sa.SelDst.Bits(), 32)}, Proto: netlink.Proto(sa.SelProto)}
	}
	return s
}

// TestBenchProgramStatesInGuest runs inside the lab guest (started by
// TestBenchProgramStatesLab): the applier programming 1,000 peers' SAs and policies
// (4,000 SAs, 2,000 policies: enforce, two generations) into a fresh namespace, against a
// minimal loop writing the same SAs and policies through one netlink socket; 9 alternating
// rounds, medians.
func TestBenchProgramStatesInGuest(t *testing.T) {
	if os.Getenv("SECUREOVERLAY_IN_LAB") != "1" || os.Getenv("SECUREOVERLAY_BENCH") != "1" {
		t.Skip("runs inside the lab guest (TestBenchProgramStatesLab)")
	}
	const rounds = 9
	st := compute(t, cluster.Inputs(cluster.Options{Nodes: 1001, Mode: api.ModeEnforce}))
	var raw, app []time.Duration
	for range rounds {
		benchNetNS(t, func() {
			h, err := netlink.NewHandle(unix.NETLINK_XFRM)
			if err != nil {
				t.Fatal(err)
			}
			defer h.Close()
			t0 := time.Now()
			for _, sa := range st.SAs {
				if err := h.XfrmStateAdd(rawState(sa)); err != nil {
					t.Fatalf("raw add %s: %v", sa, err)
				}
			}
			for _, p := range st.Policies {
				if err := h.XfrmPolicyAdd(rawPolicy(p)); err != nil {
					t.Fatalf("raw add %s: %v", p, err)
				}
			}
			raw = append(raw, time.Since(t0))
		})
		benchNetNS(t, func() {
			k, err := xfrm.OpenNetlink() // as the agent: one handle, opened before the clock starts
			if err != nil {
				t.Fatal(err)
			}
			defer k.Close()
			a := xfrm.NewApplier(k, desired.Config{})
			t0 := time.Now()
			res, err := a.Apply(st)
			d := time.Since(t0)
			if err != nil || res.StatesAdded != len(st.SAs) || res.PoliciesAdded != len(st.Policies) {
				t.Fatalf("apply: %+v %v", res, err)
			}
			app = append(app, d)
		})
	}
	r, ap := median(raw), median(app)
	bench.Report("lab_program.sas", float64(len(st.SAs)), "count")
	bench.Report("lab_program.policies", float64(len(st.Policies)), "count")
	bench.Report("lab_program.raw_handle", float64(r.Microseconds())/1000, "ms")
	bench.Report("lab_program.applier", float64(ap.Microseconds())/1000, "ms")
	bench.Report("lab_program.ratio_applier_raw", float64(ap)/float64(r), "x")
}

// TestBenchProgramStatesLab boots the lab VM (a kernel with esp4 and GCM) and runs
// TestBenchProgramStatesInGuest there, relaying its BENCH lines. SECUREOVERLAY_BENCH=1 only.
func TestBenchProgramStatesLab(t *testing.T) {
	if os.Getenv("SECUREOVERLAY_IN_LAB") == "1" {
		t.Skip("already inside the lab guest")
	}
	bench.Gate(t, true)
	out := lab.RunInGuest(t, lab.GuestTest{Run: "^TestBenchProgramStatesInGuest$", Want: []string{"TestBenchProgramStatesInGuest"},
		Env: []string{"SECUREOVERLAY_BENCH=1"}, Timeout: 15 * time.Minute})
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), "BENCH ") {
			fmt.Println(sc.Text())
		}
	}
}
