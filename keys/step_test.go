package keys

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/secureoverlay/secureoverlay/api"
)

func testConfig() Config {
	return Config{RotateInterval: 12 * time.Hour, Grace: 2 * time.Minute, Drain: 10 * time.Second, NodeTimeout: 10 * time.Minute,
		SeqThreshold: 0.5, Cipher: AES128GCM, ICVBytes: 8}
}

// follower is a simulated agent that implements whatever the ring says.
func follower(name string, r *Ring) NodeState {
	rep := &api.NodeReport{Mode: api.ModeOff, Incarnation: "boot-" + name}
	if r != nil {
		rep.Mode = r.Mode
		rep.Generations = r.Numbers()
		// It sends to its peers with the active generation once the mode encrypts.
		if a := r.Active(); a != nil && (r.Mode == api.ModeEncrypt || r.Mode == api.ModeEnforce) {
			rep.Sending, rep.PeersEncrypted = []uint32{a.Number}, 1
		}
	}
	return NodeState{Name: name, Ready: true, BootID: "boot-" + name, Report: rep}
}

func followers(r *Ring, names ...string) []NodeState {
	var out []NodeState
	for _, n := range names {
		out = append(out, follower(n, r))
	}
	return out
}

func step(t *testing.T, in Input) Result {
	t.Helper()
	if in.Rand == nil {
		in.Rand = rand.Reader
	}
	if in.Config == (Config{}) {
		in.Config = testConfig()
	}
	res, err := Step(in)
	if err != nil {
		t.Fatalf("step: %v", err)
	}
	// Every ring Step produces must survive the Secret round trip.
	b, err := Marshal(res.Ring)
	if err != nil {
		t.Fatalf("marshal stepped ring: %v", err)
	}
	if _, err := Parse(b); err != nil {
		t.Fatalf("parse stepped ring: %v", err)
	}
	return res
}

func kinds(res Result) []string {
	var out []string
	for _, a := range res.Actions {
		out = append(out, a.String())
	}
	return out
}

func lagNames(l []Lag) []string {
	var out []string
	for _, x := range l {
		out = append(out, x.Node)
	}
	return out
}

func TestEnableDisableSequence(t *testing.T) {
	names := []string{"n1", "n2", "n3"}
	now := t0
	var ring *Ring
	var modes []api.Mode
	run := func(target api.Mode, steps int) {
		for range steps {
			res := step(t, Input{Ring: ring, Nodes: followers(ring, names...), Target: target, Now: now})
			if res.Changed && res.Ring.Mode != ring.Mode {
				modes = append(modes, res.Ring.Mode)
			}
			ring = res.Ring
			now = now.Add(time.Second)
		}
	}
	// A ring that does not exist yet behaves like mode off.
	res := step(t, Input{Nodes: followers(nil, names...), Target: api.ModeOff, Now: now})
	if res.Changed != true || res.Ring.Mode != api.ModeOff || len(res.Ring.Generations) != 0 || res.Ring.NodeID("n3") == 0 {
		t.Fatalf("first ring: %+v %v", res.Ring, kinds(res))
	}
	ring = res.Ring
	run(api.ModeEnforce, 6)
	if want := []api.Mode{api.ModeAccept, api.ModeEncrypt, api.ModeEnforce}; !slices.Equal(modes, want) {
		t.Fatalf("enable went through %v, want %v", modes, want)
	}
	if a := ring.Active(); a == nil || a.Number != 1 || a.Reason != "initial" || ring.LastGeneration != 1 {
		t.Fatalf("enable should create exactly generation 1 active, ring %s", Summary(ring))
	}
	modes = nil
	run(api.ModeOff, 6)
	if want := []api.Mode{api.ModeEncrypt, api.ModeAccept, api.ModeOff}; !slices.Equal(modes, want) {
		t.Fatalf("disable went through %v, want %v", modes, want)
	}
	if len(ring.Generations) != 0 || ring.LastGeneration != 1 {
		t.Fatalf("off must drop every generation and keep the counter: %s last=%d", Summary(ring), ring.LastGeneration)
	}
	// Re-enable: a fresh generation, never number 1 again.
	modes = nil
	run(api.ModeEnforce, 4)
	if a := ring.Active(); a == nil || a.Number != 2 || ring.Mode != api.ModeEnforce {
		t.Fatalf("re-enable: %s", Summary(ring))
	}
}

func TestModeStepGatedOnEveryLiveNode(t *testing.T) {
	base := step(t, Input{Nodes: followers(nil, "a", "b"), Target: api.ModeEnforce, Now: t0}).Ring // accept, gen 1
	if base.Mode != api.ModeAccept {
		t.Fatalf("mode %s", base.Mode)
	}
	behind := follower("b", nil) // still reports off
	behind.Report.Generations = nil
	stale := follower("b", base)
	stale.BootID = "boot-b-2" // rebooted since it reported
	notReadyShort := follower("b", nil)
	notReadyShort.Ready, notReadyShort.NotReadySince = false, t0.Add(-time.Minute)
	notReadyLong := notReadyShort
	notReadyLong.NotReadySince = t0.Add(-time.Hour)
	noGen := follower("b", base)
	noGen.Report.Generations = nil
	cases := []struct {
		name    string
		b       *NodeState // nil: node b deleted
		step    bool
		lagging []string
		reason  string
	}{
		{"all reached accept", ptr(follower("b", base)), true, nil, ""},
		{"b still off", &behind, false, []string{"b"}, "report mode accept with generation 1 installed"},
		{"b accept without keys", &noGen, false, []string{"b"}, "generation 1 installed"},
		{"b rebooted since report", &stale, false, []string{"b"}, "previous boot"},
		{"b no report", &NodeState{Name: "b", Ready: true}, false, []string{"b"}, "no report"},
		{"b unreadable report", &NodeState{Name: "b", Ready: true, ReportError: "bad json"}, false, []string{"b"}, "unreadable"},
		{"b NotReady 1m", &notReadyShort, false, []string{"b"}, ""},
		{"b NotReady 1h", &notReadyLong, true, nil, ""},
		{"b deleted", nil, true, nil, ""},
	}
	for _, c := range cases {
		nodes := []NodeState{follower("a", base)}
		if c.b != nil {
			nodes = append(nodes, *c.b)
		}
		res := step(t, Input{Ring: base, Nodes: nodes, Target: api.ModeEnforce, Now: t0})
		stepped := res.Ring.Mode == api.ModeEncrypt
		if stepped != c.step {
			t.Errorf("%s: stepped=%v want %v (%v)", c.name, stepped, c.step, kinds(res))
		}
		if !stepped && !slices.Equal(lagNames(res.Lagging), c.lagging) {
			t.Errorf("%s: lagging %v want %v", c.name, res.Lagging, c.lagging)
		}
		if c.reason != "" && (len(res.Lagging) == 0 || !strings.Contains(res.Lagging[0].Reason, c.reason)) {
			t.Errorf("%s: lag reason %v, want %q", c.name, res.Lagging, c.reason)
		}
		if c.name == "b NotReady 1h" && (len(res.Excluded) != 1 || res.Excluded[0].Node != "b") {
			t.Errorf("%s: excluded %v", c.name, res.Excluded)
		}
		if c.name == "b NotReady 1m" && !res.Wake.Equal(t0.Add(9*time.Minute)) {
			t.Errorf("%s: wake %v, want when the node times out", c.name, res.Wake)
		}
	}
}

func ptr[T any](v T) *T { return &v }

// steady returns an enforce-mode ring with generation 1 active since t0.
func steady(t *testing.T, names ...string) *Ring {
	t.Helper()
	var r *Ring
	now := t0
	for range 4 {
		r = step(t, Input{Ring: r, Nodes: followers(r, names...), Target: api.ModeEnforce, Now: now}).Ring
	}
	if r.Mode != api.ModeEnforce || r.Active().Number != 1 {
		t.Fatalf("steady: %s", Summary(r))
	}
	return r
}

func TestWholeRotation(t *testing.T) {
	names := []string{"a", "b", "c"}
	r := steady(t, names...)
	cfg := testConfig()
	created := r.Active().Created

	// Not yet due: nothing changes, and the master is told when to wake.
	res := step(t, Input{Ring: r, Nodes: followers(r, names...), Target: api.ModeEnforce, Now: created.Add(11 * time.Hour)})
	if res.Changed || !res.Wake.Equal(created.Add(cfg.RotateInterval)) {
		t.Fatalf("before interval: changed=%v wake=%v", res.Changed, res.Wake)
	}
	// Due: generation 2 pending.
	now := created.Add(12 * time.Hour)
	res = step(t, Input{Ring: r, Nodes: followers(r, names...), Target: api.ModeEnforce, Now: now})
	r = res.Ring
	if p := r.Pending(); p == nil || p.Number != 2 || p.Reason != "interval" || !res.RotationInProgress {
		t.Fatalf("interval rotation: %s %v", Summary(r), kinds(res))
	}
	if r.Generation(2).Root.Equal(r.Generation(1).Root) {
		t.Fatal("new generation reuses the root")
	}
	// Agents still report only generation 1; the same input again must not rotate twice.
	old := followers(r, names...)
	for i := range old {
		old[i].Report.Generations = []uint32{1}
	}
	for range 3 {
		now = now.Add(time.Minute)
		res = step(t, Input{Ring: r, Nodes: old, Target: api.ModeEnforce, Now: now})
		if res.Changed || len(res.Lagging) != 3 || res.Waiting == "" {
			t.Fatalf("pending should hold: changed=%v lagging=%v %v", res.Changed, res.Lagging, kinds(res))
		}
	}
	// Two of three ready: still held by c.
	nodes := followers(r, names...)
	nodes[2].Report.Generations = []uint32{1}
	res = step(t, Input{Ring: r, Nodes: nodes, Target: api.ModeEnforce, Now: now})
	if res.Changed || !slices.Equal(lagNames(res.Lagging), []string{"c"}) {
		t.Fatalf("c should hold the switch: %v", res.Lagging)
	}
	// All ready: 2 active, 1 retiring.
	res = step(t, Input{Ring: r, Nodes: followers(r, names...), Target: api.ModeEnforce, Now: now})
	r = res.Ring
	if r.Active().Number != 2 || r.Generation(1).State != StateRetiring || !res.Wake.Equal(now.Add(cfg.Grace)) {
		t.Fatalf("switch: %s wake %v", Summary(r), res.Wake)
	}
	// While a node still sends with 1, nothing happens within grace; after grace 1 is
	// removed whatever the nodes report.
	lagging := followers(r, names...)
	lagging[1].Report.Sending = []uint32{1}
	res = step(t, Input{Ring: r, Nodes: lagging, Target: api.ModeEnforce, Now: now.Add(cfg.Grace - time.Second)})
	if res.Changed || !slices.Equal(lagNames(res.Lagging), []string{"b"}) || !strings.Contains(res.Waiting, "stop sending with retiring generation 1") {
		t.Fatalf("changed within grace: %v lagging %v waiting %q", kinds(res), res.Lagging, res.Waiting)
	}
	res = step(t, Input{Ring: r, Nodes: lagging, Target: api.ModeEnforce, Now: now.Add(cfg.Grace)})
	r = res.Ring
	if !slices.Equal(r.Numbers(), []uint32{2}) || res.RotationInProgress || r.LastGeneration != 2 || res.Waiting != "" {
		t.Fatalf("after grace: %s", Summary(r))
	}
	// The next interval counts from generation 2's creation.
	if res.Wake != r.Active().Created.Add(cfg.RotateInterval) {
		t.Fatalf("next wake %v", res.Wake)
	}
}

func TestRotateRequest(t *testing.T) {
	names := []string{"a", "b"}
	r := steady(t, names...)
	now := t0.Add(time.Hour)
	res := step(t, Input{Ring: r, Nodes: followers(r, names...), Target: api.ModeEnforce, RotateRequest: "req-1", Now: now})
	r = res.Ring
	if p := r.Pending(); p == nil || p.Reason != "request" || r.LastRotateRequest != "req-1" {
		t.Fatalf("request: %s %v", Summary(r), kinds(res))
	}
	// A second request while pending is deferred, not merged and not lost.
	stuck := followers(r, names...)
	for i := range stuck {
		stuck[i].Report.Generations = []uint32{1}
	}
	res = step(t, Input{Ring: r, Nodes: stuck, Target: api.ModeEnforce, RotateRequest: "req-2", Now: now})
	if res.Changed || !strings.Contains(res.Deferred, "pending generation 2") {
		t.Fatalf("second request: changed=%v deferred=%q", res.Changed, res.Deferred)
	}
	// Activation; then the deferred request starts generation 3 in the same step.
	res = step(t, Input{Ring: r, Nodes: followers(r, names...), Target: api.ModeEnforce, RotateRequest: "req-2", Now: now})
	r = res.Ring
	if r.Active().Number != 2 || r.Pending() == nil || r.Pending().Number != 3 || r.LastRotateRequest != "req-2" {
		t.Fatalf("after activation: %s %v", Summary(r), kinds(res))
	}
	// Three live generations: a further rotation waits for the retiring one to go.
	res = step(t, Input{Ring: r, Nodes: followers(r, names...), Target: api.ModeEnforce, RotateRequest: "req-3", Now: now})
	r = res.Ring
	if r.Active().Number != 3 || len(r.Generations) != 3 || !strings.Contains(res.Deferred, "retiring") {
		t.Fatalf("three live: %s deferred=%q %v", Summary(r), res.Deferred, kinds(res))
	}
	res = step(t, Input{Ring: r, Nodes: followers(r, names...), Target: api.ModeEnforce, RotateRequest: "req-3", Now: now.Add(time.Hour)})
	r = res.Ring
	if !slices.Equal(r.Numbers(), []uint32{3, 4}) || r.Pending().Number != 4 {
		t.Fatalf("after grace: %s %v", Summary(r), kinds(res))
	}
	// The same request ID never rotates again.
	r = step(t, Input{Ring: r, Nodes: followers(r, names...), Target: api.ModeEnforce, RotateRequest: "req-3", Now: now.Add(2 * time.Hour)}).Ring
	res = step(t, Input{Ring: r, Nodes: followers(r, names...), Target: api.ModeEnforce, RotateRequest: "req-3", Now: now.Add(3 * time.Hour)})
	if res.Ring.LastGeneration != 4 {
		t.Fatalf("request handled twice: %s", Summary(res.Ring))
	}
}

func TestSequenceThreshold(t *testing.T) {
	names := []string{"a", "b"}
	r := steady(t, names...)
	nodes := followers(r, names...)
	nodes[1].Report.MaxSeqFraction, nodes[1].Report.SeqGeneration = 0.49, 1
	if res := step(t, Input{Ring: r, Nodes: nodes, Target: api.ModeEnforce, Now: t0.Add(time.Hour)}); res.Changed {
		t.Fatal("rotated below the threshold")
	}
	nodes[1].Report.MaxSeqFraction = 0.5
	res := step(t, Input{Ring: r, Nodes: nodes, Target: api.ModeEnforce, Now: t0.Add(time.Hour)})
	if p := res.Ring.Pending(); p == nil || p.Reason != "sequence" {
		t.Fatalf("no early rotation: %v", kinds(res))
	}
	// After the switch, a high count on the retiring generation does not rotate again.
	r = step(t, Input{Ring: res.Ring, Nodes: followers(res.Ring, names...), Target: api.ModeEnforce, Now: t0.Add(time.Hour)}).Ring
	nodes = followers(r, names...)
	nodes[0].Report.MaxSeqFraction, nodes[0].Report.SeqGeneration = 0.9, 1
	nodes[1].Report.MaxSeqFraction = 0.9 // generation unknown while one is retiring
	if res := step(t, Input{Ring: r, Nodes: nodes, Target: api.ModeEnforce, Now: t0.Add(time.Hour)}); res.Ring.Pending() != nil {
		t.Fatalf("rotated again for the retiring generation: %v", kinds(res))
	}
}

// One node's sequence claims force at most one early rotation per SeqMinInterval: a claim
// against a younger generation is deferred (naming the node, waking when it may proceed),
// and the rotation it then starts names the node too.
func TestSequenceRotationRateLimited(t *testing.T) {
	names := []string{"a", "b"}
	cfg := testConfig()
	cfg.SeqMinInterval = 10 * time.Minute
	r := steady(t, names...) // generation 1 created at t0
	claim := func(r *Ring) []NodeState {
		nodes := followers(r, names...)
		nodes[1].Report.MaxSeqFraction, nodes[1].Report.SeqGeneration = 0.99, r.Active().Number
		return nodes
	}
	cases := []struct {
		at     time.Duration
		rotate bool
	}{
		{0, false}, {time.Minute, false}, {10*time.Minute - time.Second, false}, {10 * time.Minute, true}, {time.Hour, true},
	}
	for _, c := range cases {
		res := step(t, Input{Ring: r, Nodes: claim(r), Target: api.ModeEnforce, Now: t0.Add(c.at), Config: cfg})
		if got := res.Ring.Pending() != nil; got != c.rotate {
			t.Fatalf("at t0+%s: rotation started %v, want %v (%v, deferred %q)", c.at, got, c.rotate, kinds(res), res.Deferred)
		}
		if !c.rotate {
			want := t0.Add(10 * time.Minute)
			if !strings.Contains(res.Deferred, "reported by b") || !res.Wake.Equal(want) {
				t.Fatalf("at t0+%s: deferred %q wake %s, want it to name node b and wake at %s", c.at, res.Deferred, res.Wake, want)
			}
			continue
		}
		if ks := kinds(res); !slices.Contains(ks, "generation 2 created (sequence, reported by node b)") {
			t.Fatalf("at t0+%s: actions %v do not name the claimant", c.at, ks)
		}
	}
	// A claimant that keeps claiming after its rotation completes waits a full interval
	// again, measured from the new generation's creation.
	at := t0.Add(10 * time.Minute)
	res := step(t, Input{Ring: r, Nodes: claim(r), Target: api.ModeEnforce, Now: at, Config: cfg})
	r = step(t, Input{Ring: res.Ring, Nodes: followers(res.Ring, names...), Target: api.ModeEnforce, Now: at, Config: cfg}).Ring
	if r.Active().Number != 2 {
		t.Fatalf("generation 2 not active: %s", Summary(r))
	}
	// Let generation 1 drain and leave.
	r = step(t, Input{Ring: r, Nodes: followers(r, names...), Target: api.ModeEnforce, Now: at.Add(time.Minute), Config: cfg}).Ring
	if len(r.Generations) != 1 {
		t.Fatalf("retiring generation did not leave: %s", Summary(r))
	}
	for _, d := range []time.Duration{time.Minute, 9 * time.Minute} {
		if res := step(t, Input{Ring: r, Nodes: claim(r), Target: api.ModeEnforce, Now: at.Add(d), Config: cfg}); res.Ring.Pending() != nil {
			t.Fatalf("second early rotation %s after the first: %v", d, kinds(res))
		}
	}
	if res := step(t, Input{Ring: r, Nodes: claim(r), Target: api.ModeEnforce, Now: at.Add(10 * time.Minute), Config: cfg}); res.Ring.Pending() == nil {
		t.Fatalf("no rotation once generation 2 is seq-min-interval old: deferred %q", res.Deferred)
	}
	// Interval and request rotations are not bounded by it.
	cfg.RotateInterval = 5 * time.Minute
	if res := step(t, Input{Ring: r, Nodes: followers(r, names...), Target: api.ModeEnforce, Now: at.Add(5 * time.Minute), Config: cfg}); res.Ring.Pending() == nil {
		t.Fatal("interval rotation held by seq-min-interval")
	}
	if res := step(t, Input{Ring: r, Nodes: followers(r, names...), Target: api.ModeEnforce, RotateRequest: "op-1", Now: at.Add(time.Minute), Config: cfg}); res.Ring.Pending() == nil {
		t.Fatal("requested rotation held by seq-min-interval")
	}
}

// A sequence claim is checked against the peers' inbound counters where they report them:
// unconfirmed, it starts no rotation and the status says why; confirmed by another live
// node's counters (within SeqConfirmSlack, same generation), it does; reported by no
// other node (agents of 0.1), the claim is taken alone.
func TestSequenceClaimConfirmedByPeers(t *testing.T) {
	names := []string{"a", "b", "c"}
	cfg := testConfig()
	r := steady(t, names...)
	g := r.Active().Number
	f := func(v float64) *float64 { return &v }
	cases := []struct {
		name   string
		in     map[string]*float64 // node → maxInSeqFraction (nil: not reported)
		inGen  uint32
		excl   string // a node NotReady past the node timeout
		rotate bool
	}{
		{"no peer reports inbound counters (0.1): the claim alone", nil, g, "", true},
		{"peers' counters far below the claim", map[string]*float64{"a": f(0.1), "c": f(0.3)}, g, "", false},
		{"a peer's counters within the slack", map[string]*float64{"a": f(0.1), "c": f(0.88)}, g, "", true},
		{"a peer's counters above", map[string]*float64{"a": f(0.95)}, g, "", true},
		{"confirming counters of another generation", map[string]*float64{"a": f(0.95), "c": f(0.2)}, g + 1, "", false},
		{"the claimant's own inbound counters do not count", map[string]*float64{"b": f(0.99), "a": f(0.1)}, g, "", false},
		{"an excluded node's counters do not count", map[string]*float64{"c": f(0.95), "a": f(0.1)}, g, "c", false},
		{"0 reported is a report", map[string]*float64{"a": f(0), "c": f(0)}, g, "", false},
	}
	for _, c := range cases {
		nodes := followers(r, names...)
		for i := range nodes {
			if v, ok := c.in[nodes[i].Name]; ok {
				nodes[i].Report.MaxInSeqFraction, nodes[i].Report.InSeqGeneration = v, c.inGen
			}
			if nodes[i].Name == c.excl {
				nodes[i].Ready, nodes[i].NotReadySince = false, t0.Add(-time.Hour)
			}
			if nodes[i].Name == "b" {
				nodes[i].Report.MaxSeqFraction, nodes[i].Report.SeqGeneration = 0.9, g
			}
		}
		res := step(t, Input{Ring: r, Nodes: nodes, Target: api.ModeEnforce, Now: t0.Add(time.Hour), Config: cfg})
		if got := res.Ring.Pending() != nil; got != c.rotate {
			t.Errorf("%s: rotation started %v, want %v (deferred %q)", c.name, got, c.rotate, res.Deferred)
			continue
		}
		if !c.rotate && !strings.Contains(res.Deferred, "reported by b: 0.90 of generation 1) waits for a peer's inbound counters to confirm it") {
			t.Errorf("%s: deferred %q does not say the claim waits for confirmation", c.name, res.Deferred)
		}
	}
}

func TestDepartedNodeIDHeldWhileGenerationsLive(t *testing.T) {
	r := steady(t, "a", "b", "c")
	idB := r.NodeID("b")
	// b leaves: its ID is held (generation 1 saw it), a newcomer gets a new ID.
	res := step(t, Input{Ring: r, Nodes: followers(r, "a", "c", "d"), Target: api.ModeEnforce, Now: t0.Add(time.Hour)})
	r = res.Ring
	if r.NodeID("b") != 0 || r.NodeID("d") == idB || r.NodeID("d") == 0 {
		t.Fatalf("ids after b left: %+v", r.Nodes)
	}
	// Rotate 1 -> 2 and let 1 retire: b's ID is freed and the next newcomer may take it.
	r = step(t, Input{Ring: r, Nodes: followers(r, "a", "c", "d"), Target: api.ModeEnforce, RotateRequest: "x", Now: t0.Add(time.Hour)}).Ring
	r = step(t, Input{Ring: r, Nodes: followers(r, "a", "c", "d"), Target: api.ModeEnforce, RotateRequest: "x", Now: t0.Add(time.Hour)}).Ring
	if len(r.Nodes) != 4 {
		t.Fatalf("b's id freed while generation 1 is retiring: %+v", r.Nodes)
	}
	res = step(t, Input{Ring: r, Nodes: followers(r, "a", "c", "d", "e"), Target: api.ModeEnforce, RotateRequest: "x", Now: t0.Add(2 * time.Hour)})
	if res.Ring.NodeID("e") != idB {
		t.Fatalf("freed id not reused: %+v %v", res.Ring.Nodes, kinds(res))
	}
	// A node that comes back while its ID is held gets the same ID.
	r = steady(t, "a", "b")
	r = step(t, Input{Ring: r, Nodes: followers(r, "a"), Target: api.ModeEnforce, Now: t0.Add(time.Hour)}).Ring
	r2 := step(t, Input{Ring: r, Nodes: followers(r, "a", "b"), Target: api.ModeEnforce, Now: t0.Add(time.Hour)}).Ring
	if r2.NodeID("b") != 2 {
		t.Fatalf("returning node got id %d", r2.NodeID("b"))
	}
}

func TestStepErrors(t *testing.T) {
	_, err := Step(Input{Nodes: followers(nil, "a"), Target: api.ModeEnforce, Now: t0, Config: testConfig(),
		Rand: iotest.ErrReader(errors.New("no entropy"))})
	if err == nil || !strings.Contains(err.Error(), "create generation 1") {
		t.Fatalf("entropy failure: %v", err)
	}
	bad := sampleRing()
	bad.Generations[0].Root = bad.Generations[0].Root[:3]
	if _, err := Step(Input{Ring: bad, Target: api.ModeEnforce, Now: t0, Config: testConfig(), Rand: rand.Reader}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("invalid ring accepted: %v", err)
	}
	if _, err := Step(Input{Target: "on", Now: t0, Config: testConfig(), Rand: rand.Reader}); err == nil {
		t.Fatal("invalid target accepted")
	}
}

// TestStepDeterministic: Step is a pure function of its input.
func TestStepDeterministic(t *testing.T) {
	in := Input{Nodes: followers(nil, "a", "b"), Target: api.ModeEnforce, Now: t0, Config: testConfig()}
	var outs []string
	for range 2 {
		in.Rand = bytes.NewReader(bytes.Repeat([]byte{7}, 64))
		res, err := Step(in)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := Marshal(res.Ring)
		outs = append(outs, fmt.Sprint(string(b), kinds(res)))
	}
	if outs[0] != outs[1] {
		t.Fatal("same input, different output")
	}
}

// TestRetiringLeavesWhenNoNodeSendsWithIt: a retiring generation leaves as soon as every
// live node reports it no longer sends with it and the drain time is over — not before,
// and never on the word of a node that cannot say (an agent without the sending field).
func TestRetiringLeavesWhenNoNodeSendsWithIt(t *testing.T) {
	names := []string{"a", "b", "c", "d"}
	cfg := testConfig()
	r := steady(t, names...)
	now := t0.Add(time.Hour)
	r = step(t, Input{Ring: r, Nodes: followers(r, names...), Target: api.ModeEnforce, RotateRequest: "x", Now: now}).Ring
	r = step(t, Input{Ring: r, Nodes: followers(r, names...), Target: api.ModeEnforce, RotateRequest: "x", Now: now}).Ring
	if r.Active().Number != 2 || r.Generation(1).State != StateRetiring {
		t.Fatalf("switch: %s", Summary(r))
	}
	switched := r.Generation(1).Retiring
	type tc struct {
		name   string
		mutate func([]NodeState)
		at     time.Duration
		kept   bool
		lag    []string
	}
	for _, c := range []tc{
		{"every node switched, drain not over", nil, cfg.Drain - time.Second, true, nil},
		{"every node switched, drain over", nil, cfg.Drain, false, nil},
		{"one node still sends with 1", func(n []NodeState) { n[2].Report.Sending = []uint32{1, 2} }, time.Minute, true, []string{"c"}},
		{"old agent: no sending field but encrypts", func(n []NodeState) { n[0].Report.Sending = nil }, time.Minute, true, []string{"a"}},
		{"node that encrypts to no peer", func(n []NodeState) { n[0].Report.Sending, n[0].Report.PeersEncrypted = nil, 0 }, cfg.Drain, false, nil},
		{"node without a report", func(n []NodeState) { n[3].Report = nil }, time.Minute, true, []string{"d"}},
		{"report from a previous boot", func(n []NodeState) { n[3].BootID = "rebooted" }, time.Minute, true, []string{"d"}},
		{"node NotReady past the timeout does not hold", func(n []NodeState) {
			n[3].Report.Sending, n[3].Ready, n[3].NotReadySince = []uint32{1}, false, now.Add(-cfg.NodeTimeout)
		}, cfg.Drain, false, nil},
		{"stuck node, grace over", func(n []NodeState) { n[2].Report.Sending = []uint32{1} }, cfg.Grace, false, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			nodes := followers(r, names...)
			if c.mutate != nil {
				c.mutate(nodes)
			}
			res := step(t, Input{Ring: r, Nodes: nodes, Target: api.ModeEnforce, RotateRequest: "x", Now: switched.Add(c.at)})
			if got := res.Ring.Generation(1) != nil; got != c.kept {
				t.Fatalf("generation 1 kept=%v, want %v: %v", got, c.kept, kinds(res))
			}
			if !slices.Equal(lagNames(res.Lagging), c.lag) {
				t.Fatalf("lagging %v, want %v (waiting %q)", res.Lagging, c.lag, res.Waiting)
			}
			if c.kept && len(c.lag) == 0 && !res.Wake.Equal(switched.Add(cfg.Drain)) {
				t.Fatalf("wake %v, want the end of the drain %v", res.Wake, switched.Add(cfg.Drain))
			}
		})
	}
}

// TestAckTimeoutBoundsOneReadyNode: a Ready node that lags holds a step for at most the
// ack timeout, counted from when it first lagged without a break (carried from Step to
// Step in LagSince); then it is excluded, named with its reason, and the cluster goes on
// — through the following steps too while it still lags. A node that catches up starts a
// fresh wait the next time it lags; NotReady nodes stay under the node timeout.
func TestAckTimeoutBoundsOneReadyNode(t *testing.T) {
	cfg := testConfig()
	cfg.AckTimeout = 5 * time.Minute
	names := []string{"a", "b", "c"}

	// Enable with c stuck at off: accept waits for it, then all of enable goes on.
	var ring *Ring
	var since map[string]time.Time
	now := t0
	stuck := follower("c", nil)
	run := func(nodes func() []NodeState) Result {
		res := step(t, Input{Ring: ring, Nodes: nodes(), Target: api.ModeEnforce, Now: now, Config: cfg, LagSince: since})
		ring, since = res.Ring, res.LagSince
		return res
	}
	withStuck := func() []NodeState { return append(followers(ring, "a", "b"), stuck) }
	res := run(withStuck) // off → accept, generation 1
	res = run(withStuck)
	if ring.Mode != api.ModeAccept || !slices.Equal(lagNames(res.Lagging), []string{"c"}) || len(res.Excluded) != 0 {
		t.Fatalf("first wait: mode %s lagging %v excluded %v", ring.Mode, res.Lagging, res.Excluded)
	}
	if !since["c"].Equal(t0) || !res.Wake.Equal(t0.Add(cfg.AckTimeout)) {
		t.Fatalf("lag since %v wake %v, want %v and %v", since, res.Wake, t0, t0.Add(cfg.AckTimeout))
	}
	now = t0.Add(cfg.AckTimeout - time.Second)
	if res = run(withStuck); ring.Mode != api.ModeAccept || !since["c"].Equal(t0) {
		t.Fatalf("before the ack timeout: mode %s since %v", ring.Mode, since)
	}
	now = t0.Add(cfg.AckTimeout)
	res = run(withStuck)
	if ring.Mode != api.ModeEncrypt || len(res.Excluded) != 1 || res.Excluded[0].Node != "c" ||
		!strings.Contains(res.Excluded[0].Reason, "ack-timeout 5m0s") || !strings.Contains(res.Excluded[0].Reason, "report mode accept") {
		t.Fatalf("at the ack timeout: mode %s excluded %v lagging %v", ring.Mode, res.Excluded, res.Lagging)
	}
	// Still lagging without a break: the next step does not wait for it again.
	now = now.Add(time.Second)
	if res = run(withStuck); ring.Mode != api.ModeEnforce || len(res.Lagging) != 0 || len(res.Excluded) != 1 {
		t.Fatalf("next step: mode %s lagging %v excluded %v", ring.Mode, res.Lagging, res.Excluded)
	}

	// c catches up: no longer excluded, nothing carried.
	now = now.Add(time.Second)
	res = run(func() []NodeState { return followers(ring, names...) })
	if len(res.Excluded) != 0 || len(since) != 0 {
		t.Fatalf("caught up: excluded %v since %v", res.Excluded, since)
	}

	// A rotation: c stops acknowledging; the pending generation waits the ack timeout
	// from now, not from c's earlier lag.
	start := now
	res = step(t, Input{Ring: ring, Nodes: followers(ring, names...), Target: api.ModeEnforce, RotateRequest: "r1", Now: now, Config: cfg})
	ring, since = res.Ring, res.LagSince
	stuck = follower("c", ring)
	stuck.Report.Generations = []uint32{1}
	now = now.Add(time.Second)
	res = run(withStuck)
	if p := ring.Pending(); p == nil || !slices.Equal(lagNames(res.Lagging), []string{"c"}) || !since["c"].Equal(start) {
		t.Fatalf("rotation wait: %s lagging %v since %v", Summary(ring), res.Lagging, since)
	}
	now = start.Add(cfg.AckTimeout - time.Second)
	if res = run(withStuck); ring.Pending() == nil {
		t.Fatalf("rotation before the ack timeout: %s", Summary(ring))
	}
	now = start.Add(cfg.AckTimeout)
	res = run(withStuck)
	if a := ring.Active(); a.Number != 2 || len(res.Excluded) != 1 || !strings.Contains(res.Excluded[0].Reason, "generation 2 not installed") {
		t.Fatalf("rotation at the ack timeout (started %v): %s excluded %v", start, Summary(ring), res.Excluded)
	}
	// Settled without it: still behind, so still named.
	now = now.Add(time.Hour)
	if res = run(withStuck); len(ring.Generations) != 1 || len(res.Excluded) != 1 || res.Excluded[0].Node != "c" {
		t.Fatalf("settled, c still behind: %s excluded %v", Summary(ring), res.Excluded)
	}

	// Not Ready: the node timeout rules, whatever the ack timeout says.
	cfg.AckTimeout = time.Second
	down := follower("c", nil)
	down.Ready, down.NotReadySince = false, now
	res = step(t, Input{Ring: ring, Nodes: append(followers(ring, "a", "b"), down), Target: api.ModeEnforce, RotateRequest: "r2",
		Now: now, Config: cfg, LagSince: map[string]time.Time{"c": now.Add(-time.Hour)}})
	res = step(t, Input{Ring: res.Ring, Nodes: append(followers(res.Ring, "a", "b"), down), Target: api.ModeEnforce,
		Now: now.Add(time.Minute), Config: cfg, LagSince: res.LagSince})
	if res.Ring.Pending() == nil || len(res.Excluded) != 0 || !slices.Equal(lagNames(res.Lagging), []string{"c"}) {
		t.Fatalf("NotReady under the node timeout: %s lagging %v excluded %v", Summary(res.Ring), res.Lagging, res.Excluded)
	}

	// Disabled (0): a lagging Ready node holds the step indefinitely, as before.
	cfg.AckTimeout = 0
	res = step(t, Input{Ring: res.Ring, Nodes: append(followers(res.Ring, "a", "b"), stuck), Target: api.ModeEnforce,
		Now: now.Add(24 * time.Hour), Config: cfg, LagSince: map[string]time.Time{"c": t0}})
	if res.Ring.Pending() == nil || len(res.Excluded) != 0 {
		t.Fatalf("ack timeout 0: %s excluded %v", Summary(res.Ring), res.Excluded)
	}
}
