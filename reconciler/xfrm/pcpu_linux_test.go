//go:build linux

package xfrm

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// kernelAtLeast reports whether the running kernel's release is at least major.minor.
func kernelAtLeast(t *testing.T, major, minor int) bool {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		t.Fatal(err)
	}
	var ma, mi int
	if _, err := fmt.Sscanf(string(bytes.TrimRight(u.Release[:], "\x00")), "%d.%d", &ma, &mi); err != nil {
		t.Fatal(err)
	}
	return ma > major || ma == major && mi >= minor
}

// pcpuLab is two network namespaces on a veth pair, 198.18.0.1 (a) and 198.18.0.2 (b),
// for the per-CPU tests; they run inside the lab guest (2 vCPUs).
type pcpuLab struct {
	a, b     ns.NetNS
	ha, hb   *netlink.Handle
	src, dst net.IP
}

func newPCPULab(t *testing.T) *pcpuLab {
	t.Helper()
	if os.Getenv("SECUREOVERLAY_IN_LAB") != "1" {
		t.Skip("runs inside the lab guest (TestLabDataPath)")
	}
	if runtime.NumCPU() < 2 {
		t.Fatalf("the guest has %d CPU; the test needs 2", runtime.NumCPU())
	}
	l := &pcpuLab{src: net.ParseIP("198.18.0.1"), dst: net.ParseIP("198.18.0.2")}
	var err error
	for _, n := range []*ns.NetNS{&l.a, &l.b} {
		if *n, err = testutils.NewNS(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { (*n).Close() })
	}
	for _, c := range []struct {
		h *(*netlink.Handle)
		n ns.NetNS
	}{{&l.ha, l.a}, {&l.hb, l.b}} {
		h, err := netlink.NewHandleAt(netns.NsHandle(c.n.Fd()))
		if err != nil {
			t.Fatal(err)
		}
		*c.h = h
		t.Cleanup(h.Close)
	}
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "pa"}, PeerName: "pb"}
	if err := l.ha.LinkAdd(veth); err != nil {
		t.Fatal(err)
	}
	pb, err := l.ha.LinkByName("pb")
	if err != nil {
		t.Fatal(err)
	}
	if err := l.ha.LinkSetNsFd(pb, int(l.b.Fd())); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		h    *netlink.Handle
		link string
		addr string
	}{{l.ha, "pa", "198.18.0.1/24"}, {l.hb, "pb", "198.18.0.2/24"}} {
		link, err := c.h.LinkByName(c.link)
		if err != nil {
			t.Fatal(err)
		}
		addr, _ := netlink.ParseAddr(c.addr)
		if err := c.h.AddrAdd(link, addr); err != nil {
			t.Fatal(err)
		}
		if err := c.h.LinkSetUp(link); err != nil {
			t.Fatal(err)
		}
	}
	return l
}

// supported probes a for per-CPU states: false ends the test (after the kernel-version
// check: every kernel from 6.13 has them; an older one may carry a backport, Debian's
// 6.12.117+deb13 does, which the traffic then proves).
func (l *pcpuLab) supported(t *testing.T) bool {
	t.Helper()
	var supported bool
	if err := l.a.Do(func(ns.NetNS) (err error) { supported, err = (Netlink{}).ProbePerCPUStates(); return err }); err != nil {
		t.Fatal(err)
	}
	mainline := kernelAtLeast(t, 6, 13)
	t.Logf("per-CPU states: supported=%v (kernel ≥ 6.13: %v)", supported, mainline)
	if mainline && !supported {
		t.Fatal("probe says per-CPU states are not supported on a kernel ≥ 6.13")
	}
	return supported
}

// pcpuKey is a test key, one per SPI the tests use.
func pcpuKey(spi int) []byte { return bytes.Repeat([]byte{byte(spi) + byte(spi>>8)}, 20) }

// state is an a→b ESP transport state.
func (l *pcpuLab) state(spi, reqid int, k []byte, dir netlink.SADir) *netlink.XfrmState {
	return &netlink.XfrmState{Src: l.src, Dst: l.dst, Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TRANSPORT,
		Spi: spi, Reqid: reqid, SADir: dir, ESN: true, ReplayWindow: 1024,
		Aead: &netlink.XfrmStateAlgo{Name: "rfc4106(gcm(aes))", Key: k, ICVLen: 128}}
}

// pair installs an a→b state: outbound in a through the agent's kernel shell
// (Netlink.AddState; lane n ≥ 1 is CPU n−1, 0 no CPU), inbound in b.
func (l *pcpuLab) pair(t *testing.T, spi, reqid int, lane uint16) desired.SA {
	t.Helper()
	// As the agent programs them: ESN with its replay window, packet limits.
	sa := desired.SA{Src: netip.MustParseAddr(l.src.String()), Dst: netip.MustParseAddr(l.dst.String()), SPI: uint32(spi),
		Kind: desired.Transport, ReqID: uint32(reqid), Key: desired.NewKey(pcpuKey(spi)), ICVBytes: 16,
		ReplayWindow: desired.DefaultReplayWindow, ESN: true, SoftPackets: 1 << 40, HardPackets: 1 << 41, Lane: lane}
	if lane > 0 {
		sa.ReplayWindow = 0 // an output state (desired.Compute)
	}
	if err := l.a.Do(func(ns.NetNS) error { return Netlink{}.AddState(sa) }); err != nil {
		t.Fatalf("out state 0x%x: %v", spi, err)
	}
	in := l.state(spi, reqid, pcpuKey(spi), netlink.XFRM_SA_DIR_IN)
	if err := l.hb.XfrmStateAdd(in); err != nil {
		t.Fatalf("in state 0x%x: %v", spi, err)
	}
	return sa
}

// policy is a's outbound policy for UDP a→b with one template (spi 0: any state of reqid).
func (l *pcpuLab) policy(reqid, spi int) *netlink.XfrmPolicy {
	sel := func(ip net.IP) *net.IPNet { return &net.IPNet{IP: ip, Mask: net.CIDRMask(32, 32)} }
	return &netlink.XfrmPolicy{Src: sel(l.src), Dst: sel(l.dst), Proto: netlink.Proto(unix.IPPROTO_UDP), Dir: netlink.XFRM_DIR_OUT,
		Tmpls: []netlink.XfrmPolicyTmpl{{Src: l.src, Dst: l.dst, Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TRANSPORT, Reqid: reqid, Spi: spi}}}
}

// send sends n UDP packets a→b from a thread pinned to cpu and returns how many were sent.
func (l *pcpuLab) send(t *testing.T, cpu, n int) int {
	t.Helper()
	sent := 0
	err := l.a.Do(func(ns.NetNS) error {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		var set unix.CPUSet
		set.Set(cpu)
		if err := unix.SchedSetaffinity(0, &set); err != nil {
			return err
		}
		conn, err := net.DialUDP("udp4", nil, &net.UDPAddr{IP: l.dst, Port: 9})
		if err != nil {
			return err
		}
		defer conn.Close()
		for i := 0; i < n; i++ {
			if _, err := conn.Write([]byte("per-cpu")); err == nil {
				sent++
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return sent
}

// count is the packet count of the state with spi in h's namespace.
func (l *pcpuLab) count(t *testing.T, h *netlink.Handle, spi int) uint64 {
	t.Helper()
	got, err := h.XfrmStateGet(&netlink.XfrmState{Src: l.src, Dst: l.dst, Proto: netlink.XFRM_PROTO_ESP, Spi: spi})
	if err != nil {
		t.Fatalf("get state 0x%x: %v", spi, err)
	}
	return got.Statistics.Packets
}

// counts returns the outbound (a) and inbound (b) packet counts of spis, and a line for
// the log.
func (l *pcpuLab) counts(t *testing.T, spis []int) (out, in []uint64, line string) {
	t.Helper()
	var o, i []string
	for _, spi := range spis {
		out, in = append(out, l.count(t, l.ha, spi)), append(in, l.count(t, l.hb, spi))
		o = append(o, fmt.Sprintf("0x%x:%d", spi, out[len(out)-1]))
		i = append(i, fmt.Sprintf("0x%x:%d", spi, in[len(in)-1]))
	}
	return out, in, "out " + strings.Join(o, " ") + "; in " + strings.Join(i, " ")
}

// TestPerCPUStatesRealKernel (issue 18): on a kernel with per-CPU SAs, outbound states
// with a CPU number each and a fallback state without one, all under the same policy
// template, programmed, listed and deleted through Netlink (desired.SA.Lane). Traffic
// sent from a thread pinned to CPU c must leave through CPU c's state (its own SPI and
// key), the receiver accepting all of them; a kernel ≥ 6.13 must have them (an older one
// may, by a backport). Runs inside the lab guest (2 vCPUs), where the kernel has ESP.
func TestPerCPUStatesRealKernel(t *testing.T) {
	l := newPCPULab(t)
	if !l.supported(t) {
		return
	}
	const reqid = 0x5e
	spis := []int{0x1000, 0x1001, 0x10ff} // CPU 0, CPU 1, fallback
	var sas []desired.SA
	for i, spi := range spis {
		lane := uint16(i + 1)
		if i == 2 {
			lane = 0
		}
		sas = append(sas, l.pair(t, spi, reqid, lane))
	}
	if err := l.ha.XfrmPolicyAdd(l.policy(reqid, 0)); err != nil {
		t.Fatal(err)
	}

	const perCPU = 50
	sent := []int{l.send(t, 0, perCPU), l.send(t, 1, perCPU)}
	outs, _, line := l.counts(t, spis)
	t.Logf("sent per CPU %v; %s", sent, line)
	if outs[0] == 0 || outs[1] == 0 {
		t.Errorf("traffic from the two CPUs did not use both per-CPU states: %s", line)
	}
	if total := outs[0] + outs[1] + outs[2]; total != uint64(sent[0]+sent[1]) {
		t.Errorf("out states counted %d packets, sent %d", total, sent[0]+sent[1])
	}

	// The dump gives each state its lane back, exactly as programmed; deletes (by ID)
	// remove them.
	var listed []KernelSA
	if err := l.a.Do(func(ns.NetNS) (err error) { listed, err = Netlink{}.ListStates(); return err }); err != nil {
		t.Fatal(err)
	}
	for _, want := range sas {
		found := false
		for _, k := range listed {
			if k.SA.SPI == want.SPI {
				found = true
				if k.Foreign || !k.SA.SameKernelObject(want) {
					t.Errorf("listed %s (lane %d, foreign %v), programmed %s", k.SA, k.SA.Lane, k.Foreign, want)
				}
			}
		}
		if !found {
			t.Errorf("state 0x%x not listed", want.SPI)
		}
		if err := l.a.Do(func(ns.NetNS) error { return Netlink{}.DeleteState(want) }); err != nil {
			t.Errorf("delete %s: %v", want, err)
		}
	}
	if err := l.a.Do(func(ns.NetNS) (err error) { listed, err = Netlink{}.ListStates(); return err }); err != nil || len(listed) != 0 {
		t.Errorf("after the deletes: %d states (%v)", len(listed), err)
	}
}

// TestPerCPUStatesSelectGeneration (issue 18) checks the two kernel facts the agent's use
// of per-CPU states rests on (docs/dataplane.md §10):
//   - a template that names an SPI — how the agent's outbound policies choose the
//     generation they send with today — matches that state only: the per-CPU states of
//     the same reqid beside it carry nothing;
//   - a template without an SPI chooses by reqid, so two generations' per-CPU states under
//     two reqids are switched by updating the policy's template alone (make before
//     break): before the update every packet leaves through the first generation's
//     states, after it through the second's, none lost.
func TestPerCPUStatesSelectGeneration(t *testing.T) {
	l := newPCPULab(t)
	if !l.supported(t) {
		return
	}
	const reqidA, reqidB = 0x61, 0x62
	// Generation A: CPU 0, CPU 1 and fallback under reqidA; generation B the same under reqidB.
	genA, genB := []int{0x2002, 0x2004, 0x2000}, []int{0x3002, 0x3004, 0x3000}
	for _, g := range []struct {
		spis  []int
		reqid int
	}{{genA, reqidA}, {genB, reqidB}} {
		for i, spi := range g.spis {
			l.pair(t, spi, g.reqid, uint16((i+1)%3))
		}
	}
	all := append(slices.Clone(genA), genB...)
	const perCPU = 40
	step := func(what string) (outs, ins []uint64, sent int) {
		sent = l.send(t, 0, perCPU) + l.send(t, 1, perCPU)
		outs, ins, line := l.counts(t, all)
		t.Logf("%s: sent %d; %s", what, sent, line)
		return outs, ins, sent
	}
	sum := func(v []uint64) (s uint64) {
		for _, x := range v {
			s += x
		}
		return s
	}

	// 1. The template pins generation A's fallback SPI, as the agent's policies pin their
	// generation's SPI: every packet takes that state, the per-CPU ones none.
	if err := l.ha.XfrmPolicyAdd(l.policy(reqidA, genA[2])); err != nil {
		t.Fatal(err)
	}
	outs, ins, sent := step("template with generation A's SPI")
	if outs[2] != uint64(sent) || sum(outs) != uint64(sent) {
		t.Errorf("a template naming an SPI: want all %d packets through 0x%x, got out %v", sent, genA[2], outs)
	}
	if sum(ins) != sum(outs) {
		t.Errorf("received %d of %d", sum(ins), sum(outs))
	}

	// 2. No SPI, reqid A: generation A's per-CPU states carry each CPU's packets.
	if err := l.ha.XfrmPolicyUpdate(l.policy(reqidA, 0)); err != nil {
		t.Fatal(err)
	}
	before := outs
	outs, ins, sent = step("template with reqid A, no SPI")
	if outs[0]-before[0] == 0 || outs[1]-before[1] == 0 || sum(outs[3:]) != 0 || sum(outs)-sum(before) != uint64(sent) {
		t.Errorf("reqid A: want both CPUs' states of generation A and nothing of B, %d packets; got out %v (before %v)", sent, outs, before)
	}

	// 3. The template updated to reqid B: generation B's per-CPU states carry each CPU's
	// packets, A's nothing more; the receiver counted every packet sent.
	if err := l.ha.XfrmPolicyUpdate(l.policy(reqidB, 0)); err != nil {
		t.Fatal(err)
	}
	before = outs
	outs, ins, sent = step("template updated to reqid B")
	if sum(outs[:3]) != sum(before[:3]) || outs[3] == 0 || outs[4] == 0 || sum(outs)-sum(before) != uint64(sent) {
		t.Errorf("reqid B: want both CPUs' states of generation B and nothing more of A, %d packets; got out %v (before %v)", sent, outs, before)
	}
	if sum(ins) != sum(outs) {
		t.Errorf("received %d of %d sent through the states", sum(ins), sum(outs))
	}
}
