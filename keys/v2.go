package keys

// Protocol v2 pair keys (docs/keys.md §10): every node holds its own X25519 key pair per
// (SA epoch, generation); the key of the SA src→dst comes from the pair's X25519 shared
// secret, so a node's credentials and memory reveal only the keys of its own pairs. The
// master contributes only a public 32-byte salt per generation.
//
// This file is the pure core: key pairs, the shared-secret extract, the v2 info encoding and
// SA derivation. It is not yet used on the wire (docs/protocol-v2.md says what is left).

import (
	"crypto/ecdh"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
)

const (
	v2InfoLabel       = "secureoverlay esp sa v2"
	v2TunnelInfoLabel = "secureoverlay esp tunnel sa v2"

	// PrivateKeyBytes and PublicKeyBytes are X25519's sizes (RFC 7748).
	PrivateKeyBytes = 32
	PublicKeyBytes  = 32
	// GenerationSaltBytes is the size of a v2 generation's public salt.
	GenerationSaltBytes = 32
	// MaxLane bounds the info's lane field (2 bytes): lane 0 is a pair direction's single
	// SA, lanes 1.. per-CPU outbound SAs (one key each; issue 18). The SPI carries lanes up
	// to MaxSPILane only, so Derive refuses more.
	MaxLane = 0xffff
)

// ErrLowOrderPeerKey is returned for a peer public key whose X25519 result is all zeros (a
// low-order point): such a key would make the pair's secret known to anyone.
var ErrLowOrderPeerKey = errors.New("peer public key is a low-order point")

// PublicKey is a node's X25519 public key for one (epoch, generation). It is not secret.
type PublicKey [PublicKeyBytes]byte

func (p PublicKey) String() string { return hex.EncodeToString(p[:]) }

// ParsePublicKey reads a public key from its hex form (as published in NodeKeys).
func ParsePublicKey(s string) (PublicKey, error) {
	var p PublicKey
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != PublicKeyBytes {
		return p, fmt.Errorf("public key: want %d hex-encoded bytes", PublicKeyBytes)
	}
	copy(p[:], b)
	return p, nil
}

// PrivateKey is a node's X25519 private key for one (epoch, generation). It never leaves
// the node: it prints, formats, logs and marshals as a redacted placeholder, like Key.
// Erase zeroes this copy; see docs/keys.md §10 for what erasure does and does not cover.
type PrivateKey struct {
	b   Key              // the 32-byte scalar (clamped by X25519 on use)
	k   *ecdh.PrivateKey // the same scalar in crypto/ecdh's form (its copy cannot be zeroed)
	pub PublicKey
}

// GeneratePrivateKey draws a new private key from r (crypto/rand.Reader in the agent).
func GeneratePrivateKey(r io.Reader) (*PrivateKey, error) {
	b := make(Key, PrivateKeyBytes)
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, errors.New("generate x25519 key: random source failed")
	}
	return NewPrivateKey(b)
}

// NewPrivateKey wraps a 32-byte scalar (a reloaded key, or a test vector's). It keeps b.
func NewPrivateKey(b []byte) (*PrivateKey, error) {
	k, err := ecdh.X25519().NewPrivateKey(b)
	if err != nil {
		return nil, fmt.Errorf("x25519 private key: want %d bytes", PrivateKeyBytes)
	}
	p := &PrivateKey{b: Key(b), k: k}
	copy(p.pub[:], k.PublicKey().Bytes())
	return p, nil
}

// Public returns the key's public half.
func (p *PrivateKey) Public() PublicKey { return p.pub }

// Bytes returns the scalar, for the node's key file only (a Key: it never prints).
func (p *PrivateKey) Bytes() Key { return p.b }

// Erase zeroes the scalar and drops crypto/ecdh's copy (which Go cannot zero: it is freed
// by the garbage collector); the key is unusable afterwards.
func (p *PrivateKey) Erase() {
	clear(p.b)
	p.b, p.k = nil, nil
}

func (p *PrivateKey) String() string               { return redacted + " x25519 private key" }
func (p *PrivateKey) GoString() string             { return p.String() }
func (p *PrivateKey) Format(f fmt.State, _ rune)   { _, _ = io.WriteString(f, p.String()) }
func (p *PrivateKey) LogValue() slog.Value         { return slog.StringValue(p.String()) }
func (p *PrivateKey) MarshalJSON() ([]byte, error) { return []byte(`"` + p.String() + `"`), nil }

// GenerationV2 is what a v2 generation carries in the ring: all of it public.
type GenerationV2 struct {
	Number   uint32
	Cipher   Cipher
	ICVBytes int
	Salt     []byte // GenerationSaltBytes random bytes chosen by the master
}

// EndpointV2 is one end of a directed v2 SA: v1's endpoint and the node's public key for
// the generation.
type EndpointV2 struct {
	Endpoint
	Public PublicKey
}

// PairDeriver derives the SAs of one node pair in one generation. The X25519 and the
// HKDF-Extract are done once per pair (NewPairDeriver); each SA is one HKDF-Expand.
type PairDeriver struct {
	gen    uint32
	cipher Cipher
	icv    int
	self   PublicKey
	peer   PublicKey
	prk    Key
}

// NewPairDeriver computes the pair secret of self and the peer whose public key is peer in
// generation g: PRK = HKDF-Extract(SHA-256, salt = g.Salt, IKM = X25519(self, peer)).
// Both ends get the same PRK.
func NewPairDeriver(g GenerationV2, self *PrivateKey, peer PublicKey) (*PairDeriver, error) {
	if err := checkAEAD(g.Number, g.Cipher, g.ICVBytes); err != nil {
		return nil, err
	}
	if len(g.Salt) != GenerationSaltBytes {
		return nil, fmt.Errorf("derive generation %d: salt is %d bytes, want %d", g.Number, len(g.Salt), GenerationSaltBytes)
	}
	if self == nil || self.k == nil {
		return nil, fmt.Errorf("derive generation %d: no private key (erased?)", g.Number)
	}
	if peer == self.pub {
		return nil, fmt.Errorf("derive generation %d: peer public key is this node's own", g.Number)
	}
	pub, err := ecdh.X25519().NewPublicKey(peer[:])
	if err != nil {
		return nil, fmt.Errorf("derive generation %d: peer public key: %w", g.Number, err)
	}
	shared, err := self.k.ECDH(pub)
	if err != nil { // crypto/ecdh refuses an all-zero result
		return nil, fmt.Errorf("derive generation %d: peer public key: %w", g.Number, ErrLowOrderPeerKey)
	}
	prk, err := hkdf.Extract(sha256.New, shared, g.Salt)
	clear(shared)
	if err != nil {
		return nil, fmt.Errorf("derive generation %d: hkdf extract failed", g.Number)
	}
	return &PairDeriver{gen: g.Number, cipher: g.Cipher, icv: g.ICVBytes, self: self.pub, peer: peer, prk: prk}, nil
}

// Derive returns the SA of the given kind and lane from src to dst. One of src and dst must
// be this pair's own node and the other its peer (by public key): the sender calls it as
// (self, peer) for an outbound SA, the receiver as (peer, self) for the inbound one; both
// get the same SA.
func (d *PairDeriver) Derive(kind Kind, lane uint16, src, dst EndpointV2) (SA, error) {
	if !(src.Public == d.self && dst.Public == d.peer) && !(src.Public == d.peer && dst.Public == d.self) {
		return SA{}, fmt.Errorf("derive sa generation %d %s->%s: endpoints are not this pair", d.gen, src.IP, dst.IP)
	}
	spi, err := LaneSPI(kind, lane, d.gen, src.NodeID)
	if err != nil {
		return SA{}, err
	}
	info, err := InfoV2(kind, d.cipher, d.icv, d.gen, lane, src, dst)
	if err != nil {
		return SA{}, err
	}
	k, err := hkdf.Expand(sha256.New, d.prk, string(info), d.cipher.KeyBytes()+SaltBytes)
	if err != nil {
		return SA{}, fmt.Errorf("derive sa generation %d %s->%s: hkdf expand failed", d.gen, src.IP, dst.IP)
	}
	return SA{SPI: spi, Generation: d.gen, Cipher: d.cipher, ICVBytes: d.icv, Key: k}, nil
}

// Erase zeroes the pair secret; the deriver is unusable afterwards.
func (d *PairDeriver) Erase() {
	clear(d.prk)
	d.prk = nil
}

// InfoV2 is the HKDF info of the v2 SA src→dst: v1's injective fixed-layout encoding with
// a new label, a lane and both public keys (docs/keys.md §10):
//
//	"secureoverlay esp sa v2" | 0x00 | cipher id (1) | ICV bytes (1) | generation (4, BE) |
//	lane (2, BE) | src IP (16) | dst IP (16) | src public key (32) | dst public key (32) |
//	len(src incarnation) (2, BE) | src incarnation | len(dst incarnation) (2, BE) | dst incarnation
//
// Tunnel-mode SAs use the label "secureoverlay esp tunnel sa v2".
func InfoV2(kind Kind, c Cipher, icv int, gen uint32, lane uint16, src, dst EndpointV2) ([]byte, error) {
	if !kind.valid() {
		return nil, fmt.Errorf("derive sa: unknown sa kind %d", uint8(kind))
	}
	label := v2InfoLabel
	if kind == KindTunnel {
		label = v2TunnelInfoLabel
	}
	s, d, err := checkEndpoints(src.Endpoint, dst.Endpoint)
	if err != nil {
		return nil, err
	}
	b := make([]byte, 0, len(label)+1+2+4+2+32+64+4+len(src.Incarnation)+len(dst.Incarnation))
	b = append(b, label...)
	b = append(b, 0, c.id(), byte(icv))
	b = binary.BigEndian.AppendUint32(b, gen)
	b = binary.BigEndian.AppendUint16(b, lane)
	s16, d16 := s.As16(), d.As16()
	b = append(b, s16[:]...)
	b = append(b, d16[:]...)
	b = append(b, src.Public[:]...)
	b = append(b, dst.Public[:]...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(src.Incarnation)))
	b = append(b, src.Incarnation...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(dst.Incarnation)))
	b = append(b, dst.Incarnation...)
	return b, nil
}

// checkEndpoints validates the two ends of an SA (both derivation versions) and returns
// their unmapped addresses.
func checkEndpoints(src, dst Endpoint) (s, d netip.Addr, err error) {
	if !src.IP.IsValid() || !dst.IP.IsValid() {
		return s, d, errors.New("derive sa: invalid endpoint IP")
	}
	s, d = src.IP.Unmap(), dst.IP.Unmap()
	if s == d {
		return s, d, fmt.Errorf("derive sa %s->%s: source and destination are the same address", s, d)
	}
	if len(src.Incarnation) > 0xffff || len(dst.Incarnation) > 0xffff {
		return s, d, fmt.Errorf("derive sa %s->%s: incarnation longer than 65535 bytes", s, d)
	}
	return s, d, nil
}
