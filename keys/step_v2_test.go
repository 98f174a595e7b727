package keys

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/secureoverlay/secureoverlay/api"
)

// publishing marks every node as publishing its key for the generations gens.
func publishing(nodes []NodeState, gens ...uint32) []NodeState {
	for i := range nodes {
		nodes[i].Published = slices.Clone(gens)
	}
	return nodes
}

// TestV2GenerationsOnlyWhenEveryNodePublishes: with ProtocolV2, a new generation is a v2
// generation (a public salt, no root) exactly when every node that is not excluded
// publishes its key for it; otherwise it is v1 (a root) — an agent of the previous version
// in the cluster, or one node's NodeKeys not seen yet, keeps the cluster on v1 for that
// generation. The upgrade then completes as a rotation: the v2 generation goes pending,
// active, and the v1 one leaves.
func TestV2GenerationsOnlyWhenEveryNodePublishes(t *testing.T) {
	names := []string{"a", "b", "c"}
	cfg := testConfig()
	cfg.ProtocolV2 = true
	r := steady(t, names...) // generation 1, v1, active
	created := r.Active().Created
	now := created.Add(cfg.RotateInterval)

	// b publishes nothing (an agent of the previous version): generation 2 is v1.
	nodes := publishing(followers(r, names...), 2)
	nodes[1].Published = nil
	res := step(t, Input{Ring: r, Nodes: nodes, Target: api.ModeEnforce, Now: now, Config: cfg})
	if g := res.Ring.Pending(); g == nil || g.Number != 2 || g.V2() || len(g.Root) != RootKeyBytes {
		t.Fatalf("with b not publishing: %s %v", Summary(res.Ring), kinds(res))
	}
	// Every node publishes 2, but ProtocolV2 is off: v1.
	off := cfg
	off.ProtocolV2 = false
	res = step(t, Input{Ring: r, Nodes: publishing(followers(r, names...), 2), Target: api.ModeEnforce, Now: now, Config: off})
	if g := res.Ring.Pending(); g == nil || g.V2() {
		t.Fatalf("protocol v2 off: %s", Summary(res.Ring))
	}
	// Every node publishes 2 (and a key for some other generation, ignored): v2.
	res = step(t, Input{Ring: r, Nodes: publishing(followers(r, names...), 2, 3), Target: api.ModeEnforce, Now: now, Config: cfg})
	g := res.Ring.Pending()
	if g == nil || g.Number != 2 || !g.V2() || len(g.Root) != 0 || len(g.Salt) != GenerationSaltBytes {
		t.Fatalf("every node publishing: %s", Summary(res.Ring))
	}
	if k := kinds(res); !slices.Contains(k, "generation 2 created (interval, protocol v2)") {
		t.Fatalf("actions %v", k)
	}
	// The rest is a rotation: active once every node installed it, then 1 leaves.
	r = res.Ring
	res = step(t, Input{Ring: r, Nodes: publishing(followers(r, names...), 2, 3), Target: api.ModeEnforce, Now: now, Config: cfg})
	r = res.Ring
	if a := r.Active(); a == nil || a.Number != 2 || !a.V2() {
		t.Fatalf("switch: %s", Summary(r))
	}
	res = step(t, Input{Ring: r, Nodes: publishing(followers(r, names...), 2, 3), Target: api.ModeEnforce, Now: now.Add(cfg.Grace), Config: cfg})
	r = res.Ring
	if !slices.Equal(r.Numbers(), []uint32{2}) {
		t.Fatalf("after grace: %s", Summary(r))
	}
	// The next generation: v2 again when every node publishes 3.
	res = step(t, Input{Ring: r, Nodes: publishing(followers(r, names...), 2, 3), Target: api.ModeEnforce,
		Now: r.Active().Created.Add(cfg.RotateInterval), Config: cfg})
	if g := res.Ring.Pending(); g == nil || g.Number != 3 || !g.V2() {
		t.Fatalf("next rotation: %s", Summary(res.Ring))
	}
	// An excluded node (NotReady past the node timeout) does not hold v2 back.
	nodes = publishing(followers(r, names...), 3)
	nodes[2].Ready, nodes[2].NotReadySince, nodes[2].Published = false, now.Add(-time.Hour), nil
	res = step(t, Input{Ring: r, Nodes: nodes, Target: api.ModeEnforce, Now: r.Active().Created.Add(cfg.RotateInterval), Config: cfg})
	if g := res.Ring.Pending(); g == nil || !g.V2() || !strings.Contains(lagNames(res.Excluded)[0], "c") {
		t.Fatalf("c excluded: %s, excluded %v", Summary(res.Ring), res.Excluded)
	}
}

// TestV2InitialGeneration: enabling a cluster whose agents all publish the key of
// generation 1 starts on v2 directly.
func TestV2InitialGeneration(t *testing.T) {
	cfg := testConfig()
	cfg.ProtocolV2 = true
	now := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	res := step(t, Input{Nodes: publishing(followers(nil, "a", "b"), 1), Target: api.ModeEnforce, Now: now, Config: cfg})
	if g := res.Ring.Active(); g == nil || g.Number != 1 || !g.V2() {
		t.Fatalf("initial: %s %v", Summary(res.Ring), kinds(res))
	}
}
