// Package readiness is the pure core of protocol v2's per-pair readiness
// (docs/protocol-v2.md §6): key digests, the bucket digests an agent reports, the master's
// sticky confirmations and the node views it derives, and the agent's rule for using a view.
//
// Nothing here does I/O. Reports carry statuses (wire.go) and the master checks them in
// shadow (docs/protocol-v2.md §9); nobody decides with the package yet. Its model test
// (model_test.go) checks the design's safety and liveness against lagging watches.
package readiness

import (
	"cmp"
	"crypto/sha256"
	"encoding/binary"
	"math/bits"
	"slices"
)

// K is a node's key digest: the first 8 bytes of SHA-256 over its key incarnation
// (bootID/uid/epoch). Every claim names the K it was made for.
type K uint64

// KeyDigest returns the K of a key incarnation.
func KeyDigest(incarnation string) K {
	h := sha256.Sum256([]byte("secureoverlay keys v2\x00" + incarnation))
	return K(binary.BigEndian.Uint64(h[:8]))
}

// DefaultBuckets is the number of bucket digests per direction in a NodeStatus.
const DefaultBuckets = 32

// Keys is a view of the cluster's key digests by node ID.
type Keys map[uint32]K

// Clone copies a view.
func (ks Keys) Clone() Keys {
	c := make(Keys, len(ks))
	for id, k := range ks {
		c[id] = k
	}
	return c
}

// Digest is one 48-bit digest over the sorted (id, K) pairs of ks for which keep is true
// (nil keep: all). Every party computes it the same way.
func (ks Keys) Digest(keep func(id uint32) bool) uint64 {
	ids := make([]uint32, 0, len(ks))
	for id := range ks {
		if keep == nil || keep(id) {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	return ks.digestSorted(ids, nil)
}

// digestSorted is Digest over ids (sorted, each in ks) less those skip holds.
func (ks Keys) digestSorted(ids []uint32, skip func(id uint32) bool) uint64 {
	h := sha256.New()
	var b [12]byte
	for _, id := range ids {
		if skip != nil && skip(id) {
			continue
		}
		binary.BigEndian.PutUint32(b[:4], id)
		binary.BigEndian.PutUint64(b[4:], uint64(ks[id]))
		h.Write(b[:])
	}
	var sum [32]byte
	return binary.BigEndian.Uint64(append([]byte{0, 0}, h.Sum(sum[:0])[:6]...))
}

// Bucket is the bucket node id belongs to, of n.
func Bucket(id uint32, n int) int { return int(id % uint32(n)) }

// Buckets returns the bucket digests of claims: bucket j covers the ids with id mod n = j.
// One pass sorts the ids into their buckets (an agent computes this on every sync: n
// passes over every claim would be 32 × N).
func Buckets(claims Keys, n int) []uint64 {
	groups := make([][]uint32, n)
	for id := range claims {
		j := Bucket(id, n)
		groups[j] = append(groups[j], id)
	}
	out := make([]uint64, n)
	for j, ids := range groups {
		slices.Sort(ids)
		out[j] = claims.digestSorted(ids, nil)
	}
	return out
}

// Status is what an agent reports about its claims (the per-pair part of a NodeStatus).
type Status struct {
	ID   uint32
	Self K        // the node's own K the claims were made with
	In   []uint64 // bucket digests of the peers (with their K) it holds inbound SAs from
	Out  []uint64 // bucket digests of the peers (with their K) it sends ESP to
	// Refused are peers the node knows but will not program (bad public key, address
	// conflict): left out of the expected digests so they cannot hold their bucket back.
	Refused []uint32
}

// NewStatus builds a Status from the node's claims.
func NewStatus(id uint32, self K, in, out Keys, refused []uint32, buckets int) Status {
	return Status{ID: id, Self: self, In: Buckets(in, buckets), Out: Buckets(out, buckets), Refused: slices.Clone(refused)}
}

// View is what the master tells one node: the peers not (yet) confirmed to hold inbound SAs
// from it (NotIn) and not confirmed to send it ESP (NotOut), relative to the master's key
// view whose digest is Keys.
type View struct {
	NotIn, NotOut []uint32 // ascending
	Keys          uint64
	// Seq is the master's key sequence when the view was taken (Master.Gain); not on the
	// wire: 0 in a decoded view.
	Seq uint64
}

// Digest identifies v's content — its key digest and both lists — in 8 bytes of SHA-256
// (Seq, not on the wire, is left out): what an agent says of the last view it used
// (Agent.Used) and the master compares with the view it holds (NeedsView). Two views over
// the same key view may list different peers; only the content says which one the agent
// took.
func (v View) Digest() uint64 {
	h := sha256.New()
	var b [8]byte
	h.Write([]byte("secureoverlay view v1\x00"))
	binary.BigEndian.PutUint64(b[:], v.Keys)
	h.Write(b[:])
	for _, l := range [][]uint32{v.NotIn, v.NotOut} {
		binary.BigEndian.PutUint32(b[:4], uint32(len(l)))
		h.Write(b[:4])
		for _, id := range l {
			binary.BigEndian.PutUint32(b[:4], id)
			h.Write(b[:4])
		}
	}
	return binary.BigEndian.Uint64(h.Sum(nil)[:8])
}

// Master holds the master's key view and its sticky confirmations. The zero value is not
// usable; call NewMaster.
//
// Per bucket it keeps the bucket's node ids (sorted) and, lazily, the digest over all of
// them, so that taking one node's status costs O(N) — the peers it confirms — and not a
// digest over the whole key view per bucket (32 × N per status, 800 million pair visits
// per round of 5,000 statuses).
type Master struct {
	buckets int
	keys    Keys
	// Confirmations are two bit matrices over dense node indices (idx): row B of in has bit
	// X set when B is confirmed to hold inbound from X (out: to send ESP to X), for the
	// current K of both. 5,000 nodes take 3 MB each; maps of maps took ≈ 1 GB.
	idx     map[uint32]int // node id -> dense index
	ids     []uint32       // dense index -> node id (0: a free slot)
	free    []int          // free dense indices
	in, out []bitRow       // by dense index of B
	bucket  []bucketCache

	// keysDigest is the digest of the whole key view (every view's Keys), valid when
	// keysOK.
	keysDigest uint64
	keysOK     bool
	// dirty are the nodes whose ViewFor may differ from when TakeDirty last returned
	// (every node when allDirty).
	dirty    map[uint32]bool
	allDirty bool
	// seq counts the key view's changes (a K set or changed, a node removed); changes logs
	// the latest K changes in seq order, every one after logFrom (Gain).
	seq     uint64
	changes []keyChange
	logFrom uint64
	// used holds, for the agents that say which view they last used (ObserveUsed), that
	// view's digest (View.Digest; absent: none used since the agent started).
	used     map[uint32]uint64
	saysUsed map[uint32]bool
}

// keyChange is one K change: node id's K changed at sequence seq.
type keyChange struct {
	seq uint64
	id  uint32
}

// maxChanges bounds the K change log: a view older than the log is treated as unknown by
// Gain (it gains every peer it confirms), which only costs its write its priority.
const maxChanges = 8192

// bitRow is a set of dense indices.
type bitRow []uint64

// set adds i and reports whether it was not there.
func (b *bitRow) set(i int) bool {
	w := i >> 6
	for len(*b) <= w {
		*b = append(*b, 0)
	}
	bit := uint64(1) << (i & 63)
	if (*b)[w]&bit != 0 {
		return false
	}
	(*b)[w] |= bit
	return true
}

func (b bitRow) has(i int) bool {
	w := i >> 6
	return w < len(b) && b[w]&(uint64(1)<<(i&63)) != 0
}

func (b bitRow) unset(i int) {
	if w := i >> 6; w < len(b) {
		b[w] &^= uint64(1) << (i & 63)
	}
}

func (b bitRow) count() int {
	n := 0
	for _, w := range b {
		n += bits.OnesCount64(w)
	}
	return n
}

// bucketCache is one bucket of the master's key view.
type bucketCache struct {
	ids    []uint32 // sorted
	digest uint64   // over every id of the bucket, valid when ok
	ok     bool
}

// NewMaster returns a master with no nodes.
func NewMaster(buckets int) *Master {
	return &Master{buckets: buckets, keys: Keys{}, idx: map[uint32]int{}, bucket: make([]bucketCache, buckets), dirty: map[uint32]bool{},
		used: map[uint32]uint64{}, saysUsed: map[uint32]bool{}}
}

// TakeDirty returns, sorted, the nodes whose view (ViewFor) may have changed since the
// last call, and starts a new round: every node after a key change anywhere (the views'
// Keys digest covers the whole key view), else the nodes a status newly confirmed as peer.
// A writer of views that rewrites exactly these keeps every view current at O(changes)
// cost between key changes.
func (m *Master) TakeDirty() []uint32 {
	var out []uint32
	if m.allDirty {
		out = m.IDs()
	} else {
		for id := range m.dirty {
			if _, ok := m.keys[id]; ok {
				out = append(out, id)
			}
		}
	}
	slices.Sort(out)
	m.allDirty = false
	clear(m.dirty)
	return out
}

// SetKeys records node id's current K (from its NodeKeys). A change clears every
// confirmation about the node, as receiver and as peer: nothing confirmed about an old K
// carries over.
func (m *Master) SetKeys(id uint32, k K) {
	if id == 0 {
		return // no node has ID 0 (keys.MaxNodeID: IDs are 1..); 0 marks a free slot
	}
	old, ok := m.keys[id]
	if ok && old == k {
		return
	}
	m.keys[id] = k
	b := &m.bucket[id%uint32(m.buckets)]
	if !ok {
		i, _ := slices.BinarySearch(b.ids, id)
		b.ids = slices.Insert(b.ids, i, id)
		var x int
		if n := len(m.free); n > 0 {
			x, m.free = m.free[n-1], m.free[:n-1]
			m.ids[x] = id
		} else {
			x = len(m.ids)
			m.ids = append(m.ids, id)
			m.in, m.out = append(m.in, nil), append(m.out, nil)
		}
		m.idx[id] = x
	}
	b.ok = false
	m.keysOK, m.allDirty = false, true
	m.forget(id)
	m.seq++
	m.changes = append(m.changes, keyChange{m.seq, id})
	if len(m.changes) > maxChanges {
		drop := len(m.changes) - maxChanges/2
		m.logFrom = m.changes[drop-1].seq
		m.changes = slices.Delete(m.changes, 0, drop)
	}
}

// Remove forgets a node that left.
func (m *Master) Remove(id uint32) {
	if _, ok := m.keys[id]; !ok {
		return
	}
	m.forget(id)
	delete(m.keys, id)
	delete(m.used, id)
	delete(m.saysUsed, id)
	x := m.idx[id]
	delete(m.idx, id)
	m.ids[x] = 0
	m.free = append(m.free, x)
	b := &m.bucket[id%uint32(m.buckets)]
	if i, found := slices.BinarySearch(b.ids, id); found {
		b.ids = slices.Delete(b.ids, i, i+1)
	}
	b.ok = false
	m.keysOK, m.allDirty = false, true
	m.seq++
}

// forget clears every confirmation about id, as receiver (its rows) and as peer (its bit
// in every row).
func (m *Master) forget(id uint32) {
	x := m.idx[id]
	clear(m.in[x])
	clear(m.out[x])
	for i := range m.in {
		m.in[i].unset(x)
		m.out[i].unset(x)
	}
}

// expected is the digest a node must report for bucket j: over the bucket's ids less
// skip's (the node itself, the peers it refuses); skipAny says whether skip holds any id
// of the bucket, else the cached digest over the whole bucket serves.
func (m *Master) expected(j int, skip func(id uint32) bool, skipAny bool) uint64 {
	b := &m.bucket[j]
	if skipAny {
		return m.keys.digestSorted(b.ids, skip)
	}
	if !b.ok {
		b.digest, b.ok = m.keys.digestSorted(b.ids, nil), true
	}
	return b.digest
}

// KeyOf returns node id's K in the master's view.
func (m *Master) KeyOf(id uint32) (K, bool) {
	k, ok := m.keys[id]
	return k, ok
}

// IDs returns the ids of the master's key view, unsorted.
func (m *Master) IDs() []uint32 {
	out := make([]uint32, 0, len(m.keys))
	for id := range m.keys {
		out = append(out, id)
	}
	return out
}

// Confirmed counts the confirmed ordered pairs (B, X) of the key view, inbound and
// outbound: N·(N−1) each when every pair is ready.
func (m *Master) Confirmed() (in, out int) {
	for i := range m.in {
		in += m.in[i].count()
		out += m.out[i].count()
	}
	return in, out
}

// Keys returns the master's key view (a copy).
func (m *Master) Keys() Keys { return m.keys.Clone() }

// Observe takes a node's status: for every bucket whose digest equals the master's own
// computation over its key view (the node's live, not refused peers), every peer of that
// bucket is confirmed. A status made for another K of the node than the master's is stale
// and ignored. Confirmations are never withdrawn here.
func (m *Master) Observe(s Status) { m.ObserveBuckets(s, nil) }

// ObserveBuckets is Observe limited to the buckets only holds (nil: all). A status
// observed before, unchanged since, needs observing again only in the buckets whose key
// view changed (a node of the bucket re-keyed, joined or left): the others' expected
// digests, and the confirmations a key change clears, are elsewhere — so one re-key costs
// N statuses × 1 bucket, not N × 32.
func (m *Master) ObserveBuckets(s Status, only func(j int) bool) {
	self, ok := m.keys[s.ID]
	if !ok || self != s.Self || len(s.In) != m.buckets || len(s.Out) != m.buckets {
		return
	}
	refused := map[uint32]bool{}
	refusedIn := map[int]bool{} // buckets holding a refused peer
	for _, r := range s.Refused {
		if _, known := m.keys[r]; known && r != s.ID {
			refused[r] = true
			refusedIn[int(r%uint32(m.buckets))] = true
		}
	}
	skip := func(id uint32) bool { return id == s.ID || refused[id] }
	own := int(s.ID % uint32(m.buckets))
	for j := 0; j < m.buckets; j++ {
		if only != nil && !only(j) {
			continue
		}
		want := m.expected(j, skip, j == own || refusedIn[j])
		for _, c := range []struct {
			got uint64
			row *bitRow
		}{{s.In[j], &m.in[m.idx[s.ID]]}, {s.Out[j], &m.out[m.idx[s.ID]]}} {
			if c.got != want {
				continue
			}
			for _, id := range m.bucket[j].ids {
				if !skip(id) && c.row.set(m.idx[id]) {
					m.dirty[id] = true
				}
			}
		}
	}
}

// ViewFor returns node a's view: every other node the master knows whose inbound from a
// (NotIn) or ESP to a (NotOut) is not confirmed, sorted, and the digest of the key view.
// It costs one bit test per node (a re-key makes every view dirty: 25 million bit tests
// at 5,000 nodes, not as many map lookups).
func (m *Master) ViewFor(a uint32) View {
	if !m.keysOK {
		m.keysDigest, m.keysOK = m.keys.Digest(nil), true
	}
	v := View{Keys: m.keysDigest, Seq: m.seq}
	xa, known := m.idx[a]
	for x, id := range m.ids {
		if id == 0 || id == a {
			continue
		}
		if !known || !m.in[x].has(xa) {
			v.NotIn = append(v.NotIn, id)
		}
		if !known || !m.out[x].has(xa) {
			v.NotOut = append(v.NotOut, id)
		}
	}
	slices.Sort(v.NotIn)
	slices.Sort(v.NotOut)
	return v
}

// Gain returns how many peers next, node a's view now (from ViewFor), lets agent a use in
// a direction that prev — the view a was last given (nil: none) — does not: a pair prev
// leaves unconfirmed, or one whose K (the peer's or a's own) changed after prev was taken,
// which §6's agent holds unconfirmed until a newer consistent view confirms it. A view that
// only adds exceptions, or only moves the key digest, gains nothing: its agent already holds
// back every pair it would hold back and keeps every other one (it keeps using prev, its
// last consistent view). After a reboot every view changes; the rebooted node's own view
// gains up to N-1 peers, each peer's view one — once their pair is confirmed — and the
// rest nothing. A writer that writes the largest gain first gets the rebooted node's pairs
// back without waiting behind N digest refreshes.
//
// prev.Seq is the sequence ViewFor stamped on it; a view this master did not take (Seq 0:
// decoded, or a previous leader's) or one older than the change log is unknown: next gains
// every peer it confirms. Gain errs only upward (a K that changed and changed back still
// counts as changed), so a writer that defers a view gaining 0 defers nothing an agent
// waits for. Cost: O(k log k), k = exceptions in prev + K changes since prev, except for an
// unknown prev or a's own new K: O(N).
func (m *Master) Gain(a uint32, prev *View, next View) int { return m.gain(a, prev, next, nil) }

// gain is Gain, not counting a peer's direction that covered (nil: none) says the agent
// gets elsewhere (dir 0: the peer holds inbound from a; 1: it sends a ESP).
func (m *Master) gain(a uint32, prev *View, next View, covered func(p uint32, dir int) bool) int {
	live := func(id uint32) bool { _, ok := m.keys[id]; return ok && id != a }
	gets := func(id uint32, dir int, listed []uint32) bool {
		return !sortedHas(listed, id) && (covered == nil || !covered(id, dir))
	}
	confirmed := func() int {
		n := 0
		for id := range m.keys {
			if id != a && (gets(id, 0, next.NotIn) || gets(id, 1, next.NotOut)) {
				n++
			}
		}
		return n
	}
	if prev == nil || prev.Seq == 0 || prev.Seq < m.logFrom {
		return confirmed()
	}
	i, _ := slices.BinarySearchFunc(m.changes, prev.Seq+1, func(c keyChange, s uint64) int { return cmp.Compare(c.seq, s) })
	since := m.changes[i:]
	var cand []uint32
	for _, c := range since {
		if c.id == a {
			return confirmed() // a's own K changed: every pair waits for a newer view
		}
		cand = append(cand, c.id)
	}
	changedSince := len(cand)
	cand = append(append(cand, prev.NotIn...), prev.NotOut...)
	fresh := map[uint32]bool{}
	for _, id := range cand[:changedSince] {
		fresh[id] = true
	}
	slices.Sort(cand)
	n := 0
	for _, id := range slices.Compact(cand) {
		if !live(id) {
			continue
		}
		in := gets(id, 0, next.NotIn) && (fresh[id] || sortedHas(prev.NotIn, id))
		out := gets(id, 1, next.NotOut) && (fresh[id] || sortedHas(prev.NotOut, id))
		if in || out {
			n++
		}
	}
	return n
}

// ObserveUsed records which view agent a says it last used: the digest (View.Digest) of
// the last view it found consistent with its own key view (ok false: none since it
// started). Once an agent says so, NeedsView weighs the held view by it.
func (m *Master) ObserveUsed(a uint32, keys uint64, ok bool) {
	if _, known := m.keys[a]; !known {
		return
	}
	prev, had := m.used[a]
	if !m.saysUsed[a] || had != ok || prev != keys {
		m.dirty[a] = true // NeedsView may answer otherwise now
	}
	m.saysUsed[a] = true
	if ok {
		m.used[a] = keys
	} else {
		delete(m.used, a)
	}
}

// sameView reports whether two views hold the same lists over the same key view.
func sameView(a, b View) bool {
	return a.Keys == b.Keys && slices.Equal(a.NotIn, b.NotIn) && slices.Equal(a.NotOut, b.NotOut)
}

// NeedsView reports whether next, node a's view now, lets a's agent use a pair that
// neither the view it holds (prev, nil: none) nor the peer's row gives it (docs/keys.md
// §12): row(p) is peer p's row as the API holds it (nil: none). A row gives a the facts
// a's view states about p — p holds inbound from a, p sends a ESP — when it is for p's K in
// the master's view, does not refuse a, and its digest of a's bucket equals the master's
// (ConsiderRow's check, over the master's key view). Once every agent publishes rows, a
// view that gains nothing beyond the rows need not be written: after a reboot the rebooted
// node's view is needed, its peers' views are not once its row covers them. The master's
// and the agent's key views may differ for a while; every K change makes every view dirty,
// so a view skipped on a row that the agent cannot yet use is decided again. A node without
// a view gets one whatever the rows say (one write per node, once: every node has a view);
// a view of unknown age (a previous leader's) is weighed as Gain weighs it.
//
// The rows and the held view give a's agent what they state only if the agent took the
// held view: an agent that restarted (its informers list afresh, skipping the views and
// rows in between) or whose key view never matched the held one's holds nothing from it.
// An agent that says which view it last used (ObserveUsed) and names another than prev
// gets next whenever next differs from prev (TestModelRestartsRandomInterleavings: without
// this a restarted agent may never again be given a pair whose row it skipped).
func (m *Master) NeedsView(a uint32, prev *View, next View, row func(p uint32) *Status) bool {
	if _, ok := m.keys[a]; !ok || prev == nil {
		return true // a node's first view is always written: every node has one
	}
	if used, ok := m.used[a]; m.saysUsed[a] && (!ok || used != prev.Digest()) && !sameView(*prev, next) {
		return true // the agent holds nothing from prev: next gives it what prev would
	}
	j := Bucket(a, m.buckets)
	covered := func(p uint32, dir int) bool {
		r := row(p)
		if r == nil || r.ID != p || r.Self != m.keys[p] || len(r.In) != m.buckets || len(r.Out) != m.buckets || slices.Contains(r.Refused, a) {
			return false
		}
		skipAny := Bucket(p, m.buckets) == j
		for _, x := range r.Refused {
			skipAny = skipAny || Bucket(x, m.buckets) == j
		}
		want := m.expected(j, func(id uint32) bool { return id == p || slices.Contains(r.Refused, id) }, skipAny)
		if dir == 0 {
			return r.In[j] == want
		}
		return r.Out[j] == want
	}
	return m.gain(a, prev, next, covered) > 0
}

// Agent is one node's use of its views: the pairs it has seen confirmed by a view
// consistent with its own key view. Confirmations are
// sticky on the agent too (for the same K of both ends): the truth they state cannot
// become false without a K changing, so a later view that lost them — a new master leader
// rebuilding its confirmations, a bucket still churning — never turns a ready pair back.
type Agent struct {
	ID      uint32
	in, out map[uint32][2]K // peer -> (peer's K, own K) confirmed
	changes uint64          // confirmations set to a new value (Changes)
	used    uint64          // the digest of the last view taken (Used), when hasUsed
	hasUsed bool
}

// Used returns the digest (View.Digest) of the last view the agent took (Consider returned
// true), and whether it took one since it started: what the master needs to know of the
// views it wrote (Master.ObserveUsed).
func (a *Agent) Used() (uint64, bool) { return a.used, a.hasUsed }

// set records pair as peer's confirmation in c, counting a change.
func (a *Agent) set(c map[uint32][2]K, peer uint32, pair [2]K) {
	if old, ok := c[peer]; !ok || old != pair {
		c[peer] = pair
		a.changes++
	}
}

// Consider takes a view from the master. If its key digest equals the digest of the
// agent's own key view (mine), every peer it does not list is confirmed for the K of both
// ends in mine; otherwise the view is ignored. It reports whether the view was used.
func (a *Agent) Consider(v View, mine Keys) bool {
	if v.Keys != mine.Digest(nil) {
		return false
	}
	a.used, a.hasUsed = v.Digest(), true
	if a.in == nil {
		a.in, a.out = map[uint32][2]K{}, map[uint32][2]K{}
	}
	for id, k := range mine {
		if id == a.ID {
			continue
		}
		pair := [2]K{k, mine[a.ID]}
		if !sortedHas(v.NotIn, id) {
			a.set(a.in, id, pair)
		}
		if !sortedHas(v.NotOut, id) {
			a.set(a.out, id, pair)
		}
	}
	return true
}

// ConsiderRow takes peer x's row — x's own readiness status, as x publishes it with its
// public keys (docs/protocol-v2.md §9 step 3, revised) — and confirms what it states about
// this node: that x holds inbound from it (in) and sends it ESP (out), for the K of both
// ends in mine. It does so when the row is for x's K in mine, x does not refuse this node,
// and the row's digest of this node's bucket equals the digest over mine of that bucket
// less x and the peers x refuses: the master's check (§6), made by the agent for its own
// bucket only. A row is x's claim about its own kernel — the claim v1's lists make — so
// after x re-keys its pairs need no view of any other node. Confirmations are sticky, as
// with views. It reports the directions it confirmed.
func (a *Agent) ConsiderRow(row Status, mine Keys, buckets int) (in, out bool) {
	j := Bucket(a.ID, buckets)
	want := mine.Digest(func(id uint32) bool {
		return Bucket(id, buckets) == j && id != row.ID && !slices.Contains(row.Refused, id)
	})
	return a.considerRow(row, mine, buckets, want)
}

// ConsiderRows is ConsiderRow for many rows at once, at the cost of one digest of this
// node's bucket plus one per row that must leave a peer of that bucket out (a row from the
// bucket, or refusing a peer in it): N/32 rows of N/32 peers, where ConsiderRow one by one
// digests the bucket for every row. The result is the same (TestConsiderRowsIsConsiderRow).
func (a *Agent) ConsiderRows(rows []Status, mine Keys, buckets int) {
	if _, ok := mine[a.ID]; !ok || len(rows) == 0 {
		return
	}
	j := Bucket(a.ID, buckets)
	var ids []uint32
	for id := range mine {
		if Bucket(id, buckets) == j {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	whole := mine.digestSorted(ids, nil)
	for _, row := range rows {
		leaves := Bucket(row.ID, buckets) == j
		for _, r := range row.Refused {
			leaves = leaves || Bucket(r, buckets) == j
		}
		want := whole
		if leaves {
			want = mine.digestSorted(ids, func(id uint32) bool { return id == row.ID || slices.Contains(row.Refused, id) })
		}
		a.considerRow(row, mine, buckets, want)
	}
}

// considerRow is ConsiderRow with the expected digest of this node's bucket given.
func (a *Agent) considerRow(row Status, mine Keys, buckets int, want uint64) (in, out bool) {
	kx, ok1 := mine[row.ID]
	ka, ok2 := mine[a.ID]
	if !ok1 || !ok2 || row.ID == a.ID || row.Self != kx || len(row.In) != buckets || len(row.Out) != buckets {
		return false, false
	}
	if slices.Contains(row.Refused, a.ID) {
		return false, false
	}
	j := Bucket(a.ID, buckets)
	if a.in == nil {
		a.in, a.out = map[uint32][2]K{}, map[uint32][2]K{}
	}
	pair := [2]K{kx, ka}
	if row.In[j] == want {
		a.set(a.in, row.ID, pair)
		in = true
	}
	if row.Out[j] == want {
		a.set(a.out, row.ID, pair)
		out = true
	}
	return in, out
}

// Complete reports whether status s claims, both ways, every peer in mine (the node's own
// key view) that s does not refuse, each with its K in mine: a node whose row is complete
// for its K need not publish it again when a peer re-keys (docs/keys.md §12).
func Complete(s Status, mine Keys, buckets int) bool {
	if len(s.In) != buckets || len(s.Out) != buckets {
		return false
	}
	want := make([]uint64, buckets)
	groups := make([][]uint32, buckets)
	for id := range mine {
		if id != s.ID && !slices.Contains(s.Refused, id) {
			groups[Bucket(id, buckets)] = append(groups[Bucket(id, buckets)], id)
		}
	}
	for j, ids := range groups {
		slices.Sort(ids)
		want[j] = mine.digestSorted(ids, nil)
	}
	return slices.Equal(s.In, want) && slices.Equal(s.Out, want)
}

// Confirm records, for the K of both ends in mine, that peer holds inbound SAs from this
// node (in) and sends it ESP (out): the claims v1's lists make, each the peer's claim about
// its own kernel for those keys (docs/protocol-v2.md §9 step 4: what bridges a peer's switch
// from lists to rows and views). Sticky, as the others.
func (a *Agent) Confirm(peer uint32, in, out bool, mine Keys) {
	kp, ok1 := mine[peer]
	ka, ok2 := mine[a.ID]
	if !ok1 || !ok2 || peer == a.ID || (!in && !out) {
		return
	}
	if a.in == nil {
		a.in, a.out = map[uint32][2]K{}, map[uint32][2]K{}
	}
	pair := [2]K{kp, ka}
	if in {
		a.set(a.in, peer, pair)
	}
	if out {
		a.set(a.out, peer, pair)
	}
}

// confirmed: c holds b's confirmation for both ends' K as they are in mine.
func (a *Agent) confirmed(c map[uint32][2]K, b uint32, mine Keys) bool {
	kb, ok1 := mine[b]
	ka, ok2 := mine[a.ID]
	p, ok3 := c[b]
	return ok1 && ok2 && ok3 && p == [2]K{kb, ka}
}

// SendESP: may this node send ESP to b (b holds the inbound SAs from this node's current
// keys, derived with b's current keys)?
func (a *Agent) SendESP(b uint32, mine Keys) bool { return a.confirmed(a.in, b, mine) }

// DropPlaintext: may this node, in enforce, drop plaintext from b (b sends it ESP)?
func (a *Agent) DropPlaintext(b uint32, mine Keys) bool { return a.confirmed(a.out, b, mine) }

// sortedHas reports whether ids (ascending, as views are) holds id: O(log n), so that a
// view listing every peer (after a reboot) costs O(N log N) to consider, not O(N²).
func sortedHas(ids []uint32, id uint32) bool {
	_, ok := slices.BinarySearch(ids, id)
	return ok
}
