package desired

import (
	"cmp"
	"net/netip"
	"reflect"
	"slices"
	"strings"
)

// Memo keeps one node's desired state between computations, split by peer, so that a
// change to a few peers costs work for those peers only (Update). Compute stays the
// reference: after a successful Update(in, …), State() is the State Compute(in) returns,
// and Update fails exactly when Compute does (tested in memo_test.go, with a randomized
// comparison over event sequences).
//
// Why per peer works: with no CrossSubnet pool and no address claimed twice, a peer's
// SAs, policies, rules, status and skip depend only on its own Node, this node's Node and
// the global inputs (ring mode and generations, config, keys, pools, Felix settings,
// HoldPlaintext). Its part is then Compute of the two-node cluster {self, peer}; the
// parts are independent, and the state is their union plus what Compute of self alone
// gives (mode, notes, generations) plus the BGP peers that are not node addresses.
// Anything else — a CrossSubnet pool (block policies pair every peer with this node's
// blocks, and borrowed /32s tie peers together), an address conflict (Previous decides
// who holds it), a change of self or of any global input, Inputs without KeysVersion, an
// SA or policy identity two peers would share, or any error — takes the full path:
// Compute(in), and the memo is rebuilt from its State.
//
// A Memo is not safe for concurrent use.
type Memo struct {
	id    *byte  // identity of this memo in Versions (never dereferenced)
	n     uint64 // version of the state held
	ok    bool   // a state is held (the last Update succeeded)
	valid bool   // the per-peer fields describe the last Inputs (incremental Updates possible)

	glob     globalInputs
	pools    []Pool
	hold     []string
	bgp      []BGPPeer
	self     Node
	selfAddr netip.Addr
	base     State // Compute of self alone, without BGP peers
	ring     []Generation
	parts    map[string]*part          // every node but self, with its input
	claims   map[netip.Addr]int        // claimants per node address (self included)
	byIP     map[netip.Addr]string     // addresses of peers that passed the node checks (kept only with BGP peers)
	saIDs    map[saIdentity]string     // SA identity → peer
	polIDs   map[policyIdentity]string // policy identity → peer
	// unknown counts, per generation, the parts whose status lists it in KeysUnknown: a
	// pending generation with any is not claimed (Compute's State.Generations).
	unknown map[uint32]int

	// nodesVer is the NodesVersion of the Inputs the memo holds (nil: unversioned).
	nodesVer any
	// path is how the last incremental Update found the changed nodes (Change.How); built
	// is how State built the last state ("patched", "assembled"; for tests).
	path, built string

	// st is the last assembled State. stOK: it is the current one. Otherwise, with stHave,
	// it is an earlier one and pending holds, for every peer changed since, its part as st
	// has it (nil: st has none), so State patches st instead of assembling everything.
	st      State
	stOK    bool
	stHave  bool
	pending map[string]*part
}

// Version names one state of one Memo (the zero Version names none). An applier that
// holds the state of version V can apply a Change from V by its difference alone.
type Version struct {
	memo *byte
	n    uint64
}

// IsZero reports whether v names no state.
func (v Version) IsZero() bool { return v.memo == nil }

// Change is what one Update changed. Full: the state was recomputed whole (apply
// Memo.State, walking everything). Otherwise SAs and Policies are the new contents of
// the changed peers and OldSAs and OldPolicies what those peers held at From; every
// other peer's objects are unchanged. An applier holding From's state reaches To's by
// writing the new objects and removing the old identities that are not among them.
type Change struct {
	From, To Version
	Full     bool
	// How the changed peers were found: "full" (recomputed whole), "same" (the Inputs'
	// NodesVersion was the memo's: no node looked at), "hint" (the nodes the Hint named),
	// "scan" (every Node compared). For metrics.
	How                   string
	Peers                 []string // the nodes whose parts were recomputed (not set when Full)
	SAs, OldSAs           []SA
	Policies, OldPolicies []Policy
}

// Hint tells Update which nodes may differ from the previous Inputs. The zero Hint means
// any may: every Node is compared (no derivation, no allocation) and only changed peers
// are recomputed. With Known set, only the nodes in Nodes (added, changed or removed)
// are looked at; in.Nodes must then be sorted by name (watch.Inputs gives them so). The
// cost of such an Update does not depend on the cluster's size.
//
// A hint is a claim about two versions of the Nodes: between the Inputs whose
// NodesVersion is Since and in (whose NodesVersion must be set), only the named nodes
// changed. Update uses it only when Since is the NodesVersion of the Inputs the memo
// holds, so a hint relative to another state (a lost or coalesced event, a failed
// Update, a Reset) cannot narrow what is compared. Even then the memo checks what is
// cheap to check — this node's own Node, and that the number of nodes is what the named
// joins and leaves make it — and compares every Node when a check fails.
type Hint struct {
	Known bool
	Nodes []string
	Since any
}

type part struct {
	node     Node // the input it was computed from
	accepted bool // passed Compute's address, incarnation and node ID checks
	addr     netip.Addr
	sas      []SA
	policies []Policy
	rules    []Rule
	status   []PeerStatus
	skipped  []Skip
}

type globalInputs struct {
	self  string
	mode  string
	cfg   Config
	felix Felix
	keys  any
}

type saIdentity struct {
	dst netip.Addr
	spi uint32
}

type policyIdentity struct {
	src, dst netip.Prefix
	proto    uint8
	dir      Dir
}

// NewMemo returns an empty memo; its first Update computes everything.
func NewMemo() *Memo { return &Memo{id: new(byte)} }

// Version is the version of the state the memo holds (zero when it holds none).
func (m *Memo) Version() Version {
	if !m.ok {
		return Version{}
	}
	return Version{memo: m.id, n: m.n}
}

// NodesVersion is the NodesVersion of the Inputs the memo holds (nil when it holds none,
// or they had none): what a Hint for the next Update is relative to (Hint.Since).
func (m *Memo) NodesVersion() any {
	if !m.ok {
		return nil
	}
	return m.nodesVer
}

// Reset makes the next Update compute everything (a periodic full resync).
func (m *Memo) Reset() {
	if m.ok {
		m.State()
	}
	m.valid = false
}

// Update brings the memo to in, recomputing only the peers that changed when it can
// (see Memo), and returns what changed. On error the memo holds no state and the next
// Update computes everything.
func (m *Memo) Update(in Inputs, h Hint) (Change, error) {
	from := m.Version()
	if ch, ok := m.incremental(in, h); ok {
		ch.From = from
		return ch, nil
	}
	m.valid, m.ok, m.stOK, m.stHave, m.nodesVer = false, false, false, false, nil
	clear(m.pending)
	st, err := Compute(in)
	if err != nil {
		return Change{}, err
	}
	m.n++
	m.ok, m.st, m.stOK, m.stHave = true, st, true, true
	m.nodesVer = in.NodesVersion
	m.rebuild(in, st)
	return Change{From: from, To: m.Version(), Full: true, How: "full"}, nil
}

// State returns the state the last Update computed (what Compute returns for its Inputs;
// the zero State after a failed Update). After incremental Updates it is built on first
// use from the last one built: the changed peers' objects are taken out of and merged
// into its sorted lists, in new slices (a State returned earlier is never modified), with
// no sorting and no walk over the peers — a copy of the lists, O(N) memory moves. When
// many peers changed, or none was built, it is assembled from every peer and sorted.
func (m *Memo) State() State {
	if !m.ok {
		return State{} // the last Update failed (or none ran)
	}
	if m.stOK {
		return m.st
	}
	st, ok := State{}, false
	if m.stHave && len(m.pending) <= len(m.parts)/8+8 {
		st, ok = m.patched()
		m.built = "patched"
	}
	if !ok {
		st, m.built = m.assembled(), "assembled"
	}
	m.st, m.stOK, m.stHave = st, true, true
	clear(m.pending)
	return st
}

// assembled is the State of every part, sorted: O(N log N).
func (m *Memo) assembled() State {
	st := State{Mode: m.base.Mode, Generations: m.generations(),
		Neighbours: slices.Clone(m.base.Neighbours), NotCovered: slices.Clone(m.base.NotCovered),
		Skipped: slices.Clone(m.base.Skipped)}
	for _, p := range m.parts {
		st.SAs = append(st.SAs, p.sas...)
		st.Policies = append(st.Policies, p.policies...)
		st.Rules = append(st.Rules, p.rules...)
		st.Peers = append(st.Peers, p.status...)
		st.Skipped = append(st.Skipped, p.skipped...)
	}
	st.NotCovered = append(st.NotCovered, m.bgpNotes()...)
	slices.SortFunc(st.Peers, comparePeer)
	// finish cannot fail here: every identity was checked unique when its part was added.
	st, _ = finish(st)
	return st
}

// generations is base's generations without the pending ones a peer lacks for want of
// its public key (as Compute leaves them out).
func (m *Memo) generations() []uint32 {
	out := slices.Clone(m.base.Generations)
	return slices.DeleteFunc(out, func(g uint32) bool {
		if m.unknown[g] == 0 {
			return false
		}
		i := slices.IndexFunc(m.ring, func(x Generation) bool { return x.ID == g })
		return i >= 0 && m.ring[i].State == GenPending
	})
}

// countUnknown adds d to the counts of p's status's KeysUnknown.
func (m *Memo) countUnknown(p *part, d int) {
	if m.unknown == nil {
		m.unknown = map[uint32]int{}
	}
	for _, s := range p.status {
		for _, g := range s.KeysUnknown {
			if m.unknown[g] += d; m.unknown[g] == 0 {
				delete(m.unknown, g)
			}
		}
	}
}

// bgpNotes are the notes of the BGP peers that are not node addresses.
func (m *Memo) bgpNotes() []string {
	var out []string
	for _, b := range m.bgp {
		ip := b.PeerIP.Unmap()
		if _, isNode := m.byIP[ip]; !isNode && ip != m.selfAddr {
			out = append(out, bgpNote(b))
		}
	}
	return out
}

// patched is m.st with the pending peers' objects replaced by their current parts'. It
// fails (assemble instead) when an object to take out is not in m.st or one to merge in
// is already there: neither happens while the memo's bookkeeping is right.
func (m *Memo) patched() (State, bool) {
	var del, add part
	names := make([]string, 0, len(m.pending))
	for name, old := range m.pending {
		names = append(names, name)
		for _, p := range []struct {
			dst *part
			src *part
		}{{&del, old}, {&add, m.parts[name]}} {
			if p.src == nil {
				continue
			}
			p.dst.sas = append(p.dst.sas, p.src.sas...)
			p.dst.policies = append(p.dst.policies, p.src.policies...)
			p.dst.rules = append(p.dst.rules, p.src.rules...)
			p.dst.status = append(p.dst.status, p.src.status...)
			p.dst.skipped = append(p.dst.skipped, p.src.skipped...)
		}
	}
	old := m.st
	st := old
	st.Generations = m.generations()
	var ok [4]bool
	st.SAs, ok[0] = patchSorted(old.SAs, del.sas, add.sas, compareSA)
	st.Policies, ok[1] = patchSorted(old.Policies, del.policies, add.policies, comparePolicy)
	st.Rules, ok[2] = patchSorted(old.Rules, del.rules, add.rules, compareRule)
	st.Peers, ok[3] = patchSorted(old.Peers, del.status, add.status, comparePeer)
	if ok != [4]bool{true, true, true, true} {
		return State{}, false
	}
	if len(del.skipped)+len(add.skipped) > 0 {
		st.Skipped = slices.DeleteFunc(slices.Clone(old.Skipped), func(s Skip) bool {
			name, ok := strings.CutPrefix(s.Object, "node/")
			return ok && slices.Contains(names, name)
		})
		st.Skipped = append(st.Skipped, add.skipped...)
		slices.SortFunc(st.Skipped, func(a, b Skip) int { return strings.Compare(a.Object, b.Object) })
		if len(st.Skipped) == 0 {
			st.Skipped = nil
		}
	}
	if len(m.bgp) > 0 { // a joining or leaving node may be a BGP peer's address
		st.NotCovered = append(slices.Clone(m.base.NotCovered), m.bgpNotes()...)
		slices.Sort(st.NotCovered)
	}
	return st, true
}

// patchSorted returns a new slice: old (sorted by cmp, unique) without the elements of del
// and with those of add, sorted. del and add are sorted in place. old is not modified; it
// is returned as is when there is nothing to do. False: an element of del is not in old,
// or one of add is in old and not deleted.
func patchSorted[T any](old, del, add []T, cmp func(a, b T) int) ([]T, bool) {
	if len(del) == 0 && len(add) == 0 {
		return old, true
	}
	slices.SortFunc(del, cmp)
	slices.SortFunc(add, cmp)
	skip := make([]int, 0, len(del))
	for _, d := range del {
		j, found := slices.BinarySearchFunc(old, d, cmp)
		if !found || (len(skip) > 0 && skip[len(skip)-1] == j) {
			return nil, false
		}
		skip = append(skip, j)
	}
	out := make([]T, 0, len(old)-len(del)+len(add))
	i, s := 0, 0 // next element of old to copy, next index of skip
	copyTo := func(end int) {
		for s < len(skip) && skip[s] < end {
			out = append(out, old[i:skip[s]]...)
			i = skip[s] + 1
			s++
		}
		if i < end {
			out = append(out, old[i:end]...)
			i = end
		}
	}
	for k, x := range add {
		if k > 0 && cmp(add[k-1], x) == 0 {
			return nil, false
		}
		p, found := slices.BinarySearchFunc(old, x, cmp)
		if found && !slices.Contains(skip[s:], p) {
			return nil, false
		}
		copyTo(p)
		out = append(out, x)
	}
	copyTo(len(old))
	if len(out) == 0 {
		return nil, true
	}
	return out, true
}

func compareSA(a, b SA) int {
	if c := a.Dst.Compare(b.Dst); c != 0 {
		return c
	}
	return cmp.Compare(a.SPI, b.SPI)
}

func comparePeer(a, b PeerStatus) int { return strings.Compare(a.Name, b.Name) }

func (m *Memo) globals(in Inputs) globalInputs {
	return globalInputs{self: in.Self, mode: string(in.Ring.Mode), cfg: in.Config, felix: in.Felix, keys: in.KeysVersion}
}

// sameGlobals reports whether in's inputs other than Nodes are the memo's (Blocks and
// Previous do not enter a memoised state: see Memo).
func (m *Memo) sameGlobals(in Inputs) bool {
	return m.globals(in) == m.glob && slices.Equal(in.Ring.Generations, m.ring) &&
		slices.Equal(in.Pools, m.pools) && slices.Equal(in.HoldPlaintext, m.hold) && slices.Equal(in.BGPPeers, m.bgp)
}

// memoisable reports whether in's global inputs allow per-peer parts.
func memoisable(in Inputs) bool {
	if in.KeysVersion == nil {
		return false
	}
	for _, p := range in.Pools {
		if p.IPIPMode == IPIPCrossSubnet {
			return false
		}
	}
	return true
}

// pairInputs is in reduced to self and one peer, without BGP peers, blocks and Previous.
func (m *Memo) pairInputs(in Inputs, peer *Node) Inputs {
	nodes := []Node{m.self}
	if peer != nil {
		nodes = append(nodes, *peer)
	}
	return Inputs{Self: in.Self, Nodes: nodes, Pools: in.Pools, Ring: in.Ring, Config: in.Config,
		Keys: in.Keys, KeysVersion: in.KeysVersion, Felix: in.Felix, HoldPlaintext: in.HoldPlaintext}
}

// rebuild makes the per-peer fields describe in, whose full state is st.
func (m *Memo) rebuild(in Inputs, st State) {
	if !memoisable(in) {
		return
	}
	var self *Node
	for i := range in.Nodes {
		if in.Nodes[i].Name == in.Self {
			self = &in.Nodes[i]
		}
	}
	if self == nil {
		return
	}
	sa, err := ParseNodeAddress(self.IPv4Address)
	if err != nil {
		return
	}
	m.self, m.selfAddr = cloneNode(*self), sa.Addr()
	base, err := Compute(m.pairInputs(in, nil))
	if err != nil {
		return
	}
	m.base, m.glob = base, m.globals(in)
	m.ring = slices.Clone(in.Ring.Generations)
	m.pools, m.hold, m.bgp = slices.Clone(in.Pools), slices.Clone(in.HoldPlaintext), slices.Clone(in.BGPPeers)
	m.parts = make(map[string]*part, len(in.Nodes))
	m.claims = map[netip.Addr]int{m.selfAddr: 1}
	m.byIP = make(map[netip.Addr]string, len(in.Nodes))
	m.saIDs = make(map[saIdentity]string, len(st.SAs))
	m.polIDs = make(map[policyIdentity]string, len(st.Policies))
	for _, n := range in.Nodes {
		if n.Name == in.Self {
			continue
		}
		p := &part{node: cloneNode(n)}
		p.addr, p.accepted = m.accepted(n)
		m.parts[n.Name] = p
		if a, err := ParseNodeAddress(n.IPv4Address); err == nil {
			if m.claims[a.Addr()]++; m.claims[a.Addr()] > 1 {
				return // a conflict: full path until it is resolved
			}
		}
		if p.accepted && len(m.bgp) > 0 {
			m.byIP[p.addr] = n.Name
		}
	}
	get := func(name string) *part {
		if p := m.parts[name]; p != nil {
			return p
		}
		return &part{} // not a node's object: cannot be memoised
	}
	for _, s := range st.SAs {
		p := get(s.Peer)
		p.sas = append(p.sas, s)
		m.saIDs[saIdentity{s.Dst, s.SPI}] = s.Peer
	}
	for _, x := range st.Policies {
		p := get(x.Peer)
		p.policies = append(p.policies, x)
		m.polIDs[policyIdentityOf(x)] = x.Peer
	}
	for _, r := range st.Rules {
		p := get(r.Peer)
		p.rules = append(p.rules, r)
	}
	m.unknown = map[uint32]int{}
	for _, s := range st.Peers {
		p := get(s.Name)
		p.status = append(p.status, s)
		for _, g := range s.KeysUnknown {
			m.unknown[g]++
		}
	}
	for _, s := range st.Skipped {
		name, ok := strings.CutPrefix(s.Object, "node/")
		if !ok || m.parts[name] == nil {
			continue // base's (none in a memoisable state)
		}
		m.parts[name].skipped = append(m.parts[name].skipped, s)
	}
	m.valid = true
}

// accepted reports whether Compute takes n as a peer (before key derivation), and its
// address.
func (m *Memo) accepted(n Node) (netip.Addr, bool) {
	a, err := ParseNodeAddress(n.IPv4Address)
	if err != nil {
		return netip.Addr{}, false
	}
	return a.Addr(), n.Incarnation != "" && n.NodeID != 0 && n.NodeID != m.self.NodeID
}

func policyIdentityOf(p Policy) policyIdentity {
	return policyIdentity{src: p.Src, dst: p.Dst, proto: p.Proto, dir: p.Dir}
}

// incremental updates the memo peer by peer; false: take the full path (the memo may
// then be half updated, and the full path rebuilds it).
func (m *Memo) incremental(in Inputs, h Hint) (Change, bool) {
	if !m.valid || !m.ok || !memoisable(in) || !m.sameGlobals(in) {
		return Change{}, false
	}
	find := func(name string) (*Node, bool) {
		i, ok := slices.BinarySearchFunc(in.Nodes, name, func(n Node, name string) int { return strings.Compare(n.Name, name) })
		if !ok {
			return nil, false
		}
		return &in.Nodes[i], true
	}
	var changed []string
	switch {
	case sameVersion(in.NodesVersion, m.nodesVer):
		// The same Nodes as the memo's Inputs (the caller's version says so): nothing to
		// compare, only this node's own Node checked.
		if !m.selfUnchanged(in, find) {
			return Change{}, false
		}
		changed, m.path = noChange, "same"
	case h.Known && in.NodesVersion != nil && sameVersion(h.Since, m.nodesVer):
		if changed, m.path = m.hinted(in, h, find), "hint"; changed == nil {
			changed, m.path = m.scan(in, find), "scan"
		}
	default:
		changed, m.path = m.scan(in, find), "scan"
	}
	if changed == nil {
		return Change{}, false
	}
	changed = changed[:len(changed):len(changed)]
	m.valid = false // until every changed peer is done
	ch := Change{To: Version{memo: m.id, n: m.n + 1}, Peers: changed, How: m.path}
	if m.pending == nil {
		m.pending = map[string]*part{}
	}
	for _, name := range changed {
		n, present := find(name)
		if _, seen := m.pending[name]; !seen && m.stHave {
			m.pending[name] = m.parts[name] // as the last built State has it (nil: absent)
		}
		if old := m.parts[name]; old != nil {
			ch.OldSAs = append(ch.OldSAs, old.sas...)
			ch.OldPolicies = append(ch.OldPolicies, old.policies...)
			m.remove(name, old)
		}
		if !present {
			continue
		}
		p, ok := m.add(in, n)
		if !ok {
			return Change{}, false
		}
		ch.SAs = append(ch.SAs, p.sas...)
		ch.Policies = append(ch.Policies, p.policies...)
	}
	m.valid, m.stOK = true, false
	m.nodesVer = in.NodesVersion
	m.n++
	return ch, true
}

// noChange is the changed list of an Update that changes no peer (nil means "cannot tell").
var noChange = []string{}

// selfUnchanged reports whether in holds this node's Node as the memo has it.
func (m *Memo) selfUnchanged(in Inputs, find func(string) (*Node, bool)) bool {
	n, ok := find(in.Self)
	return ok && nodeEqual(*n, m.self)
}

// hinted returns the nodes h names, after the cheap checks of Hint; nil: a check failed
// (or this node's own Node changed), compare everything.
func (m *Memo) hinted(in Inputs, h Hint, find func(string) (*Node, bool)) []string {
	if !m.selfUnchanged(in, find) {
		return nil
	}
	changed := noChange
	n := len(m.parts) + 1 // the nodes in, if the hint is right
	var seen map[string]bool
	if len(h.Nodes) > 16 {
		seen = make(map[string]bool, len(h.Nodes))
	}
	for i, name := range h.Nodes {
		if name == in.Self {
			return nil
		}
		if seen != nil {
			if seen[name] {
				continue
			}
			seen[name] = true
		} else if slices.Contains(h.Nodes[:i], name) {
			continue // named twice
		}
		node, present := find(name)
		old, had := m.parts[name]
		switch {
		case present && !had:
			n++
		case had && !present:
			n--
		case had && nodeEqual(*node, old.node):
			continue // named but unchanged (an event on a field that is not an input)
		}
		changed = append(changed, name)
	}
	if n != len(in.Nodes) {
		return nil // a join or leave the hint does not name
	}
	return changed
}

// scan compares every Node with the memo's; nil: take the full path.
func (m *Memo) scan(in Inputs, find func(string) (*Node, bool)) []string {
	changed := noChange
	matched, selfSeen := 0, false
	for i := range in.Nodes {
		n := &in.Nodes[i]
		if i > 0 && in.Nodes[i-1].Name >= n.Name {
			return nil // unsorted or listed twice: Compute decides
		}
		if n.Name == in.Self {
			if !nodeEqual(*n, m.self) {
				return nil
			}
			selfSeen = true
			continue
		}
		old, ok := m.parts[n.Name]
		if ok {
			matched++
		}
		if !ok || !nodeEqual(*n, old.node) {
			changed = append(changed, n.Name)
		}
	}
	if !selfSeen {
		return nil
	}
	if matched < len(m.parts) {
		for name := range m.parts {
			if _, ok := find(name); !ok {
				changed = append(changed, name)
			}
		}
	}
	return changed
}

// sameVersion reports whether a and b are the same non-nil, comparable version.
func sameVersion(a, b any) bool {
	if a == nil || b == nil {
		return false
	}
	va, vb := reflect.ValueOf(a), reflect.ValueOf(b)
	return va.Type() == vb.Type() && va.Comparable() && vb.Comparable() && va.Equal(vb)
}

func (m *Memo) remove(name string, p *part) {
	if a, err := ParseNodeAddress(p.node.IPv4Address); err == nil {
		if m.claims[a.Addr()]--; m.claims[a.Addr()] == 0 {
			delete(m.claims, a.Addr())
		}
	}
	if p.accepted && len(m.bgp) > 0 && m.byIP[p.addr] == name {
		delete(m.byIP, p.addr)
	}
	for _, s := range p.sas {
		delete(m.saIDs, saIdentity{s.Dst, s.SPI})
	}
	for _, x := range p.policies {
		delete(m.polIDs, policyIdentityOf(x))
	}
	m.countUnknown(p, -1)
	delete(m.parts, name)
}

func (m *Memo) add(in Inputs, n *Node) (*part, bool) {
	if a, err := ParseNodeAddress(n.IPv4Address); err == nil {
		if m.claims[a.Addr()]++; m.claims[a.Addr()] > 1 {
			return nil, false // an address conflict
		}
	}
	st, err := Compute(m.pairInputs(in, n))
	if err != nil {
		return nil, false
	}
	p := &part{sas: st.SAs, policies: st.Policies, rules: st.Rules, status: st.Peers}
	p.addr, p.accepted = m.accepted(*n)
	for _, s := range st.Skipped {
		if s.Object == "node/"+n.Name {
			p.skipped = append(p.skipped, s)
		}
	}
	for _, s := range p.sas {
		if _, taken := m.saIDs[saIdentity{s.Dst, s.SPI}]; taken {
			return nil, false // Compute reports the collision
		}
	}
	for _, x := range p.policies {
		if _, taken := m.polIDs[policyIdentityOf(x)]; taken {
			return nil, false
		}
	}
	for _, s := range p.sas {
		m.saIDs[saIdentity{s.Dst, s.SPI}] = n.Name
	}
	for _, x := range p.policies {
		m.polIDs[policyIdentityOf(x)] = n.Name
	}
	if p.accepted && len(m.bgp) > 0 {
		m.byIP[p.addr] = n.Name
	}
	p.node = cloneNode(*n)
	m.parts[n.Name] = p
	m.countUnknown(p, 1)
	return p, true
}

func nodeEqual(a, b Node) bool {
	if a.Name != b.Name || a.IPv4Address != b.IPv4Address || a.Incarnation != b.Incarnation || a.NodeID != b.NodeID ||
		a.Published != b.Published || a.Lanes != b.Lanes || a.TakesLanes != b.TakesLanes {
		return false
	}
	if a.Report == nil || b.Report == nil {
		return a.Report == b.Report
	}
	x, y := *a.Report, *b.Report
	return x.Incarnation == y.Incarnation && x.Mode == y.Mode && x.InboundFromSelf == y.InboundFromSelf &&
		x.EncryptsToSelf == y.EncryptsToSelf && slices.Equal(x.Generations, y.Generations)
}

func cloneNode(n Node) Node {
	if n.Report != nil {
		r := *n.Report
		r.Generations = slices.Clone(r.Generations)
		n.Report = &r
	}
	return n
}
