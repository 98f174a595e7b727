//go:build linux

package xfrm

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// perCPUSupported probes, in the current network namespace, whether the kernel keeps a
// state's per-CPU number (XFRMA_SA_PCPU, Linux ≥ 6.13): older kernels parse xfrm
// messages leniently and drop an attribute they do not know, so the answer is whether the
// attribute comes back. The probe state uses addresses of the test range and is deleted.
func perCPUSupported(h *netlink.Handle) (bool, error) {
	cpu := uint32(0)
	probe := &netlink.XfrmState{
		Src: net.ParseIP("198.19.255.253"), Dst: net.ParseIP("198.19.255.254"),
		Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TRANSPORT, Spi: 0x0fff0000, Reqid: 0x7e57,
		Aead:  &netlink.XfrmStateAlgo{Name: "rfc4106(gcm(aes))", Key: make([]byte, 20), ICVLen: 128},
		SADir: netlink.XFRM_SA_DIR_OUT, Pcpunum: &cpu,
	}
	if err := h.XfrmStateAdd(probe); err != nil {
		// Kernels before 6.10 do not know XFRMA_SA_DIR either and may refuse the pair.
		return false, nil
	}
	// Get and delete by ID only: the kernel refuses XFRMA_SA_PCPU in those requests
	// (EINVAL on 7.3), and the library sends it when the state carries one.
	id := &netlink.XfrmState{Src: probe.Src, Dst: probe.Dst, Proto: probe.Proto, Spi: probe.Spi}
	got, err := h.XfrmStateGet(id)
	if derr := h.XfrmStateDel(id); err == nil && derr != nil {
		err = derr
	}
	if err != nil {
		return false, err
	}
	return got.Pcpunum != nil && *got.Pcpunum == cpu, nil
}

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

// TestPerCPUStatesRealKernel (issue 18): on a kernel with per-CPU SAs, outbound states
// with a CPU number each and a fallback state without one, all under the same policy
// template, programmed, listed and deleted through Netlink (desired.SA.Lane). Traffic sent from a thread pinned to CPU c must leave through CPU c's state
// (its own SPI and key), the receiver accepting all of them; a kernel ≥ 6.13 must have
// them (an older one may, by a backport). Runs inside the lab guest (2 vCPUs), where the kernel has ESP.
func TestPerCPUStatesRealKernel(t *testing.T) {
	if os.Getenv("SECUREOVERLAY_IN_LAB") != "1" {
		t.Skip("runs inside the lab guest (TestLabDataPath)")
	}
	if runtime.NumCPU() < 2 {
		t.Fatalf("the guest has %d CPU; the test needs 2", runtime.NumCPU())
	}
	a, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	handle := func(n ns.NetNS) *netlink.Handle {
		h, err := netlink.NewHandleAt(netns.NsHandle(n.Fd()))
		if err != nil {
			t.Fatal(err)
		}
		return h
	}
	ha, hb := handle(a), handle(b)
	defer ha.Close()
	defer hb.Close()

	supported, err := perCPUSupported(ha)
	if err != nil {
		t.Fatal(err)
	}
	// Every kernel from 6.13 has them; an older one may carry a backport (Debian's
	// 6.12.117+deb13 does), which the traffic below then proves.
	mainline := kernelAtLeast(t, 6, 13)
	t.Logf("per-CPU states: supported=%v (kernel ≥ 6.13: %v)", supported, mainline)
	if mainline && !supported {
		t.Fatal("probe says per-CPU states are not supported on a kernel ≥ 6.13")
	}
	if !supported {
		return
	}

	// Two namespaces on a veth pair, 198.18.0.1 (a) and 198.18.0.2 (b).
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "pa"}, PeerName: "pb"}
	if err := ha.LinkAdd(veth); err != nil {
		t.Fatal(err)
	}
	pb, err := ha.LinkByName("pb")
	if err != nil {
		t.Fatal(err)
	}
	if err := ha.LinkSetNsFd(pb, int(b.Fd())); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		h    *netlink.Handle
		link string
		addr string
	}{{ha, "pa", "198.18.0.1/24"}, {hb, "pb", "198.18.0.2/24"}} {
		l, err := c.h.LinkByName(c.link)
		if err != nil {
			t.Fatal(err)
		}
		addr, _ := netlink.ParseAddr(c.addr)
		if err := c.h.AddrAdd(l, addr); err != nil {
			t.Fatal(err)
		}
		if err := c.h.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	src, dst := net.ParseIP("198.18.0.1"), net.ParseIP("198.18.0.2")
	const reqid = 0x5e
	key := func(i byte) []byte { return bytes.Repeat([]byte{0x40 + i}, 20) } // test keys, one per state
	state := func(spi int, k []byte, dir netlink.SADir, cpu *uint32) *netlink.XfrmState {
		return &netlink.XfrmState{Src: src, Dst: dst, Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TRANSPORT,
			Spi: spi, Reqid: reqid, SADir: dir, Pcpunum: cpu, ReplayWindow: 0,
			Aead: &netlink.XfrmStateAlgo{Name: "rfc4106(gcm(aes))", Key: k, ICVLen: 128}}
	}
	spis := []int{0x1000, 0x1001, 0x10ff} // CPU 0, CPU 1, fallback
	// The outbound states go through the agent's own kernel shell (Netlink.AddState with
	// desired.SA.Lane: lane n is CPU n−1, 0 the fallback).
	outSA := func(i int) desired.SA {
		sa := desired.SA{Src: netip.MustParseAddr(src.String()), Dst: netip.MustParseAddr(dst.String()), SPI: uint32(spis[i]),
			Kind: desired.Transport, ReqID: reqid, Key: desired.NewKey(key(byte(i))), ICVBytes: 16, SoftPackets: 1 << 40, HardPackets: 1 << 41}
		if i < 2 {
			sa.Lane = uint16(i + 1)
		}
		return sa
	}
	for i, spi := range spis {
		if err := a.Do(func(ns.NetNS) error { return Netlink{}.AddState(outSA(i)) }); err != nil {
			t.Fatalf("out state 0x%x: %v", spi, err)
		}
		in := state(spi, key(byte(i)), netlink.XFRM_SA_DIR_IN, nil)
		in.ReplayWindow = 32
		if err := hb.XfrmStateAdd(in); err != nil {
			t.Fatalf("in state 0x%x: %v", spi, err)
		}
	}
	sel := func(ip net.IP) *net.IPNet { return &net.IPNet{IP: ip, Mask: net.CIDRMask(32, 32)} }
	if err := ha.XfrmPolicyAdd(&netlink.XfrmPolicy{Src: sel(src), Dst: sel(dst), Proto: netlink.Proto(unix.IPPROTO_UDP), Dir: netlink.XFRM_DIR_OUT,
		Tmpls: []netlink.XfrmPolicyTmpl{{Src: src, Dst: dst, Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TRANSPORT, Reqid: reqid}}}); err != nil {
		t.Fatal(err)
	}

	// Send from a thread pinned to each CPU in turn.
	const perCPU = 50
	sent := []int{0, 0}
	for cpu := 0; cpu < 2; cpu++ {
		err := a.Do(func(ns.NetNS) error {
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			var set unix.CPUSet
			set.Set(cpu)
			if err := unix.SchedSetaffinity(0, &set); err != nil {
				return err
			}
			conn, err := net.DialUDP("udp4", nil, &net.UDPAddr{IP: dst, Port: 9})
			if err != nil {
				return err
			}
			defer conn.Close()
			for i := 0; i < perCPU; i++ {
				if _, err := conn.Write([]byte("per-cpu")); err == nil {
					sent[cpu]++
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	count := func(h *netlink.Handle, spi int) uint64 {
		got, err := h.XfrmStateGet(state(spi, nil, 0, nil))
		if err != nil {
			t.Fatalf("get state 0x%x: %v", spi, err)
		}
		return got.Statistics.Packets
	}
	var out, in []string
	outs := make([]uint64, len(spis))
	for i, spi := range spis {
		outs[i] = count(ha, spi)
		out = append(out, fmt.Sprintf("0x%x:%d", spi, outs[i]))
		in = append(in, fmt.Sprintf("0x%x:%d", spi, count(hb, spi)))
	}
	t.Logf("sent per CPU %v; out states %s; in states %s", sent, strings.Join(out, " "), strings.Join(in, " "))
	if outs[0] == 0 || outs[1] == 0 {
		t.Errorf("traffic from the two CPUs did not use both per-CPU states: %s", strings.Join(out, " "))
	}
	if total := outs[0] + outs[1] + outs[2]; total != uint64(sent[0]+sent[1]) {
		t.Errorf("out states counted %d packets, sent %d", total, sent[0]+sent[1])
	}

	// The dump gives each state its lane back, exactly as programmed; deletes (by ID)
	// remove them.
	var listed []KernelSA
	if err := a.Do(func(ns.NetNS) (err error) { listed, err = Netlink{}.ListStates(); return err }); err != nil {
		t.Fatal(err)
	}
	for i := range spis {
		want, found := outSA(i), false
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
		if err := a.Do(func(ns.NetNS) error { return Netlink{}.DeleteState(want) }); err != nil {
			t.Errorf("delete %s: %v", want, err)
		}
	}
	if err := a.Do(func(ns.NetNS) (err error) { listed, err = Netlink{}.ListStates(); return err }); err != nil || len(listed) != 0 {
		t.Errorf("after the deletes: %d states (%v)", len(listed), err)
	}
}
