package readiness

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
)

// snapshot is a view as its agent was given it, with the key view it was consistent with.
type snapshot struct {
	view View
	keys Keys
}

// decisions are agent ag's pair decisions over the peers in mine: "b:send/drop" per peer.
func decisions(ag *Agent, mine Keys) map[uint32][2]bool {
	d := map[uint32][2]bool{}
	for b := range mine {
		if b != ag.ID {
			d[b] = [2]bool{ag.SendESP(b, mine), ag.DropPlaintext(b, mine)}
		}
	}
	return d
}

// TestGainIsExactlyWhatTheAgentGains checks Master.Gain against §6's agent rule over
// random histories of re-keys, leaves, re-joins and partial statuses: for an agent whose
// last view is prev (taken earlier, consistent when taken) or none, Gain(a, prev, next)
// must be exactly the number of peers for which also considering next changes one of its
// pair decisions. A gain of 0 is what lets the writer defer a view, so a gain too low would
// hold a ready pair back behind the queue; one too high only costs priority (checked too:
// Gain is exact here, where no K ever changes back).
func TestGainIsExactlyWhatTheAgentGains(t *testing.T) {
	for seed := uint64(1); seed <= 300; seed++ {
		r := rand.New(rand.NewPCG(seed, 7))
		n, buckets := 3+r.IntN(5), 1+r.IntN(3)
		m := NewMaster(buckets)
		ks := Keys{}
		fresh := 0
		rekey := func(id uint32) {
			fresh++
			ks[id] = KeyDigest(fmt.Sprintf("%d/%d", seed, fresh))
			m.SetKeys(id, ks[id])
		}
		for id := uint32(1); id <= uint32(n); id++ {
			rekey(id)
		}
		last := map[uint32]snapshot{} // each node's view at a random earlier point
		gated, deferred := 0, 0
		for step := 0; step < 120; step++ {
			id := uint32(1 + r.IntN(n))
			switch e := r.IntN(10); {
			case e == 0:
				rekey(id)
			case e == 1 && len(ks) > 2:
				delete(ks, id)
				m.Remove(id)
			case e == 2:
				if _, ok := ks[id]; !ok {
					rekey(id) // re-joins under a new K
				}
			case e < 6:
				if _, ok := ks[id]; !ok {
					continue
				}
				// A status claiming a random subset of its peers (each bucket then
				// confirms or not as a whole).
				in, out := Keys{}, Keys{}
				for p, k := range ks {
					if p != id && r.IntN(3) > 0 {
						in[p] = k
					}
					if p != id && r.IntN(3) > 0 {
						out[p] = k
					}
				}
				m.Observe(NewStatus(id, ks[id], in, out, nil, buckets))
			case e < 8:
				if _, ok := ks[id]; ok {
					last[id] = snapshot{m.ViewFor(id), ks.Clone()}
				}
			default:
				if _, ok := ks[id]; !ok {
					continue
				}
				next := m.ViewFor(id)
				held := &Agent{ID: id}
				var prev *View
				if s, ok := last[id]; ok && r.IntN(4) > 0 {
					if !held.Consider(s.view, s.keys) {
						t.Fatalf("seed %d: a view refused by the key view it was taken with", seed)
					}
					prev = &s.view
				}
				before := decisions(held, ks)
				if !held.Consider(next, ks) {
					t.Fatalf("seed %d: the current view refused", seed)
				}
				after := decisions(held, ks)
				changed := 0
				for b, d := range after {
					if d != before[b] {
						changed++
					}
				}
				if got := m.Gain(id, prev, next); got != changed {
					t.Fatalf("seed %d step %d: node %d: Gain %d, but the view changes the agent's decisions about %d peers\nprev %+v\nnext %+v", seed, step, id, got, changed, prev, next)
				}
				if changed > 0 {
					gated++
				} else {
					deferred++
				}
			}
		}
		if seed == 300 && testing.Verbose() {
			t.Logf("last seed: %d views gate, %d do not", gated, deferred)
		}
	}
}

// TestGainReboot: the case it is for. After one node reboots, every view changes; the
// peers' views that only list the rebooted node, and its own view that lists everyone,
// gate nothing. Once a peer's pair with it is confirmed, that peer's view gates — even when
// the exception came and went between two writes, so that the written view and the new one
// list the same nobody and differ only in the digest.
func TestGainReboot(t *testing.T) {
	m, ks, _ := steady(t, 4, 2)
	written := map[uint32]View{}
	for a := uint32(1); a <= 4; a++ {
		written[a] = m.ViewFor(a)
	}
	ks[3] = KeyDigest("rebooted")
	m.SetKeys(3, ks[3])
	for a := uint32(1); a <= 4; a++ {
		v := m.ViewFor(a)
		if m.Gain(a, ptr(written[a]), v) > 0 {
			t.Errorf("node %d: view %+v after node 3's reboot gains something, want nothing", a, v)
		}
	}
	// Node 3 and node 1 install each other's keys (node 1 is alone in its bucket of node
	// 3's status: 1 and 3 are odd); nobody writes a view in between.
	peers := Keys{1: ks[1]}
	m.Observe(NewStatus(3, ks[3], peers, peers, nil, 2))
	m.Observe(NewStatus(1, ks[1], Keys{2: ks[2], 3: ks[3], 4: ks[4]}, Keys{2: ks[2], 3: ks[3], 4: ks[4]}, nil, 2))
	v1 := m.ViewFor(1)
	if len(v1.NotIn)+len(v1.NotOut) != 0 {
		t.Fatalf("node 1's view %+v: want no exceptions", v1)
	}
	if m.Gain(1, ptr(written[1]), v1) != 1 {
		t.Errorf("node 1's view confirms its pair with node 3 (same lists as written, new digest): gain %d, want 1", m.Gain(1, ptr(written[1]), v1))
	}
	if m.Gain(3, ptr(written[3]), m.ViewFor(3)) != 1 {
		t.Errorf("node 3's view confirms node 1: gain %d, want 1", m.Gain(3, ptr(written[3]), m.ViewFor(3)))
	}
	if v2 := m.ViewFor(2); m.Gain(2, ptr(written[2]), v2) > 0 {
		t.Errorf("node 2's view %+v gates, but node 3 has not installed node 2's keys", v2)
	}
	if m.Gain(2, ptr(m.ViewFor(2)), m.ViewFor(2)) > 0 {
		t.Errorf("a view gates over itself")
	}
	if m.Gain(2, nil, m.ViewFor(2)) != 2 {
		t.Errorf("node 2 has no view yet, and this one confirms node 1 and node 4: gain %d, want 2", m.Gain(2, nil, m.ViewFor(2)))
	}
	if stale := (View{Keys: written[2].Keys}); m.Gain(2, &stale, m.ViewFor(2)) != 2 {
		t.Errorf("a view of unknown age (Seq 0) must be treated as none")
	}
}

func ptr(v View) *View { return &v }

// TestGainLogBound: a view older than the change log counts as unknown.
func TestGainLogBound(t *testing.T) {
	m, _, _ := steady(t, 3, 1)
	old := m.ViewFor(1)
	for i := 0; i < maxChanges+1; i++ {
		m.SetKeys(2, KeyDigest(fmt.Sprint(i)))
	}
	if len(m.changes) > maxChanges {
		t.Fatalf("change log holds %d entries, bound %d", len(m.changes), maxChanges)
	}
	if m.Gain(1, &old, m.ViewFor(1)) != 1 {
		t.Errorf("a view older than the change log, next confirming node 3 (node 2 re-keyed since): gain %d, want 1", m.Gain(1, &old, m.ViewFor(1)))
	}
}

// TestRowRules pins ConsiderRow's checks the model does not exercise: a row confirms both
// directions for the K of both ends; a row for another K of the peer, one whose digest of
// this node's bucket does not match this node's key view, and one from a peer that refuses
// this node confirm nothing.
func TestRowRules(t *testing.T) {
	const buckets = 2
	ks := Keys{1: KeyDigest("a"), 2: KeyDigest("b"), 3: KeyDigest("c"), 4: KeyDigest("d")}
	claims := func(x uint32, except ...uint32) Keys {
		c := ks.Clone()
		delete(c, x)
		for _, e := range except {
			delete(c, e)
		}
		return c
	}
	row := NewStatus(2, ks[2], claims(2), claims(2), nil, buckets)
	a := &Agent{ID: 1}
	if in, out := a.ConsiderRow(row, ks, buckets); !in || !out || !a.SendESP(2, ks) || !a.DropPlaintext(2, ks) {
		t.Fatalf("a complete row of node 2: confirmed in %v out %v", in, out)
	}
	if in, out := (&Agent{ID: 1}).ConsiderRow(NewStatus(2, KeyDigest("b-old"), claims(2), claims(2), nil, buckets), ks, buckets); in || out {
		t.Errorf("a row for another K of node 2 confirmed in %v out %v", in, out)
	}
	lagging := ks.Clone()
	lagging[3] = KeyDigest("c-new") // node 3 shares node 1's bucket (odd ids)
	if in, out := (&Agent{ID: 1}).ConsiderRow(row, lagging, buckets); in || out {
		t.Errorf("a row over another K of a bucket-mate confirmed in %v out %v", in, out)
	}
	refusing := NewStatus(2, ks[2], claims(2, 1), claims(2, 1), []uint32{1}, buckets)
	if in, out := (&Agent{ID: 1}).ConsiderRow(refusing, ks, buckets); in || out {
		t.Errorf("a row of a peer refusing this node confirmed in %v out %v", in, out)
	}
	if in, out := (&Agent{ID: 3}).ConsiderRow(refusing, ks, buckets); !in || !out {
		t.Errorf("node 2 refuses node 1 only: node 3 (same bucket) confirmed in %v out %v", in, out)
	}
}

// TestConsiderRowsIsConsiderRow: ConsiderRows confirms exactly what ConsiderRow does row by
// row, over random key views, rows of other Ks, partial claims, rows from the checker's
// own bucket and refused peers in and out of it.
func TestConsiderRowsIsConsiderRow(t *testing.T) {
	for seed := uint64(0); seed < 300; seed++ {
		rng := rand.New(rand.NewPCG(seed, 77))
		n, buckets := 2+rng.IntN(40), 1+rng.IntN(6)
		mine := Keys{}
		for id := uint32(1); id <= uint32(n); id++ {
			mine[id] = K(rng.Uint64())
		}
		var rows []Status
		for x := uint32(1); x <= uint32(n); x++ {
			if rng.IntN(4) == 0 {
				continue
			}
			in, out := Keys{}, Keys{}
			var refused []uint32
			for id, k := range mine {
				switch {
				case id == x:
				case rng.IntN(10) == 0:
					refused = append(refused, id)
				default:
					if rng.IntN(6) != 0 {
						in[id] = k
					}
					if rng.IntN(6) != 0 {
						out[id] = k
					}
					if rng.IntN(20) == 0 {
						in[id] = K(rng.Uint64()) // an older K of the peer
					}
				}
			}
			slices.Sort(refused)
			self := mine[x]
			if rng.IntN(8) == 0 {
				self = K(rng.Uint64())
			}
			rows = append(rows, NewStatus(x, self, in, out, refused, buckets))
		}
		for a := uint32(1); a <= uint32(n); a++ {
			one, all := &Agent{ID: a}, &Agent{ID: a}
			for _, r := range rows {
				one.ConsiderRow(r, mine, buckets)
			}
			all.ConsiderRows(rows, mine, buckets)
			for b := uint32(1); b <= uint32(n); b++ {
				if one.SendESP(b, mine) != all.SendESP(b, mine) || one.DropPlaintext(b, mine) != all.DropPlaintext(b, mine) {
					t.Fatalf("seed %d, agent %d, peer %d: ConsiderRow says send %v drop %v, ConsiderRows %v %v", seed, a, b,
						one.SendESP(b, mine), one.DropPlaintext(b, mine), all.SendESP(b, mine), all.DropPlaintext(b, mine))
				}
			}
		}
	}
}

// TestComplete: a status is complete when it claims every peer of the key view it does not
// refuse, both ways, with the peer's K in that view.
func TestComplete(t *testing.T) {
	const buckets = 4
	ks := Keys{1: KeyDigest("a"), 2: KeyDigest("b"), 3: KeyDigest("c"), 4: KeyDigest("d"), 5: KeyDigest("e")}
	less := func(drop ...uint32) Keys {
		c := ks.Clone()
		for _, d := range drop {
			delete(c, d)
		}
		return c
	}
	older := less(1)
	older[3] = KeyDigest("c-old")
	for _, tc := range []struct {
		name string
		s    Status
		mine Keys
		want bool
	}{
		{"every peer both ways", NewStatus(1, ks[1], less(1), less(1), nil, buckets), ks, true},
		{"one peer missing inbound", NewStatus(1, ks[1], less(1, 4), less(1), nil, buckets), ks, false},
		{"one peer missing outbound", NewStatus(1, ks[1], less(1), less(1, 2), nil, buckets), ks, false},
		{"a peer claimed with its old K", NewStatus(1, ks[1], older, less(1), nil, buckets), ks, false},
		{"a refused peer left out", NewStatus(1, ks[1], less(1, 5), less(1, 5), []uint32{5}, buckets), ks, true},
		{"a peer left out but not refused", NewStatus(1, ks[1], less(1, 5), less(1, 5), nil, buckets), ks, false},
		{"a peer the status claims but the view lacks", NewStatus(1, ks[1], less(1), less(1), nil, buckets), less(5), false},
		{"wrong bucket count", NewStatus(1, ks[1], less(1), less(1), nil, buckets+1), ks, false},
	} {
		if got := Complete(tc.s, tc.mine, buckets); got != tc.want {
			t.Errorf("%s: Complete = %v, want %v", tc.name, got, tc.want)
		}
	}
}

// TestNeedsView: once rows are published, a node's view need not be written when every
// pair it would gain its peers' rows give it — and must be when a row does not: no row, a
// row made before the peer knew this node (the first wiring's e2e failure: views skipped
// for nodes whose peers' first rows were "complete" over an empty key view), a row of the
// peer's old K, a refusing row, a row over this node's old K.
func TestNeedsView(t *testing.T) {
	const buckets = 4
	m := NewMaster(buckets)
	k := map[uint32]K{1: KeyDigest("a"), 2: KeyDigest("b"), 3: KeyDigest("c")}
	m.SetKeys(1, k[1])
	held := m.ViewFor(1) // node 1 alone: lists nobody
	m.SetKeys(2, k[2])
	m.SetKeys(3, k[3])
	all := Keys{1: k[1], 2: k[2], 3: k[3]}
	status := func(id uint32, keys Keys, refused ...uint32) Status {
		c := keys.Clone()
		delete(c, id)
		for _, r := range refused {
			delete(c, r)
		}
		return NewStatus(id, keys[id], c, c, refused, buckets)
	}
	for id := uint32(1); id <= 3; id++ {
		m.Observe(status(id, all))
	}
	next := m.ViewFor(1)
	if len(next.NotIn)+len(next.NotOut) != 0 {
		t.Fatalf("every pair confirmed, view %+v", next)
	}
	rows := map[uint32]Status{}
	row := func(p uint32) *Status {
		if r, ok := rows[p]; ok {
			return &r
		}
		return nil
	}
	check := func(what string, prev *View, want bool) {
		t.Helper()
		if got := m.NeedsView(1, prev, next, row); got != want {
			t.Errorf("%s: NeedsView = %v, want %v", what, got, want)
		}
	}
	check("peers joined after the held view, no rows", &held, true)
	rows[2], rows[3] = status(2, all), status(3, all)
	check("both peers' rows cover node 1", &held, false)
	check("no view held: the first is written whatever the rows", nil, true)
	check("a view of unknown age, rows cover every pair", &View{}, false)
	rows[3] = status(3, Keys{3: k[3]}) // made before node 3 knew anyone
	check("node 3's row claims nobody", &held, true)
	old := all.Clone()
	old[3] = KeyDigest("c-old")
	rows[3] = status(3, old)
	check("node 3's row is for its old K", &held, true)
	rows[3] = status(3, all, 1)
	check("node 3's row refuses node 1", &held, true)
	noOne := all.Clone()
	delete(noOne, 3)
	outOnly := noOne.Clone()
	delete(noOne, 1)
	rows[3] = NewStatus(3, k[3], noOne, outOnly, nil, buckets)
	check("node 3 sends node 1 ESP but holds no inbound from it", &held, true)
	rows[3] = NewStatus(3, k[3], outOnly, noOne, nil, buckets)
	check("node 3 holds inbound from node 1 but does not send it ESP", &held, true)
	rows[3] = status(3, all)
	check("rows cover again", &held, false)
	// Node 1 re-keys: the rows over its old K cover nothing of its new pairs.
	k[1] = KeyDigest("a2")
	m.SetKeys(1, k[1])
	all[1] = k[1]
	for id := uint32(1); id <= 3; id++ {
		m.Observe(status(id, all))
	}
	prev := next
	next = m.ViewFor(1)
	check("node 1 re-keyed, rows over its old K", &prev, true)
	rows[2], rows[3] = status(2, all), status(3, all)
	check("node 1 re-keyed, rows over its new K", &prev, false)
	// A bucket-mate joins (node 5 shares bucket 1 with node 1): the rows of 2 and 3, made
	// before, no longer match node 1's bucket digest, but their pairs with node 1 are
	// confirmed already (the held view) and stay so; only node 5's pair is new.
	m.SetKeys(5, KeyDigest("e"))
	all[5] = KeyDigest("e")
	for _, id := range []uint32{1, 2, 3, 5} {
		m.Observe(status(id, all))
	}
	prev, next = next, m.ViewFor(1)
	check("a bucket-mate joined, no row of it", &prev, true)
	rows[5] = status(5, all)
	check("a bucket-mate joined, its row covers node 1", &prev, false)
	check("the same with a view of unknown age: the rows of 2 and 3 are stale for node 1's bucket", &View{}, true)

	// Node 1's agent says which view it used (ObserveUsed). The held view prev is
	// weighed by it: an agent that did not take prev (it restarted, or its key view
	// never matched prev's) holds nothing from it, whatever the rows cover.
	m.TakeDirty()
	m.ObserveUsed(1, prev.Digest(), true)
	if d := m.TakeDirty(); !slices.Contains(d, 1) {
		t.Errorf("the first word of node 1's agent left its view clean: %v", d)
	}
	check("node 1's agent used the held view, rows cover", &prev, false)
	m.ObserveUsed(1, prev.Digest(), true)
	if d := m.TakeDirty(); slices.Contains(d, 1) {
		t.Errorf("the same word again made node 1's view dirty: %v", d)
	}
	m.ObserveUsed(1, 0, false)
	if d := m.TakeDirty(); !slices.Contains(d, 1) {
		t.Errorf("node 1's agent used no view since it started, yet its view stays clean: %v", d)
	}
	check("node 1's agent restarted: it used no view since", &prev, true)
	check("the same, but the view now is the held one: nothing to give", &next, false)
	m.ObserveUsed(1, prev.Digest()^1, true)
	check("node 1's agent used another view", &prev, true)
	other := prev
	other.NotIn = []uint32{2}
	m.ObserveUsed(1, other.Digest(), true)
	check("node 1's agent used a view over the same key view listing node 2", &prev, true)
	if other.Digest() == prev.Digest() || (View{Keys: 1, NotIn: []uint32{2}}).Digest() == (View{Keys: 1, NotOut: []uint32{2}}).Digest() {
		t.Error("views of other content share a digest")
	}
	if (View{Keys: 1, Seq: 5}).Digest() != (View{Keys: 1}).Digest() {
		t.Error("a view's digest depends on Seq, which is not on the wire")
	}
	m.ObserveUsed(9, 0, false) // not a node of the key view: ignored
	if d := m.TakeDirty(); slices.Contains(d, 9) {
		t.Errorf("an unknown node's word made it dirty: %v", d)
	}
}
