package keys

import (
	"encoding/hex"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"net/netip"
	"strings"
	"testing"
)

// startPeers returns n peers with deterministic test key pairs (never real keys).
func startPeers(t testing.TB, n int, seed uint64) []EndpointV2 {
	rng := mrand.New(mrand.NewPCG(seed, 1))
	eps := make([]EndpointV2, n)
	for i := range eps {
		b := make([]byte, PrivateKeyBytes)
		for j := range b {
			b[j] = byte(rng.Uint32())
		}
		p, err := NewPrivateKey(b)
		if err != nil {
			t.Fatal(err)
		}
		eps[i] = EndpointV2{Endpoint{IP: netip.AddrFrom4([4]byte{198, 18, byte((i + 2) >> 8), byte(i + 2)}), Incarnation: fmt.Sprintf("b%d/u/e", i), NodeID: uint32(i + 2)}, p.Public()}
	}
	return eps
}

// serialStart is the reference: the plain loop over NewPairDeriver and Derive.
func serialStart(t testing.TB, g GenerationV2, self *PrivateKey, me EndpointV2, peers []EndpointV2, kinds []Kind, lane uint16) []PeerSAsV2 {
	out := make([]PeerSAsV2, len(peers))
	for i, p := range peers {
		d, err := NewPairDeriver(g, self, p.Public)
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range kinds {
			o, err := d.Derive(k, lane, me, p)
			if err != nil {
				t.Fatal(err)
			}
			in, err := d.Derive(k, lane, p, me)
			if err != nil {
				t.Fatal(err)
			}
			out[i].Out, out[i].In = append(out[i].Out, o), append(out[i].In, in)
		}
	}
	return out
}

func sameSAs(a, b []PeerSAsV2) error {
	if len(a) != len(b) {
		return fmt.Errorf("%d peers, want %d", len(a), len(b))
	}
	for i := range a {
		for _, dir := range []struct {
			name string
			x, y []SA
		}{{"out", a[i].Out, b[i].Out}, {"in", a[i].In, b[i].In}} {
			if len(dir.x) != len(dir.y) {
				return fmt.Errorf("peer %d %s: %d SAs, want %d", i, dir.name, len(dir.x), len(dir.y))
			}
			for k := range dir.x {
				x, y := dir.x[k], dir.y[k]
				if x.SPI != y.SPI || x.Generation != y.Generation || x.Cipher != y.Cipher || x.ICVBytes != y.ICVBytes || !x.Key.Equal(y.Key) {
					return fmt.Errorf("peer %d %s SA %d differs (spi %#x vs %#x)", i, dir.name, k, x.SPI, y.SPI)
				}
			}
		}
	}
	return nil
}

// TestDerivePeersV2EqualsSerial: the parallel start derivation returns exactly what the
// serial loop does, in the peers' order, for any number of workers.
func TestDerivePeersV2EqualsSerial(t *testing.T) {
	self := mustPrivate(t, hex.EncodeToString(testScalar(0x10)))
	me := EndpointV2{Endpoint{IP: netip.MustParseAddr("198.18.0.1"), Incarnation: "b/u/e", NodeID: 1}, self.Public()}
	both := []Kind{KindTransport, KindTunnel}
	for _, c := range []struct {
		name  string
		peers int
		g     GenerationV2
		kinds []Kind
		lane  uint16
	}{
		{"no peers", 0, GenerationV2{1, AES128GCM, 16, testSalt(1)}, both, 0},
		{"one peer", 1, GenerationV2{1, AES128GCM, 16, testSalt(1)}, both, 0},
		{"two peers", 2, GenerationV2{2, AES256GCM, 8, testSalt(2)}, both, 0},
		{"transport only", 37, GenerationV2{3, AES128GCM, 12, testSalt(3)}, []Kind{KindTransport}, 0},
		{"both kinds", 101, GenerationV2{7, AES256GCM, 16, testSalt(7)}, both, 0},
		{"lane 3", 64, GenerationV2{1, AES128GCM, 16, testSalt(1)}, both, 3},
		{"no kinds", 5, GenerationV2{1, AES128GCM, 16, testSalt(1)}, nil, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			peers := startPeers(t, c.peers, uint64(c.peers))
			want := serialStart(t, c.g, self, me, peers, c.kinds, c.lane)
			for _, w := range []int{0, 1, 2, 3, 8, 1000} {
				got, err := DerivePeersV2(c.g, self, me, peers, c.kinds, c.lane, w)
				if err != nil {
					t.Fatalf("workers %d: %v", w, err)
				}
				if err := sameSAs(got, want); err != nil {
					t.Fatalf("workers %d: %v", w, err)
				}
			}
		})
	}
}

// TestDerivePeersV2Errors: a bad peer fails the whole derivation with the error a serial
// loop meets first (the lowest failing index) whatever the number of workers, and the
// error carries no key bytes.
func TestDerivePeersV2Errors(t *testing.T) {
	self := mustPrivate(t, hex.EncodeToString(testScalar(0x10)))
	me := EndpointV2{Endpoint{IP: netip.MustParseAddr("198.18.0.1"), Incarnation: "b/u/e", NodeID: 1}, self.Public()}
	g := GenerationV2{1, AES128GCM, 16, testSalt(1)}
	both := []Kind{KindTransport, KindTunnel}
	var zero PublicKey
	good := startPeers(t, 50, 9)
	with := func(f func([]EndpointV2)) []EndpointV2 {
		c := append([]EndpointV2(nil), good...)
		f(c)
		return c
	}
	for _, c := range []struct {
		name   string
		g      GenerationV2
		peers  []EndpointV2
		kinds  []Kind
		want   string // in the error
		wantIx int    // the peer the error names (-1: none)
		is     error
	}{
		{"low-order at 5 and 20", g, with(func(p []EndpointV2) { p[5].Public, p[20].Public = zero, zero }), both, "derive peer 5 (198.18.0.7)", 5, ErrLowOrderPeerKey},
		{"low-order at 49", g, with(func(p []EndpointV2) { p[49].Public = zero }), both, "low-order", 49, ErrLowOrderPeerKey},
		{"own key at 0, low-order at 1", g, with(func(p []EndpointV2) { p[0].Public, p[1].Public = self.Public(), zero }), both, "this node's own", 0, nil},
		{"own address at 30", g, with(func(p []EndpointV2) { p[30].IP = me.IP }), both, "same address", 30, nil},
		{"unknown kind", g, good, []Kind{KindTransport, Kind(9)}, "unknown sa kind", 0, nil},
		{"no salt", GenerationV2{1, AES128GCM, 16, nil}, good, both, "salt is 0 bytes", 0, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			for _, w := range []int{0, 1, 2, 7, 1000} {
				got, err := DerivePeersV2(c.g, self, me, c.peers, c.kinds, 0, w)
				if err == nil || got != nil {
					t.Fatalf("workers %d: got %d results and error %v, want only an error", w, len(got), err)
				}
				msg := err.Error()
				if !strings.Contains(msg, c.want) || !strings.Contains(msg, fmt.Sprintf("derive peer %d (", c.wantIx)) {
					t.Fatalf("workers %d: error %q, want one naming peer %d and containing %q", w, msg, c.wantIx, c.want)
				}
				if c.is != nil && !errors.Is(err, c.is) {
					t.Fatalf("workers %d: %v is not %v", w, err, c.is)
				}
				pub := self.Public()
				for _, secret := range []string{hex.EncodeToString(testScalar(0x10)), hex.EncodeToString(pub[:])} {
					if strings.Contains(strings.ToLower(msg), secret[:16]) {
						t.Fatalf("workers %d: error %q carries key bytes", w, msg)
					}
				}
			}
		})
	}
}
