//go:build linux

package xfrm

import (
	"errors"
	"net"
	"syscall"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// rawState builds the NEWSA message the kernel dumps for sa (what `ip xfrm state` reads),
// so the parser is tested on this host although its kernel cannot create ESP states.
func rawState(sa desired.SA, oseq uint64, extra ...*nl.RtAttr) []byte {
	info := &nl.XfrmUsersaInfo{Family: nl.FAMILY_V4, Reqid: sa.ReqID, Mode: uint8(mode(sa.Kind))}
	info.Id.Daddr.FromIP(net.IP(sa.Dst.AsSlice()))
	info.Saddr.FromIP(net.IP(sa.Src.AsSlice()))
	info.Id.Proto = unix.IPPROTO_ESP
	info.Id.Spi = nl.Swap32(sa.SPI)
	info.Lft.SoftPacketLimit, info.Lft.HardPacketLimit = sa.SoftPackets, sa.HardPackets
	info.Lft.SoftByteLimit, info.Lft.HardByteLimit = nl.XFRM_INF, nl.XFRM_INF
	info.Curlft.Packets = 42
	if sa.ESN {
		info.Flags |= nl.XFRM_STATE_ESN
	}
	if sa.SelSrc.IsValid() {
		info.Sel.Family = nl.FAMILY_V4
		info.Sel.Saddr.FromIP(net.IP(sa.SelSrc.Addr().AsSlice()))
		info.Sel.Daddr.FromIP(net.IP(sa.SelDst.Addr().AsSlice()))
		info.Sel.PrefixlenS, info.Sel.PrefixlenD = uint8(sa.SelSrc.Bits()), uint8(sa.SelDst.Bits())
		info.Sel.Proto = sa.SelProto
	}
	b := append([]byte(nil), info.Serialize()...)
	algo := nl.XfrmAlgoAEAD{AlgKeyLen: uint32(sa.Key.Len() * 8), AlgICVLen: uint32(sa.ICVBytes * 8), AlgKey: sa.Key.Bytes()}
	copy(algo.AlgName[:], aeadName)
	b = append(b, nl.NewRtAttr(nl.XFRMA_ALG_AEAD, algo.Serialize()).Serialize()...)
	esn := &nl.XfrmReplayStateEsn{BmpLen: sa.ReplayWindow / 32, OSeq: uint32(oseq), OSeqHi: uint32(oseq >> 32),
		Seq: uint32(oseq + 7), SeqHi: uint32((oseq + 7) >> 32), ReplayWindow: sa.ReplayWindow}
	esnb := append(esn.Serialize(), make([]byte, 4*esn.BmpLen)...)
	b = append(b, nl.NewRtAttr(nl.XFRMA_REPLAY_ESN_VAL, esnb).Serialize()...)
	for _, e := range extra {
		b = append(b, e.Serialize()...)
	}
	return b
}

func TestParseStateRoundTrip(t *testing.T) {
	st := compute(t, crossSubnetCluster(api.ModeEncrypt, []desired.Generation{active(1)}, 1))
	for _, want := range st.SAs {
		k, err := parseState(rawState(want, 1<<32+5))
		if err != nil {
			t.Fatal(err)
		}
		if k.Foreign || !k.SA.SameKernelObject(want) || k.OutSeq != 1<<32+5 || k.InSeq != 1<<32+12 || k.Packets != 42 {
			t.Fatalf("parsed %s foreign=%v oseq=%d seq=%d, want %s", k.SA, k.Foreign, k.OutSeq, k.InSeq, want)
		}
	}
	// A mark or an encapsulation makes it foreign whatever its reqid.
	k, err := parseState(rawState(st.SAs[0], 0, nl.NewRtAttr(nl.XFRMA_MARK, (&nl.XfrmMark{Value: 1, Mask: 1}).Serialize())))
	if err != nil || !k.Foreign {
		t.Fatalf("marked state not foreign: %v", err)
	}
	if _, err := parseState(make([]byte, 10)); err == nil {
		t.Fatal("short message accepted")
	}
	// A per-CPU outbound state (Linux ≥ 6.13: XFRMA_SA_DIR out, XFRMA_SA_PCPU 3) is lane 4
	// of ours; a CPU number no lane holds is someone else's.
	lane := st.SAs[0]
	lane.Lane = 4
	dir, cpu := nl.NewRtAttr(nl.XFRMA_SA_DIR, []byte{uint8(netlink.XFRM_SA_DIR_OUT)}), nl.NewRtAttr(nl.XFRMA_SA_PCPU, nl.Uint32Attr(3))
	k, err = parseState(rawState(lane, 0, dir, cpu))
	if err != nil || k.Foreign || k.SA.Lane != 4 || !k.SA.SameKernelObject(lane) || k.SA.SameKernelObject(st.SAs[0]) {
		t.Fatalf("per-CPU state parsed as lane %d foreign=%v (%v)", k.SA.Lane, k.Foreign, err)
	}
	if k, err = parseState(rawState(lane, 0, nl.NewRtAttr(nl.XFRMA_SA_PCPU, nl.Uint32Attr(1<<20)))); err != nil || !k.Foreign {
		t.Fatalf("CPU 1<<20 not foreign (%v)", err)
	}
}

func TestNetlinkPolicyConversionRoundTrip(t *testing.T) {
	st := compute(t, crossSubnetCluster(api.ModeEnforce, []desired.Generation{active(1)}, 1))
	for _, want := range st.Policies {
		got := fromNetlinkPolicy(*toNetlinkPolicy(want))
		if got.Foreign || !got.Policy.SameKernelObject(want) {
			t.Fatalf("round trip %s → %s (foreign=%v)", want, got.Policy, got.Foreign)
		}
	}
	p := toNetlinkPolicy(st.Policies[0])
	p.Tmpls = append(p.Tmpls, p.Tmpls[0])
	if !fromNetlinkPolicy(*p).Foreign {
		t.Fatal("two-template policy not foreign")
	}
	p = toNetlinkPolicy(st.Policies[0])
	p.Mark = &netlink.XfrmMark{Value: 5, Mask: 0xff}
	if !fromNetlinkPolicy(*p).Foreign {
		t.Fatal("marked policy not foreign")
	}
}

func TestRetryDump(t *testing.T) {
	calls := 0
	got, err := retryDump("x", func() ([]int, error) {
		calls++
		if calls < 3 {
			if calls == 1 {
				return []int{9}, netlink.ErrDumpInterrupted
			}
			return nil, syscall.EINTR
		}
		return []int{1, 2}, nil
	})
	if err != nil || len(got) != 2 || calls != 3 {
		t.Fatalf("got %v %v after %d calls", got, err, calls)
	}
	calls = 0
	_, err = retryDump("x", func() ([]int, error) { calls++; return nil, syscall.EPERM })
	if !errors.Is(err, syscall.EPERM) || calls != 1 {
		t.Fatalf("permanent error retried: %v %d", err, calls)
	}
	calls = 0
	_, err = retryDump("x", func() ([]int, error) { calls++; return nil, netlink.ErrDumpInterrupted })
	if !errors.Is(err, netlink.ErrDumpInterrupted) || calls != dumpRetries {
		t.Fatalf("endless interruption: %v %d", err, calls)
	}
}
