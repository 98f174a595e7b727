package agent

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/nodeview"
	"github.com/secureoverlay/secureoverlay/readiness"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/ledger"
	"github.com/secureoverlay/secureoverlay/reconciler/rules"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
)

// TestAddDecisions: the view and rows rule adds to a peer's current report what it
// confirms and the report does not state; peers without a current report, without an ID,
// and this node are left alone; the caller's nodes and reports are never modified.
func TestAddDecisions(t *testing.T) {
	rep := func(inc string, in, enc bool) *desired.Report {
		return &desired.Report{Incarnation: inc, Mode: api.ModeEnforce, InboundFromSelf: in, EncryptsToSelf: enc}
	}
	base := func() desired.Inputs {
		return desired.Inputs{Self: "a", NodesVersion: "v7", Nodes: []desired.Node{
			{Name: "a", NodeID: 1, Incarnation: "ia"},
			{Name: "b", NodeID: 2, Incarnation: "ib", Report: rep("ib", false, false)},     // lists nothing
			{Name: "c", NodeID: 3, Incarnation: "ic", Report: rep("ic", true, false)},      // lists inbound only
			{Name: "d", NodeID: 4, Incarnation: "id", Report: rep("id-old", false, false)}, // stale report
			{Name: "e", NodeID: 5, Incarnation: "ie"},                                      // no report
			{Name: "f", NodeID: 0, Incarnation: "if", Report: rep("if", false, false)},     // no ring ID
			{Name: "g", NodeID: 7, Incarnation: "ig", Report: rep("ig", true, true)},       // lists both
		}}
	}
	all := func(uint32) bool { return true }
	none := func(uint32) bool { return false }
	only := func(ids ...uint32) func(uint32) bool {
		return func(id uint32) bool { return slices.Contains(ids, id) }
	}
	for _, tc := range []struct {
		name       string
		send, drop func(uint32) bool
		want       map[string]added
	}{
		{"nothing confirmed", none, none, nil},
		{"everything confirmed", all, all, map[string]added{"b": {true, true}, "c": {false, true}}},
		{"inbound of b only", only(2), none, map[string]added{"b": {inbound: true}}},
		{"encrypts of c and g", none, only(3, 7), map[string]added{"c": {encrypts: true}}},
		{"the stale, the reportless and the ID-less stay", only(4, 5, 0), only(4, 5, 0), nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := base()
			orig := base()
			got, ad := addDecisions(in, tc.send, tc.drop)
			if !reflect.DeepEqual(ad, tc.want) {
				t.Errorf("additions %v, want %v", ad, tc.want)
			}
			if !reflect.DeepEqual(in, orig) {
				t.Errorf("the caller's inputs changed: %+v", in)
			}
			if len(tc.want) == 0 && &got.Nodes[0] != &in.Nodes[0] {
				t.Error("nodes copied without an addition")
			}
			for i, n := range got.Nodes {
				o := orig.Nodes[i]
				w := tc.want[n.Name]
				if n.Name != o.Name || n.NodeID != o.NodeID || n.Incarnation != o.Incarnation || (n.Report == nil) != (o.Report == nil) {
					t.Fatalf("node %d: %+v, was %+v", i, n, o)
				}
				if n.Report == nil {
					continue
				}
				wantRep := *o.Report
				wantRep.InboundFromSelf = wantRep.InboundFromSelf || w.inbound
				wantRep.EncryptsToSelf = wantRep.EncryptsToSelf || w.encrypts
				if !reflect.DeepEqual(*n.Report, wantRep) {
					t.Errorf("%s's report %+v, want %+v", n.Name, *n.Report, wantRep)
				}
			}
		})
	}
}

// staticHinter is a NodeHinter that names nodes between any two versions (or knows
// nothing).
type staticHinter struct {
	known bool
	nodes []string
}

func (h staticHinter) Hint(since, cur any) desired.Hint {
	if !h.known {
		return desired.Hint{}
	}
	return desired.Hint{Known: true, Nodes: h.nodes, Since: since}
}

// TestDecisionsVersion: additions that change without any Node event still reach the
// memo — the version changes and the hint names the peers — while unchanged additions
// leave the version as it was (the memo's "same Nodes" path stays open).
func TestDecisionsVersion(t *testing.T) {
	in := func(ver any) desired.Inputs {
		return desired.Inputs{Self: "a", NodesVersion: ver, Nodes: []desired.Node{
			{Name: "a", NodeID: 1, Incarnation: "ia"},
			{Name: "b", NodeID: 2, Incarnation: "ib", Report: &desired.Report{Incarnation: "ib"}},
			{Name: "c", NodeID: 3, Incarnation: "ic", Report: &desired.Report{Incarnation: "ic"}},
		}}
	}
	var d decisions
	send := map[uint32]bool{}
	sendF := func(id uint32) bool { return send[id] }
	none := func(uint32) bool { return false }

	got, changed, next := d.apply(in("v1"), sendF, none)
	if len(changed) != 0 || got.NodesVersion != (decidedVersion{"v1", 0}) {
		t.Fatalf("nothing added: changed %v version %v", changed, got.NodesVersion)
	}
	d = next
	memoVer := got.NodesVersion

	send[2] = true // the view confirms b; no Node changed (the watcher's version is the same)
	got, changed, next = d.apply(in("v1"), sendF, none)
	if !slices.Equal(changed, []string{"b"}) || got.NodesVersion != (decidedVersion{"v1", 1}) {
		t.Fatalf("b added: changed %v version %v", changed, got.NodesVersion)
	}
	if got.NodesVersion == memoVer {
		t.Fatal("the version did not change: the memo would take the same Nodes")
	}
	h := decidedHint(staticHinter{known: true}, memoVer, got.NodesVersion, changed)
	if !h.Known || h.Since != memoVer || !slices.Equal(h.Nodes, []string{"b"}) {
		t.Errorf("hint %+v, want b named since %v", h, memoVer)
	}
	h = decidedHint(staticHinter{known: true, nodes: []string{"c"}}, memoVer, got.NodesVersion, changed)
	if !slices.Equal(h.Nodes, []string{"c", "b"}) {
		t.Errorf("hint nodes %v, want the watcher's c and the additions' b", h.Nodes)
	}
	if h := decidedHint(staticHinter{}, memoVer, got.NodesVersion, changed); h.Known {
		t.Errorf("the watcher knows nothing, yet the hint is %+v", h)
	}
	if h := decidedHint(staticHinter{known: true}, "v1", got.NodesVersion, changed); h.Known {
		t.Errorf("a memo version of another kind gave a hint %+v", h)
	}
	d = next

	got, changed, next = d.apply(in("v2"), sendF, none)
	if len(changed) != 0 || got.NodesVersion != (decidedVersion{"v2", 1}) {
		t.Errorf("unchanged additions: changed %v version %v", changed, got.NodesVersion)
	}
	d = next

	send[2] = false // withdrawn (say b re-keyed)
	got, changed, _ = d.apply(in("v2"), sendF, none)
	if !slices.Equal(changed, []string{"b"}) || got.NodesVersion != (decidedVersion{"v2", 2}) {
		t.Errorf("b withdrawn: changed %v version %v", changed, got.NodesVersion)
	}

	if got, _, _ := d.apply(in(nil), sendF, none); got.NodesVersion != nil {
		t.Errorf("inputs without a version got %v (a nil version must stay nil: no memo shortcut)", got.NodesVersion)
	}
	if got := firstNames([]string{"a", "b", "c"}, 2); !slices.Equal(got, []string{"a", "b", "and 1 more"}) {
		t.Errorf("firstNames: %v", got)
	}
}

// viewEnv is an agent "a" in enforce (env) with its peer b, whose report the test writes,
// and a's NodeView.
type viewEnv struct {
	*env
	ctx context.Context
}

func newViewEnv(t *testing.T) *viewEnv {
	e := newEnv(t, api.ModeEnforce, Config{})
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	e.versionSecret(ctx) // the memo's incremental paths, which these tests are about
	go e.src.Run(ctx)
	waitFor(t, "synced", e.src.HasSynced)
	return &viewEnv{env: e, ctx: ctx}
}

// setReport writes b's report: in enforce, for b's SA epoch, listing a both ways or not.
func (v *viewEnv) setReport(epoch string, lists bool) {
	v.t.Helper()
	r := watch.Report{NodeReport: api.NodeReport{Mode: api.ModeEnforce, Incarnation: "boot-b", UID: "uid-b", Epoch: epoch, Generations: []uint32{1}}}
	if lists {
		tag := testTag("a", "boot-a")
		r.InboundFrom, r.EncryptingTo = map[string]string{"a": tag}, map[string]string{"a": tag}
	}
	b, _ := json.Marshal(r)
	setAnnotation(v.t, v.env, "b", string(b))
}

// setView writes a's NodeView over the keys of a and of b in SA epoch epochB, confirming
// both ways every pair, and waits for the watcher to hold it (or, with epochB "", deletes
// it and waits for it to go).
func (v *viewEnv) setView(epochB string) {
	v.t.Helper()
	res := v.dc.Resource(nodeview.GVR).Namespace(api.Namespace)
	if epochB == "" {
		if err := res.Delete(v.ctx, "a", metav1.DeleteOptions{}); err != nil {
			v.t.Fatal(err)
		}
		waitFor(v.t, "the view gone from the cache", func() bool { _, ok := v.src.ReadinessView(); return !ok })
		return
	}
	want := *readiness.EncodeView(readiness.View{Keys: v.viewKeys(epochB)})
	if _, err := res.Create(v.ctx, nodeview.Object(api.Namespace, "a", "uid-a", want), metav1.CreateOptions{}); err != nil {
		v.t.Fatal(err)
	}
	waitFor(v.t, "the view in the cache", func() bool { got, ok := v.src.ReadinessView(); return ok && got == want })
}

// viewKeys is the key digest of a's key view with b in SA epoch epochB.
func (v *viewEnv) viewKeys(epochB string) uint64 {
	ks := readiness.Keys{1: readiness.KeyDigest(testInc("a", "boot-a")), 2: readiness.KeyDigest(watch.KeyIncarnation("boot-b", "uid-b", epochB))}
	return ks.Digest(nil)
}

// toward reports a's kernel toward b: an outbound ESP policy, b's outbound plaintext drop
// (enforce's fail-closed rule beside it) and b's inbound plaintext drop.
func (v *viewEnv) toward() (policy, outDrop, inDrop bool) {
	_, ps := v.xk.Snapshot()
	for _, p := range ps {
		if p.Policy.Dir == desired.Out && p.Policy.Dst.Addr().String() == "198.18.0.2" {
			policy = true
		}
	}
	has := func(chain string) bool {
		return strings.Contains(strings.Join(v.rk.Chain(rules.Table, chain), "\n"), "198.18.0.2")
	}
	return policy, has(rules.ChainOut), has(rules.ChainIn)
}

// expect checks a's kernel toward b: ESP policy, outbound plaintext drop and inbound
// plaintext drop, all present or all absent.
func (v *viewEnv) expect(what string, want bool) {
	v.t.Helper()
	if policy, outDrop, inDrop := v.toward(); policy != want || outDrop != want || inDrop != want {
		v.t.Fatalf("%s: ESP policy to b %v, b's outbound drop %v, b's inbound plaintext drop %v; want all %v", what, policy, outDrop, inDrop, want)
	}
}

// TestViewDecidesAheadOfLists: a real agent (watcher, memo, fake kernel) in enforce whose
// peer b reports its current keys but lists nothing about a. Then a's NodeView confirms
// the pair both ways, with no Node event at all: a sends b ESP and drops b's plaintext.
// Once b's lists say the same nothing changes; when b re-keys without listing a, the
// view's confirmation (for b's old keys) does not carry over: a stops both.
func TestViewDecidesAheadOfLists(t *testing.T) {
	e := newViewEnv(t)
	e.setReport("e-b", false)
	e.sync(e.ctx)
	e.expect("b lists nothing, no view", false)
	used := func() string {
		t.Helper()
		r := e.report() // Sync flushed it
		if r == nil || r.Readiness == nil {
			t.Fatal("no report with readiness")
		}
		return r.Readiness.Used
	}
	if u := used(); u != api.UsedNone {
		t.Errorf("the report says used %q before any view, want %q", u, api.UsedNone)
	}

	e.setView("e-b")
	incremental := func() float64 {
		return value(e.m.MemoUpdates.WithLabelValues("same")) + value(e.m.MemoUpdates.WithLabelValues("hint")) + value(e.m.MemoUpdates.WithLabelValues("scan"))
	}
	before := incremental()
	e.sync(e.ctx)
	if incremental() == before {
		t.Fatal("the memo recomputed everything: the test does not reach its incremental paths")
	}
	e.expect("the view confirms b both ways", true)
	noKeyReused(t, e.xk)
	if u, want := used(), readiness.EncodeUsed(readiness.View{Keys: e.viewKeys("e-b")}.Digest(), true); u != want {
		t.Errorf("the report says used %q, want the view's %q", u, want)
	}

	e.setReport("e-b", true)
	e.sync(e.ctx)
	e.expect("b's lists agree", true)

	e.setReport("e-b2", false) // b re-keyed; its lists do not name a yet
	e.sync(e.ctx)
	e.expectHeld("b re-keyed, the view is about its old keys")
	noKeyReused(t, e.xk)
}

// expectHeld checks a's kernel toward b while the pair waits for b's new keys: no ESP
// policy, no inbound plaintext drop, but the outbound plaintext drop held (holdRekeyed).
func (v *viewEnv) expectHeld(what string) {
	v.t.Helper()
	if policy, outDrop, inDrop := v.toward(); policy || !outDrop || inDrop {
		v.t.Fatalf("%s: ESP policy to b %v, b's outbound drop %v, b's inbound plaintext drop %v; want only the outbound drop (held)", what, policy, outDrop, inDrop)
	}
}

// TestConfirmationsSurviveRestart: the view's confirmations of a's pair with b are saved
// beside the ledger; an agent restarted with the same keys, with no view and b's lists
// still silent, keeps the pair both ways from them. After b re-keys, a restarted agent
// does not take them for b's new keys; and a save of a's earlier keys is not taken.
func TestConfirmationsSurviveRestart(t *testing.T) {
	e := newViewEnv(t)
	e.setReport("e-b", false)
	e.setView("e-b")
	e.sync(e.ctx)
	e.expect("the view confirms b both ways", true)

	e.setView("") // no view after the restart: only the saved confirmations can say
	e.restart()
	e.sync(e.ctx)
	e.expect("restarted, without a view", true)
	noKeyReused(t, e.xk)

	e.setReport("e-b2", false)
	e.restart()
	e.sync(e.ctx)
	e.expect("restarted after b re-keyed", false)

	// A save made with other keys of a: this node's keys changed since, nothing holds.
	b, _ := readiness.Saved{Self: readiness.KeyDigest("boot-a/uid-a/earlier"), In: map[uint32]readiness.K{2: readiness.KeyDigest(watch.KeyIncarnation("boot-b", "uid-b", "e-b2"))},
		Out: map[uint32]readiness.K{2: readiness.KeyDigest(watch.KeyIncarnation("boot-b", "uid-b", "e-b2"))}}.MarshalBinary()
	if err := ledger.WriteSide(e.a.cfg.LedgerDir, ledger.SideReadiness, b); err != nil {
		t.Fatal(err)
	}
	e.restart()
	e.sync(e.ctx)
	e.expect("restarted with a save of a's earlier keys", false)
}

// TestUnsavedConfirmationsWait: write-ahead. While the confirmations cannot be saved (a
// directory stands where the side file goes), the view's new confirmation of a's pair
// with b does not reach the kernel; once the save succeeds it does.
func TestUnsavedConfirmationsWait(t *testing.T) {
	e := newViewEnv(t)
	e.setReport("e-b", false)
	e.sync(e.ctx)
	e.expect("b lists nothing, no view", false)

	block := filepath.Join(e.a.cfg.LedgerDir, ledger.SideReadiness)
	if err := os.MkdirAll(filepath.Join(block, "in-the-way"), 0o700); err != nil {
		t.Fatal(err)
	}
	e.setView("e-b")
	e.sync(e.ctx)
	e.sync(e.ctx)
	e.expect("the view confirms b, but the confirmation cannot be saved", false)

	if err := os.RemoveAll(block); err != nil {
		t.Fatal(err)
	}
	e.sync(e.ctx)
	e.expect("saved", true)
	b, err := ledger.ReadSide(e.a.cfg.LedgerDir, ledger.SideReadiness)
	var s readiness.Saved
	if err == nil {
		err = s.UnmarshalBinary(b)
	}
	if err != nil || len(s.In) != 1 || len(s.Out) != 1 {
		t.Errorf("the side file: %+v, %v", s, err)
	}
}

// TestListsToNoListsKeepsPairs: a peer's report goes from listing its claims to omitting
// them (its agent saw every peer decide, docs/protocol-v2.md §9 step 4) before this node
// has a NodeView or a row of it that confirms the pair: the pair its lists made ready
// stays ready, both ways, for the same keys of both ends — and survives this agent's
// restart — but not for the peer's next keys. (E2e scenario 0 lost 89 requests to that
// switch: node2 withdrew ESP to node3 for 5 s once node3's first report without lists
// arrived before its row.)
func TestListsToNoListsKeepsPairs(t *testing.T) {
	e := newViewEnv(t)
	e.setReport("e-b", true)
	e.sync(e.ctx)
	e.expect("b's lists confirm the pair", true)

	e.setReportOmitted("e-b")
	e.sync(e.ctx)
	e.expect("b omits its lists now, no view or row yet", true)

	e.restart()
	e.sync(e.ctx)
	e.expect("restarted, b still omits its lists", true)

	e.setReportOmitted("e-b2") // b re-keyed
	e.sync(e.ctx)
	e.expectHeld("b re-keyed without lists")
	noKeyReused(t, e.xk)
}

// TestRekeyedPeerHeld: a peer that takes a new SA epoch under the same boot (lost state,
// its pods running) while a sends it ESP in enforce: a learns b's new keys before it
// learns that b holds SAs for them (here b's report, without lists, before a's NodeView),
// and keeps dropping plaintext toward b meanwhile instead of sending it (holdRekeyed);
// once the view confirms the pair under b's new keys the hold ends and ESP resumes. After
// b reboots (new boot ID, its pods held by its boot gate) nothing is held.
func TestRekeyedPeerHeld(t *testing.T) {
	e := newViewEnv(t)
	e.setReportOmitted("e-b")
	e.setView("e-b")
	e.sync(e.ctx)
	e.expect("the view confirms b both ways", true)

	e.setReportOmitted("e-b2")
	e.sync(e.ctx)
	e.expectHeld("b re-keyed, no view for its new keys yet")
	e.sync(e.ctx)
	e.expectHeld("and at the next sync")

	e.setView("")
	e.setView("e-b2")
	e.sync(e.ctx)
	e.expect("the view confirms b's new keys", true)
	if len(e.a.hold) != 0 {
		t.Errorf("hold %v once b is ready again, want none", e.a.hold)
	}

	// b reboots: a new boot ID on its Node, a report of the new boot without lists.
	ctx := context.Background()
	n, err := e.cs.CoreV1().Nodes().Get(ctx, "b", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	n.Status.NodeInfo.BootID = "boot-b2"
	r := watch.Report{NodeReport: api.NodeReport{Mode: api.ModeEnforce, Incarnation: "boot-b2", UID: "uid-b", Epoch: "e-b3", Generations: []uint32{1}}}
	r.OmitLists()
	raw, _ := json.Marshal(r)
	n.Annotations[api.ReportAnnotation] = string(raw)
	if _, err := e.cs.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b's new boot in the cache", func() bool { s := e.src.Snapshot(); return s.Node("b").Incarnation == "boot-b2" })
	e.sync(e.ctx)
	e.expect("b rebooted: not held", false)
	noKeyReused(t, e.xk)
}

// setReportOmitted writes b's report for SA epoch epoch without lists (ListsOmitted).
func (v *viewEnv) setReportOmitted(epoch string) {
	v.t.Helper()
	r := watch.Report{NodeReport: api.NodeReport{Mode: api.ModeEnforce, Incarnation: "boot-b", UID: "uid-b", Epoch: epoch, Generations: []uint32{1}}}
	r.OmitLists()
	b, _ := json.Marshal(r)
	setAnnotation(v.t, v.env, "b", string(b))
}
