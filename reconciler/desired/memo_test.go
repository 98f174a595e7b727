package desired

import (
	"crypto/sha256"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/secureoverlay/secureoverlay/api"
)

// otherKeys is a second KeyFunc (another ring's secrets): a memo must not keep keys of
// the first when KeysVersion changes.
func otherKeys(gen uint32, kind Kind, lane uint16, src, dst Endpoint) (uint32, Key, error) {
	spi, _, err := testKeys(gen, kind, lane, src, dst)
	h := sha256.Sum256(fmt.Appendf(nil, "other|%d|%d|%s|%s|%s|%s", gen, kind, src.IP, src.Incarnation, dst.IP, dst.Incarnation))
	return spi, NewKey(h[:20]), err
}

// memoCheck compares one Update against Compute: same error or none, the same State, and
// a Change that turns the previous state's SAs and policies into the new ones.
func memoCheck(t *testing.T, m *Memo, prev *State, in Inputs, h Hint, step string) *State {
	t.Helper()
	want, werr := Compute(in)
	ch, gerr := m.Update(in, h)
	if (werr != nil) != (gerr != nil) {
		t.Fatalf("%s: Compute error %v, Update error %v", step, werr, gerr)
	}
	if werr != nil {
		if m.Version() != (Version{}) {
			t.Fatalf("%s: memo holds a version after an error", step)
		}
		return nil
	}
	got := m.State()
	if !ch.Full {
		memoPaths[m.path]++
		memoPaths[m.built]++
	}
	if want := map[bool]string{true: "full", false: m.path}[ch.Full]; ch.How != want {
		t.Fatalf("%s: change found %q, want %q", step, ch.How, want)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("%s: memo state differs from Compute\n--- memo (%d SAs %d policies %d peers %d skipped)\n%s--- compute (%d SAs %d policies %d peers %d skipped)\n%s\nmemo peers %v\ncompute peers %v\nmemo notes %q neighbours %q gens %v\ncompute notes %q neighbours %q gens %v",
			step, len(got.SAs), len(got.Policies), len(got.Peers), len(got.Skipped), render(got),
			len(want.SAs), len(want.Policies), len(want.Peers), len(want.Skipped), render(want),
			got.Peers, want.Peers, got.NotCovered, got.Neighbours, got.Generations, want.NotCovered, want.Neighbours, want.Generations)
	}
	memoStats[ch.Full]++
	if ch.To != m.Version() || ch.To.IsZero() {
		t.Fatalf("%s: change to %v, memo at %v", step, ch.To, m.Version())
	}
	if !ch.Full {
		if prev == nil {
			t.Fatalf("%s: incremental change without a previous state", step)
		}
		sas := map[saIdentity]SA{}
		for _, s := range prev.SAs {
			sas[saIdentity{s.Dst, s.SPI}] = s
		}
		pols := map[policyIdentity]Policy{}
		for _, p := range prev.Policies {
			pols[policyIdentityOf(p)] = p
		}
		for _, s := range ch.OldSAs {
			delete(sas, saIdentity{s.Dst, s.SPI})
		}
		for _, p := range ch.OldPolicies {
			delete(pols, policyIdentityOf(p))
		}
		for _, s := range ch.SAs {
			sas[saIdentity{s.Dst, s.SPI}] = s
		}
		for _, p := range ch.Policies {
			pols[policyIdentityOf(p)] = p
		}
		if len(sas) != len(want.SAs) || len(pols) != len(want.Policies) {
			t.Fatalf("%s: change gives %d SAs %d policies, want %d and %d", step, len(sas), len(pols), len(want.SAs), len(want.Policies))
		}
		for _, s := range want.SAs {
			if sas[saIdentity{s.Dst, s.SPI}] != s {
				t.Fatalf("%s: change misses %s", step, s)
			}
		}
		for _, p := range want.Policies {
			if pols[policyIdentityOf(p)] != p {
				t.Fatalf("%s: change misses %s", step, p)
			}
		}
	}
	return &want
}

// memoStats counts full and incremental updates (the random test asserts both happen);
// memoPaths the incremental ones by how they found the changed nodes and built the state.
var (
	memoStats = map[bool]int{}
	memoPaths = map[string]int{}
)

func memoInputs(mode api.Mode, nodes ...Node) Inputs {
	return Inputs{Self: "a", Nodes: nodes, Ring: ring(mode, active(1), pending(2)), Keys: testKeys, KeysVersion: "test",
		Pools: []Pool{{Name: "default", CIDR: mustPrefix("10.0.0.0/8"), IPIPMode: IPIPAlways}}}
}

func sortedNodes(ns []Node) []Node {
	ns = slices.Clone(ns)
	slices.SortFunc(ns, func(a, b Node) int { return strings.Compare(a.Name, b.Name) })
	return ns
}

// TestMemoTable: each case applies one change to a three-node cluster (a is self) and
// checks the incremental result against Compute, with and without a hint, and whether the
// change was incremental.
func TestMemoTable(t *testing.T) {
	a := node("a", "198.18.0.1/24", 1)
	b := withReport(node("b", "198.18.0.2/24", 2), api.ModeEnforce, 1, 2)
	c := withReport(node("c", "198.18.1.3/24", 3), api.ModeEnforce, 1, 2)
	d := withReport(node("d", "198.18.1.4/24", 4), api.ModeEnforce, 1, 2)
	base := memoInputs(api.ModeEnforce, a, b, c)
	with := func(f func(*Inputs)) Inputs {
		in := base
		in.Nodes = slices.Clone(base.Nodes)
		in.Pools = slices.Clone(base.Pools)
		f(&in)
		in.Nodes = sortedNodes(in.Nodes)
		return in
	}
	setNode := func(in *Inputs, n Node) {
		for i := range in.Nodes {
			if in.Nodes[i].Name == n.Name {
				in.Nodes[i] = n
				return
			}
		}
		in.Nodes = append(in.Nodes, n)
	}
	for _, tc := range []struct {
		name        string
		in          Inputs
		hint        []string
		incremental bool
	}{
		{"nothing", base, nil, true},
		{"join", with(func(in *Inputs) { setNode(in, d) }), []string{"d"}, true},
		{"leave", with(func(in *Inputs) { in.Nodes = slices.DeleteFunc(in.Nodes, func(n Node) bool { return n.Name == "c" }) }), []string{"c"}, true},
		{"key incarnation", with(func(in *Inputs) {
			c2 := c
			c2.Incarnation = "boot-c-2"
			setNode(in, withReport(c2, api.ModeEnforce, 1, 2))
		}), []string{"c"}, true},
		{"stale report", with(func(in *Inputs) { c2 := c; c2.Incarnation = "boot-c-2"; setNode(in, c2) }), []string{"c"}, true},
		{"report not ready", with(func(in *Inputs) {
			c2 := withReport(c, api.ModeEnforce, 1, 2)
			c2.Report.InboundFromSelf, c2.Report.EncryptsToSelf = false, false
			setNode(in, c2)
		}), []string{"c"}, true},
		{"report generations", with(func(in *Inputs) { setNode(in, withReport(c, api.ModeEnforce, 2)) }), []string{"c"}, true},
		{"node id", with(func(in *Inputs) { c2 := c; c2.NodeID = 9; setNode(in, c2) }), []string{"c"}, true},
		{"node id equals self", with(func(in *Inputs) { c2 := c; c2.NodeID = 1; setNode(in, c2) }), []string{"c"}, true},
		{"address", with(func(in *Inputs) { c2 := c; c2.IPv4Address = "198.18.1.9/24"; setNode(in, c2) }), []string{"c"}, true},
		{"bad address", with(func(in *Inputs) { c2 := c; c2.IPv4Address = "nope"; setNode(in, c2) }), []string{"c"}, true},
		{"address conflict", with(func(in *Inputs) { c2 := c; c2.IPv4Address = "198.18.0.2/24"; setNode(in, c2) }), []string{"c"}, false},
		{"self address", with(func(in *Inputs) { a2 := a; a2.IPv4Address = "198.18.0.7/24"; setNode(in, a2) }), []string{"a"}, false},
		{"self incarnation", with(func(in *Inputs) { a2 := a; a2.Incarnation = "boot-a-2"; setNode(in, a2) }), []string{"a"}, false},
		{"mode", with(func(in *Inputs) { in.Ring.Mode = api.ModeEncrypt }), nil, false},
		{"generation", with(func(in *Inputs) { in.Ring.Generations = []Generation{retiring(1), active(2)} }), nil, false},
		{"keys", with(func(in *Inputs) { in.Keys, in.KeysVersion = otherKeys, "other" }), nil, false},
		{"crosssubnet pool", with(func(in *Inputs) { in.Pools[0].IPIPMode = IPIPCrossSubnet }), nil, false},
		{"blocks ignored without crosssubnet", with(func(in *Inputs) {
			in.Blocks = []Block{{CIDR: mustPrefix("10.0.0.0/26"), Affinity: "host:b"}}
		}), nil, true},
		{"hold plaintext", with(func(in *Inputs) { in.HoldPlaintext = []string{"b"} }), nil, false},
		{"bgp peer", with(func(in *Inputs) {
			in.BGPPeers = []BGPPeer{{Name: "rr", PeerIP: mustAddr("198.18.0.2")}, {Name: "ext", PeerIP: mustAddr("192.0.2.1")}}
		}), nil, false},
		{"felix", with(func(in *Inputs) { in.Felix.WireGuard = true }), nil, false},
		{"no keys version", with(func(in *Inputs) { in.KeysVersion = nil }), nil, false},
	} {
		for _, hinted := range []bool{false, true} {
			if hinted && tc.hint == nil {
				continue
			}
			t.Run(fmt.Sprintf("%s/hint=%v", tc.name, hinted), func(t *testing.T) {
				m := NewMemo()
				in0, in1 := base, tc.in
				in0.Nodes = sortedNodes(base.Nodes)
				h := Hint{}
				if hinted {
					in0.NodesVersion, in1.NodesVersion = "v1", "v2"
					h = Hint{Known: true, Nodes: tc.hint, Since: "v1"}
				}
				prev := memoCheck(t, m, nil, in0, Hint{}, "initial")
				ch, err := m.Update(in1, h)
				if err != nil {
					t.Fatal(err)
				}
				if ch.Full == tc.incremental {
					t.Fatalf("full %v, want incremental %v", ch.Full, tc.incremental)
				}
				if want := map[bool]string{false: "scan", true: "hint"}[hinted]; tc.incremental && m.path != want {
					t.Fatalf("the update compared nodes by %q, want %q", m.path, want)
				}
				// Check the same update again against Compute, on a fresh memo at prev.
				m2 := NewMemo()
				memoCheck(t, m2, nil, in0, Hint{}, "initial")
				memoCheck(t, m2, prev, in1, h, tc.name)
			})
		}
	}
}

// TestMemoRandomSequences: random event sequences — joins, leaves, a peer's key
// incarnation, reports, node IDs, addresses (conflicts included), self, ring mode and
// generations, keys, pools (CrossSubnet included), blocks, BGP peers, HoldPlaintext,
// Felix, Previous — each checked against Compute after every event, alternately with and
// without a hint naming the nodes the event touched.
func TestMemoRandomSequences(t *testing.T) {
	clear(memoStats)
	clear(memoHints)
	clear(memoPaths)
	for seed := range uint64(40) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { memoSequence(t, seed, 150) })
	}
	t.Logf("updates: %d incremental, %d full; hints %v; incremental paths %v", memoStats[false], memoStats[true], memoHints, memoPaths)
	if memoStats[false] < 1000 || memoStats[true] < 100 {
		t.Errorf("updates: %d incremental, %d full: the sequences exercise too little of one path", memoStats[false], memoStats[true])
	}
	for _, p := range []string{"same", "hint", "scan", "patched"} {
		if memoPaths[p] < 50 {
			t.Errorf("incremental paths %v: too few %q", memoPaths, p)
		}
	}
}

func memoSequence(t *testing.T, seed uint64, steps int) {
	rng := rand.New(rand.NewPCG(seed, 7))
	modes := []api.Mode{api.ModeOff, api.ModeAccept, api.ModeEncrypt, api.ModeEnforce}
	nodes := map[string]Node{}
	nextID := uint32(1)
	mk := func(name string) Node {
		n := node(name, fmt.Sprintf("198.18.%d.%d/24", rng.IntN(2), 1+rng.IntN(60)), nextID)
		nextID++
		if rng.IntN(5) > 0 {
			n = withReport(n, modes[rng.IntN(len(modes))], []uint32{1, 2, 3}[:1+rng.IntN(3)]...)
		}
		if rng.IntN(3) > 0 {
			n.Published = "keys-of-" + n.Name
		}
		n.Lanes, n.TakesLanes = uint16(rng.IntN(3)), rng.IntN(3) > 0
		return n
	}
	self := node("self", "198.18.0.200/24", 1000)
	self.Lanes = 2
	// Generations 2 and 3 are protocol v2: a pair's keys need the peer's published keys
	// (by its incarnation, as the agent's KeyFunc looks them up), else ErrPeerKeyUnknown;
	// they differ with what the peer publishes.
	pubByInc := map[string]string{}
	v2 := func(base KeyFunc) KeyFunc {
		return func(gen uint32, kind Kind, lane uint16, src, dst Endpoint) (uint32, Key, error) {
			spi, k, err := base(gen, kind, lane, src, dst)
			if gen < 2 || err != nil {
				return spi, k, err
			}
			peer := src
			if src.Incarnation == self.Incarnation {
				peer = dst
			}
			pub := pubByInc[peer.Incarnation]
			if pub == "" {
				return 0, Key{}, fmt.Errorf("no key: %w", ErrPeerKeyUnknown)
			}
			h := sha256.Sum256(append(k.Bytes(), pub...))
			return spi, NewKey(h[:20]), nil
		}
	}
	for i := range 6 {
		n := mk(fmt.Sprintf("n%02d", i))
		nodes[n.Name] = n
	}
	in := Inputs{Self: "self", Ring: ring(api.ModeEnforce, active(1), pending(2)), Keys: v2(testKeys), KeysVersion: "test",
		Pools: []Pool{{Name: "default", CIDR: mustPrefix("10.0.0.0/8"), IPIPMode: IPIPAlways}}}
	build := func() {
		in.Nodes = []Node{self}
		for _, n := range nodes {
			in.Nodes = append(in.Nodes, n)
		}
		in.Nodes = sortedNodes(in.Nodes)
		clear(pubByInc)
		for _, n := range in.Nodes {
			pubByInc[n.Incarnation] = n.Published
		}
		in.Blocks = nil
		for _, n := range in.Nodes {
			if n.NodeID%3 != 0 {
				in.Blocks = append(in.Blocks, Block{CIDR: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(n.NodeID >> 2), byte(n.NodeID << 6), 0}), 26), Affinity: "host:" + n.Name})
			}
		}
	}
	names := func() []string {
		var out []string
		for n := range nodes {
			out = append(out, n)
		}
		slices.Sort(out)
		return out
	}
	pick := func() (string, bool) {
		ns := names()
		if len(ns) == 0 {
			return "", false
		}
		return ns[rng.IntN(len(ns))], true
	}
	// Versions as the agent's watcher gives them: ver names the Nodes (it changes with
	// every node event); the memo is at memoVer (nil after a failed Update) and since
	// then the nodes in since changed.
	ver, memoVer := 1, any(nil)
	var since []string
	memoNames := map[string]bool{}
	for n := range nodes {
		memoNames[n] = true
	}
	build()
	in.NodesVersion = ver
	m := NewMemo()
	prev := memoCheck(t, m, nil, in, Hint{}, "initial")
	memoVer = ver
	for step := range steps {
		var touched []string
		known := true
		ev := rng.IntN(23)
		switch ev {
		case 0, 1, 2: // join
			n := mk(fmt.Sprintf("n%02d", rng.IntN(40)))
			nodes[n.Name] = n
			touched = append(touched, n.Name)
		case 3, 4: // leave
			if name, ok := pick(); ok {
				delete(nodes, name)
				touched = append(touched, name)
			}
		case 5, 6: // key incarnation (reboot, new epoch), report follows or not
			if name, ok := pick(); ok {
				n := nodes[name]
				n.Incarnation = fmt.Sprintf("boot-%s-%d", name, step)
				if rng.IntN(2) == 0 {
					n = withReport(n, modes[rng.IntN(len(modes))], 1, 2)
				}
				nodes[name] = n
				touched = append(touched, name)
			}
		case 7, 8: // report change
			if name, ok := pick(); ok {
				n := withReport(nodes[name], modes[rng.IntN(len(modes))], []uint32{1, 2, 3}[:1+rng.IntN(3)]...)
				n.Report.InboundFromSelf, n.Report.EncryptsToSelf = rng.IntN(4) > 0, rng.IntN(4) > 0
				if rng.IntN(6) == 0 {
					n.Report = nil
				}
				nodes[name] = n
				touched = append(touched, name)
			}
		case 9: // address (may conflict, may be invalid)
			if name, ok := pick(); ok {
				n := nodes[name]
				switch rng.IntN(4) {
				case 0:
					n.IPv4Address = "bad"
				case 1:
					n.IPv4Address = fmt.Sprintf("198.18.%d.%d", rng.IntN(2), 1+rng.IntN(8))
				default:
					n.IPv4Address = fmt.Sprintf("198.18.%d.%d/24", rng.IntN(2), 1+rng.IntN(8))
				}
				nodes[name] = n
				touched = append(touched, name)
			}
		case 10: // node ID (may collide with self's or another's: SPI collision)
			if name, ok := pick(); ok {
				n := nodes[name]
				n.NodeID = []uint32{0, 1000, uint32(1 + rng.IntN(50))}[rng.IntN(3)]
				nodes[name] = n
				touched = append(touched, name)
			}
		case 11: // self
			self.Incarnation = fmt.Sprintf("boot-self-%d", step)
			if rng.IntN(3) == 0 {
				self.IPv4Address = fmt.Sprintf("198.18.0.%d/24", 200+rng.IntN(3))
			}
			touched = append(touched, "self")
		case 12: // mode
			in.Ring.Mode = modes[rng.IntN(len(modes))]
			known = false
		case 13: // generations
			switch rng.IntN(3) {
			case 0:
				in.Ring.Generations = []Generation{active(1), pending(2)}
			case 1:
				in.Ring.Generations = []Generation{retiring(1), active(2)}
			default:
				in.Ring.Generations = []Generation{active(2), pending(3)}
			}
			known = false
		case 14: // keys
			if in.KeysVersion == "test" {
				in.Keys, in.KeysVersion = v2(otherKeys), "other"
			} else {
				in.Keys, in.KeysVersion = v2(testKeys), "test"
			}
			known = false
		case 15: // pool mode
			in.Pools = []Pool{{Name: "default", CIDR: mustPrefix("10.0.0.0/8"), IPIPMode: []string{IPIPAlways, IPIPCrossSubnet, IPIPNever}[rng.IntN(3)]}}
			known = false
		case 16: // BGP peers: one on a node address, one outside
			in.BGPPeers = nil
			if rng.IntN(2) == 0 {
				in.BGPPeers = []BGPPeer{{Name: "ext", PeerIP: mustAddr("192.0.2.1")}}
				if name, ok := pick(); ok {
					if a, err := ParseNodeAddress(nodes[name].IPv4Address); err == nil {
						in.BGPPeers = append(in.BGPPeers, BGPPeer{Name: "rr", PeerIP: a.Addr()})
					}
				}
			}
			known = false
		case 17: // hold plaintext
			in.HoldPlaintext = nil
			if name, ok := pick(); ok && rng.IntN(2) == 0 {
				in.HoldPlaintext = []string{name}
			}
			known = false
		case 18: // Previous: the last state, as the agent passes it
			in.Previous = prev
			known = false
		case 19: // Felix
			in.Felix.BPF = !in.Felix.BPF
			known = false
		case 21: // per-CPU lanes: a peer's count or whether it takes them, or self's count
			if name, ok := pick(); ok && rng.IntN(3) > 0 {
				n := nodes[name]
				n.Lanes, n.TakesLanes = uint16(rng.IntN(3)), rng.IntN(2) == 0
				nodes[name] = n
				touched = append(touched, name)
			} else {
				self.Lanes = uint16(rng.IntN(3))
				touched = append(touched, "self")
			}
		case 22: // lanes turned off or on
			in.Config.LanesOff = !in.Config.LanesOff
			known = false
		case 20: // published keys (protocol v2): new, changed or gone
			if name, ok := pick(); ok {
				n := nodes[name]
				n.Published = []string{"", fmt.Sprintf("keys-of-%s-%d", name, step)}[rng.IntN(2)]
				nodes[name] = n
				touched = append(touched, name)
			}
		}
		build()
		if len(touched) > 0 {
			ver++
		}
		in.NodesVersion = ver
		since = append(since, touched...)
		h, kind := Hint{}, "none"
		switch r := rng.IntN(8); {
		case !known || r < 2:
		case r < 6:
			h, kind = Hint{Known: true, Nodes: slices.Clone(since), Since: memoVer}, "right"
		default:
			h, kind = wrongHint(rng, since, memoVer, in.Self, nodes, memoNames)
		}
		if rng.IntN(25) == 0 {
			m.Reset()
		}
		step := fmt.Sprintf("seed %d step %d event %d touched %v hint %s", seed, step, ev, touched, kind)
		if rng.IntN(4) == 0 {
			// Update only: State is built later, from several Updates' changes.
			want, werr := Compute(in)
			if _, err := m.Update(in, h); (err != nil) != (werr != nil) {
				t.Fatalf("%s: Compute error %v, Update error %v", step, werr, err)
			}
			prev = nil
			if werr == nil {
				prev = &want
			}
		} else {
			prev = memoCheck(t, m, prev, in, h, step)
		}
		memoHints[kind]++
		memoVer, since = nil, nil
		if prev != nil {
			memoVer = ver
			clear(memoNames)
			for n := range nodes {
				memoNames[n] = true
			}
		}
	}
}

// memoHints counts the hints the random sequences gave, by kind.
var memoHints = map[string]int{}

// wrongHint is a hint that lies in a way the memo must not be misled by: relative to
// another version than the memo's, without a version, leaving out one join or one leave,
// or leaving out this node's own change. (A hint that leaves out a changed peer while its
// versions agree breaks the Hint contract itself: the caller's versions vouch for it.)
func wrongHint(rng *rand.Rand, since []string, memoVer any, self string, nodes map[string]Node, memoNames map[string]bool) (Hint, string) {
	var joinsLeaves []string
	for _, n := range since {
		if _, present := nodes[n]; n != self && present != memoNames[n] && !slices.Contains(joinsLeaves, n) {
			joinsLeaves = append(joinsLeaves, n)
		}
	}
	switch r := rng.IntN(4); {
	case r == 2 && len(joinsLeaves) > 0:
		omit := joinsLeaves[rng.IntN(len(joinsLeaves))]
		return Hint{Known: true, Nodes: slices.DeleteFunc(slices.Clone(since), func(n string) bool { return n == omit }), Since: memoVer}, "omits-join-or-leave"
	case r == 3 && slices.Contains(since, self):
		return Hint{Known: true, Nodes: slices.DeleteFunc(slices.Clone(since), func(n string) bool { return n == self }), Since: memoVer}, "omits-self"
	case r == 1:
		return Hint{Known: true, Nodes: since}, "unversioned"
	default: // another base than the memo's (an earlier step's, or another memo's)
		return Hint{Known: true, Since: -1 - rng.IntN(3)}, "stale"
	}
}

// TestMemoStateAfterManyUpdates: after k incremental Updates with no State in between,
// State equals Compute's, is patched from the last one built when few peers changed and
// assembled when many did, and never modifies a State it returned before.
func TestMemoStateAfterManyUpdates(t *testing.T) {
	const peers = 60
	nodes := []Node{node("self", "198.18.0.200/24", 1000)}
	for i := range peers {
		nodes = append(nodes, withReport(node(fmt.Sprintf("n%02d", i), fmt.Sprintf("198.18.%d.%d/24", i%2, 1+i), uint32(i+1)), api.ModeEnforce, 1, 2))
	}
	in := Inputs{Self: "self", Nodes: sortedNodes(nodes), Ring: ring(api.ModeEnforce, active(1), pending(2)), Keys: testKeys, KeysVersion: "test",
		Pools: []Pool{{Name: "default", CIDR: mustPrefix("10.0.0.0/8"), IPIPMode: IPIPAlways}}, NodesVersion: 0}
	rng := rand.New(rand.NewPCG(3, 4))
	for _, k := range []int{1, 3, 15, 40, 2, 60} {
		t.Run(fmt.Sprint(k), func(t *testing.T) {
			m := NewMemo()
			memoCheck(t, m, nil, in, Hint{}, "initial")
			before := m.State()
			frozen := render(before)
			cur := in
			cur.Nodes = slices.Clone(in.Nodes)
			var named []string // every peer changed so far: the hint names them all again
			for i, p := range rng.Perm(peers)[:k] {
				n := &cur.Nodes[p] // self sorts last ("self" > "n..")
				switch i % 3 {
				case 0:
					*n = withReport(*n, api.ModeEnforce, 2)
				case 1:
					n.Incarnation = fmt.Sprintf("boot-%s-%d", n.Name, k)
				default:
					r := *n.Report // shared with in's nodes
					r.InboundFromSelf = !r.InboundFromSelf
					n.Report = &r
				}
				since := cur.NodesVersion
				cur.Nodes = slices.Clone(cur.Nodes)
				cur.NodesVersion = 1 + i
				named = append(named, n.Name)
				// Unchanged nodes and a name given twice may be named: only n is recomputed.
				ch, err := m.Update(cur, Hint{Known: true, Nodes: append(slices.Clone(named), n.Name), Since: since})
				if err != nil || ch.Full || m.path != "hint" || !slices.Equal(ch.Peers, []string{n.Name}) {
					t.Fatalf("update %d: full=%v path %s peers %v %v", i, ch.Full, m.path, ch.Peers, err)
				}
			}
			want, err := Compute(cur)
			if err != nil {
				t.Fatal(err)
			}
			if got := m.State(); !reflect.DeepEqual(got, want) {
				t.Fatalf("after %d updates the memo state differs from Compute:\n%s\n---\n%s", k, render(got), render(want))
			}
			if wantBuilt := map[bool]string{true: "patched", false: "assembled"}[k <= peers/8+8]; m.built != wantBuilt {
				t.Errorf("state %s, want %s", m.built, wantBuilt)
			}
			if render(before) != frozen {
				t.Fatal("a State returned before was modified")
			}
		})
	}
}
