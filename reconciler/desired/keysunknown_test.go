package desired

import (
	"fmt"
	"slices"
	"testing"

	"github.com/secureoverlay/secureoverlay/api"
)

// keysUnknownFor is testKeys, except that generation gen's SAs with node ID peer fail
// with ErrPeerKeyUnknown (a protocol v2 generation whose peer key is not seen yet).
func keysUnknownFor(gen, peer uint32) KeyFunc {
	return func(g uint32, kind Kind, lane uint16, src, dst Endpoint) (uint32, Key, error) {
		if g == gen && (src.NodeID == peer || dst.NodeID == peer) {
			return 0, Key{}, fmt.Errorf("generation %d: node id %d publishes no key for it: %w", g, peer, ErrPeerKeyUnknown)
		}
		return testKeys(g, kind, lane, src, dst)
	}
}

// TestPeerKeyUnknown: a generation whose SAs with one peer cannot be derived yet costs that
// pair that generation only — never the peer's other generations, never another pair —
// and the claims say so: a pending generation is not claimed installed (the master waits),
// a generation peers send with keeps its claim but the pair's inbound claim is withdrawn
// (the peer does not send to a node that lacks its SAs).
func TestPeerKeyUnknown(t *testing.T) {
	type want struct {
		gensOfC     []uint32 // generations with SAs toward c
		inboundC    bool
		sendC       uint32
		generations []uint32 // State.Generations
	}
	for _, tc := range []struct {
		name  string
		ring  Ring
		cRep  []uint32 // generations c claims
		bRep  []uint32
		want  want
		sendB uint32
	}{
		{"v2 generation 2 pending, c's key not seen", ring(api.ModeEnforce, active(1), pending(2)), []uint32{1, 2}, []uint32{1, 2},
			want{[]uint32{1}, true, 1, []uint32{1}}, 1},
		{"v2 generation 2 active, 1 retiring, c's key not seen (c rebooted)", ring(api.ModeEnforce, retiring(1), active(2)), []uint32{1, 2}, []uint32{1, 2},
			want{[]uint32{1}, false, 1, []uint32{1, 2}}, 2},
		{"only v2 generation 2, c's key not seen", ring(api.ModeEnforce, active(2)), []uint32{2}, []uint32{2},
			want{nil, false, 0, []uint32{2}}, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := alwaysInputs(api.ModeEnforce)
			in.Ring = tc.ring
			in.Nodes = []Node{node("a", "198.18.0.1/24", 1),
				withReport(node("b", "198.18.0.2/24", 2), api.ModeEnforce, tc.bRep...),
				withReport(node("c", "198.19.0.3/24", 3), api.ModeEnforce, tc.cRep...)}
			in.Keys = keysUnknownFor(2, 3)
			st, err := Compute(in)
			if err != nil {
				t.Fatal(err)
			}
			var gensC []uint32
			for _, sa := range st.SAs {
				if sa.Peer == "c" && !slices.Contains(gensC, sa.Generation) {
					gensC = append(gensC, sa.Generation)
				}
			}
			slices.Sort(gensC)
			var b, c PeerStatus
			for _, p := range st.Peers {
				switch p.Name {
				case "b":
					b = p
				case "c":
					c = p
				}
			}
			if len(st.Skipped) != 0 {
				t.Errorf("skipped %+v: a key not known yet is not a fault", st.Skipped)
			}
			if !slices.Equal(gensC, tc.want.gensOfC) || c.Inbound != tc.want.inboundC || c.SendGeneration != tc.want.sendC ||
				!slices.Equal(c.KeysUnknown, []uint32{2}) || !slices.Equal(st.Generations, tc.want.generations) {
				t.Errorf("c: SAs of %v, inbound %v, send %d, keys unknown %v; generations %v; want %+v\n%s",
					gensC, c.Inbound, c.SendGeneration, c.KeysUnknown, st.Generations, tc.want, render(st))
			}
			if c.SendGeneration == 0 && c.Reason != "peer's public key for generation [2] not known yet" {
				t.Errorf("c's reason %q", c.Reason)
			}
			// b is untouched: every generation, inbound, sending with the active one.
			if !b.Inbound || b.SendGeneration != tc.sendB || len(b.KeysUnknown) != 0 {
				t.Errorf("b: %+v", b)
			}
			// Make before break still holds for c: an outbound policy only toward a
			// generation whose outbound SA is in the state.
			for _, p := range st.Policies {
				if p.Peer == "c" && p.Dir == Out && p.Tmpl.SPI != 0 {
					found := false
					for _, sa := range st.SAs {
						found = found || (sa.Peer == "c" && sa.Dir == Out && sa.SPI == p.Tmpl.SPI)
					}
					if !found {
						t.Errorf("outbound policy toward c without its SA:\n%s", render(st))
					}
				}
			}
		})
	}
}
