package watch

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/nodekeys"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// v2node is one node of the v2 derivation tests: its endpoint, private key of generation
// 6 and published keys.
type v2node struct {
	ep   desired.Endpoint
	priv *keys.PrivateKey
	pub  nodekeys.Keys
}

func newV2Node(t *testing.T, id uint32, ip, boot string) v2node {
	t.Helper()
	k, err := keys.GeneratePrivateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	inc := nodekeys.Incarnation{BootID: boot, UID: "uid-" + boot, Epoch: "epoch-" + boot}
	return v2node{
		ep:   desired.Endpoint{IP: netip.MustParseAddr(ip), NodeID: id, Incarnation: KeyIncarnation(inc.BootID, inc.UID, inc.Epoch)},
		priv: k,
		pub:  nodekeys.Keys{Incarnation: inc, Keys: []nodekeys.Key{{Generation: 6, X25519: k.Public()}}},
	}
}

// v2TestRing: generation 5 (v1, a root) active, generation 6 (v2, a salt) pending.
func v2TestRing() *keys.Ring {
	r := keys.NewRing()
	r.Mode, r.Target, r.LastGeneration = api.ModeEnforce, api.ModeEnforce, 6
	t0 := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	r.Generations = []keys.Generation{
		{Number: 5, State: keys.StateActive, Cipher: keys.AES128GCM, ICVBytes: 8, Root: bytes.Repeat([]byte{0x55}, keys.RootKeyBytes), Created: t0, Activated: t0},
		{Number: 6, State: keys.StatePending, Cipher: keys.AES128GCM, ICVBytes: 8, Salt: bytes.Repeat([]byte{0xa6}, keys.GenerationSaltBytes), Created: t0},
	}
	return r
}

func (n v2node) keyFunc(r *keys.Ring, peers ...v2node) desired.KeyFunc {
	m := map[uint32]nodekeys.Keys{}
	for _, p := range peers {
		m[p.ep.NodeID] = p.pub
	}
	return KeyFuncWith(r, &V2Keys{Self: n.ep.Incarnation, Peer: lookup(m),
		Private: func(g uint32) (*keys.PrivateKey, bool) { return n.priv, g == 6 }})
}

func lookup(m map[uint32]nodekeys.Keys) func(uint32) (nodekeys.Keys, bool) {
	return func(id uint32) (nodekeys.Keys, bool) { k, ok := m[id]; return k, ok }
}

func TestKeyFuncV2(t *testing.T) {
	r := v2TestRing()
	a := newV2Node(t, 1, "198.18.0.1", "boot-a")
	b := newV2Node(t, 2, "198.18.0.2", "boot-b")
	c := newV2Node(t, 3, "198.18.0.3", "boot-c")
	fa, fb, fc := a.keyFunc(r, b, c), b.keyFunc(r, a, c), c.keyFunc(r, a, b)
	type sa struct {
		spi uint32
		key desired.Key
	}
	get := func(f desired.KeyFunc, gen uint32, kind desired.Kind, lane uint16, src, dst desired.Endpoint) sa {
		t.Helper()
		spi, k, err := f(gen, kind, lane, src, dst)
		if err != nil {
			t.Fatal(err)
		}
		return sa{spi, k}
	}
	seen := map[string]string{}
	for _, tc := range []struct {
		name     string
		gen      uint32
		kind     desired.Kind
		lane     uint16
		src, dst v2node
		f1, f2   desired.KeyFunc // sender's and receiver's
	}{
		{"v2 a->b", 6, desired.Transport, 0, a, b, fa, fb},
		{"v2 b->a", 6, desired.Transport, 0, b, a, fb, fa},
		{"v2 a->b tunnel", 6, desired.Tunnel, 0, a, b, fa, fb},
		{"v2 a->c", 6, desired.Transport, 0, a, c, fa, fc},
		{"v2 c->b", 6, desired.Transport, 0, c, b, fc, fb},
		{"v1 a->b", 5, desired.Transport, 0, a, b, fa, fb},
		{"v2 a->b lane 1", 6, desired.Transport, 1, a, b, fa, fb},
		{"v2 a->b lane 2", 6, desired.Transport, 2, a, b, fa, fb},
		{"v2 a->b tunnel lane 2", 6, desired.Tunnel, 2, a, b, fa, fb},
		{"v2 b->a lane 2", 6, desired.Transport, 2, b, a, fb, fa},
	} {
		s, d := get(tc.f1, tc.gen, tc.kind, tc.lane, tc.src.ep, tc.dst.ep), get(tc.f2, tc.gen, tc.kind, tc.lane, tc.src.ep, tc.dst.ep)
		if s.spi != d.spi || !s.key.Equal(d.key) {
			t.Errorf("%s: sender and receiver disagree", tc.name)
		}
		if want, _ := keys.LaneSPI(tc.kind, tc.lane, tc.gen, tc.src.ep.NodeID); s.spi != want {
			t.Errorf("%s: spi 0x%08x, want 0x%08x", tc.name, s.spi, want)
		}
		if o, dup := seen[string(s.key.Bytes())]; dup {
			t.Errorf("%s: same key as %s", tc.name, o)
		}
		seen[string(s.key.Bytes())] = tc.name
	}
	// Generation 5 is v1: the same answer as the v1 KeyFunc, and no lanes.
	if v1, v2 := get(KeyFunc(r), 5, desired.Transport, 0, a.ep, b.ep), get(fa, 5, desired.Transport, 0, a.ep, b.ep); v1.spi != v2.spi || !v1.key.Equal(v2.key) {
		t.Error("a v1 generation derives differently through KeyFuncWith")
	}
	for _, f := range []desired.KeyFunc{KeyFunc(r), fa} {
		if _, _, err := f(5, desired.Transport, 1, a.ep, b.ep); !errors.Is(err, desired.ErrNoLanes) {
			t.Errorf("v1 generation, lane 1: %v, want ErrNoLanes", err)
		}
	}
	// A third node cannot derive a pair's key: its KeyFunc refuses endpoints that are not
	// its own pair (and with its own private key it would get another key anyway).
	if _, _, err := fc(6, desired.Transport, 0, a.ep, b.ep); err == nil || errors.Is(err, desired.ErrPeerKeyUnknown) {
		t.Errorf("c derived a->b: %v", err)
	}

	// Not known yet: the pair has no v2 SA, and the error says so (never key bytes).
	stale := b
	stale.pub.Incarnation.Epoch = "an-older-epoch"
	noKey := b
	noKey.pub.Keys = []nodekeys.Key{{Generation: 7, X25519: b.priv.Public()}}
	for name, f := range map[string]desired.KeyFunc{
		"no NodeKeys":               a.keyFunc(r, c),
		"keys of another epoch":     a.keyFunc(r, stale, c),
		"no key for the generation": a.keyFunc(r, noKey, c),
		"no v2 keys at all":         KeyFuncWith(r, nil),
		"no private key": KeyFuncWith(r, &V2Keys{Self: a.ep.Incarnation, Peer: lookup(map[uint32]nodekeys.Keys{2: b.pub}),
			Private: func(uint32) (*keys.PrivateKey, bool) { return nil, false }}),
	} {
		_, _, err := f(6, desired.Transport, 0, a.ep, b.ep)
		if !errors.Is(err, desired.ErrPeerKeyUnknown) {
			t.Errorf("%s: %v, want ErrPeerKeyUnknown", name, err)
			continue
		}
		for _, k := range []*keys.PrivateKey{a.priv, b.priv} {
			if strings.Contains(err.Error(), hex.EncodeToString(k.Bytes())) {
				t.Errorf("%s: error holds a private key", name)
			}
		}
		// v1 generations are unaffected.
		if _, _, err := f(5, desired.Transport, 0, a.ep, b.ep); err != nil {
			t.Errorf("%s: generation 5: %v", name, err)
		}
	}
}
