package readiness

import (
	"fmt"
	"slices"
	"testing"
)

// steady builds a master and agents for nodes 1..n that have all confirmed each other.
func steady(t *testing.T, n, buckets int) (*Master, Keys, []*Agent) {
	t.Helper()
	m := NewMaster(buckets)
	ks := Keys{}
	for id := uint32(1); id <= uint32(n); id++ {
		ks[id] = KeyDigest(string(rune('a' + id)))
		m.SetKeys(id, ks[id])
	}
	for id := range ks {
		peers := ks.Clone()
		delete(peers, id)
		m.Observe(NewStatus(id, ks[id], peers, peers, nil, buckets))
	}
	agents := make([]*Agent, n+1)
	for id := uint32(1); id <= uint32(n); id++ {
		agents[id] = &Agent{ID: id}
		if !agents[id].Consider(m.ViewFor(id), ks) {
			t.Fatalf("node %d: consistent view refused", id)
		}
	}
	return m, ks, agents
}

func TestSteadyStateEveryPairReady(t *testing.T) {
	m, ks, agents := steady(t, 5, 2)
	for a := uint32(1); a <= 5; a++ {
		if v := m.ViewFor(a); len(v.NotIn)+len(v.NotOut) != 0 {
			t.Errorf("node %d: view %+v, want no exceptions", a, v)
		}
		for b := uint32(1); b <= 5; b++ {
			if a != b && (!agents[a].SendESP(b, ks) || !agents[a].DropPlaintext(b, ks)) {
				t.Errorf("%d->%d not ready in steady state", a, b)
			}
		}
	}
}

// TestStaleStatusIgnored: a status B made before its reboot, delivered after the master
// saw B's new keys, must not confirm anything for B's new keys (B's new kernel holds no
// inbound SA yet). The status names the K it was made for; the master drops it.
func TestStaleStatusIgnored(t *testing.T) {
	m, ks, agents := steady(t, 2, 1)
	old := ks.Clone()
	ks[2] = KeyDigest("rebooted")
	m.SetKeys(2, ks[2])
	peers := Keys{1: old[1]}
	m.Observe(NewStatus(2, old[2], peers, peers, nil, 1)) // the pre-reboot status, late
	if v := m.ViewFor(1); !slices.Contains(v.NotIn, 2) {
		t.Fatalf("view of node 1 %+v: node 2 confirmed from a status of its previous boot", v)
	}
	agents[1].Consider(m.ViewFor(1), ks)
	if agents[1].SendESP(2, ks) {
		t.Fatal("node 1 sends ESP to rebooted node 2 before it installed the inbound SA")
	}
	// Node 2's first status after the reboot confirms it.
	m.Observe(NewStatus(2, ks[2], peers, Keys{}, nil, 1))
	agents[1].Consider(m.ViewFor(1), ks)
	if !agents[1].SendESP(2, ks) {
		t.Fatal("node 1 not ready for node 2 after its new status")
	}
	if agents[1].DropPlaintext(2, ks) {
		t.Fatal("node 1 drops plaintext from node 2, which does not send it ESP yet")
	}
}

// TestInconsistentViewIgnored: a view computed over other keys than the agent's own key
// view is not used.
func TestInconsistentViewIgnored(t *testing.T) {
	m, ks, _ := steady(t, 3, 2)
	a := &Agent{ID: 1}
	lagging := ks.Clone()
	lagging[3] = KeyDigest("older")
	if a.Consider(m.ViewFor(1), lagging) {
		t.Fatal("a view over other keys was used")
	}
	if a.SendESP(2, lagging) || a.SendESP(3, lagging) {
		t.Fatal("ready without a consistent view")
	}
}

// TestConfirmationsSticky: a confirmation survives a view that lost it (a new master
// leader that has not yet seen the statuses, a bucket still churning) and ends only when a
// K changes.
func TestConfirmationsSticky(t *testing.T) {
	_, ks, agents := steady(t, 3, 2)
	fresh := NewMaster(2) // a new leader: keys listed, no status observed yet
	for id, k := range ks {
		fresh.SetKeys(id, k)
	}
	if v := fresh.ViewFor(1); len(v.NotIn) != 2 {
		t.Fatalf("fresh leader's view %+v: want both peers unconfirmed", v)
	}
	agents[1].Consider(fresh.ViewFor(1), ks)
	if !agents[1].SendESP(2, ks) || !agents[1].DropPlaintext(3, ks) {
		t.Fatal("a view without confirmations withdrew ready pairs whose keys did not change")
	}
	changed := ks.Clone()
	changed[2] = KeyDigest("new epoch")
	if agents[1].SendESP(2, changed) || agents[1].DropPlaintext(2, changed) {
		t.Fatal("a confirmation carried over to a new K of the peer")
	}
	if !agents[1].SendESP(3, changed) {
		t.Fatal("a change of node 2's keys withdrew the pair with node 3")
	}
	self := ks.Clone()
	self[1] = KeyDigest("own new epoch")
	if agents[1].SendESP(2, self) || agents[1].SendESP(3, self) {
		t.Fatal("a confirmation carried over to a new K of the node itself")
	}
}

// TestRefusedPeerDoesNotHoldItsBucket: a peer that B refuses to program (bad key) is left
// out of the expected digest, so its bucket-mates are confirmed; the refused peer is not.
func TestRefusedPeerDoesNotHoldItsBucket(t *testing.T) {
	m := NewMaster(1)
	ks := Keys{1: KeyDigest("1"), 2: KeyDigest("2"), 3: KeyDigest("3")}
	for id, k := range ks {
		m.SetKeys(id, k)
	}
	good := Keys{2: ks[2]} // node 1 programs node 2 only; node 3's key is refused
	m.Observe(NewStatus(1, ks[1], good, good, nil, 1))
	if v := m.ViewFor(2); !slices.Contains(v.NotIn, 1) {
		t.Fatal("without the refusal stated, node 1's bucket matched although node 3 is missing")
	}
	m.Observe(NewStatus(1, ks[1], good, good, []uint32{3}, 1))
	if v := m.ViewFor(2); slices.Contains(v.NotIn, 1) {
		t.Fatalf("view of node 2 %+v: node 1 not confirmed although it refused only node 3", v)
	}
	if v := m.ViewFor(3); !slices.Contains(v.NotIn, 1) {
		t.Fatalf("view of node 3 %+v: node 1 confirmed for the peer it refused", v)
	}
}

// TestBucketDigests: a bucket digest depends on every (id, K) of its bucket and on nothing
// outside it.
func TestBucketDigests(t *testing.T) {
	ks := Keys{1: 10, 2: 20, 3: 30, 4: 40}
	b := Buckets(ks, 2)
	c := ks.Clone()
	c[3] = 31 // bucket 1
	b2 := Buckets(c, 2)
	if b[0] != b2[0] || b[1] == b2[1] {
		t.Fatalf("changing node 3's K: buckets %x -> %x", b, b2)
	}
	d := ks.Clone()
	delete(d, 4) // bucket 0
	if b3 := Buckets(d, 2); b3[0] == b[0] || b3[1] != b[1] {
		t.Fatalf("removing node 4: buckets %x -> %x", b, b3)
	}
	// The one-pass grouping equals a filtered digest per bucket (the definition).
	big := Keys{}
	for id := uint32(0); id < 1000; id += 3 {
		big[id] = KeyDigest(fmt.Sprint(id))
	}
	for _, n := range []int{1, 2, 7, DefaultBuckets} {
		got := Buckets(big, n)
		for j := range n {
			if want := big.Digest(func(id uint32) bool { return int(id%uint32(n)) == j }); got[j] != want {
				t.Fatalf("%d buckets: bucket %d is %x, its definition %x", n, j, got[j], want)
			}
		}
	}
	if Keys(nil).Digest(nil) != (Keys{}).Digest(nil) {
		t.Fatal("nil and empty key views differ")
	}
	if KeyDigest("a/b/c") == KeyDigest("a/b/d") {
		t.Fatal("key digests of different incarnations collide")
	}
}
