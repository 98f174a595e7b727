package desired

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/secureoverlay/secureoverlay/api"
)

// The sequence test (after tailscale's TestRouterStates, but for a whole cluster): several
// simulated nodes, each with a lagging view of the ring and of the others' reports, apply
// Compute's output to a simulated kernel and publish reports only after applying (program
// before advertise). A simulated master walks the cluster through enable, rotations, a
// join, a leave and disable, advancing only when every published report allows it.
// Events are interleaved randomly; after every single event the invariants must hold:
//
//   - make before break: an outbound policy X→Y with SPI s exists only if X holds the
//     outbound SA s and Y holds the inbound SA s with the same key;
//   - no plaintext is dropped from a peer still sending it: if X has no outbound policy
//     toward Y, Y neither drops X's plaintext IPIP (rule) nor requires ESP from X (policy),
//     for transport and for CrossSubnet tunnel coverage alike.

type pubReport struct {
	mode        api.Mode
	gens        []uint32
	inbound     []string
	encrypting  []string
	sendingGens []uint32
}

type simNode struct {
	n        Node
	block    string
	ringView Ring
	seen     map[string]*pubReport // this node's (lagging) view of the others' reports
	seenLeft map[string]bool       // nodes this node has seen deleted
	seenJoin map[string]bool       // nodes this node has seen created
	state    *State                // what its kernel holds; nil before the first apply
	report   *pubReport            // what it published; nil before the first publish
}

type sim struct {
	t      fataler
	rng    *rand.Rand
	ring   Ring // the master's authoritative ring
	nodes  map[string]*simNode
	events int
	// lanes, if set, gives a node its lane count and whether it takes its peers' (fixed
	// for its incarnation: every view of it has them); onEncrypt runs at each
	// assertAllEncrypt after convergence.
	lanes     func(*Node)
	onEncrypt func()
}

type fataler interface {
	Fatalf(format string, args ...any)
}

func newSim(t fataler, seed uint64) *sim {
	s := &sim{t: t, rng: rand.New(rand.NewPCG(seed, 99)), nodes: map[string]*simNode{}, ring: ring(api.ModeOff)}
	for i, name := range []string{"a", "b", "c"} {
		s.join(name, uint32(i+1))
	}
	for _, n := range s.nodes { // the initial nodes know each other
		for m := range s.nodes {
			n.seenJoin[m] = true
		}
	}
	return s
}

func (s *sim) join(name string, id uint32) {
	s.nodes[name] = &simNode{
		n:        Node{Name: name, IPv4Address: fmt.Sprintf("198.18.0.%d/24", id), Incarnation: "boot-" + name, NodeID: id},
		block:    fmt.Sprintf("10.244.%d.0/26", id),
		ringView: s.ring, seen: map[string]*pubReport{}, seenLeft: map[string]bool{}, seenJoin: map[string]bool{name: true},
	}
	if s.lanes != nil {
		s.lanes(&s.nodes[name].n)
	}
}

func (s *sim) names() []string {
	var out []string
	for n := range s.nodes {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// inputs builds node x's Inputs from its own views.
func (s *sim) inputs(x *simNode) Inputs {
	in := Inputs{Self: x.n.Name, Ring: x.ringView, Keys: testKeys,
		Pools: []Pool{{Name: "cross", CIDR: mustPrefix("10.244.0.0/16"), IPIPMode: IPIPCrossSubnet}}}
	for _, name := range s.names() {
		y := s.nodes[name]
		if !x.seenJoin[name] || x.seenLeft[name] {
			continue
		}
		n := y.n
		if s.lanes != nil && !x.n.TakesLanes {
			// An agent before lanes reads no lane counts: it installs none of its
			// peers' lanes and sends on none of its own.
			n.Lanes, n.TakesLanes = 0, false
		}
		if r := x.seen[name]; r != nil && name != x.n.Name {
			n.Report = &Report{Incarnation: n.Incarnation, Mode: r.mode, Generations: r.gens,
				InboundFromSelf: slices.Contains(r.inbound, x.n.Name), EncryptsToSelf: slices.Contains(r.encrypting, x.n.Name)}
		}
		in.Nodes = append(in.Nodes, n)
		in.Blocks = append(in.Blocks, Block{CIDR: mustPrefix(y.block), Affinity: "host:" + name})
	}
	return in
}

func (s *sim) apply(x *simNode) {
	st, err := Compute(s.inputs(x))
	if err != nil {
		s.t.Fatalf("event %d: compute %s: %v", s.events, x.n.Name, err)
	}
	x.state = &st
}

func (s *sim) publish(x *simNode) {
	if x.state == nil {
		return
	}
	x.report = &pubReport{mode: x.state.Mode, gens: x.state.Generations, inbound: x.state.InboundPeers(),
		encrypting: x.state.EncryptingPeers(), sendingGens: x.state.SendingGenerations()}
}

func (s *sim) observe(x *simNode) {
	for name, y := range s.nodes {
		x.seenJoin[name] = true
		if y.report != nil {
			r := *y.report
			x.seen[name] = &r
		}
	}
	for name := range x.seenJoin {
		if s.nodes[name] == nil {
			x.seenLeft[name] = true
		}
	}
}

func (s *sim) randomEvent() {
	names := s.names()
	x := s.nodes[names[s.rng.IntN(len(names))]]
	switch s.rng.IntN(4) {
	case 0:
		s.apply(x)
	case 1:
		s.publish(x)
	case 2:
		s.observe(x)
	case 3:
		x.ringView = s.ring
	}
	s.events++
	s.check()
}

// converge runs full rounds in a fixed order until nothing changes.
func (s *sim) converge() {
	for round := 0; round < 4; round++ {
		for _, name := range s.names() {
			x := s.nodes[name]
			s.observe(x)
			x.ringView = s.ring
			s.apply(x)
			s.check()
			s.publish(x)
		}
	}
}

func findSA(st *State, src, dst string, spi uint32) (SA, bool) {
	if st == nil {
		return SA{}, false
	}
	for _, sa := range st.SAs {
		if sa.Src.String() == src && sa.Dst.String() == dst && sa.SPI == spi {
			return sa, true
		}
	}
	return SA{}, false
}

// sentSPIs are the SPIs X's outbound policy p may send with toward Y: the one its template
// names, or for a template without an SPI (per-CPU lanes) every outbound state from X to
// Y under its reqid — whichever the kernel picks for the sending CPU — which must hold
// the lanes' fallback (p.Fallback) and be of one generation.
func (s *sim) sentSPIs(x *simNode, xn, xip, yip string, p Policy) []uint32 {
	if p.Tmpl.SPI != 0 {
		return []uint32{p.Tmpl.SPI}
	}
	var spis []uint32
	gens := map[uint32]bool{}
	for _, sa := range x.state.SAs {
		if sa.Dir == Out && sa.Src.String() == xip && sa.Dst.String() == yip && sa.ReqID == p.Tmpl.ReqID && sa.Kind == p.Tmpl.Kind {
			spis = append(spis, sa.SPI)
			gens[sa.Generation] = true
		}
	}
	if p.Fallback == 0 || !slices.Contains(spis, p.Fallback) {
		s.t.Fatalf("event %d: %s policy %s sends on lanes without their fallback state (0x%x)", s.events, xn, p, p.Fallback)
	}
	if len(gens) != 1 {
		s.t.Fatalf("event %d: %s policy %s: reqid 0x%x holds states of generations %v", s.events, xn, p, p.Tmpl.ReqID, gens)
	}
	return spis
}

func (s *sim) check() {
	for _, xn := range s.names() {
		x := s.nodes[xn]
		xip := x.n.IPv4Address[:strings.IndexByte(x.n.IPv4Address, '/')]
		for _, yn := range s.names() {
			if xn == yn {
				continue
			}
			y := s.nodes[yn]
			yip := y.n.IPv4Address[:strings.IndexByte(y.n.IPv4Address, '/')]
			// What X sends to Y.
			var sendsTransport, sendsTunnel bool
			if x.state != nil {
				for _, p := range x.state.Policies {
					if p.Dir != Out || p.Tmpl.IsZero() || p.Tmpl.Dst.String() != yip {
						continue
					}
					if p.Tmpl.Kind == Transport {
						sendsTransport = true
					} else {
						sendsTunnel = true
					}
					for _, spi := range s.sentSPIs(x, xn, xip, yip, p) {
						out, ok := findSA(x.state, xip, yip, spi)
						if !ok {
							s.t.Fatalf("event %d: %s policy %s without its outbound SA 0x%x", s.events, xn, p, spi)
						}
						in, ok := findSA(y.state, xip, yip, spi)
						if !ok {
							s.t.Fatalf("event %d: make-before-break broken: %s sends %s but %s lacks the inbound SA 0x%x", s.events, xn, p, yn, spi)
						}
						if !in.Key.Equal(out.Key) || in.Kind != out.Kind {
							s.t.Fatalf("event %d: %s and %s disagree on the key of spi 0x%x", s.events, xn, yn, spi)
						}
					}
				}
			}
			// What Y drops from X.
			if y.state == nil {
				continue
			}
			for _, r := range y.state.Rules {
				if r.Hook == HookIn && r.Action == Drop && r.PeerIP.String() == xip && !sendsTransport {
					s.t.Fatalf("event %d: %s drops plaintext from %s which still sends plaintext", s.events, yn, xn)
				}
				if r.Hook == HookOut && r.PeerIP.String() == xip {
					// Y's own fail-closed rule must only back an existing outbound policy.
					found := false
					for _, p := range y.state.Policies {
						found = found || (p.Dir == Out && p.Tmpl.Kind == Transport && p.Tmpl.Dst.String() == xip)
					}
					if !found {
						s.t.Fatalf("event %d: %s drops its own traffic to %s without encrypting it", s.events, yn, xn)
					}
				}
			}
			for _, p := range y.state.Policies {
				if p.Tmpl.IsZero() || p.Tmpl.Optional || p.Tmpl.Src.String() != xip {
					continue
				}
				if (p.Tmpl.Kind == Transport && !sendsTransport) || (p.Tmpl.Kind == Tunnel && !sendsTunnel) {
					s.t.Fatalf("event %d: %s requires ESP (%s) from %s which still sends plaintext", s.events, yn, p, xn)
				}
			}
		}
	}
}

// runUntil interleaves random events until cond holds on the master's view.
func (s *sim) runUntil(what string, cond func() bool) {
	for i := 0; !cond(); i++ {
		if i > 20000 {
			s.t.Fatalf("event %d: stuck waiting for %s", s.events, what)
		}
		s.randomEvent()
	}
}

func (s *sim) allReport(ok func(r *pubReport) bool) func() bool {
	return func() bool {
		for _, x := range s.nodes {
			if x.report == nil || !ok(x.report) {
				return false
			}
		}
		return true
	}
}

func (s *sim) setMode(m api.Mode) {
	s.ring.Mode = m
	s.runUntil("all report "+string(m), s.allReport(func(r *pubReport) bool { return r.mode == m }))
}

func (s *sim) rotate(next uint32) {
	prev := uint32(0)
	for _, g := range s.ring.Generations {
		if g.State == GenActive {
			prev = g.ID
		}
	}
	s.ring.Generations = append(slices.Clone(s.ring.Generations), pending(next))
	s.runUntil(fmt.Sprintf("all install %d", next), s.allReport(func(r *pubReport) bool { return slices.Contains(r.gens, next) }))
	gens := []Generation{retiring(prev), active(next)}
	s.ring.Generations = gens
	s.runUntil(fmt.Sprintf("nobody sends %d", prev), s.allReport(func(r *pubReport) bool {
		return slices.Contains(r.gens, next) && !slices.Contains(r.sendingGens, prev)
	}))
	s.ring.Generations = []Generation{active(next)}
}

// assertAllEncrypt checks liveness after convergence: every pair sends ESP both ways
// (transport and, same subnet here, tunnel) with the active generation.
func (s *sim) assertAllEncrypt(gen uint32, drops bool) {
	s.converge()
	if s.onEncrypt != nil {
		s.onEncrypt()
	}
	for _, xn := range s.names() {
		x := s.nodes[xn]
		if got, want := len(x.state.EncryptingPeers()), len(s.nodes)-1; got != want {
			s.t.Fatalf("%s encrypts to %d peers, want %d\n%s", xn, got, want, render(*x.state))
		}
		if sg := x.state.SendingGenerations(); !slices.Equal(sg, []uint32{gen}) {
			s.t.Fatalf("%s sends with generations %v, want [%d]", xn, sg, gen)
		}
		var nDrop int
		for _, r := range x.state.Rules {
			if r.Action == Drop {
				nDrop++
			}
		}
		if want := 2 * (len(s.nodes) - 1); drops && nDrop != want {
			s.t.Fatalf("%s has %d drop rules, want %d", xn, nDrop, want)
		}
		if !drops && nDrop != 0 {
			s.t.Fatalf("%s has %d drop rules outside enforce", xn, nDrop)
		}
	}
}

func TestSequenceEnableRotateJoinLeaveDisable(t *testing.T) {
	seeds := 60
	if testing.Short() {
		seeds = 10
	}
	for seed := 0; seed < seeds; seed++ {
		runSequence(t, newSim(t, uint64(seed)), seed)
	}
}

// TestSequenceWithLanes is the same walk with per-CPU lanes (docs/dataplane.md §10): a
// sends on 2 lanes, c on 3, b on none but takes its peers', and d, which joins later, is
// an agent before lanes (it takes none and publishes no count). Every lane a policy may
// send on must be installed at the receiver with the same key, the fallback among them.
func TestSequenceWithLanes(t *testing.T) {
	seeds := 60
	if testing.Short() {
		seeds = 10
	}
	lanes := map[string]uint16{"a": 2, "c": 3}
	sendsOnLanes := 0
	for seed := 0; seed < seeds; seed++ {
		s := newSim(t, uint64(seed))
		s.lanes = func(n *Node) {
			n.Lanes, n.TakesLanes = lanes[n.Name], n.Name != "d"
		}
		for _, x := range s.nodes {
			s.lanes(&x.n)
		}
		s.onEncrypt = func() {
			for _, x := range s.nodes {
				for _, p := range x.state.Policies {
					if p.Dir == Out && !p.Tmpl.IsZero() && p.Tmpl.SPI == 0 {
						sendsOnLanes++
					}
				}
			}
		}
		runSequence(t, s, seed)
	}
	if sendsOnLanes == 0 {
		t.Fatal("no policy ever sent on lanes")
	}
	t.Logf("%d outbound policies seen sending on lanes at the checkpoints", sendsOnLanes)
}

func runSequence(t *testing.T, s *sim, seed int) {
	t.Helper()
	s.converge()
	// Enable: the master creates generation 1 with accept.
	s.ring.Generations = []Generation{active(1)}
	s.setMode(api.ModeAccept)
	s.setMode(api.ModeEncrypt)
	s.assertAllEncrypt(1, false)
	s.setMode(api.ModeEnforce)
	s.assertAllEncrypt(1, true)

	// A whole rotation under enforce.
	s.rotate(2)
	s.assertAllEncrypt(2, true)

	// A node joins while the cluster enforces; it must converge to full encryption.
	s.join("d", 4)
	s.runUntil("d reports enforce", func() bool { r := s.nodes["d"].report; return r != nil && r.mode == api.ModeEnforce })
	s.assertAllEncrypt(2, true)

	// Another rotation with four nodes, then a node leaves.
	s.rotate(3)
	delete(s.nodes, "b")
	s.assertAllEncrypt(3, true)

	// Disable walks back; every step gated on all reports.
	s.setMode(api.ModeEncrypt)
	s.assertAllEncrypt(3, false)
	s.setMode(api.ModeAccept)
	s.setMode(api.ModeOff)
	s.ring.Generations = nil
	s.converge()
	for _, name := range s.names() {
		if st := s.nodes[name].state; len(st.SAs)+len(st.Policies)+len(st.Rules) != 0 {
			t.Fatalf("seed %d: %s still programs state after disable:\n%s", seed, name, render(*st))
		}
	}
	if seed == 0 {
		t.Logf("seed 0: %d interleaved events, invariants checked after each", s.events)
	}
}

// The invariant checker must catch the hazard it exists for: a node that drops plaintext
// from a peer because it trusted a report the peer's kernel does not back (here: a forged
// "b encrypts to a" while b has programmed nothing).
func TestSequenceCheckerCatchesEarlyDrop(t *testing.T) {
	rec := &recorder{}
	s := newSim(rec, 1)
	s.ring = ring(api.ModeEnforce, active(1))
	for _, n := range s.names() {
		s.nodes[n].ringView = s.ring
	}
	a := s.nodes["a"]
	a.seen["b"] = &pubReport{mode: api.ModeEnforce, gens: []uint32{1}, encrypting: []string{"a"}}
	s.apply(a)
	func() {
		defer func() { _ = recover() }()
		s.check()
	}()
	if !strings.Contains(rec.msg, "drops plaintext from b which still sends plaintext") {
		t.Fatalf("checker missed the early drop (got %q)", rec.msg)
	}
	// And make-before-break: a sends with generation 1 to b that has no inbound SA.
	rec.msg = ""
	a.seen["b"].inbound = []string{"a"}
	s.ring = ring(api.ModeEncrypt, active(1))
	a.ringView = s.ring
	s.apply(a)
	func() {
		defer func() { _ = recover() }()
		s.check()
	}()
	if !strings.Contains(rec.msg, "make-before-break broken") {
		t.Fatalf("checker missed a send without the receiver's SA (got %q)", rec.msg)
	}
}

type recorder struct{ msg string }

func (r *recorder) Fatalf(format string, args ...any) {
	r.msg = fmt.Sprintf(format, args...)
	panic(r.msg)
}
