package desired

import (
	"errors"
	"fmt"
)

// Config holds the data-plane knobs. Zero fields take the defaults (see WithDefaults).
type Config struct {
	// ICVBytes is the AES-GCM ICV length: 8 (default, the documented 26-byte overhead),
	// 12 or 16. The MTU budget must use the same value.
	ICVBytes int
	// ReplayWindow is the ESN replay window in packets (default 1024, 1024..32768).
	ReplayWindow uint32
	// SoftPackets / HardPackets are the per-SA packet lifetimes, a backstop behind
	// rotation (the master rotates before any SA's sequence nears 2^32). Defaults: soft
	// 2^32 (the kernel's soft-expire event then marks a missed rotation), hard 2^34.
	SoftPackets uint64
	HardPackets uint64
	// ReqID marks the transport-mode SAs and policies we own (default 0x5ec0);
	// TunnelReqID the CrossSubnet tunnel-mode ones (default 0x5ec1).
	ReqID       uint32
	TunnelReqID uint32
	// LaneReqID is the first of the eight reqids of the per-CPU lanes' outbound states
	// (default 0x5ec2): generation g's states of kind k are under LaneReqID + 2·(g mod 4)
	// + k, so an SPI-less template chooses the generation (docs/dataplane.md §10).
	LaneReqID uint32
	// LanesOff: this node sends on no lanes, whatever count its NodeKeys still publish:
	// its outbound policies name lane 0's SPI and its outbound lane states go (the
	// agent's --pcpu-sas=off; it publishes 0 lanes next). Inbound states for its peers'
	// lanes stay: it still takes them.
	LanesOff bool
	// Priority is the xfrm priority of our most specific policies (lower wins; default
	// 0x5ec0). Tunnel-mode block policies use Priority + (32-srclen) + (32-dstlen) so that
	// borrowed /32s override their block. Template-less (bypass) policies are recognised as
	// ours by a priority in [Priority, Priority+PriorityBand).
	Priority uint32
}

// PriorityBand is the width of the priority range our policies use.
const PriorityBand = 65

// Defaults.
const (
	DefaultICVBytes     = 8
	DefaultReplayWindow = 1024
	DefaultSoftPackets  = uint64(1) << 32
	DefaultHardPackets  = uint64(1) << 34
	DefaultReqID        = 0x5ec0
	DefaultTunnelReqID  = 0x5ec1
	DefaultLaneReqID    = 0x5ec2
	// LaneReqIDs is how many reqids from LaneReqID the lanes use: 4 generation slots × 2 kinds.
	LaneReqIDs      = 8
	DefaultPriority = 0x5ec0
	MaxReplayWindow = 32768 // XFRMA_REPLAY_ESN_MAX (4096 bytes of bitmap)
)

// WithDefaults returns c with zero fields set to their defaults.
func (c Config) WithDefaults() Config {
	if c.ICVBytes == 0 {
		c.ICVBytes = DefaultICVBytes
	}
	if c.ReplayWindow == 0 {
		c.ReplayWindow = DefaultReplayWindow
	}
	if c.SoftPackets == 0 {
		c.SoftPackets = DefaultSoftPackets
	}
	if c.HardPackets == 0 {
		c.HardPackets = DefaultHardPackets
	}
	if c.ReqID == 0 {
		c.ReqID = DefaultReqID
	}
	if c.TunnelReqID == 0 {
		c.TunnelReqID = DefaultTunnelReqID
	}
	if c.LaneReqID == 0 {
		c.LaneReqID = DefaultLaneReqID
	}
	if c.Priority == 0 {
		c.Priority = DefaultPriority
	}
	return c
}

// Validate checks a defaulted Config.
func (c Config) Validate() error {
	var errs []error
	if c.ICVBytes != 8 && c.ICVBytes != 12 && c.ICVBytes != 16 {
		errs = append(errs, fmt.Errorf("icv %d bytes: want 8, 12 or 16", c.ICVBytes))
	}
	if c.ReplayWindow < 1024 || c.ReplayWindow > MaxReplayWindow {
		errs = append(errs, fmt.Errorf("replay window %d: want 1024..%d", c.ReplayWindow, MaxReplayWindow))
	}
	if c.SoftPackets >= c.HardPackets {
		errs = append(errs, fmt.Errorf("soft packet limit %d must be below hard limit %d", c.SoftPackets, c.HardPackets))
	}
	if c.ReqID == c.TunnelReqID {
		errs = append(errs, fmt.Errorf("reqid 0x%x: transport and tunnel reqids must differ", c.ReqID))
	}
	if c.LaneReqID > ^uint32(0)-LaneReqIDs {
		errs = append(errs, fmt.Errorf("lane reqid 0x%x: the eight lane reqids must fit in 32 bits", c.LaneReqID))
	}
	for _, r := range []uint32{c.ReqID, c.TunnelReqID} {
		if c.isLaneReqID(r) {
			errs = append(errs, fmt.Errorf("reqid 0x%x is among the lanes' reqids 0x%x..0x%x", r, c.LaneReqID, c.LaneReqID+LaneReqIDs-1))
		}
	}
	if c.Priority > 1<<31 {
		errs = append(errs, fmt.Errorf("policy priority %d too large", c.Priority))
	}
	if len(errs) > 0 {
		return fmt.Errorf("invalid data-plane config: %w", errors.Join(errs...))
	}
	return nil
}

// OwnsSA reports whether an SA with this reqid belongs to us.
func (c Config) OwnsSA(reqid uint32) bool {
	return reqid == c.ReqID || reqid == c.TunnelReqID || c.isLaneReqID(reqid)
}

func (c Config) isLaneReqID(reqid uint32) bool {
	return reqid >= c.LaneReqID && reqid-c.LaneReqID < LaneReqIDs
}

// LaneReqIDFor is the reqid of generation gen's lane states of kind k (outbound, lanes ≥
// keys.FallbackLane): one per live generation and kind, as live generations are at most 3
// and consecutive (docs/keys.md §2).
func (c Config) LaneReqIDFor(k Kind, gen uint32) uint32 { return c.LaneReqID + 2*(gen%4) + uint32(k) }

// OwnsPolicy reports whether a kernel policy belongs to us: it has a template with one of
// our reqids, or it has no template and a priority inside our band.
func (c Config) OwnsPolicy(p Policy) bool {
	if p.Tmpl.IsZero() {
		return p.Priority >= c.Priority && p.Priority < c.Priority+PriorityBand
	}
	return c.OwnsSA(p.Tmpl.ReqID)
}
