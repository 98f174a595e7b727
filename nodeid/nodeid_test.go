package nodeid

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
)

// served is u as a reader gets it from the API server: through JSON.
func served(t *testing.T, u *unstructured.Unstructured) *unstructured.Unstructured {
	t.Helper()
	b, err := json.Marshal(u.Object)
	if err != nil {
		t.Fatal(err)
	}
	out := &unstructured.Unstructured{}
	if err := out.UnmarshalJSON(b); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestObjectRoundTrip(t *testing.T) {
	for _, e := range []Entry{
		{ID: 1, Node: "node-a"},
		{ID: keys.MaxNodeID, Node: "ip-10-0-12-34.eu-west-1.compute.internal"},
	} {
		u := Object("secureoverlay", e)
		if u.GetName() != fmt.Sprintf("id-%d", e.ID) || u.GetNamespace() != "secureoverlay" || u.GetKind() != Kind || len(u.GetOwnerReferences()) != 0 {
			t.Errorf("%+v: object %s/%s kind %s owners %v", e, u.GetNamespace(), u.GetName(), u.GetKind(), u.GetOwnerReferences())
		}
		for _, v := range []*unstructured.Unstructured{u, served(t, u)} {
			got, err := Parse(v)
			if err != nil || got != e {
				t.Errorf("%+v: parsed %+v, %v", e, got, err)
			}
		}
	}
}

// TestParseRefuses: what a reader must not take, and errors that name the field but never
// a value (an operator's edit may hold anything).
func TestParseRefuses(t *testing.T) {
	good := func() *unstructured.Unstructured {
		return served(t, Object("ns", Entry{ID: 17, Node: "node-a"}))
	}
	for _, c := range []struct {
		name string
		edit func(u *unstructured.Unstructured)
		want string
	}{
		{"id 0", func(u *unstructured.Unstructured) { u.Object["id"] = int64(0); u.SetName("id-0") }, "id: outside"},
		{"id above the SPI's 22 bits", func(u *unstructured.Unstructured) {
			u.Object["id"] = int64(keys.MaxNodeID + 1)
			u.SetName(Name(keys.MaxNodeID + 1))
		}, "id: outside"},
		{"negative id", func(u *unstructured.Unstructured) { u.Object["id"] = int64(-17) }, "id: want an integer"},
		{"id beyond 32 bits", func(u *unstructured.Unstructured) { u.Object["id"] = int64(1<<32 + 17) }, "id: want an integer"},
		{"id a string", func(u *unstructured.Unstructured) { u.Object["id"] = "17" }, "id: want an integer"},
		{"id a fraction", func(u *unstructured.Unstructured) { u.Object["id"] = 17.5 }, "id: want an integer"},
		{"no node", func(u *unstructured.Unstructured) { delete(u.Object, "node") }, "node: want a string"},
		{"node not a node name", func(u *unstructured.Unstructured) { u.Object["node"] = "Secret-Looking_Value" }, "node: not a Kubernetes node name"},
		{"name of another id", func(u *unstructured.Unstructured) { u.SetName("id-18") }, "the name is not id- followed by its id"},
		{"name with a leading zero", func(u *unstructured.Unstructured) { u.SetName("id-017") }, "the name is not id- followed by its id"},
	} {
		u := good()
		c.edit(u)
		_, err := Parse(u)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want %q", c.name, err, c.want)
			continue
		}
		if strings.Contains(err.Error(), "Secret-Looking") {
			t.Errorf("%s: the error quotes the value: %v", c.name, err)
		}
	}
}

// ring is a ring with the given live generation numbers, last generation and table.
func ring(last uint32, gens []uint32, nodes ...keys.NodeID) *keys.Ring {
	r := keys.NewRing()
	r.LastGeneration = last
	for _, g := range gens {
		r.Generations = append(r.Generations, keys.Generation{Number: g})
	}
	r.Nodes = nodes
	return r
}

func TestPlan(t *testing.T) {
	a, b, c := keys.NodeID{Name: "a", ID: 1}, keys.NodeID{Name: "b", ID: 2}, keys.NodeID{Name: "c", ID: 3}
	released := keys.NodeID{Name: "d", ID: 4, Released: true, ReleasedAt: 5}
	for _, tc := range []struct {
		name string
		r    *keys.Ring
		have []Entry
		put  []Entry
		del  []uint32
	}{
		{"first write: every live entry, ascending; released ones have none", ring(5, []uint32{4, 5}, c, a, b, released), nil,
			[]Entry{{1, "a"}, {2, "b"}, {3, "c"}}, nil},
		{"nothing to do", ring(5, []uint32{4, 5}, a, b), []Entry{{1, "a"}, {2, "b"}}, nil, nil},
		{"a join writes one", ring(7, []uint32{6, 7}, a, b, c), []Entry{{1, "a"}, {2, "b"}}, []Entry{{3, "c"}}, nil},
		{"a leave (released) deletes one", ring(7, []uint32{6, 7}, a, keys.NodeID{Name: "b", ID: 2, Released: true, ReleasedAt: 7}),
			[]Entry{{1, "a"}, {2, "b"}}, nil, []uint32{2}},
		{"an ID moved to another node is rewritten", ring(9, []uint32{8, 9}, a, keys.NodeID{Name: "e", ID: 2}),
			[]Entry{{1, "a"}, {2, "b"}}, []Entry{{2, "e"}}, nil},
		{"an edited object is put back", ring(5, []uint32{5}, a), []Entry{{1, "z"}}, []Entry{{1, "a"}}, nil},
		{"objects the ring does not have are deleted, ascending", ring(5, []uint32{5}, a), []Entry{{9, "q"}, {1, "a"}, {4, "d"}},
			nil, []uint32{4, 9}},
		{"a ring without a table: every object goes", ring(5, []uint32{5}), []Entry{{1, "a"}}, nil, []uint32{1}},
	} {
		have := map[uint32]Entry{}
		for _, e := range tc.have {
			have[e.ID] = e
		}
		put, del := Plan(tc.r, have)
		if !slices.Equal(put, tc.put) || !slices.Equal(del, tc.del) {
			t.Errorf("%s: put %v del %v, want put %v del %v", tc.name, put, del, tc.put, tc.del)
		}
		apply(have, put, del)
		if put, del := Plan(tc.r, have); len(put)+len(del) != 0 {
			t.Errorf("%s: after applying the plan, again put %v del %v", tc.name, put, del)
		}
		if got, want := Digest(table(have)), TableDigest(tc.r); got != want {
			t.Errorf("%s: after the plan the NodeIDs' digest is %s, the ring's %s", tc.name, got, want)
		}
	}
}

// table is have as a table (node → ID).
func table(have map[uint32]Entry) map[string]uint32 {
	ids := map[string]uint32{}
	for _, e := range have {
		ids[e.Node] = e.ID
	}
	return ids
}

func TestDigest(t *testing.T) {
	base := map[string]uint32{"a": 1, "b": 2}
	d := Digest(base)
	if !strings.HasPrefix(d, "2:") || len(d) != 2+32 {
		t.Errorf("digest %q: want the count, a colon and 32 hex digits", d)
	}
	for name, other := range map[string]map[string]uint32{
		"an ID moved":       {"a": 1, "c": 2},
		"two IDs swapped":   {"a": 2, "b": 1},
		"one more":          {"a": 1, "b": 2, "c": 3},
		"one less":          {"a": 1},
		"a name's boundary": {"a": 1, "b 3\n": 2},
	} {
		if Digest(other) == d {
			t.Errorf("%s: same digest as %v", name, base)
		}
	}
	if Digest(map[string]uint32{"b": 2, "a": 1}) != d {
		t.Error("the digest depends on the map's order")
	}
}

func apply(have map[uint32]Entry, put []Entry, del []uint32) {
	for _, e := range put {
		have[e.ID] = e
	}
	for _, id := range del {
		delete(have, id)
	}
}

func TestIDs(t *testing.T) {
	a := keys.NodeID{Name: "a", ID: 1}
	entries := []Entry{{3, "c"}, {1, "a"}, {2, "b"}}
	abc := Digest(map[string]uint32{"a": 1, "b": 2, "c": 3})
	for _, tc := range []struct {
		name    string
		r       *keys.Ring
		entries []Entry
		want    string
		ids     map[string]uint32
		ok      bool
	}{
		{"the ring's table wins", ring(7, []uint32{6, 7}, a, keys.NodeID{Name: "b", ID: 5}, keys.NodeID{Name: "x", ID: 9, Released: true, ReleasedAt: 3}),
			entries, abc, map[string]uint32{"a": 1, "b": 5}, true},
		{"no table and no digest: the ring's (empty) table", ring(7, []uint32{7}), entries, "", map[string]uint32{}, true},
		{"no table: the NodeIDs the digest names", ring(7, []uint32{6, 7}), entries, abc, map[string]uint32{"a": 1, "b": 2, "c": 3}, true},
		{"NodeIDs ahead of the ring (a join)", ring(7, []uint32{7}), entries, Digest(map[string]uint32{"a": 1, "b": 2}), nil, false},
		{"NodeIDs behind the ring (an ID moved)", ring(7, []uint32{7}), entries, Digest(map[string]uint32{"a": 1, "b": 2, "e": 3}), nil, false},
		{"one node named twice", ring(7, []uint32{7}), []Entry{{1, "a"}, {2, "a"}}, Digest(map[string]uint32{"a": 1}), nil, false},
		{"an empty table, named", ring(7, []uint32{7}), nil, Digest(nil), map[string]uint32{}, true},
	} {
		ids, ok := IDs(tc.r, tc.entries, tc.want)
		if ok != tc.ok || !maps.Equal(ids, tc.ids) {
			t.Errorf("%s: %v %v, want %v %v", tc.name, ids, ok, tc.ids, tc.ok)
		}
	}
}

// history is a master's life in a random cluster: rings made by the table rules of
// docs/keys.md §1 (a departed node's ID is released at the last generation and freed once
// no live generation is at or below that; a new node takes the lowest unused ID; a node
// that returns while its ID is held gets it back), each followed by the NodeIDs the master
// writes for it (Plan). seen records, per generation number, which node held each ID
// (unreleased) in some ring while that generation was live.
type history struct {
	rings   []*keys.Ring
	objects []map[uint32]Entry
	seen    map[uint32]map[uint32]map[string]bool // generation → ID → nodes
	writes  []int                                 // object writes after each ring
	ops     []string
}

func (h *history) record(r *keys.Ring, op string) {
	have := map[uint32]Entry{}
	if len(h.objects) > 0 {
		maps.Copy(have, h.objects[len(h.objects)-1])
	}
	put, del := Plan(r, have)
	apply(have, put, del)
	h.rings, h.objects, h.ops = append(h.rings, r), append(h.objects, have), append(h.ops, op)
	h.writes = append(h.writes, len(put)+len(del))
	for _, g := range r.Numbers() {
		for _, n := range r.Nodes {
			if n.Released {
				continue
			}
			if h.seen[g] == nil {
				h.seen[g] = map[uint32]map[string]bool{}
			}
			if h.seen[g][n.ID] == nil {
				h.seen[g][n.ID] = map[string]bool{}
			}
			h.seen[g][n.ID][n.Name] = true
		}
	}
}

// assign applies the table rules for the nodes present.
func assign(r *keys.Ring, present map[string]bool) {
	oldest := uint32(0)
	if len(r.Generations) > 0 {
		oldest = slices.Min(r.Numbers())
	}
	var kept []keys.NodeID
	has := map[string]bool{}
	used := map[uint32]bool{}
	for _, n := range r.Nodes {
		switch {
		case !n.Released && !present[n.Name]:
			n.Released, n.ReleasedAt = true, r.LastGeneration
		case n.Released && present[n.Name]:
			n.Released, n.ReleasedAt = false, 0
		}
		if n.Released && (oldest == 0 || oldest > n.ReleasedAt) {
			continue // freed
		}
		kept = append(kept, n)
		used[n.ID] = true
		if !n.Released {
			has[n.Name] = true
		}
	}
	for _, name := range slices.Sorted(maps.Keys(present)) {
		if has[name] || !present[name] {
			continue
		}
		id := uint32(1)
		for used[id] {
			id++
		}
		used[id] = true
		kept = append(kept, keys.NodeID{Name: name, ID: id})
	}
	r.Nodes = kept
}

func randomHistory(rng *rand.Rand, steps int) *history {
	h := &history{seen: map[uint32]map[uint32]map[string]bool{}}
	r := keys.NewRing()
	present := map[string]bool{}
	names := []string{"a", "b", "c", "d", "e", "f"}
	for range steps {
		r = r.Clone()
		var op string
		switch k := rng.IntN(10); {
		case k < 3:
			name := names[rng.IntN(len(names))]
			present[name] = !present[name]
			op = fmt.Sprintf("%s present=%v", name, present[name])
		case k < 6 || len(r.Generations) == 0: // rotate: a new generation, at most 3 live
			r.LastGeneration++
			r.Generations = append(r.Generations, keys.Generation{Number: r.LastGeneration})
			if len(r.Generations) > 3 {
				r.Generations = r.Generations[1:]
			}
			op = fmt.Sprintf("generation %d", r.LastGeneration)
		case k < 8 && len(r.Generations) > 1:
			r.Generations = r.Generations[1:]
			op = "oldest dropped"
		default:
			r.Generations = nil
			op = "off"
		}
		assign(r, present)
		h.record(r, op)
	}
	return h
}

// TestIDsNeverReuseUnderALiveGeneration: over random cluster histories, an agent whose
// ring (without its table, with the digest) lags the NodeIDs or is ahead of them takes a
// table only when it is the ring's own, so it never takes an ID for a node while a
// generation live in its ring saw another node hold that ID — the invariant that keeps two
// senders from one SPI (docs/keys.md §2, §13); with its ring current it takes the table.
// Rotations write no NodeID.
func TestIDsNeverReuseUnderALiveGeneration(t *testing.T) {
	taken, refused := 0, 0
	for seed := range uint64(100) {
		rng := rand.New(rand.NewPCG(seed, 29))
		h := randomHistory(rng, 60)
		for i, r := range h.rings {
			stripped := r.Clone()
			stripped.Nodes = nil
			for j := max(0, i-6); j < len(h.objects) && j <= i+6; j++ {
				ids, ok := IDs(stripped, slices.Collect(maps.Values(h.objects[j])), TableDigest(r))
				own, _ := IDs(r, nil, "")
				if ok != maps.Equal(table(h.objects[j]), own) || (ok && !maps.Equal(ids, own)) {
					t.Fatalf("seed %d: agent at ring %d, NodeIDs of ring %d: took %v (%v); the ring's table %v, the NodeIDs' %v",
						seed, i, j, ids, ok, own, table(h.objects[j]))
				}
				if j == i && !ok {
					t.Fatalf("seed %d ring %d: the NodeIDs written for it are not taken with it", seed, i)
				}
				if ok {
					taken++
				} else {
					refused++
				}
				for name, id := range ids {
					for _, g := range r.Numbers() {
						for holder := range h.seen[g][id] {
							if holder != name {
								t.Fatalf("seed %d: agent at ring %d (generations %v), NodeIDs of ring %d: %s takes ID %d, which %s held under live generation %d\nops: %q",
									seed, i, r.Numbers(), j, name, id, holder, g, h.ops[:max(i, j)+1])
							}
						}
					}
				}
			}
			if i > 0 && slices.Equal(h.rings[i-1].Nodes, r.Nodes) && h.writes[i] != 0 {
				t.Fatalf("seed %d ring %d (%s): %d NodeID writes with the table unchanged", seed, i, h.ops[i], h.writes[i])
			}
		}
	}
	if taken == 0 || refused == 0 {
		t.Fatalf("the histories never exercised both sides: %d pairs taken, %d refused", taken, refused)
	}
	t.Logf("(ring, NodeIDs) pairs: %d taken, %d refused", taken, refused)
}

// TestStripAndFill: the master's public ring without its table, and an agent's ring filled
// from the NodeIDs the master wrote for it, give every live node the ID the Secret's ring
// gives it; NodeIDs of another table fill nothing.
func TestStripAndFill(t *testing.T) {
	full := ring(5, []uint32{4, 5}, keys.NodeID{Name: "c", ID: 3}, keys.NodeID{Name: "a", ID: 1},
		keys.NodeID{Name: "d", ID: 4, Released: true, ReleasedAt: 5}, keys.NodeID{Name: "b", ID: 2})
	stripped, digest := Strip(full)
	if len(stripped.Nodes) != 0 || len(full.Nodes) != 4 {
		t.Fatalf("stripped %d entries, the Secret's ring kept %d: want 0 and 4", len(stripped.Nodes), len(full.Nodes))
	}
	if digest != TableDigest(full) {
		t.Fatal("the digest is not the Secret's table's")
	}
	if r, ok := Fill(full, nil, digest); !ok || r != full {
		t.Fatal("a ring with its table is not taken as it is")
	}
	put, _ := Plan(full, nil)
	slices.Reverse(put)
	filled, ok := Fill(stripped, put, digest)
	if !ok {
		t.Fatal("the NodeIDs written for the ring do not fill it")
	}
	for _, n := range []string{"a", "b", "c", "d", "x"} {
		if got, want := filled.NodeID(n), full.NodeID(n); got != want {
			t.Errorf("node %s: ID %d, want %d", n, got, want)
		}
	}
	if !slices.IsSortedFunc(filled.Nodes, func(a, b keys.NodeID) int { return int(a.ID) - int(b.ID) }) {
		t.Error("the filled table is not in ascending ID")
	}
	if len(stripped.Nodes) != 0 {
		t.Error("Fill changed the ring it was given")
	}
	if _, ok := Fill(stripped, put[1:], digest); ok {
		t.Error("NodeIDs missing one entry filled the ring")
	}
	if _, ok := Fill(stripped, append(slices.Clone(put), Entry{ID: 9, Node: "e"}), digest); ok {
		t.Error("NodeIDs with one entry more filled the ring")
	}
}

// TestStrippedRingSizeBound: the public ring an agent receives at every step is bounded
// once it leaves its table out — the same size at 100 and at 5,000 nodes with 40-character
// names — while the ring with its table grows by ≈ 60 bytes per node (docs/keys.md §13;
// docs/performance.md §3). A must-hold bound, not a benchmark.
func TestStrippedRingSizeBound(t *testing.T) {
	size := func(n int) (full, stripped int) {
		r := keys.NewRing()
		r.Mode, r.Target, r.LastGeneration = api.ModeEnforce, api.ModeEnforce, 3
		created := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
		for g := uint32(1); g <= 3; g++ {
			st := keys.StateRetiring
			switch g {
			case 2:
				st = keys.StateActive
			case 3:
				st = keys.StatePending
			}
			r.Generations = append(r.Generations, keys.Generation{Number: g, State: st, Cipher: keys.AES128GCM, ICVBytes: 16,
				Salt: bytes.Repeat([]byte{byte(g)}, keys.GenerationSaltBytes), Created: created, Activated: created, Reason: "request"})
			if st == keys.StateRetiring {
				r.Generations[len(r.Generations)-1].Retiring = created
			}
		}
		for i := 1; i <= n; i++ {
			r.Nodes = append(r.Nodes, keys.NodeID{Name: fmt.Sprintf("ip-10-%03d-%03d-%03d.eu-west-1.compute.internal", i/65536, i/256%256, i%256), ID: uint32(i)})
		}
		if err := r.Validate(); err != nil {
			t.Fatal(err)
		}
		a, err := keys.MarshalPublic(r)
		if err != nil {
			t.Fatal(err)
		}
		s, _ := Strip(r)
		b, err := keys.MarshalPublic(s)
		if err != nil {
			t.Fatal(err)
		}
		return len(a), len(b)
	}
	full100, s100 := size(100)
	full5k, s5k := size(5000)
	t.Logf("public ring: %d bytes with its table and %d without at 100 nodes; %d and %d at 5,000 (40-character names)", full100, s100, full5k, s5k)
	if s5k != s100 || s5k > 2048 {
		t.Errorf("without its table the ring is %d bytes at 5,000 nodes and %d at 100: want equal and ≤ 2 KiB", s5k, s100)
	}
	if full5k < 50*5000 {
		t.Errorf("with its table the ring is %d bytes at 5,000 nodes: the test does not build the table it means to", full5k)
	}
}
