package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	k8stesting "k8s.io/client-go/testing"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
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

// putRing writes r as the key Secret and waits until the agent's cache holds it.
func putRing(t *testing.T, e *env, r *keys.Ring) {
	t.Helper()
	data, err := keys.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	putSecretData(t, e, data)
}

func putSecretData(t *testing.T, e *env, data []byte) {
	t.Helper()
	ctx := context.Background()
	sec, err := e.cs.CoreV1().Secrets(api.Namespace).Get(ctx, api.SecretName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	sec.Data[api.SecretDataKey] = data
	if _, err := e.cs.CoreV1().Secrets(api.Namespace).Update(ctx, sec, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "ring in cache", func() bool {
		s := e.src.Snapshot()
		r, perr := keys.Parse(data)
		return (perr != nil && s.RingErr != nil) || (s.Ring != nil && r != nil && s.Ring.LastGeneration == r.LastGeneration &&
			slices.Equal(s.Ring.Numbers(), r.Numbers()) && s.Ring.Mode == r.Mode)
	})
}

// currentRing is the ring the agent's cache holds.
func currentRing(t *testing.T, e *env) *keys.Ring {
	t.Helper()
	s := e.src.Snapshot()
	if s.Ring == nil {
		t.Fatalf("no ring: %v", s.RingErr)
	}
	return s.Ring.Clone()
}

// withPending returns r with generation LastGeneration+1 pending (a rotation starts).
func withPending(t *testing.T, r *keys.Ring) *keys.Ring {
	t.Helper()
	r = r.Clone()
	r.LastGeneration++
	root := make(keys.Key, keys.RootKeyBytes)
	root[0], root[1] = byte(r.LastGeneration), 0x5a
	r.Generations = append(r.Generations, keys.Generation{Number: r.LastGeneration, State: keys.StatePending, Cipher: keys.AES128GCM, ICVBytes: 8,
		Root: root, Reason: "request", Created: time.Date(2026, 1, 2, 0, 0, 0, 0, time.UTC)})
	return r
}

// Review case 1: the agent is killed between programming the kernel and publishing its
// report (here: the report patch of the sync that installed a new generation never
// lands), another tool flushes the states, the agent restarts. Its old report claims
// generation 1 only; the kernel lost generation 2's SAs. Adopting the epoch from the
// report re-created both under their old keys; the ledger remembers them.
func TestEpochKilledBeforeReportThenFlushThenRestart(t *testing.T) {
	e, ctx := epochEnv(t)
	e.sync(ctx)
	var dead atomic.Bool
	e.cs.PrependReactor("patch", "nodes", func(k8stesting.Action) (bool, runtime.Object, error) {
		if dead.Load() {
			return true, nil, errors.New("killed")
		}
		return false, nil, nil
	})
	putRing(t, e, withPending(t, currentRing(t, e)))
	dead.Store(true)
	_ = e.a.Sync(ctx) // the kernel gets generation 2; the report does not
	if e.ourStates() != 4 || slices.Contains(e.report().Generations, 2) {
		t.Fatalf("setup: %d states, report %v", e.ourStates(), e.report().Generations)
	}
	dead.Store(false)
	e.xk.Remove("state", func(string) bool { return true }) // ip xfrm state flush
	e.restart()
	e.sync(ctx)
	if e.ourStates() != 4 || e.a.Epoch() == "e-a" {
		t.Fatalf("after the restart: %d states, epoch %s (want 4 under a new epoch)", e.ourStates(), e.a.Epoch())
	}
	noKeyReused(t, e.xk)
}

// Review case 1, second form: cleanup (which leaves the ledger, as an old cleanup binary
// or a hand-run `ip xfrm state flush` would) and a restart with the report of an earlier
// sync: the keys the ledger recorded are refused and a new epoch is taken.
func TestEpochCleanupKeepsLedgerThenRestart(t *testing.T) {
	e, ctx := epochEnv(t)
	e.sync(ctx)
	putRing(t, e, withPending(t, currentRing(t, e)))
	e.sync(ctx)
	if _, err := xfrm.NewApplier(e.xk, e.a.cfg.Dataplane).Cleanup(); err != nil {
		t.Fatal(err)
	}
	e.restart()
	e.sync(ctx)
	if e.ourStates() != 4 || e.a.Epoch() == "e-a" {
		t.Fatalf("after cleanup and restart: %d states, epoch %s", e.ourStates(), e.a.Epoch())
	}
	noKeyReused(t, e.xk)
}

// Review case 2: peer b's report becomes unreadable (its SAs are removed), the agent
// restarts while b is skipped, then b's report comes back unchanged: the pair's old keys
// would be installed again.
func TestEpochPeerFlapAcrossRestart(t *testing.T) {
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
	e.restart()
	e.sync(ctx)
	setAnnotation(t, e, "b", good)
	e.sync(ctx)
	if e.ourStates() != 2 || e.a.Epoch() == "e-a" {
		t.Fatalf("after the flap across a restart: %d states, epoch %s", e.ourStates(), e.a.Epoch())
	}
	noKeyReused(t, e.xk)
}

// Review case 3: rotate 1 → 2, restart the agent, restore the pre-rotation Secret (a
// backup, GitOps, `kubectl apply` of an old copy). The restored ring is refused: no key
// is derived from it, the kernel keeps what it has, the refusal is logged, counted and
// reported; the newest ring is accepted again.
func TestEpochRestoredSecretIsRefused(t *testing.T) {
	e, ctx := epochEnv(t)
	e.sync(ctx)
	old, err := keys.Marshal(currentRing(t, e))
	if err != nil {
		t.Fatal(err)
	}
	r := withPending(t, currentRing(t, e))
	putRing(t, e, r)
	e.sync(ctx)
	now := time.Date(2026, 1, 3, 0, 0, 0, 0, time.UTC)
	r.Generations[0].State, r.Generations[0].Retiring = keys.StateRetiring, now
	r.Generations[1].State, r.Generations[1].Activated = keys.StateActive, now
	putRing(t, e, r)
	e.sync(ctx)
	newest := r.Clone()
	newest.Generations = newest.Generations[1:] // generation 1 removed
	putRing(t, e, newest)
	e.sync(ctx)
	e.restart()
	e.sync(ctx)
	log := len(e.xk.Log)
	putSecretData(t, e, old)
	err = e.a.Sync(ctx)
	if !errors.Is(err, keys.ErrRingWentBackwards) {
		t.Fatalf("sync with the restored Secret: %v, want ErrRingWentBackwards", err)
	}
	if w := e.xk.Log[log:]; len(w) != 0 {
		t.Fatalf("the restored ring reached the kernel: %v", w)
	}
	if v := value(e.m.RingRefused); v != 1 {
		t.Errorf("ring_refused_total = %v", v)
	}
	if rep := e.report(); !strings.Contains(rep.Error, "went backwards") || !slices.Equal(rep.Generations, []uint32{2}) {
		t.Errorf("report after the refusal: error %q, generations %v", rep.Error, rep.Generations)
	}
	putRing(t, e, newest) // the master writes its ring again
	e.sync(ctx)
	if rep := e.report(); rep.Error != "" || e.ourStates() != 2 {
		t.Errorf("after the newest ring is back: error %q, %d states", rep.Error, e.ourStates())
	}
	noKeyReused(t, e.xk)
}

// Review case 4 at the agent: node a-evil claims b's address. b keeps exactly what it had;
// a-evil gets nothing; the conflict is logged, counted and reported naming both nodes.
func TestAddressConflictKeepsTheHolder(t *testing.T) {
	e := newEnv(t, api.ModeEnforce, Config{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go e.src.Run(ctx)
	waitFor(t, "synced", e.src.HasSynced)
	tag := testTag("a", "boot-a")
	rep, _ := json.Marshal(watch.Report{NodeReport: api.NodeReport{Mode: api.ModeEnforce, Incarnation: "boot-b", UID: "uid-b", Epoch: "e-b", Generations: []uint32{1}},
		InboundFrom: map[string]string{"a": tag}, EncryptingTo: map[string]string{"a": tag}})
	setAnnotation(t, e, "b", string(rep))
	e.sync(ctx)
	before := kernelText(e)
	if !strings.Contains(before, "198.18.0.2") || !strings.Contains(strings.Join(e.rk.Chain(rules.Table, rules.ChainIn), "\n"), "198.18.0.2") {
		t.Fatalf("b not enforced before the conflict:\n%s", before)
	}
	evil := testNode("a-evil", "198.18.0.2", "boot-evil")
	evil.Annotations[api.ReportAnnotation] = strings.ReplaceAll(strings.ReplaceAll(string(rep), `"boot-b"`, `"boot-evil"`), `"uid-b"`, `"uid-a-evil"`)
	if _, err := e.cs.CoreV1().Nodes().Create(ctx, evil, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a-evil in the cache", func() bool { s := e.src.Snapshot(); return s.Node("a-evil") != nil })
	e.a.Resync()
	e.sync(ctx)
	if after := kernelText(e); after != before {
		t.Errorf("the kernel changed when a-evil claimed b's address:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	r := e.report()
	if !strings.Contains(r.Error, "198.18.0.2 claimed by nodes a-evil, b") {
		t.Errorf("report error %q does not name the conflict", r.Error)
	}
	if v := value(e.m.Conflicts); v != 1 {
		t.Errorf("address_conflicts = %v", v)
	}
	if err := e.cs.CoreV1().Nodes().Delete(ctx, "a-evil", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a-evil gone", func() bool { s := e.src.Snapshot(); return s.Node("a-evil") == nil })
	e.sync(ctx)
	if r := e.report(); r.Error != "" || value(e.m.Conflicts) != 0 {
		t.Errorf("after the conflict: error %q, conflicts %v", r.Error, value(e.m.Conflicts))
	}
	noKeyReused(t, e.xk)
}

// kernelText is the fake kernel's states, policies and rules as text.
func kernelText(e *env) string {
	sts, ps := e.xk.Snapshot()
	var b strings.Builder
	for _, s := range sts {
		fmt.Fprintf(&b, "%s\n", s.SA)
	}
	for _, p := range ps {
		fmt.Fprintf(&b, "%s\n", p.Policy)
	}
	for _, c := range []string{rules.ChainIn, rules.ChainOut} {
		fmt.Fprintf(&b, "%s\n", strings.Join(e.rk.Chain(rules.Table, c), "\n"))
	}
	return b.String()
}
