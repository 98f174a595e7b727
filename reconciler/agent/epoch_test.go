package agent

import (
	"context"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/rules"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
	"github.com/secureoverlay/secureoverlay/reconciler/xfrm"
)

// The three ways an SA used to come back under a key it had used (docs/keys.md,
// "Incarnations and epochs"). Each test runs the real applier on the fake kernel, which
// remembers every key it was ever given: no key may be installed twice in a whole run.

// epochEnv is node a in accept mode with peer b (and c) reporting; the watcher runs, the
// test drives Sync itself.
func epochEnv(t *testing.T) (*env, context.Context) {
	t.Helper()
	e := newEnv(t, api.ModeAccept, Config{})
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go e.src.Run(ctx)
	waitFor(t, "synced", e.src.HasSynced)
	return e, ctx
}

func (e *env) sync(ctx context.Context) {
	e.t.Helper()
	for range 3 { // a partial sync that would publish hands over to a full one
		if err := e.a.Sync(ctx); err != nil {
			e.t.Fatal(err)
		}
		if !e.a.full.Load() {
			return
		}
	}
}

// restart replaces the agent by a new process's (new applier, same kernel and API).
func (e *env) restart() {
	e.t.Helper()
	var err error
	e.a.Close() // the old process is gone (its ledger file handle with it)
	e.m = NewMetrics(filepath.Join(e.t.TempDir(), "missing-xfrm_stat"))
	e.a, err = New(e.a.cfg, Deps{Client: e.cs, Source: e.src, Xfrm: xfrm.NewApplier(e.xk, e.a.cfg.Dataplane),
		Rules: rules.NewApplier(e.rk), Metrics: e.m, Now: func() time.Time { return time.Unix(0, e.now.Load()) }})
	if err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) ourStates() int {
	s, _ := e.xk.Snapshot()
	return len(s)
}

func noKeyReused(t *testing.T, f *xfrm.Fake) {
	t.Helper()
	if r := f.ReusedKeys(); len(r) != 0 {
		t.Fatalf("SAs re-created under a key they used before: %v", r)
	}
}

func TestEpochAdoptedAcrossCleanRestart(t *testing.T) {
	e, ctx := epochEnv(t)
	e.sync(ctx)
	r := e.report()
	if r.Epoch != "e-a" || r.UID != "uid-a" || r.InboundFrom["b"] != testTag("b", "boot-b") || e.ourStates() != 2 {
		t.Fatalf("first report %+v, %d states", r, e.ourStates())
	}
	e.restart()
	log := len(e.xk.Log)
	e.sync(ctx)
	if got := e.a.Epoch(); got != "e-a" {
		t.Errorf("epoch after a clean restart = %q, want e-a (adopted)", got)
	}
	if w := e.xk.Log[log:]; len(w) != 0 {
		t.Errorf("a clean restart wrote %v, want nothing (adopt)", w)
	}
	if v := value(e.m.Epochs.WithLabelValues("adopted")); v != 1 {
		t.Errorf("adopted epochs = %v", v)
	}
	noKeyReused(t, e.xk)
}

// Case 1: another tool flushes our xfrm states; the resync must not re-add them under the
// same keys but change epoch (every key of the node changes).
func TestEpochChangesWhenStatesAreFlushed(t *testing.T) {
	e, ctx := epochEnv(t)
	e.sync(ctx)
	before := e.report()
	if e.ourStates() != 2 {
		t.Fatalf("states = %d", e.ourStates())
	}
	e.xk.Remove("state", func(string) bool { return true }) // ip xfrm state flush
	e.a.Resync()
	e.sync(ctx)
	after := e.report()
	if e.ourStates() != 2 || after.Epoch == "" || after.Epoch == before.Epoch || after.Error != "" {
		t.Fatalf("after the flush: %d states, report %+v (before: epoch %s)", e.ourStates(), after, before.Epoch)
	}
	if e.a.Epoch() != after.Epoch || value(e.m.Epochs.WithLabelValues("lost")) != 1 {
		t.Errorf("agent epoch %q, report %q, lost epochs %v", e.a.Epoch(), after.Epoch, value(e.m.Epochs.WithLabelValues("lost")))
	}
	// The peer's tag is about the peer: unchanged. Peers see a's new epoch and re-key.
	if after.InboundFrom["b"] != testTag("b", "boot-b") {
		t.Errorf("inboundFrom after the flush = %v", after.InboundFrom)
	}
	// Flushing only one SA (a partial loss) changes the epoch too.
	s, _ := e.xk.Snapshot()
	e.xk.Remove("state", func(id string) bool { return id == s[0].SA.ID() })
	e.a.Resync()
	e.sync(ctx)
	if third := e.report(); third.Epoch == after.Epoch || e.ourStates() != 2 {
		t.Errorf("after losing one SA: epoch %s (was %s), %d states", third.Epoch, after.Epoch, e.ourStates())
	}
	noKeyReused(t, e.xk)
	if n := e.xk.KeysAdded(); n != 6 {
		t.Errorf("distinct keys = %d, want 6 (2 per epoch)", n)
	}
}

// Case 2: `secureoverlay-agent cleanup` (or the uninstall walk-down) removes everything,
// then an agent starts again with the same ring and boot IDs and its old report on the
// Node: the report's claimed SAs are missing, so it takes a new epoch.
func TestEpochChangesAfterCleanupAndRestart(t *testing.T) {
	e, ctx := epochEnv(t)
	e.sync(ctx)
	if e.ourStates() != 2 {
		t.Fatalf("states = %d", e.ourStates())
	}
	if _, err := xfrm.NewApplier(e.xk, e.a.cfg.Dataplane).Cleanup(); err != nil { // the cleanup command
		t.Fatal(err)
	}
	if e.ourStates() != 0 {
		t.Fatal("cleanup left states")
	}
	e.restart()
	e.sync(ctx)
	r := e.report()
	if r.Epoch == "e-a" || e.ourStates() != 2 || r.Error != "" || r.InboundFrom["b"] == "" {
		t.Fatalf("after cleanup and restart: report %+v, %d states", r, e.ourStates())
	}
	noKeyReused(t, e.xk)
}

// Case 3: a peer's Node object is deleted and re-created (kubelet re-registers) without a
// reboot: same name, IP and boot ID, even the same epoch in a copied report. Its new UID
// makes its old report stale and gives the pair new keys.
func TestPeerNodeRecreatedGetsNewKeys(t *testing.T) {
	e, ctx := epochEnv(t)
	e.sync(ctx)
	if e.ourStates() != 2 {
		t.Fatalf("states = %d", e.ourStates())
	}
	if err := e.cs.CoreV1().Nodes().Delete(ctx, "b", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b gone from the cache", func() bool { s := e.src.Snapshot(); return s.Node("b") == nil })
	e.sync(ctx)
	if e.ourStates() != 0 {
		t.Fatalf("states for a deleted peer: %d", e.ourStates())
	}
	// Re-created with its old report annotation copied over (old UID): stale, nothing.
	nb := testNode("b", "198.18.0.2", "boot-b")
	nb.UID = types.UID("uid-b2")
	if _, err := e.cs.CoreV1().Nodes().Create(ctx, nb, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b back in the cache", func() bool { s := e.src.Snapshot(); return s.Node("b") != nil })
	e.sync(ctx)
	if e.ourStates() != 0 {
		t.Fatalf("states derived from a stale report (old uid): %d", e.ourStates())
	}
	// b's agent publishes for its new Node object, with the same epoch even.
	rep, _ := json.Marshal(watch.Report{NodeReport: api.NodeReport{Mode: api.ModeOff, Incarnation: "boot-b", UID: "uid-b2", Epoch: "e-b"}})
	setAnnotation(t, e, "b", string(rep))
	e.sync(ctx)
	r := e.report()
	if e.ourStates() != 2 || r.InboundFrom["b"] != watch.IncarnationTag(watch.KeyIncarnation("boot-b", "uid-b2", "e-b")) {
		t.Fatalf("after b's new report: %d states, report %+v", e.ourStates(), r)
	}
	noKeyReused(t, e.xk)
	if n := e.xk.KeysAdded(); n != 4 {
		t.Errorf("distinct keys = %d, want 4", n)
	}
}

// A peer that disappears and comes back with the same key incarnation (its report flapped)
// would get its old keys back: the applier refuses, and this node changes epoch instead.
func TestPeerFlapChangesEpochNotKeys(t *testing.T) {
	e, ctx := epochEnv(t)
	e.sync(ctx)
	n, err := e.cs.CoreV1().Nodes().Get(ctx, "b", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	good := n.Annotations[api.ReportAnnotation]
	setAnnotation(t, e, "b", "{not json")
	e.sync(ctx)
	if e.ourStates() != 0 {
		t.Fatalf("states for a peer without a usable report: %d", e.ourStates())
	}
	setAnnotation(t, e, "b", good)
	e.sync(ctx)
	if e.ourStates() != 2 || e.a.Epoch() == "e-a" {
		t.Fatalf("after the flap: %d states, epoch %s", e.ourStates(), e.a.Epoch())
	}
	noKeyReused(t, e.xk)
}

func setAnnotation(t *testing.T, e *env, name, value string) {
	t.Helper()
	ctx := context.Background()
	n, err := e.cs.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	n.Annotations[api.ReportAnnotation] = value
	if _, err := e.cs.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "annotation in cache", func() bool { s := e.src.Snapshot(); return s.Node(name).RawReport == e.cached(name, value) })
}

// After lost state in enforce mode the new epoch's keys are not ready at the peer yet, so
// the outbound policy to it goes; its outbound plaintext drop rule stays (fail closed)
// until the peer reports the new keys installed, then ESP resumes.
func TestLostStateFailsClosedUntilPeerReKeys(t *testing.T) {
	e := newEnv(t, api.ModeEnforce, Config{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go e.src.Run(ctx)
	waitFor(t, "synced", e.src.HasSynced)
	ready := func(selfInc string) string {
		tag := watch.IncarnationTag(selfInc)
		b, _ := json.Marshal(watch.Report{NodeReport: api.NodeReport{Mode: api.ModeEnforce, Incarnation: "boot-b", UID: "uid-b", Epoch: "e-b", Generations: []uint32{1}},
			InboundFrom: map[string]string{"a": tag}, EncryptingTo: map[string]string{"a": tag}})
		return string(b)
	}
	setAnnotation(t, e, "b", ready(testInc("a", "boot-a")))
	e.sync(ctx)
	outRule := func() bool {
		return strings.Contains(strings.Join(e.rk.Chain(rules.Table, rules.ChainOut), "\n"), "198.18.0.2")
	}
	outPolicy := func() bool {
		_, ps := e.xk.Snapshot()
		for _, p := range ps {
			if p.Policy.Dir == desired.Out {
				return true
			}
		}
		return false
	}
	if !outRule() || !outPolicy() {
		t.Fatalf("enforce toward b not programmed: rule %v policy %v", outRule(), outPolicy())
	}
	e.xk.Remove("state", func(string) bool { return true })
	e.a.Resync()
	e.sync(ctx)
	if e.a.Epoch() == "e-a" || outPolicy() || !outRule() {
		t.Fatalf("after losing the SAs: epoch %s, outbound policy %v (want none), drop rule %v (want kept)", e.a.Epoch(), outPolicy(), outRule())
	}
	if r := e.report(); r.Epoch != e.a.Epoch() || len(r.EncryptingTo) != 0 {
		t.Errorf("report after the new epoch: %+v", r)
	}
	// Still held on later syncs while b has not re-keyed.
	e.a.Resync()
	e.sync(ctx)
	if !outRule() {
		t.Fatal("hold released before b re-keyed")
	}
	// b installs the new keys and says so.
	setAnnotation(t, e, "b", ready(watch.KeyIncarnation("boot-a", "uid-a", e.a.Epoch())))
	e.sync(ctx)
	if !outPolicy() || !outRule() || len(e.a.hold) != 0 {
		t.Fatalf("after b re-keyed: policy %v rule %v hold %v", outPolicy(), outRule(), e.a.hold)
	}
	noKeyReused(t, e.xk)
}
