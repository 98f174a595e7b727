//go:build linux

package xfrm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// aeadName is the only algorithm we program.
const aeadName = "rfc4106(gcm(aes))"

// dumpRetries bounds the retries of a dump the kernel interrupted (NLM_F_DUMP_INTR: the
// table changed while it was being dumped) or a call interrupted by a signal (EINTR).
const dumpRetries = 8

// Netlink is the real Kernel.
//
// OpenNetlink's value keeps its netlink sockets open: every call goes to the network
// namespace of the thread that opened it, whichever thread calls, and a write costs one
// round trip instead of a socket's setup and teardown as well (half the time of 2,000
// policy writes; docs/performance.md §2). The agent opens one at start and closes it at
// exit.
//
// The zero value opens a socket per call in the network namespace of the calling thread
// (tests use it from inside ns.Do).
type Netlink struct {
	h      *netlink.Handle  // nil: per-call sockets
	raw    *nl.SocketHandle // for the state dump the library does not decode; with h
	closed *atomic.Bool     // with h: after Close every call fails (a closed Handle would
	// fall back to per-call sockets in the caller's namespace)
}

// ErrClosed is returned by the methods of a Netlink after Close.
var ErrClosed = errors.New("xfrm netlink handle closed")

var _ Kernel = Netlink{}

// perCall is a netlink.Handle without sockets: each request opens its own.
var perCall = &netlink.Handle{}

// dumpTimeout bounds a send or receive of the state dump's socket, as the library's
// per-call sockets are bounded. The handle that writes has no timeout: a deadline costs a
// clock read and a poller update per send and per receive (≈15 % of programming 1,000
// peers in the lab VM), and the kernel answers an xfrm write within the send itself. A
// call that hung anyway would hold the sync, which /healthz reports (WedgeTimeout).
const dumpTimeout = time.Minute

// OpenNetlink returns a Netlink bound to the calling thread's network namespace, holding
// its sockets until Close.
func OpenNetlink() (Netlink, error) {
	h, err := netlink.NewHandle(unix.NETLINK_XFRM)
	if err != nil {
		return Netlink{}, fmt.Errorf("open xfrm netlink socket: %w", err)
	}
	s, err := nl.GetNetlinkSocketAt(netns.None(), netns.None(), unix.NETLINK_XFRM)
	if err != nil {
		h.Close()
		return Netlink{}, fmt.Errorf("open xfrm netlink socket: %w", err)
	}
	tv := unix.NsecToTimeval(dumpTimeout.Nanoseconds())
	if err := errors.Join(s.SetSendTimeout(&tv), s.SetReceiveTimeout(&tv)); err != nil {
		s.Close()
		h.Close()
		return Netlink{}, fmt.Errorf("xfrm netlink socket timeout: %w", err)
	}
	return Netlink{h: h, raw: &nl.SocketHandle{Socket: s}, closed: new(atomic.Bool)}, nil
}

// Close releases the sockets of an OpenNetlink value; later calls fail with ErrClosed.
// It is a no-op for the zero value. Close must not run concurrently with other calls.
func (n Netlink) Close() {
	if n.h != nil && !n.closed.Swap(true) {
		n.h.Close()
		n.raw.Close()
	}
}

func (n Netlink) handle() (*netlink.Handle, error) {
	switch {
	case n.h == nil:
		return perCall, nil
	case n.closed.Load():
		return nil, ErrClosed
	}
	return n.h, nil
}

// retryDump runs dump until it is neither interrupted nor EINTR, at most dumpRetries
// times.
func retryDump[T any](what string, dump func() ([]T, error)) ([]T, error) {
	var err error
	for range dumpRetries {
		var out []T
		out, err = dump()
		if err == nil {
			return out, nil
		}
		if !errors.Is(err, netlink.ErrDumpInterrupted) && !errors.Is(err, unix.EINTR) {
			return nil, err
		}
	}
	return nil, fmt.Errorf("dump %s: still interrupted after %d attempts: %w", what, dumpRetries, err)
}

// ListStates dumps every xfrm state (`ip xfrm state show`). It parses the raw messages
// itself because the netlink library does not decode the ESN replay state (flag, window,
// output sequence).
func (n Netlink) ListStates() ([]KernelSA, error) {
	return retryDump("xfrm states", func() ([]KernelSA, error) {
		if _, err := n.handle(); err != nil {
			return nil, err
		}
		req := nl.NewNetlinkRequest(nl.XFRM_MSG_GETSA, unix.NLM_F_DUMP)
		if n.raw != nil {
			req.Sockets = map[int]*nl.SocketHandle{unix.NETLINK_XFRM: n.raw}
		}
		msgs, err := req.Execute(unix.NETLINK_XFRM, nl.XFRM_MSG_NEWSA)
		if err != nil {
			return nil, err
		}
		out := make([]KernelSA, 0, len(msgs))
		for _, m := range msgs {
			s, err := parseState(m)
			if err != nil {
				return nil, err
			}
			out = append(out, s)
		}
		return out, nil
	})
}

func addr4(x *nl.XfrmAddress) netip.Addr { return netip.AddrFrom4([4]byte(x[:4])) }

func parseState(m []byte) (KernelSA, error) {
	if len(m) < nl.SizeofXfrmUsersaInfo {
		return KernelSA{}, fmt.Errorf("parse xfrm state: message of %d bytes", len(m))
	}
	info := nl.DeserializeXfrmUsersaInfo(m)
	var k KernelSA
	sa := &k.SA
	if info.Family != nl.FAMILY_V4 {
		k.Foreign = true
		return k, nil
	}
	sa.Src, sa.Dst = addr4(&info.Saddr), addr4(&info.Id.Daddr)
	sa.SPI = nl.Swap32(info.Id.Spi) // stored in network byte order
	sa.ReqID = info.Reqid
	switch info.Mode {
	case uint8(netlink.XFRM_MODE_TRANSPORT):
		sa.Kind = desired.Transport
	case uint8(netlink.XFRM_MODE_TUNNEL):
		sa.Kind = desired.Tunnel
	default:
		k.Foreign = true
	}
	if info.Id.Proto != unix.IPPROTO_ESP {
		k.Foreign = true
	}
	sa.ESN = info.Flags&nl.XFRM_STATE_ESN != 0
	sa.ReplayWindow = uint32(info.ReplayWindow)
	sa.SoftPackets, sa.HardPackets = info.Lft.SoftPacketLimit, info.Lft.HardPacketLimit
	k.Packets, k.Bytes = info.Curlft.Packets, info.Curlft.Bytes
	if info.Sel.Family == nl.FAMILY_V4 && (info.Sel.PrefixlenS != 0 || info.Sel.PrefixlenD != 0 || info.Sel.Proto != 0) {
		sa.SelSrc = netip.PrefixFrom(addr4(&info.Sel.Saddr), int(info.Sel.PrefixlenS))
		sa.SelDst = netip.PrefixFrom(addr4(&info.Sel.Daddr), int(info.Sel.PrefixlenD))
		sa.SelProto = info.Sel.Proto
	}
	if info.Sel.Ifindex != 0 || info.Sel.Dport != 0 || info.Sel.Sport != 0 {
		k.Foreign = true
	}
	attrs, err := nl.ParseRouteAttr(m[nl.SizeofXfrmUsersaInfo:])
	if err != nil {
		return KernelSA{}, fmt.Errorf("parse xfrm state spi=0x%08x dst=%s: %w", sa.SPI, sa.Dst, err)
	}
	aead := false
	for _, a := range attrs {
		switch a.Attr.Type {
		case nl.XFRMA_ALG_AEAD:
			algo := nl.DeserializeXfrmAlgoAEAD(a.Value)
			if nl.BytesToString(algo.AlgName[:]) != aeadName {
				k.Foreign = true
			}
			sa.Key = desired.NewKey(algo.AlgKey)
			sa.ICVBytes = int(algo.AlgICVLen / 8)
			aead = true
		case nl.XFRMA_REPLAY_ESN_VAL:
			if len(a.Value) >= nl.SizeofXfrmReplayStateEsn {
				v := a.Value
				// struct xfrm_replay_state_esn: bmp_len, oseq, seq, oseq_hi, seq_hi,
				// replay_window, bmp[].
				oseq := binary.NativeEndian.Uint32(v[4:8])
				seq := binary.NativeEndian.Uint32(v[8:12])
				oseqHi := binary.NativeEndian.Uint32(v[12:16])
				seqHi := binary.NativeEndian.Uint32(v[16:20])
				k.OutSeq = uint64(oseqHi)<<32 | uint64(oseq)
				k.InSeq = uint64(seqHi)<<32 | uint64(seq)
				sa.ReplayWindow = binary.NativeEndian.Uint32(v[20:24])
			}
		case nl.XFRMA_REPLAY_VAL:
			if len(a.Value) >= nl.SizeofXfrmReplayState {
				rs := nl.DeserializeXfrmReplayState(a.Value)
				k.OutSeq, k.InSeq = uint64(rs.OSeq), uint64(rs.Seq)
			}
		case nl.XFRMA_SA_PCPU: // only on a per-CPU state (Linux ≥ 6.13)
			if len(a.Value) >= 4 {
				if cpu := binary.NativeEndian.Uint32(a.Value[:4]); cpu < math.MaxUint16 {
					sa.Lane = uint16(cpu + 1)
				} else {
					k.Foreign = true // not a lane of ours
				}
			}
		case nl.XFRMA_ALG_AUTH, nl.XFRMA_ALG_AUTH_TRUNC, nl.XFRMA_ALG_CRYPT, nl.XFRMA_ALG_COMP,
			nl.XFRMA_ENCAP, nl.XFRMA_MARK, nl.XFRMA_IF_ID, nl.XFRMA_SET_MARK:
			k.Foreign = true
		}
	}
	if !aead {
		k.Foreign = true
	}
	return k, nil
}

func ipnet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func mode(k desired.Kind) netlink.Mode {
	if k == desired.Tunnel {
		return netlink.XFRM_MODE_TUNNEL
	}
	return netlink.XFRM_MODE_TRANSPORT
}

// AddState is `ip xfrm state add src S dst D proto esp spi SPI reqid R mode M
// replay-window W flag esn aead 'rfc4106(gcm(aes))' KEY ICVBITS [sel ...] limit ...`.
// ProbePerCPUStates reports whether the kernel keeps a state's CPU number
// (XFRMA_SA_PCPU, Linux ≥ 6.13 and some vendor kernels before; docs/dataplane.md §10) for
// a state written exactly as the agent writes its per-CPU states (addPerCPUState: ESN,
// AES-GCM, packet limits). Kernels without them parse xfrm messages leniently and drop an
// attribute they do not know, so a successful add proves nothing: the answer is whether
// the number comes back. The probe state is between two addresses of the benchmarking
// range 198.18.0.0/15 that no node uses (no policy selects it, so it carries no packet)
// and is deleted at once, by ID. A kernel that refuses the add (before 6.10 it does not
// know XFRMA_SA_DIR either; or it lacks ESP or GCM) has none the agent could use.
func (n Netlink) ProbePerCPUStates() (bool, error) {
	h, err := n.handle()
	if err != nil {
		return false, err
	}
	probe := desired.SA{Src: netip.MustParseAddr("198.19.255.253"), Dst: netip.MustParseAddr("198.19.255.254"), SPI: 0x0fff0000,
		Kind: desired.Transport, ReqID: 0x7e57, Key: desired.NewKey(make([]byte, 20)), ICVBytes: 16, ESN: true,
		SoftPackets: 1 << 32, HardPackets: 1 << 34, Lane: 1}
	if err := n.addPerCPUState(probe); err != nil {
		return false, nil
	}
	id := &netlink.XfrmState{Src: probe.Src.AsSlice(), Dst: probe.Dst.AsSlice(), Proto: netlink.XFRM_PROTO_ESP, Spi: int(probe.SPI)}
	got, err := h.XfrmStateGet(id)
	if derr := h.XfrmStateDel(id); derr != nil {
		return false, fmt.Errorf("delete the per-CPU probe state: %w", derr)
	}
	if err != nil {
		return false, fmt.Errorf("read back the per-CPU probe state: %w", err)
	}
	return got.Pcpunum != nil && *got.Pcpunum == 0, nil
}

func (n Netlink) AddState(sa desired.SA) error {
	s := &netlink.XfrmState{
		Src: sa.Src.AsSlice(), Dst: sa.Dst.AsSlice(), Proto: netlink.XFRM_PROTO_ESP,
		Mode: mode(sa.Kind), Spi: int(sa.SPI), Reqid: int(sa.ReqID),
		ReplayWindow: int(sa.ReplayWindow), ESN: sa.ESN,
		Limits: netlink.XfrmStateLimits{PacketSoft: sa.SoftPackets, PacketHard: sa.HardPackets},
		Aead:   &netlink.XfrmStateAlgo{Name: aeadName, Key: sa.Key.Bytes(), ICVLen: sa.ICVBytes * 8},
	}
	if sa.SelSrc.IsValid() && sa.SelDst.IsValid() {
		s.Selector = &netlink.XfrmPolicy{Src: ipnet(sa.SelSrc), Dst: ipnet(sa.SelDst), Proto: netlink.Proto(sa.SelProto)}
	}
	if sa.Lane > 0 {
		clear(s.Aead.Key)
		return n.addPerCPUState(sa)
	}
	h, err := n.handle()
	if err == nil {
		err = h.XfrmStateAdd(s)
	}
	clear(s.Aead.Key)
	return err
}

// addPerCPUState writes sa, a per-CPU outbound state (sa.Lane n ≥ 1: CPU n−1, Linux ≥ 6.13),
// in a NEWSA message of its own: the smallest shim where the library falls short. The
// kernel keeps a state's CPU number only with XFRMA_SA_DIR out (without it the number is
// dropped: the probe says none, 6.18), and for an output state with ESN it wants
// XFRMA_REPLAY_ESN_VAL with a replay window of 0 and no bitmap (verify_sa_dir,
// xfrm_init_replay) — netlink.XfrmStateAdd refuses ESN without a window and sizes the
// bitmap from it. So sa.ReplayWindow must be 0 (desired.Compute makes it so), and the
// dump gives the state back as written (parseState). Lookups and deletes go by ID only
// (DeleteState): 7.3 refuses XFRMA_SA_PCPU there.
func (n Netlink) addPerCPUState(sa desired.SA) error {
	if _, err := n.handle(); err != nil {
		return err
	}
	if sa.ReplayWindow != 0 {
		return fmt.Errorf("per-CPU outbound state %s: replay window %d, an output state has none", sa, sa.ReplayWindow)
	}
	info := &nl.XfrmUsersaInfo{Family: nl.FAMILY_V4, Mode: uint8(mode(sa.Kind)), Reqid: sa.ReqID}
	info.Id.Daddr.FromIP(sa.Dst.AsSlice())
	info.Saddr.FromIP(sa.Src.AsSlice())
	info.Id.Proto = uint8(netlink.XFRM_PROTO_ESP)
	info.Id.Spi = nl.Swap32(sa.SPI)
	info.Lft = nl.XfrmLifetimeCfg{SoftByteLimit: nl.XFRM_INF, HardByteLimit: nl.XFRM_INF, SoftPacketLimit: nl.XFRM_INF, HardPacketLimit: nl.XFRM_INF}
	if sa.SoftPackets != 0 {
		info.Lft.SoftPacketLimit = sa.SoftPackets
	}
	if sa.HardPackets != 0 {
		info.Lft.HardPacketLimit = sa.HardPackets
	}
	if sa.SelSrc.IsValid() && sa.SelDst.IsValid() {
		info.Sel.Family = nl.FAMILY_V4
		info.Sel.Saddr.FromIP(sa.SelSrc.Addr().AsSlice())
		info.Sel.Daddr.FromIP(sa.SelDst.Addr().AsSlice())
		info.Sel.PrefixlenS, info.Sel.PrefixlenD = uint8(sa.SelSrc.Bits()), uint8(sa.SelDst.Bits())
		info.Sel.Proto = sa.SelProto
	}
	if sa.ESN {
		info.Flags |= nl.XFRM_STATE_ESN
	}
	req := nl.NewNetlinkRequest(nl.XFRM_MSG_NEWSA, unix.NLM_F_CREATE|unix.NLM_F_EXCL|unix.NLM_F_ACK)
	if n.raw != nil {
		req.Sockets = map[int]*nl.SocketHandle{unix.NETLINK_XFRM: n.raw}
	}
	req.AddData(info)
	key := sa.Key.Bytes()
	aead := nl.XfrmAlgoAEAD{AlgKeyLen: uint32(len(key) * 8), AlgICVLen: uint32(sa.ICVBytes * 8), AlgKey: key}
	copy(aead.AlgName[:], aeadName)
	aeadAttr := aead.Serialize()
	req.AddData(nl.NewRtAttr(nl.XFRMA_ALG_AEAD, aeadAttr))
	if sa.ESN {
		esn := nl.XfrmReplayStateEsn{} // window 0, no bitmap: an output state
		req.AddData(nl.NewRtAttr(nl.XFRMA_REPLAY_ESN_VAL, esn.Serialize()))
	}
	req.AddData(nl.NewRtAttr(nl.XFRMA_SA_DIR, []byte{uint8(netlink.XFRM_SA_DIR_OUT)}))
	cpu := make([]byte, 4)
	binary.NativeEndian.PutUint32(cpu, uint32(sa.Lane-1))
	req.AddData(nl.NewRtAttr(nl.XFRMA_SA_PCPU, cpu))
	_, err := req.Execute(unix.NETLINK_XFRM, 0)
	clear(key)
	clear(aeadAttr)
	return err
}

// DeleteState is `ip xfrm state delete src S dst D proto esp spi SPI`.
func (n Netlink) DeleteState(sa desired.SA) error {
	h, err := n.handle()
	if err != nil {
		return err
	}
	return h.XfrmStateDel(&netlink.XfrmState{Src: sa.Src.AsSlice(), Dst: sa.Dst.AsSlice(),
		Proto: netlink.XFRM_PROTO_ESP, Spi: int(sa.SPI)})
}

// ListPolicies is `ip -4 xfrm policy show`.
func (n Netlink) ListPolicies() ([]KernelPolicy, error) {
	return retryDump("xfrm policies", func() ([]KernelPolicy, error) {
		h, err := n.handle()
		if err != nil {
			return nil, err
		}
		ps, err := h.XfrmPolicyList(netlink.FAMILY_V4)
		if err != nil {
			return nil, err
		}
		out := make([]KernelPolicy, 0, len(ps))
		for _, p := range ps {
			out = append(out, fromNetlinkPolicy(p))
		}
		return out, nil
	})
}

func prefix(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	a = a.Unmap()
	bits, _ := n.Mask.Size()
	return netip.PrefixFrom(a, bits), a.Is4()
}

func fromNetlinkPolicy(p netlink.XfrmPolicy) KernelPolicy {
	var k KernelPolicy
	src, okS := prefix(p.Src)
	dst, okD := prefix(p.Dst)
	k.Policy = desired.Policy{Dir: desired.Dir(p.Dir), Src: src, Dst: dst, Proto: uint8(p.Proto), Priority: uint32(p.Priority)}
	if !okS || !okD || p.Dir > netlink.XFRM_DIR_FWD || p.Action != netlink.XFRM_POLICY_ALLOW ||
		(p.Mark != nil && (p.Mark.Value != 0 || p.Mark.Mask != 0)) || p.Ifid != 0 || p.Ifindex != 0 ||
		p.DstPort != 0 || p.SrcPort != 0 || len(p.Tmpls) > 1 {
		k.Foreign = true
	}
	if len(p.Tmpls) == 1 {
		t := p.Tmpls[0]
		ts, ok1 := netip.AddrFromSlice(t.Src)
		td, ok2 := netip.AddrFromSlice(t.Dst)
		k.Policy.Tmpl = desired.Template{Src: ts.Unmap(), Dst: td.Unmap(), SPI: uint32(t.Spi), ReqID: uint32(t.Reqid), Optional: t.Optional != 0}
		switch t.Mode {
		case netlink.XFRM_MODE_TRANSPORT:
			k.Policy.Tmpl.Kind = desired.Transport
		case netlink.XFRM_MODE_TUNNEL:
			k.Policy.Tmpl.Kind = desired.Tunnel
		default:
			k.Foreign = true
		}
		if !ok1 || !ok2 || t.Proto != netlink.XFRM_PROTO_ESP {
			k.Foreign = true
		}
	}
	return k
}

func toNetlinkPolicy(p desired.Policy) *netlink.XfrmPolicy {
	np := &netlink.XfrmPolicy{Src: ipnet(p.Src), Dst: ipnet(p.Dst), Proto: netlink.Proto(p.Proto),
		Dir: netlink.Dir(p.Dir), Priority: int(p.Priority), Action: netlink.XFRM_POLICY_ALLOW}
	if !p.Tmpl.IsZero() {
		t := netlink.XfrmPolicyTmpl{Src: p.Tmpl.Src.AsSlice(), Dst: p.Tmpl.Dst.AsSlice(),
			Proto: netlink.XFRM_PROTO_ESP, Mode: mode(p.Tmpl.Kind), Spi: int(p.Tmpl.SPI), Reqid: int(p.Tmpl.ReqID)}
		if p.Tmpl.Optional {
			t.Optional = 1
		}
		np.Tmpls = []netlink.XfrmPolicyTmpl{t}
	}
	return np
}

// AddPolicy is `ip xfrm policy add src S dst D proto P dir DIR priority N tmpl ...`.
func (n Netlink) AddPolicy(p desired.Policy) error {
	h, err := n.handle()
	if err != nil {
		return err
	}
	return h.XfrmPolicyAdd(toNetlinkPolicy(p))
}

// UpdatePolicy is `ip xfrm policy update ...`: the kernel swaps the policy in place.
func (n Netlink) UpdatePolicy(p desired.Policy) error {
	h, err := n.handle()
	if err != nil {
		return err
	}
	return h.XfrmPolicyUpdate(toNetlinkPolicy(p))
}

// DeletePolicy is `ip xfrm policy delete src S dst D proto P dir DIR`.
func (n Netlink) DeletePolicy(p desired.Policy) error {
	h, err := n.handle()
	if err != nil {
		return err
	}
	return h.XfrmPolicyDel(toNetlinkPolicy(p))
}
