package watch

import (
	"slices"
	"testing"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/nodekeys"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// nk is a NodeKeys of boot, uid and epoch with the given capabilities and installed.
func nk(boot, uid, epoch string, installed []uint32, caps ...string) *nodekeys.Keys {
	return &nodekeys.Keys{Incarnation: nodekeys.Incarnation{BootID: boot, UID: uid, Epoch: epoch}, Capabilities: caps, Installed: installed}
}

// TestNodeKeyIncarnation: the one rule agents and the master take a node's key
// incarnation by (docs/keys.md §3): a current report that lists its claims decides (the
// incarnation and the claims made for it in one object); otherwise NodeKeys of the
// Node's boot and UID that declare installed; otherwise a current report.
func TestNodeKeyIncarnation(t *testing.T) {
	rep := func(boot, uid, epoch string) *api.NodeReport {
		return &api.NodeReport{Mode: api.ModeEnforce, Incarnation: boot, UID: uid, Epoch: epoch, Generations: []uint32{3}}
	}
	bare := func(boot, uid, epoch string) *api.NodeReport { // without lists
		r := rep(boot, uid, epoch)
		r.ListsOmitted = true
		return r
	}
	inst := api.CapabilityInstalled
	for _, c := range []struct {
		name     string
		k        *nodekeys.Keys
		rep      *api.NodeReport
		want     string
		fromKeys bool
	}{
		{"report only (0.1 or no NodeKeys)", nil, rep("b", "u", "e1"), "b/u/e1", false},
		{"report without lists only", nil, bare("b", "u", "e1"), "b/u/e1", false},
		{"report of another boot", nil, rep("old", "u", "e1"), "", false},
		{"report of another Node object", nil, rep("b", "u0", "e1"), "", false},
		{"report without epoch", nil, rep("b", "u", ""), "", false},
		{"a listing report decides over newer keys", nk("b", "u", "e2", []uint32{3}, inst), rep("b", "u", "e1"), "b/u/e1", false},
		{"keys decide over an older report without lists", nk("b", "u", "e2", []uint32{3}, inst), bare("b", "u", "e1"), "b/u/e2", true},
		{"keys decide over a newer report without lists", nk("b", "u", "e1", []uint32{3}, inst), bare("b", "u", "e2"), "b/u/e1", true},
		{"keys decide without a report", nk("b", "u", "e2", []uint32{3}, inst), nil, "b/u/e2", true},
		{"keys decide with nothing installed", nk("b", "u", "e2", nil, inst), bare("b", "u", "e1"), "b/u/e2", true},
		{"keys decide over a listing report of another boot", nk("b", "u", "e2", []uint32{3}, inst), rep("old", "u", "e1"), "b/u/e2", true},
		{"keys without the capability: the report", nk("b", "u", "e2", []uint32{3}, api.CapabilityReadinessDecide), bare("b", "u", "e1"), "b/u/e1", false},
		{"keys of another boot: the report", nk("old", "u", "e2", []uint32{3}, inst), bare("b", "u", "e1"), "b/u/e1", false},
		{"keys of another Node object: the report", nk("b", "u0", "e2", []uint32{3}, inst), bare("b", "u", "e1"), "b/u/e1", false},
		{"keys of another boot, no report", nk("old", "u", "e2", []uint32{3}, inst), nil, "", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := NodeKeyIncarnation("b", "u", c.k, c.rep); got != c.want {
				t.Errorf("NodeKeyIncarnation = %q, want %q", got, c.want)
			}
			n := NodeInfo{Name: "p", Incarnation: "b", UID: "u", Keys: c.k}
			if c.rep != nil {
				n.Report = &Report{NodeReport: *c.rep}
			}
			if got, fromKeys := n.keyIncarnation(); got != c.want || fromKeys != c.fromKeys {
				t.Errorf("NodeInfo.keyIncarnation = %q, from keys %v; want %q, %v", got, fromKeys, c.want, c.fromKeys)
			}
		})
	}
	if NodeKeyIncarnation("", "u", nk("", "u", "e", []uint32{1}, inst), nil) != "" {
		t.Error("a Node without a boot ID has a key incarnation")
	}
}

// TestInputsFromNodeKeys: what Compute takes of a peer whose NodeKeys decide — the
// incarnation, the mode its installed stands for, the generations installed, no lists —
// and of one whose report lists: that report, whole.
func TestInputsFromNodeKeys(t *testing.T) {
	ring := testRing(t, api.ModeEncrypt, 8, "a", "b")
	tagA := IncarnationTag(KeyIncarnation("boot-a", "uid-a", "ea"))
	inst := api.CapabilityInstalled
	lists := func(epoch string, omitted bool) *Report {
		r := &Report{NodeReport: api.NodeReport{Mode: api.ModeEnforce, Incarnation: "boot-b", UID: "uid-b", Epoch: epoch, Generations: []uint32{1, 2}, ListsOmitted: omitted}}
		if !omitted {
			r.InboundFrom, r.EncryptingTo = map[string]string{"a": tagA}, map[string]string{"a": tagA}
		}
		return r
	}
	for _, c := range []struct {
		name      string
		keys      *nodekeys.Keys
		rep       *Report
		want      desired.Report
		wantInc   string
		wantLists bool
	}{
		{"installed, no report", nk("boot-b", "uid-b", "e2", []uint32{1}, inst), nil,
			desired.Report{Incarnation: "boot-b/uid-b/e2", Mode: api.ModeAccept, Generations: []uint32{1}, ListsOmitted: true}, "boot-b/uid-b/e2", false},
		{"nothing installed", nk("boot-b", "uid-b", "e2", nil, inst), lists("e1", true),
			desired.Report{Incarnation: "boot-b/uid-b/e2", Mode: api.ModeOff, ListsOmitted: true}, "boot-b/uid-b/e2", false},
		{"report of an older epoch without lists: the keys' epoch", nk("boot-b", "uid-b", "e2", []uint32{1}, inst), lists("e1", true),
			desired.Report{Incarnation: "boot-b/uid-b/e2", Mode: api.ModeAccept, Generations: []uint32{1}, ListsOmitted: true}, "boot-b/uid-b/e2", false},
		{"report of the same epoch without lists: installed gives the generations", nk("boot-b", "uid-b", "e2", []uint32{1}, inst), lists("e2", true),
			desired.Report{Incarnation: "boot-b/uid-b/e2", Mode: api.ModeAccept, Generations: []uint32{1}, ListsOmitted: true}, "boot-b/uid-b/e2", false},
		{"a listing report of an older epoch decides, whole", nk("boot-b", "uid-b", "e2", []uint32{1}, inst), lists("e1", false),
			desired.Report{Incarnation: "boot-b/uid-b/e1", Mode: api.ModeEnforce, Generations: []uint32{1, 2}, InboundFromSelf: true, EncryptsToSelf: true}, "boot-b/uid-b/e1", true},
		{"keys without the capability: the report as before", nk("boot-b", "uid-b", "e2", []uint32{1}), lists("e1", false),
			desired.Report{Incarnation: "boot-b/uid-b/e1", Mode: api.ModeEnforce, Generations: []uint32{1, 2}, InboundFromSelf: true, EncryptsToSelf: true}, "boot-b/uid-b/e1", true},
	} {
		t.Run(c.name, func(t *testing.T) {
			snap := Snapshot{Ring: ring, Nodes: []NodeInfo{
				{Name: "a", IPv4Address: "198.18.0.1/24", Incarnation: "boot-a", UID: "uid-a"},
				{Name: "b", IPv4Address: "198.18.0.2/24", Incarnation: "boot-b", UID: "uid-b", Keys: c.keys, Report: c.rep},
			}}
			in, err := Inputs("a", snap, desired.Config{}, "ea")
			if err != nil {
				t.Fatal(err)
			}
			b := in.Nodes[1]
			if b.Incarnation != c.wantInc {
				t.Errorf("incarnation %q, want %q", b.Incarnation, c.wantInc)
			}
			if b.Report == nil {
				t.Fatalf("no report, want %+v", c.want)
			}
			got := *b.Report
			if got.Incarnation != c.want.Incarnation || got.Mode != c.want.Mode || !slices.Equal(got.Generations, c.want.Generations) ||
				got.InboundFromSelf != c.want.InboundFromSelf || got.EncryptsToSelf != c.want.EncryptsToSelf || got.ListsOmitted != c.want.ListsOmitted {
				t.Errorf("report %+v, want %+v", got, c.want)
			}
			// The peer's own report is not modified (the cache shares it).
			if c.rep != nil && (c.rep.Mode != api.ModeEnforce || len(c.rep.Generations) != 2) {
				t.Errorf("the cached report was modified: %+v", c.rep.NodeReport)
			}
			st, err := desired.Compute(in)
			if err != nil {
				t.Fatal(err)
			}
			// Encrypt mode: ESP to b needs b's lists (or the rule's confirmations, none
			// here) and the ring's generation installed at b.
			want := c.wantLists && c.want.Mode.Rank() >= api.ModeAccept.Rank() && slices.Contains(c.want.Generations, 1)
			if got := slices.Contains(st.EncryptingPeers(), "b"); got != want {
				t.Errorf("encrypting to b: %v, want %v", got, want)
			}
		})
	}
}

// TestInputsLanes: a node's lane count and whether it takes lanes come from its NodeKeys of
// its current key incarnation with the capability lanes (docs/dataplane.md §10) — for
// self as for peers; keys of another incarnation, or a count without the capability (an
// agent rolled back to one before lanes replaces the capabilities, not the count), say
// none.
func TestInputsLanes(t *testing.T) {
	ring := testRing(t, api.ModeEncrypt, 8, "a", "b")
	inst, lanes := api.CapabilityInstalled, api.CapabilityLanes
	withLanes := func(k *nodekeys.Keys, n uint16) *nodekeys.Keys { k.Lanes = n; return k }
	for _, c := range []struct {
		name          string
		self, peer    *nodekeys.Keys
		selfLanes     uint16
		peerLanes     uint16
		takes, selfTk bool
	}{
		{"both declare", withLanes(nk("boot-a", "uid-a", "ea", nil, inst, lanes), 2), withLanes(nk("boot-b", "uid-b", "e2", []uint32{1}, inst, lanes), 3), 2, 3, true, true},
		{"peer takes, sends on none", nil, withLanes(nk("boot-b", "uid-b", "e2", []uint32{1}, inst, lanes), 0), 0, 0, true, false},
		{"count without the capability (rolled back)", withLanes(nk("boot-a", "uid-a", "ea", nil, inst), 2), withLanes(nk("boot-b", "uid-b", "e2", []uint32{1}, inst), 3), 0, 0, false, false},
		{"self's keys of another epoch", withLanes(nk("boot-a", "uid-a", "old", nil, inst, lanes), 2), nil, 0, 0, false, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			snap := Snapshot{Ring: ring, Nodes: []NodeInfo{
				{Name: "a", IPv4Address: "198.18.0.1/24", Incarnation: "boot-a", UID: "uid-a", Keys: c.self},
				{Name: "b", IPv4Address: "198.18.0.2/24", Incarnation: "boot-b", UID: "uid-b", Keys: c.peer},
			}}
			in, err := Inputs("a", snap, desired.Config{}, "ea")
			if err != nil {
				t.Fatal(err)
			}
			a, b := in.Nodes[0], in.Nodes[1]
			if a.Lanes != c.selfLanes || a.TakesLanes != c.selfTk || b.Lanes != c.peerLanes || b.TakesLanes != c.takes {
				t.Errorf("self lanes %d takes %v, peer lanes %d takes %v; want %d %v, %d %v", a.Lanes, a.TakesLanes, b.Lanes, b.TakesLanes,
					c.selfLanes, c.selfTk, c.peerLanes, c.takes)
			}
		})
	}
}
