package readiness

import (
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"testing"
	"time"
)

// refMaster is the master as first written (session 13): every bucket's expected digest
// computed over the whole key view for every status. The bucket cache must not change a
// single confirmation.
type refMaster struct {
	buckets int
	keys    Keys
	in, out map[uint32]map[uint32]bool
}

func newRef(buckets int) *refMaster {
	return &refMaster{buckets: buckets, keys: Keys{}, in: map[uint32]map[uint32]bool{}, out: map[uint32]map[uint32]bool{}}
}

func (m *refMaster) setKeys(id uint32, k K) {
	if old, ok := m.keys[id]; ok && old == k {
		return
	}
	m.keys[id] = k
	m.forget(id)
}

func (m *refMaster) remove(id uint32) { delete(m.keys, id); m.forget(id) }

func (m *refMaster) forget(id uint32) {
	delete(m.in, id)
	delete(m.out, id)
	for _, row := range m.in {
		delete(row, id)
	}
	for _, row := range m.out {
		delete(row, id)
	}
}

func (m *refMaster) observe(s Status) {
	self, ok := m.keys[s.ID]
	if !ok || self != s.Self || len(s.In) != m.buckets || len(s.Out) != m.buckets {
		return
	}
	refused := map[uint32]bool{}
	for _, r := range s.Refused {
		refused[r] = true
	}
	for j := 0; j < m.buckets; j++ {
		keep := func(id uint32) bool { return id != s.ID && !refused[id] && int(id%uint32(m.buckets)) == j }
		want := m.keys.Digest(keep)
		for _, c := range []struct {
			got  uint64
			conf map[uint32]map[uint32]bool
		}{{s.In[j], m.in}, {s.Out[j], m.out}} {
			if c.got != want {
				continue
			}
			row := c.conf[s.ID]
			if row == nil {
				row = map[uint32]bool{}
				c.conf[s.ID] = row
			}
			for id := range m.keys {
				if keep(id) {
					row[id] = true
				}
			}
		}
	}
}

func (m *refMaster) viewFor(a uint32) View {
	v := View{Keys: m.keys.Digest(nil)}
	for id := range m.keys {
		if id == a {
			continue
		}
		if !m.in[id][a] {
			v.NotIn = append(v.NotIn, id)
		}
		if !m.out[id][a] {
			v.NotOut = append(v.NotOut, id)
		}
	}
	slices.Sort(v.NotIn)
	slices.Sort(v.NotOut)
	return v
}

// TestMasterCacheMatchesReference runs random sequences of key changes, joins, leaves and
// statuses (complete, partial, stale, with refused peers, refused ids unknown or the node
// itself) through the cached Master and the reference, and compares every node's view
// after every step; and checks that TakeDirty names every view that changed since its last
// call.
func TestMasterCacheMatchesReference(t *testing.T) {
	for seed := uint64(1); seed <= 200; seed++ {
		rng := rand.New(rand.NewPCG(seed, 7))
		buckets := []int{1, 2, 3, 8, 32}[rng.IntN(5)]
		n := 2 + rng.IntN(12)
		m, ref := NewMaster(buckets), newRef(buckets)
		ks := Keys{}
		inc := 0
		rekey := func(id uint32) {
			inc++
			ks[id] = KeyDigest(fmt.Sprint(seed, "/", id, "/", inc))
			m.SetKeys(id, ks[id])
			ref.setKeys(id, ks[id])
		}
		for id := uint32(1); id <= uint32(n); id++ {
			rekey(id)
		}
		taken := map[uint32]View{} // each view as of the last TakeDirty (none before the first)
		for step := 0; step < 150; step++ {
			id := uint32(1 + rng.IntN(n+2)) // sometimes a node not (or no longer) in the view
			what := ""
			switch r := rng.IntN(10); {
			case r == 0:
				what = "rekey"
				rekey(id)
			case r == 1:
				what = "remove"
				delete(ks, id)
				m.Remove(id)
				ref.remove(id)
			default:
				what = "status"
				// The node's claims: its view of the peers' keys, some missing or stale.
				claims := func() Keys {
					c := Keys{}
					for p, k := range ks {
						if p == id || rng.IntN(6) == 0 {
							continue
						}
						if rng.IntN(12) == 0 {
							k ^= 1 // a stale K
						}
						c[p] = k
					}
					return c
				}
				self := ks[id]
				if rng.IntN(10) == 0 {
					self ^= 1 // a status of the node's previous keys
				}
				var refused []uint32
				for range rng.IntN(3) {
					refused = append(refused, uint32(1+rng.IntN(n+2)))
				}
				in, out := claims(), claims()
				for _, r := range refused {
					delete(in, r)
					delete(out, r)
				}
				s := NewStatus(id, self, in, out, refused, buckets)
				m.Observe(s)
				ref.observe(s)
			}
			for a := range ks {
				if got, want := m.ViewFor(a), ref.viewFor(a); !slices.Equal(got.NotIn, want.NotIn) || !slices.Equal(got.NotOut, want.NotOut) || got.Keys != want.Keys {
					t.Fatalf("seed %d step %d (%s of %d, %d buckets): view of %d\ncached    %+v\nreference %+v", seed, step, what, id, buckets, a, got, want)
				}
			}
			// TakeDirty, now and then (changes accumulate between calls): every view
			// not named is the one the previous round left.
			if rng.IntN(3) == 0 {
				dirty := m.TakeDirty()
				if !slices.IsSorted(dirty) {
					t.Fatalf("seed %d step %d: TakeDirty %v not sorted", seed, step, dirty)
				}
				for a := range ks {
					v := ref.viewFor(a)
					if p, ok := taken[a]; ok && !slices.Contains(dirty, a) && !equalView(p, v) {
						t.Fatalf("seed %d step %d (%s of %d): view of %d changed since the last TakeDirty but is not dirty (%v)\nthen %+v\nnow  %+v", seed, step, what, id, a, dirty, p, v)
					}
					taken[a] = v
				}
				for _, a := range dirty {
					if _, ok := ks[a]; !ok {
						t.Fatalf("seed %d step %d: TakeDirty names %d, not in the key view", seed, step, a)
					}
				}
			}
		}
	}
}

// TestBenchMasterObserve is the master's cost of one round of statuses (every node reports
// once, all complete: the steady state after an enable step) at 5,000 nodes and 32
// buckets, cached against the reference, as a ratio in one run.
func TestBenchMasterObserve(t *testing.T) {
	if os.Getenv("SECUREOVERLAY_BENCH") == "" {
		t.Skip("set SECUREOVERLAY_BENCH=1")
	}
	const n, buckets = 5000, DefaultBuckets
	ks := Keys{}
	for id := uint32(1); id <= n; id++ {
		ks[id] = KeyDigest(fmt.Sprint("node/", id))
	}
	statuses := make([]Status, 0, n)
	for id := uint32(1); id <= n; id++ {
		peers := ks.Clone()
		delete(peers, id)
		statuses = append(statuses, NewStatus(id, ks[id], peers, peers, nil, buckets))
	}
	m, ref := NewMaster(buckets), newRef(buckets)
	for id, k := range ks {
		m.SetKeys(id, k)
		ref.setKeys(id, k)
	}
	t0 := time.Now()
	for _, s := range statuses {
		m.Observe(s)
	}
	cached := time.Since(t0)
	t0 = time.Now()
	for _, s := range statuses {
		ref.observe(s)
	}
	reference := time.Since(t0)
	for _, a := range []uint32{1, n / 2, n} {
		if v := m.ViewFor(a); len(v.NotIn)+len(v.NotOut) != 0 {
			t.Fatalf("view of %d after a complete round: %d exceptions", a, len(v.NotIn)+len(v.NotOut))
		}
	}
	t.Logf("one round of %d statuses, %d buckets: cached %v, reference %v: %.3f×", n, buckets, cached.Round(time.Millisecond), reference.Round(time.Millisecond), float64(cached)/float64(reference))
	fmt.Printf("BENCH readiness.round %g s\nBENCH readiness.round_reference %g s\nBENCH readiness.round_ratio %g x\n", cached.Seconds(), reference.Seconds(), float64(cached)/float64(reference))

	// One node re-keys: every view changes (its key digest covers every node), and the
	// writer asks for all of them. The bit matrices against the reference's maps.
	k := KeyDigest("node/1/rekeyed")
	t0 = time.Now()
	m.SetKeys(1, k)
	dirty := m.TakeDirty()
	total := 0
	for _, a := range dirty {
		total += len(m.ViewFor(a).NotIn)
	}
	kept := time.Since(t0)
	t0 = time.Now()
	ref.setKeys(1, k)
	refTotal := 0
	for a := range ref.keys {
		refTotal += len(ref.viewFor(a).NotIn)
	}
	pass := time.Since(t0)
	if len(dirty) != n || total != refTotal || total != 2*(n-1) {
		t.Fatalf("after a re-key: %d views dirty, %d (reference %d) exceptions, want %d and %d", len(dirty), total, refTotal, n, 2*(n-1))
	}
	t.Logf("one re-key at %d nodes, every view taken: bit matrices %v, the reference (maps) %v: %.4f×", n, kept.Round(time.Millisecond), pass.Round(time.Millisecond), float64(kept)/float64(pass))
	fmt.Printf("BENCH readiness.rekey %g s\nBENCH readiness.rekey_reference %g s\nBENCH readiness.rekey_ratio %g x\n", kept.Seconds(), pass.Seconds(), float64(kept)/float64(pass))
}
