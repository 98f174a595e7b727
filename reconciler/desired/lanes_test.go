package desired

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
)

// lanesInputs: self a (node ID 1) sends on 2 lanes; b takes lanes and sends on 3; c takes
// none (an agent before lanes); d takes lanes and sends on none. Generation 1 active, 2
// pending; every peer ready both ways for both.
func lanesInputs(mode api.Mode) Inputs {
	self := node("a", "198.18.0.1/24", 1)
	self.Lanes = 2
	b := withReport(node("b", "198.18.0.2/24", 2), api.ModeEnforce, 1, 2)
	b.Lanes, b.TakesLanes = 3, true
	c := withReport(node("c", "198.18.0.3/24", 3), api.ModeEnforce, 1, 2)
	d := withReport(node("d", "198.18.0.4/24", 4), api.ModeEnforce, 1, 2)
	d.TakesLanes = true
	return Inputs{Self: "a", Nodes: []Node{self, b, c, d},
		Pools: []Pool{{Name: "default", CIDR: mustPrefix("10.244.0.0/16"), IPIPMode: IPIPAlways}},
		Ring:  ring(mode, active(1), pending(2)), Keys: testKeys}
}

// laneOf is the derivation lane an SPI carries.
func laneOf(spi uint32) uint16 {
	_, lane, _, _, _ := keys.ParseLaneSPI(spi)
	return lane
}

func TestComputeLanes(t *testing.T) {
	cfg := Config{}.WithDefaults()
	type want struct {
		lanes []uint16 // derivation lanes, ascending
	}
	check := func(t *testing.T, st State, peer string, dir Dir, gen uint32, lanes []uint16) {
		t.Helper()
		var got []uint16
		for _, sa := range st.SAs {
			if sa.Peer != peer || sa.Dir != dir || sa.Generation != gen || sa.Kind != Transport {
				continue
			}
			l := laneOf(sa.SPI)
			got = append(got, l)
			// reqid and CPU number by lane and direction.
			wantReqID, wantCPU := cfg.ReqID, uint16(0)
			if dir == Out && l >= keys.FallbackLane {
				wantReqID = cfg.LaneReqIDFor(Transport, gen)
				if l > keys.FallbackLane {
					wantCPU = l - keys.FallbackLane
				}
			}
			if sa.ReqID != wantReqID || sa.Lane != wantCPU {
				t.Errorf("%s: reqid 0x%x lane %d, want reqid 0x%x lane %d", sa, sa.ReqID, sa.Lane, wantReqID, wantCPU)
			}
			// A per-CPU state is an output state to the kernel: no replay window.
			if wantWin := map[bool]uint32{true: 0, false: cfg.ReplayWindow}[wantCPU > 0]; sa.ReplayWindow != wantWin || !sa.ESN {
				t.Errorf("%s: replay window %d esn %v, want %d with esn", sa, sa.ReplayWindow, sa.ESN, wantWin)
			}
		}
		slices.Sort(got)
		if !slices.Equal(got, lanes) {
			t.Errorf("%s %s generation %d: lanes %v, want %v", dir, peer, gen, got, lanes)
		}
	}
	outPolicy := func(t *testing.T, st State, peer string) Policy {
		t.Helper()
		for _, p := range st.Policies {
			if p.Dir == Out && p.Peer == peer && p.Tmpl.Kind == Transport {
				return p
			}
		}
		t.Fatalf("no outbound policy toward %s", peer)
		return Policy{}
	}
	spiOf := func(st State, peer string, gen uint32, lane uint16) uint32 {
		for _, sa := range st.SAs {
			if sa.Peer == peer && sa.Dir == Out && sa.Generation == gen && sa.Kind == Transport && laneOf(sa.SPI) == lane {
				return sa.SPI
			}
		}
		return 0
	}

	t.Run("enforce", func(t *testing.T) {
		st, err := Compute(lanesInputs(api.ModeEnforce))
		if err != nil {
			t.Fatal(err)
		}
		for _, gen := range []uint32{1, 2} {
			// Outbound: lane 0, the fallback and 2 CPU lanes toward every peer, whether
			// it takes lanes or not (a later change of that is a policy update, never a
			// state re-added under a recorded key).
			for _, p := range []string{"b", "c", "d"} {
				check(t, st, p, Out, gen, []uint16{0, 1, 2, 3})
			}
			// Inbound: the peer's lanes — b's 3 and its fallback; c and d lane 0 only.
			check(t, st, "b", In, gen, []uint16{0, 1, 2, 3, 4})
			check(t, st, "c", In, gen, []uint16{0})
			check(t, st, "d", In, gen, []uint16{0})
		}
		// b and d take lanes: an SPI-less template under generation 1's lane reqid, the
		// fallback named; c does not: lane 0's SPI as without lanes.
		for _, p := range []string{"b", "d"} {
			pol := outPolicy(t, st, p)
			if pol.Tmpl.SPI != 0 || pol.Tmpl.ReqID != cfg.LaneReqIDFor(Transport, 1) || pol.Fallback != spiOf(st, p, 1, keys.FallbackLane) || pol.Fallback == 0 {
				t.Errorf("toward %s: %s fallback 0x%x, want lanes of generation 1", p, pol, pol.Fallback)
			}
		}
		if pol := outPolicy(t, st, "c"); pol.Tmpl.SPI != spiOf(st, "c", 1, 0) || pol.Tmpl.ReqID != cfg.ReqID || pol.Fallback != 0 {
			t.Errorf("toward c: %s fallback 0x%x, want lane 0 of generation 1", pol, pol.Fallback)
		}
		// No two states share an SPI toward one destination, nor a key.
		ids, keysSeen := map[string]bool{}, map[string]bool{}
		for _, sa := range st.SAs {
			if ids[sa.ID()] || keysSeen[string(sa.Key.Bytes())] {
				t.Errorf("%s: SPI or key used twice", sa)
			}
			ids[sa.ID()], keysSeen[string(sa.Key.Bytes())] = true, true
		}
	})

	t.Run("lanes off", func(t *testing.T) {
		in := lanesInputs(api.ModeEnforce)
		in.Config.LanesOff = true
		st, err := Compute(in)
		if err != nil {
			t.Fatal(err)
		}
		// No outbound lanes (the policies name lane 0 in the same apply, before the
		// states go); b's lanes are still taken.
		for _, p := range []string{"b", "c", "d"} {
			check(t, st, p, Out, 1, []uint16{0})
		}
		check(t, st, "b", In, 1, []uint16{0, 1, 2, 3, 4})
		for _, p := range []string{"b", "c", "d"} {
			if pol := outPolicy(t, st, p); pol.Tmpl.SPI != spiOf(st, p, 1, 0) || pol.Tmpl.ReqID != cfg.ReqID || pol.Fallback != 0 {
				t.Errorf("toward %s: %s, want lane 0", p, pol)
			}
		}
	})

	t.Run("sending generation 2", func(t *testing.T) {
		in := lanesInputs(api.ModeEnforce)
		in.Ring = ring(api.ModeEnforce, retiring(1), active(2))
		st, err := Compute(in)
		if err != nil {
			t.Fatal(err)
		}
		if pol := outPolicy(t, st, "b"); pol.Tmpl.ReqID != cfg.LaneReqIDFor(Transport, 2) || pol.Fallback != spiOf(st, "b", 2, keys.FallbackLane) {
			t.Errorf("toward b: %s, want lanes of generation 2", pol)
		}
	})

	t.Run("generation without lanes", func(t *testing.T) {
		// testKeys gives generations ≥ 100 no lanes, as protocol v1.
		in := lanesInputs(api.ModeEnforce)
		in.Ring = ring(api.ModeEnforce, active(101))
		for i := range in.Nodes[1:] {
			in.Nodes[i+1].Report.Generations = []uint32{101}
		}
		st, err := Compute(in)
		if err != nil {
			t.Fatal(err)
		}
		if len(st.Skipped) != 0 {
			t.Fatalf("skipped %v", st.Skipped)
		}
		for _, p := range []string{"b", "c", "d"} {
			check(t, st, p, Out, 101, []uint16{0})
			check(t, st, p, In, 101, []uint16{0})
			if pol := outPolicy(t, st, p); pol.Tmpl.SPI == 0 || pol.Tmpl.ReqID != cfg.ReqID {
				t.Errorf("toward %s: %s, want lane 0", p, pol)
			}
		}
	})

	t.Run("tunnel", func(t *testing.T) {
		in := crossSubnetInputs(api.ModeEnforce)
		for i := range in.Nodes {
			in.Nodes[i].Lanes, in.Nodes[i].TakesLanes = 1, true
		}
		st, err := Compute(in)
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, p := range st.Policies {
			if p.Dir != Out || p.Tmpl.Kind != Tunnel {
				continue
			}
			n++
			if p.Tmpl.SPI != 0 || p.Tmpl.ReqID < cfg.LaneReqID || p.Tmpl.ReqID >= cfg.LaneReqID+LaneReqIDs || p.Tmpl.ReqID%2 != cfg.LaneReqID%2+1 || p.Fallback == 0 {
				t.Errorf("%s fallback 0x%x: want the tunnel lanes' reqid", p, p.Fallback)
			}
		}
		if n == 0 {
			t.Fatal("no outbound tunnel policy")
		}
	})

	t.Run("too many lanes", func(t *testing.T) {
		in := lanesInputs(api.ModeEnforce)
		in.Nodes[1].Lanes = keys.MaxCPULanes + 1
		st, err := Compute(in)
		if err != nil {
			t.Fatal(err)
		}
		if len(st.Skipped) != 1 || st.Skipped[0].Object != "node/b" || !strings.Contains(st.Skipped[0].Reason, fmt.Sprint(keys.MaxCPULanes)) {
			t.Errorf("skipped %v, want b for its lane count", st.Skipped)
		}
	})
}

// The lanes' reqids: eight from LaneReqID, owned, apart from the two others, one per
// generation slot and kind.
func TestLaneReqIDs(t *testing.T) {
	cfg := Config{}.WithDefaults()
	seen := map[uint32]string{}
	for gen := uint32(1); gen <= 4; gen++ {
		for _, k := range []Kind{Transport, Tunnel} {
			r := cfg.LaneReqIDFor(k, gen)
			if o, dup := seen[r]; dup {
				t.Errorf("generation %d %s: reqid 0x%x also %s", gen, k, r, o)
			}
			seen[r] = fmt.Sprintf("generation %d %s", gen, k)
			if !cfg.OwnsSA(r) || r == cfg.ReqID || r == cfg.TunnelReqID {
				t.Errorf("reqid 0x%x: not owned or not apart", r)
			}
			if cfg.LaneReqIDFor(k, gen+4) != r {
				t.Errorf("generation %d and %d: not the same slot", gen, gen+4)
			}
		}
	}
	if cfg.OwnsSA(cfg.LaneReqID + LaneReqIDs) {
		t.Error("ownership reaches beyond the lanes' reqids")
	}
	bad := cfg
	bad.ReqID = cfg.LaneReqID + 3
	if err := bad.Validate(); err == nil {
		t.Error("a reqid among the lanes' passed validation")
	}
}
