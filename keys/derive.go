package keys

import (
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"net/netip"
)

// SaltBytes is the rfc4106 salt (nonce prefix) appended to every AES key.
const SaltBytes = 4

// infoLabel starts every transport-mode derivation info; it versions the encoding.
// Tunnel-mode SAs use tunnelInfoLabel. Neither label is a prefix of the other and both are
// followed by a 0x00 separator, so the two families can never derive the same key.
const (
	infoLabel       = "secureoverlay esp sa v1"
	tunnelInfoLabel = "secureoverlay esp tunnel sa v1"
)

// Kind is an SA family. Transport SAs carry Calico's IPIP packets node to node (ESP
// transport mode); tunnel SAs carry same-subnet pod traffic of CrossSubnet pools (ESP
// tunnel mode between the node IPs). The two families never share a key or an SPI.
type Kind uint8

const (
	KindTransport Kind = 0
	KindTunnel    Kind = 1
)

func (k Kind) String() string {
	switch k {
	case KindTransport:
		return "transport"
	case KindTunnel:
		return "tunnel"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

func (k Kind) valid() bool { return k == KindTransport || k == KindTunnel }

// Endpoint is one end of a directed SA: a node's IP, its incarnation (boot ID) and its
// master-assigned node ID (see Ring.NodeID).
type Endpoint struct {
	IP          netip.Addr
	Incarnation string
	NodeID      uint32
}

// SA is everything both ends need to program one direction of a node pair.
type SA struct {
	// SPI identifies the SA at the receiver (dst); see SPI for the layout.
	SPI        uint32
	Generation uint32
	Cipher     Cipher
	ICVBytes   int
	// Key is the rfc4106 key blob: AES key followed by the 4-byte salt (20 or 36 bytes),
	// the form `ip xfrm state ... aead 'rfc4106(gcm(aes))' KEY ICVBITS` takes.
	Key Key
}

// Deriver derives SAs of one generation (HKDF-Extract is done once).
type Deriver struct {
	gen    uint32
	cipher Cipher
	icv    int
	prk    Key
}

// NewDeriver prepares derivation for generation g.
func NewDeriver(g *Generation) (*Deriver, error) {
	if err := checkAEAD(g.Number, g.Cipher, g.ICVBytes); err != nil {
		return nil, err
	}
	if len(g.Root) != RootKeyBytes {
		return nil, fmt.Errorf("derive generation %d: root key is %d bytes, want %d", g.Number, len(g.Root), RootKeyBytes)
	}
	prk, err := hkdf.Extract(sha256.New, g.Root, nil)
	if err != nil {
		return nil, fmt.Errorf("derive generation %d: hkdf extract failed", g.Number)
	}
	return &Deriver{gen: g.Number, cipher: g.Cipher, icv: g.ICVBytes, prk: prk}, nil
}

// checkAEAD validates a generation's cipher and ICV length (both derivation versions).
func checkAEAD(gen uint32, c Cipher, icv int) error {
	if c.KeyBytes() == 0 {
		return fmt.Errorf("derive generation %d: cipher %s", gen, notOneOf(ciphers))
	}
	if !ValidICV(icv) {
		return fmt.Errorf("derive generation %d: icvBytes %s", gen, notOneOf(icvs))
	}
	return nil
}

// Derive returns the transport-mode SA from src to dst. The sender calls it as (self,
// peer) for its outbound SA, the receiver as (peer, self) for its inbound SA; both get the
// same SA.
func (d *Deriver) Derive(src, dst Endpoint) (SA, error) {
	return d.DeriveKind(KindTransport, src, dst)
}

// DeriveKind returns the SA of the given family from src to dst (see Derive).
func (d *Deriver) DeriveKind(kind Kind, src, dst Endpoint) (SA, error) {
	spi, err := KindSPI(kind, d.gen, src.NodeID)
	if err != nil {
		return SA{}, err
	}
	info, err := KindInfo(kind, d.cipher, d.icv, d.gen, src, dst)
	if err != nil {
		return SA{}, err
	}
	n := d.cipher.KeyBytes() + SaltBytes
	k, err := hkdf.Expand(sha256.New, d.prk, string(info), n)
	if err != nil {
		return SA{}, fmt.Errorf("derive sa generation %d %s->%s: hkdf expand failed", d.gen, src.IP, dst.IP)
	}
	return SA{SPI: spi, Generation: d.gen, Cipher: d.cipher, ICVBytes: d.icv, Key: k}, nil
}

// DeriveKind is NewDeriver(g).DeriveKind(kind, src, dst).
func (g *Generation) DeriveKind(kind Kind, src, dst Endpoint) (SA, error) {
	d, err := NewDeriver(g)
	if err != nil {
		return SA{}, err
	}
	return d.DeriveKind(kind, src, dst)
}

// Derive is NewDeriver(g).Derive(src, dst).
func (g *Generation) Derive(src, dst Endpoint) (SA, error) {
	d, err := NewDeriver(g)
	if err != nil {
		return SA{}, err
	}
	return d.Derive(src, dst)
}

// Info is the HKDF info for the SA src→dst: an injective, fixed-layout encoding
//
//	"secureoverlay esp sa v1" | 0x00 | cipher id (1 byte: 1=aes128gcm, 2=aes256gcm) |
//	ICV bytes (1) | generation (4, big endian) |
//	src IP (16, IPv4 as ::ffff:a.b.c.d) | dst IP (16) |
//	len(src incarnation) (2, big endian) | src incarnation |
//	len(dst incarnation) (2, big endian) | dst incarnation
//
// IPv4-mapped IPv6 addresses are unmapped first, so both ends agree however they parsed
// the address. Source and destination are positional, so the two directions differ.
// Tunnel-mode SAs (KindInfo) use the label "secureoverlay esp tunnel sa v1" instead.
func Info(c Cipher, icv int, gen uint32, src, dst Endpoint) ([]byte, error) {
	return KindInfo(KindTransport, c, icv, gen, src, dst)
}

// KindInfo is Info for an SA family.
func KindInfo(kind Kind, c Cipher, icv int, gen uint32, src, dst Endpoint) ([]byte, error) {
	if !kind.valid() {
		return nil, fmt.Errorf("derive sa: unknown sa kind %d", uint8(kind))
	}
	label := infoLabel
	if kind == KindTunnel {
		label = tunnelInfoLabel
	}
	s, d, err := checkEndpoints(src, dst)
	if err != nil {
		return nil, err
	}
	b := make([]byte, 0, len(label)+1+2+4+32+4+len(src.Incarnation)+len(dst.Incarnation))
	b = append(b, label...)
	b = append(b, 0, c.id(), byte(icv))
	b = binary.BigEndian.AppendUint32(b, gen)
	s16, d16 := s.As16(), d.As16()
	b = append(b, s16[:]...)
	b = append(b, d16[:]...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(src.Incarnation)))
	b = append(b, src.Incarnation...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(dst.Incarnation)))
	b = append(b, dst.Incarnation...)
	return b, nil
}

// SPI layout (32 bits, big endian on the wire; docs/keys.md §2):
//
//	bits 31..30  generation mod 4
//	bits 29..8   sender's node ID (1..MaxNodeID)
//	bits  7..1   lane: 0 the direction's one SA, 1..MaxSPILane per-CPU outbound SAs
//	bit   0      SA kind: 0 transport (IPIP), 1 tunnel (CrossSubnet)
//
// A receiver sees one SA per (sender, live generation, kind, lane); at most 3 consecutive
// generations are live, so (generation mod 4, sender ID, kind, lane) is unique there, and
// node ID >= 1 makes every SPI >= 256. Lane 0's SPIs are those of the layout before lanes
// (whose bits 7..1 were reserved and zero).
const (
	spiGenShift  = 30
	spiNodeShift = 8
	spiLaneShift = 1
	// MaxSPILane is the highest lane an SPI carries (bits 7..1).
	MaxSPILane = 0x7f
)

// How the agent numbers its lanes (docs/dataplane.md §10, "How the agent uses them"):
// lane 0 is the direction's one SA (kept under the usual reqid); a sender with L lanes adds
// FallbackLane, the state without a CPU that carries the CPUs without a lane of their own,
// and lanes FallbackLane+1..FallbackLane+L, the states of CPUs 0..L−1. So a node sends on at
// most MaxCPULanes per-CPU lanes.
const (
	FallbackLane = 1
	MaxCPULanes  = MaxSPILane - FallbackLane
)

// SPI returns the SPI of generation gen's transport SAs sent by the node with ID srcNodeID.
func SPI(gen, srcNodeID uint32) (uint32, error) {
	return KindSPI(KindTransport, gen, srcNodeID)
}

// KindSPI returns the SPI of generation gen's SAs of the given kind sent by srcNodeID
// (lane 0: the direction's one SA).
func KindSPI(kind Kind, gen, srcNodeID uint32) (uint32, error) {
	return LaneSPI(kind, 0, gen, srcNodeID)
}

// LaneSPI returns the SPI of generation gen's SA of the given kind and lane sent by
// srcNodeID.
func LaneSPI(kind Kind, lane uint16, gen, srcNodeID uint32) (uint32, error) {
	if !kind.valid() {
		return 0, fmt.Errorf("spi for generation %d: unknown sa kind %d", gen, uint8(kind))
	}
	if srcNodeID == 0 || srcNodeID > MaxNodeID {
		return 0, fmt.Errorf("spi for generation %d: node id %d outside 1..%d", gen, srcNodeID, MaxNodeID)
	}
	if lane > MaxSPILane {
		return 0, fmt.Errorf("spi for generation %d: lane %d outside 0..%d", gen, lane, MaxSPILane)
	}
	return (gen%4)<<spiGenShift | srcNodeID<<spiNodeShift | uint32(lane)<<spiLaneShift | uint32(kind), nil
}

// ParseSPI splits a transport SPI of lane 0 into generation mod 4 and sender node ID; ok
// is false if the SPI does not follow the layout (another kind or lane, or node ID 0).
func ParseSPI(spi uint32) (genMod4, srcNodeID uint32, ok bool) {
	kind, genMod4, srcNodeID, ok := ParseKindSPI(spi)
	return genMod4, srcNodeID, ok && kind == KindTransport
}

// ParseKindSPI splits an SPI of lane 0 into its kind, generation mod 4 and sender node ID
// (ok false for another lane: ParseLaneSPI).
func ParseKindSPI(spi uint32) (kind Kind, genMod4, srcNodeID uint32, ok bool) {
	kind, lane, genMod4, srcNodeID, ok := ParseLaneSPI(spi)
	return kind, genMod4, srcNodeID, ok && lane == 0
}

// ParseLaneSPI splits an SPI into its kind, lane, generation mod 4 and sender node ID; ok
// is false for node ID 0.
func ParseLaneSPI(spi uint32) (kind Kind, lane uint16, genMod4, srcNodeID uint32, ok bool) {
	kind = Kind(spi & 1)
	lane = uint16(spi>>spiLaneShift) & MaxSPILane
	genMod4 = spi >> spiGenShift
	srcNodeID = (spi >> spiNodeShift) & MaxNodeID
	return kind, lane, genMod4, srcNodeID, srcNodeID != 0
}
