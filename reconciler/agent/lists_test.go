package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic"
	k8stesting "k8s.io/client-go/testing"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/nodekeys"
	"github.com/secureoverlay/secureoverlay/nodereport"
	"github.com/secureoverlay/secureoverlay/readiness"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/rules"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
)

// TestListsGate: the report's per-pair lists go only once every live peer's agent
// declares readiness-decide for its current boot (docs/protocol-v2.md §9 step 4). A peer
// reporting only as a Node annotation (0.1), or whose NodeKeys for this boot lack the
// capability, needs them at once; a peer whose agent has not said (no NodeKeys, or those
// of another boot) needs them once ListsUnknownGrace has passed, and the gate says when
// to look again; a node with no current report (no agent) needs nothing.
func TestListsGate(t *testing.T) {
	t0 := time.Date(2026, 12, 6, 12, 0, 0, 0, time.UTC)
	decides := []string{api.CapabilityRingConfigMap, api.CapabilityReadinessRows, api.CapabilityReadinessDecide}
	node := func(name string, caps []string, keysBoot string, annotation bool) watch.NodeInfo {
		n := watch.NodeInfo{Name: name, Incarnation: "boot-" + name, UID: "uid-" + name,
			Report:         &watch.Report{NodeReport: api.NodeReport{Mode: api.ModeEnforce, Incarnation: "boot-" + name, UID: "uid-" + name, Epoch: "e"}},
			FromAnnotation: annotation}
		if keysBoot != "" {
			n.Keys = &nodekeys.Keys{Incarnation: nodekeys.Incarnation{BootID: keysBoot, UID: "uid-" + name, Epoch: "e"}, Capabilities: caps}
		}
		return n
	}
	gone := node("gone", nil, "", false)
	gone.Incarnation = "boot-gone-rebooted" // its report is of the last boot: not current
	cases := []struct {
		name  string
		peers []watch.NodeInfo
		mode  string
		after time.Duration // since the first decision
		want  []string      // the peers needing the lists (nil: omitted)
		again time.Duration
	}{
		{name: "every peer decides", peers: []watch.NodeInfo{node("b", decides, "boot-b", false), node("c", decides, "boot-c", false)}},
		{name: "always", mode: ListsAlways, peers: []watch.NodeInfo{node("b", decides, "boot-b", false)}, want: []string{}},
		{name: "a 0.1 peer (annotation only)", peers: []watch.NodeInfo{node("b", decides, "boot-b", false), node("c", nil, "", true)}, want: []string{"c"}},
		{name: "a peer without the capability", peers: []watch.NodeInfo{node("b", decides[:2], "boot-b", false), node("c", decides, "boot-c", false)}, want: []string{"b"}},
		{name: "no agent on a node", peers: []watch.NodeInfo{node("b", decides, "boot-b", false), gone}},
		{name: "no NodeKeys yet, within the grace", peers: []watch.NodeInfo{node("b", nil, "", false)}, again: ListsUnknownGrace},
		{name: "NodeKeys of the last boot, within the grace", peers: []watch.NodeInfo{node("b", decides, "boot-b-old", false)}, after: 10 * time.Second, again: ListsUnknownGrace - 10*time.Second},
		{name: "unknown past the grace", peers: []watch.NodeInfo{node("b", nil, "", false), node("c", decides, "boot-c", false)}, after: ListsUnknownGrace, want: []string{"b"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			snap := &watch.Snapshot{Nodes: append([]watch.NodeInfo{node("a", nil, "", true)}, tc.peers...)} // self: never counted
			var g listsGate
			mode := tc.mode
			if mode == "" {
				mode = ListsAuto
			}
			g.decide(snap, "a", mode, t0)
			need, needers, again := g.decide(snap, "a", mode, t0.Add(tc.after))
			if need != (tc.want != nil) || (tc.want != nil && len(tc.want) > 0 && !slices.Equal(needers, tc.want)) || again != tc.again {
				t.Errorf("need %v peers %v again %v; want need %v peers %v again %v", need, needers, again, tc.want != nil, tc.want, tc.again)
			}
		})
	}

	// An unknown peer that turns out to decide is forgotten: coming back unknown later
	// starts a new grace.
	var g listsGate
	b := node("b", nil, "", false)
	snap := &watch.Snapshot{Nodes: []watch.NodeInfo{b}}
	g.decide(snap, "a", ListsAuto, t0)
	snap.Nodes[0] = node("b", decides, "boot-b", false)
	g.decide(snap, "a", ListsAuto, t0.Add(20*time.Second))
	snap.Nodes[0] = b
	if need, _, again := g.decide(snap, "a", ListsAuto, t0.Add(40*time.Second)); need || again != ListsUnknownGrace {
		t.Errorf("a peer unknown again: need %v again %v, want a fresh grace", need, again)
	}
}

// TestAgentsOmitListsOnceEveryPeerDecides: three real agents (watchers, desired state,
// fake kernels, ledgers) on one fake API, every one declaring readiness-decide: their
// reports omit the per-pair lists, and every pair is still programmed both ways (ESP
// and enforce's plaintext drops) — decided from the peers' rows alone. A node whose agent
// reports only as a Node annotation (0.1) appears: every agent lists its claims again;
// when it goes, the lists go too. The report without lists is small whatever the
// cluster's size (TestReportSizeBound measures it at 5,000 nodes).
func TestAgentsOmitListsOnceEveryPeerDecides(t *testing.T) {
	ring := testRing(t, api.ModeEnforce, "a", "b", "c", "d")
	cs, dc := fakeAPI(t, ring, testNode("a", "198.18.0.1", "boot-a"), testNode("b", "198.18.0.2", "boot-b"), testNode("c", "198.18.0.3", "boot-c"))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	names := []string{"a", "b", "c"}
	nodes := startAgents(t, ctx, cs, dc, names...)
	// state is "" when every agent's last report omits (lists false) or carries (true)
	// the lists, its metric says so, and it encrypts to and drops the plaintext of both
	// other agents.
	state := func(lists bool) string {
		for _, name := range names {
			n := nodes[name]
			r := n.a.Published()
			switch {
			case r == nil:
				return name + ": no report yet"
			case r.ListsOmitted == lists || lists != (len(r.EncryptingTo) > 0):
				return fmt.Sprintf("%s: lists omitted %v, encryptingTo %v; want lists %v", name, r.ListsOmitted, r.EncryptingTo, lists)
			case value(n.a.d.Metrics.ReportLists) != map[bool]float64{true: 1}[lists]:
				return fmt.Sprintf("%s: report_lists %v", name, value(n.a.d.Metrics.ReportLists))
			}
			if why := pairsProgrammed(n, 2); why != "" {
				return why
			}
		}
		return ""
	}
	var why string
	if !waitUntil(30*time.Second, func() bool { why = state(false); return why == "" }) {
		t.Fatalf("every agent decides, lists omitted: %s", why)
	}
	r := nodes["a"].a.Published()
	raw, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("a's report without lists: %d bytes", len(raw))

	// d's agent is 0.1: it reports only as an annotation on its Node, and reads lists.
	d := testNode("d", "198.18.0.4", "boot-d")
	if _, err := cs.CoreV1().Nodes().Create(ctx, d, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	listed := func() string {
		for _, name := range names {
			if r := nodes[name].a.Published(); r == nil || r.ListsOmitted || value(nodes[name].a.d.Metrics.ReportLists) != 1 {
				return name + " omits its lists with a 0.1 peer"
			}
		}
		return ""
	}
	if !waitUntil(30*time.Second, func() bool { why = listed(); return why == "" }) {
		t.Fatal(why)
	}
	if why := state(true); why != "" {
		t.Fatalf("with a 0.1 peer: %s", why)
	}
	if err := cs.CoreV1().Nodes().Delete(ctx, "d", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if !waitUntil(30*time.Second, func() bool { why = state(false); return why == "" }) {
		t.Fatalf("the 0.1 peer gone: %s", why)
	}
	for _, n := range nodes {
		noKeyReused(t, n.xk)
	}
}

// TestReportSizeBound: issue 16's bound — a node's report is at most 2 KiB at any
// cluster size once it omits its lists. Built as the agent builds it (BuildReport,
// ReadinessOf) for node 1 of 100, 1,000 and 5,000 nodes with 40-character names
// (ip-10-0-12-34.eu-west-1.compute.internal style), every peer inbound and encrypted, with
// every bounded field at its largest: more refused peers than the status names, the
// longest error text, every neighbour code, a Calico API switch. With the lists (as an
// agent writes while an older peer reads them) it grows with the cluster, as before.
func TestReportSizeBound(t *testing.T) {
	const bound = 2048
	var last, lastListed []byte
	name := func(i int) string { return fmt.Sprintf("ip-10-%03d-%03d.eu-west-1.compute.internal", i/250, i%250+1) }
	for _, n := range []int{100, 1000, 5000} {
		ring := keys.NewRing()
		snap := &watch.Snapshot{Ring: ring, Calico: watch.CalicoAPI{GroupVersion: "crd.projectcalico.org/v1"}, CalicoSwitching: "projectcalico.org/v3"}
		st := desired.State{Mode: api.ModeEnforce, Generations: []uint32{4_000_000_007, 4_000_000_008}, Neighbours: []string{desired.NeighbourVXLAN,
			desired.NeighbourNever, desired.NeighbourIPv6, desired.NeighbourVirtual, desired.NeighbourWireGuard, desired.NeighbourBPF, desired.NeighbourNFTables}}
		for i := 1; i <= n; i++ {
			nm := name(i)
			if len(nm) != 40 {
				t.Fatalf("name %q: %d characters", nm, len(nm))
			}
			boot, uid := fmt.Sprintf("%08d-61d4-4a8e-9d64-3c1f0e2b7a91", i), fmt.Sprintf("%08d-5a6e-4b7c-8d9e-0f1a2b3c4d5e", i)
			snap.Nodes = append(snap.Nodes, watch.NodeInfo{Name: nm, Incarnation: boot, UID: uid,
				Report: &watch.Report{NodeReport: api.NodeReport{Mode: api.ModeEnforce, Incarnation: boot, UID: uid, Epoch: "9c2f4e6a8b1d3f5e"}}})
			ring.Nodes = append(ring.Nodes, keys.NodeID{Name: nm, ID: uint32(i)})
			if i == 1 {
				continue
			}
			if i <= 2+2*readiness.MaxRefused { // refused: more than the status names
				st.Skipped = append(st.Skipped, desired.Skip{Object: "node/" + nm, Reason: "bad key"})
				continue
			}
			st.Peers = append(st.Peers, desired.PeerStatus{Name: nm, SendGeneration: 4_000_000_008, Inbound: true, DropsPlaintext: true})
		}
		slices.SortFunc(snap.Nodes, func(a, b watch.NodeInfo) int { return strings.Compare(a.Name, b.Name) })
		self := snap.Node(name(1))
		seq, in := SeqUse{Fraction: 0.999, Generation: 4_000_000_008}, SeqUse{Fraction: 0.999, Generation: 4_000_000_008}
		r := BuildReport(st, snap, self.Incarnation, Budget{BudgetMTU: 8950, ExternalMTU: 9001}, seq, in, time.Date(2026, 12, 6, 23, 59, 59, 0, time.UTC))
		r.UID, r.Epoch = self.UID, "9c2f4e6a8b1d3f5e"
		r.Readiness = ReadinessOf(st, snap, name(1), watch.KeyIncarnation(self.Incarnation, self.UID, r.Epoch))
		if r.Readiness == nil || r.Readiness.RefusedMore == 0 {
			t.Fatalf("%d nodes: readiness %+v, want refused peers beyond the status's", n, r.Readiness)
		}
		r.Readiness.Used = readiness.EncodeUsed(1<<64-1, true)
		r.Error = reportError(errors.New(strings.Repeat("address conflict: "+name(n)+" ", n)))
		listed, err := json.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		r.OmitLists()
		raw, err := json.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%d nodes: report %d bytes without lists, %d with them", n, len(raw), len(listed))
		if len(raw) > bound {
			t.Errorf("%d nodes: a report without lists is %d bytes, over %d", n, len(raw), bound)
		}
		if n >= 1000 && len(listed) <= bound {
			t.Errorf("%d nodes: the report with lists is %d bytes: the test builds no lists", n, len(listed))
		}
		last, lastListed = raw, listed
	}
	if testing.Short() {
		return
	}
	// The NodeReport object holding it, as a real API server stores and serves it (the
	// report, its summary — the same without lists — and the object's metadata).
	c := kube.Start(t)
	dc := dynamic.NewForConfigOrDie(c.AdminConfig())
	ctx := context.Background()
	node := name(1)
	var u *unstructured.Unstructured
	// Created without lists, then with lists (an older peer appeared), then without again.
	for i, raw := range [][]byte{last, lastListed, last} {
		if err := nodereport.Write(ctx, dc, api.Namespace, node, "4f1d2c3b-5a6e-4b7c-8d9e-0f1a2b3c4d5e", string(api.ModeEnforce), raw); err != nil {
			t.Fatal(err)
		}
		var err error
		if u, err = dc.Resource(nodereport.GVR).Namespace(api.Namespace).Get(ctx, node, metav1.GetOptions{}); err != nil {
			t.Fatal(err)
		}
		_, summary := u.GetAnnotations()[nodereport.SummaryAnnotation]
		if nodereport.Raw(u) != string(raw) || summary != (i == 1) {
			t.Fatalf("write %d: the object's report differs from the one written, or it has a summary %v (want %v)", i, summary, i == 1)
		}
	}
	served, _ := json.Marshal(u.Object)
	t.Logf("5,000 nodes: the NodeReport object as served, %d bytes, its report %d (no summary: the report is its own)", len(served), len(last))
}

// TestInstalledNeverFlapsOnRestart: an agent restarted with its ledger adopted (the
// kernel kept its SAs) goes on publishing in NodeKeys' installed (docs/keys.md §10) what
// the agent before it did for the same incarnation — never "none installed" in between,
// which a reader would take for a peer that holds nothing.
func TestInstalledNeverFlapsOnRestart(t *testing.T) {
	e := newEnv(t, api.ModeAccept, Config{})
	var mu sync.Mutex
	var written [][]uint32 // installed of every NodeKeys write, in order
	record := func(action k8stesting.Action) (bool, runtime.Object, error) {
		var obj map[string]any
		switch a := action.(type) {
		case k8stesting.PatchAction:
			if json.Unmarshal(a.GetPatch(), &obj) != nil {
				return false, nil, nil
			}
		case k8stesting.CreateAction:
			u, ok := a.GetObject().(*unstructured.Unstructured)
			if !ok {
				return false, nil, nil
			}
			obj = u.Object
		}
		var gens []uint32
		l, _ := obj["installed"].([]any)
		for _, g := range l {
			switch v := g.(type) {
			case float64:
				gens = append(gens, uint32(v))
			case int64:
				gens = append(gens, uint32(v))
			}
		}
		mu.Lock()
		written = append(written, gens)
		mu.Unlock()
		return false, nil, nil
	}
	e.dc.PrependReactor("patch", "nodekeys", record) // before the watcher runs: not thread-safe
	e.dc.PrependReactor("create", "nodekeys", record)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go e.src.Run(ctx)
	waitFor(t, "synced", e.src.HasSynced)
	e.a.d.Dynamic = e.dc // the watcher's: the agent sees its own NodeKeys
	e.sync(ctx)
	k := e.a.PublishedKeys()
	if k == nil || len(k.Installed) == 0 {
		t.Fatalf("published %+v, want installed generations", k)
	}
	waitFor(t, "the NodeKeys in the cache", func() bool {
		s := e.src.Snapshot()
		me := s.Node("a")
		return me != nil && me.Keys != nil && slices.Equal(me.Keys.Installed, k.Installed)
	})
	mu.Lock()
	n := len(written)
	mu.Unlock()

	e.restart() // same kernel, same ledger: the epoch is adopted
	e.a.d.Dynamic = e.dc
	// What the restarted agent hands its keys writer first, before any sync of its own
	// programmed the kernel (the writer, running beside the sync, may write it at once).
	snap := e.src.Snapshot()
	if err := e.a.openLedger(&snap); err != nil {
		t.Fatal(err)
	}
	if err := e.a.publishKeys(&snap); err != nil {
		t.Fatal(err)
	}
	e.a.mu.Lock()
	first := e.a.keysWant
	e.a.mu.Unlock()
	if first == nil || !slices.Equal(first.Installed, k.Installed) {
		t.Fatalf("the restarted agent first hands over %+v, want installed %v", first, k.Installed)
	}
	e.sync(ctx)
	if e.a.Epoch() != k.Incarnation.Epoch {
		t.Fatalf("the restart took epoch %s, want %s adopted", e.a.Epoch(), k.Incarnation.Epoch)
	}
	mu.Lock()
	after := slices.Clone(written[n:])
	mu.Unlock()
	for _, w := range after {
		if !slices.Equal(w, k.Installed) {
			t.Errorf("after a restart with the epoch adopted, a NodeKeys write with installed %v (before: %v)", w, k.Installed)
		}
	}
	if got := e.a.PublishedKeys(); got == nil || !got.Equal(*k) {
		t.Errorf("restarted agent publishes %+v, want %+v", got, k)
	}
	noKeyReused(t, e.xk)
}

// TestInstalledOnlyOnceProgrammed: NodeKeys' installed is empty while no sync has
// programmed the kernel (the keys themselves are published before, as peers need them),
// and names the report's generations once one has.
func TestInstalledOnlyOnceProgrammed(t *testing.T) {
	e, ctx := epochEnv(t)
	dc := keysClient(e)
	e.failXf.Store(true) // every SA write fails: no sync succeeds
	if err := e.a.Sync(ctx); err == nil {
		t.Fatal("a sync succeeded with every SA write failing")
	}
	k := published(t, e, dc)
	if len(k.Keys) == 0 || len(k.Installed) != 0 || !k.Has(api.CapabilityInstalled) {
		t.Fatalf("while no sync programmed the kernel: %+v", k)
	}
	e.failXf.Store(false)
	e.a.Resync()
	e.sync(ctx)
	k = published(t, e, dc)
	if r := e.report(); r == nil || len(r.Generations) == 0 || !slices.Equal(k.Installed, r.Generations) || k.Incarnation.Epoch != r.Epoch {
		t.Fatalf("once programmed: NodeKeys %+v, report %+v", k, r)
	}
}

// TestHoldWithoutLists: an agent restarted in the same boot whose ledger is gone (a new
// epoch: every key changes) holds its outbound plaintext drops toward the peers it may
// have been encrypting to. Its last report omitted the lists (docs/protocol-v2.md §9
// step 4) and said it encrypted to one peer: with nothing to say which, it holds every
// peer whose agent enforces (b), not one that does not (c), until that peer is ready for
// its new keys.
func TestHoldWithoutLists(t *testing.T) {
	e := newEnv(t, api.ModeEnforce, Config{LedgerDir: t.TempDir()}) // no ledger of this boot
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := e.cs.CoreV1().Nodes().Create(ctx, testNode("c", "198.18.0.3", "boot-c"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	go e.src.Run(ctx)
	waitFor(t, "synced", e.src.HasSynced)
	report := func(name string, mode api.Mode, r watch.Report) string {
		r.Mode, r.Incarnation, r.UID, r.Epoch, r.Generations = mode, "boot-"+name, "uid-"+name, "e-"+name, []uint32{1}
		b, _ := json.Marshal(r)
		return string(b)
	}
	setAnnotation(t, e, "b", report("b", api.ModeEnforce, watch.Report{}))
	setAnnotation(t, e, "c", report("c", api.ModeAccept, watch.Report{}))
	mine := watch.Report{NodeReport: api.NodeReport{PeersEncrypted: 1, PeersExpected: 2}}
	mine.OmitLists()
	setAnnotation(t, e, "a", report("a", api.ModeEnforce, mine))
	e.sync(ctx)
	if e.a.Epoch() == "e-a" {
		t.Fatal("the ledger is gone, yet the epoch was adopted")
	}
	if !slices.Equal(e.a.hold, []string{"b"}) {
		t.Fatalf("held %v, want [b] (b enforces, c does not)", e.a.hold)
	}
	out := strings.Join(e.rk.Chain(rules.Table, rules.ChainOut), "\n")
	if !strings.Contains(out, "198.18.0.2") || strings.Contains(out, "198.18.0.3") {
		t.Fatalf("outbound drop rules:\n%s\nwant b's only", out)
	}
	noKeyReused(t, e.xk)
}

// TestNewEpochKeysWaitUntilInstalled: an agent that takes a new SA epoch (here: its SAs
// were flushed) while its NodeKeys show the old epoch with generations installed does
// not publish the new epoch until a sync has programmed it (docs/keys.md §3: peers take
// the key incarnation from NodeKeys, and one under which nothing is installed would make
// them stop sending ESP a sync earlier than needed). A failed sync under the new epoch
// leaves the old keys handed over; the next successful one publishes the new epoch with
// its generations installed.
func TestNewEpochKeysWaitUntilInstalled(t *testing.T) {
	e := newEnv(t, api.ModeAccept, Config{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go e.src.Run(ctx)
	waitFor(t, "synced", e.src.HasSynced)
	e.a.d.Dynamic = e.dc
	e.sync(ctx)
	first := e.a.PublishedKeys()
	if first == nil || len(first.Installed) == 0 {
		t.Fatalf("published %+v, want installed generations", first)
	}
	waitFor(t, "the NodeKeys in the cache", func() bool {
		s := e.src.Snapshot()
		me := s.Node("a")
		return me != nil && me.Keys != nil && me.Keys.Equal(*first)
	})

	e.xk.Remove("state", func(string) bool { return true }) // ip xfrm state flush
	e.failXf.Store(true)                                    // and the new epoch's SAs cannot be added
	e.a.Resync()
	if err := e.a.Sync(ctx); err == nil {
		t.Fatal("sync succeeded with every SA write failing")
	}
	if e.a.Epoch() == first.Incarnation.Epoch {
		t.Fatalf("epoch %s kept after the flush, want a new one", e.a.Epoch())
	}
	e.a.mu.Lock()
	want := e.a.keysWant
	e.a.mu.Unlock()
	if want == nil || want.Incarnation != first.Incarnation {
		t.Fatalf("handed to the keys writer under the new epoch before it was installed: %+v (published: epoch %s, installed %v)",
			want, first.Incarnation.Epoch, first.Installed)
	}

	e.failXf.Store(false)
	e.sync(ctx)
	e.a.mu.Lock()
	want = e.a.keysWant
	e.a.mu.Unlock()
	if want == nil || want.Incarnation.Epoch != e.a.Epoch() || len(want.Installed) == 0 {
		t.Fatalf("after a sync programmed the new epoch %s: handed over %+v, want its keys with generations installed", e.a.Epoch(), want)
	}
	noKeyReused(t, e.xk)
}

// TestShadowsInstalled: which published keys a new incarnation's keys with nothing
// installed may not replace (the writer's side of docs/keys.md §3's rule).
func TestShadowsInstalled(t *testing.T) {
	inc := func(boot, uid, epoch string) nodekeys.Incarnation {
		return nodekeys.Incarnation{BootID: boot, UID: uid, Epoch: epoch}
	}
	next := nodekeys.Keys{Incarnation: inc("b", "u", "e2")}
	for _, c := range []struct {
		name string
		pub  *nodekeys.Keys
		want bool
	}{
		{"nothing published", nil, false},
		{"same boot and Node, older epoch, installed", &nodekeys.Keys{Incarnation: inc("b", "u", "e1"), Capabilities: []string{api.CapabilityInstalled}, Installed: []uint32{3}}, true},
		{"older epoch, nothing installed", &nodekeys.Keys{Incarnation: inc("b", "u", "e1"), Capabilities: []string{api.CapabilityInstalled}}, false},
		{"older epoch of an agent without the capability", &nodekeys.Keys{Incarnation: inc("b", "u", "e1"), Installed: []uint32{3}}, false},
		{"the same epoch", &nodekeys.Keys{Incarnation: inc("b", "u", "e2"), Capabilities: []string{api.CapabilityInstalled}, Installed: []uint32{3}}, false},
		{"another boot (a reboot)", &nodekeys.Keys{Incarnation: inc("b0", "u", "e1"), Capabilities: []string{api.CapabilityInstalled}, Installed: []uint32{3}}, false},
		{"another Node object", &nodekeys.Keys{Incarnation: inc("b", "u0", "e1"), Capabilities: []string{api.CapabilityInstalled}, Installed: []uint32{3}}, false},
	} {
		if got := shadowsInstalled(c.pub, next); got != c.want {
			t.Errorf("%s: shadowsInstalled = %v, want %v", c.name, got, c.want)
		}
	}
}

// TestHoldWithoutListsStatusOnly is TestHoldWithoutLists where the agents report as they
// do once no peer reads NodeReports (docs/keys.md §6): its own last report only in its
// NodeStatus (read once when its ledger is opened; its NodeReport superseded), peer b's
// NodeReport superseded (a stale "accept" in it) with NodeKeys for its boot that declare
// node-status, peer c reporting accept as before. With the cluster in
// enforce, the agent that lost its ledger holds b (its mode unknown here, so the
// cluster's), not c.
func TestHoldWithoutListsStatusOnly(t *testing.T) {
	e := newEnv(t, api.ModeEnforce, Config{LedgerDir: t.TempDir()}) // no ledger of this boot
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := e.cs.CoreV1().Nodes().Create(ctx, testNode("c", "198.18.0.3", "boot-c"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	at := time.Date(2026, 3, 1, 11, 0, 0, 0, time.UTC)
	report := func(name string, mode api.Mode, r watch.Report) []byte {
		r.Mode, r.Incarnation, r.UID, r.Epoch, r.Generations, r.LastSync = mode, "boot-"+name, "uid-"+name, "e-"+name, []uint32{1}, at
		r.OmitLists()
		b, _ := json.Marshal(r)
		return b
	}
	superseded := watch.Report{NodeReport: api.NodeReport{Superseded: true}}
	for _, w := range []struct {
		write func(context.Context, dynamic.Interface, string, string, string, string, []byte) error
		node  string
		raw   []byte
	}{
		{nodereport.Write, "a", report("a", api.ModeOff, superseded)},
		{nodereport.WriteStatus, "a", report("a", api.ModeEnforce, watch.Report{NodeReport: api.NodeReport{PeersEncrypted: 1, PeersExpected: 2}})},
		{nodereport.Write, "b", report("b", api.ModeAccept, superseded)},
		{nodereport.Write, "c", report("c", api.ModeAccept, watch.Report{})},
	} {
		if err := w.write(ctx, e.dc, api.Namespace, w.node, "", "off", w.raw); err != nil {
			t.Fatal(err)
		}
	}
	var pub keys.PublicKey
	pub[0] = 1
	if err := nodekeys.Write(ctx, e.dc, api.Namespace, "b", "", nodekeys.Keys{Incarnation: nodekeys.Incarnation{BootID: "boot-b", UID: "uid-b", Epoch: "e-b"},
		Keys: []nodekeys.Key{{Generation: 1, X25519: pub}}, Installed: []uint32{1},
		Capabilities: []string{api.CapabilityInstalled, api.CapabilityReadinessDecide, api.CapabilityNodeStatus}}); err != nil {
		t.Fatal(err)
	}
	go e.src.Run(ctx)
	waitFor(t, "synced", e.src.HasSynced)
	waitFor(t, "the peers in the cache", func() bool {
		s := e.src.Snapshot()
		b, c := s.Node("b"), s.Node("c")
		return b != nil && b.Keys != nil && c != nil && c.CurrentReport() != nil && c.CurrentReport().Mode == api.ModeAccept
	})
	e.a.d.Dynamic = e.dc
	e.sync(ctx)
	if e.a.Epoch() == "e-a" {
		t.Fatal("the ledger is gone, yet the epoch was adopted")
	}
	if !slices.Equal(e.a.hold, []string{"b"}) {
		t.Fatalf("held %v, want [b] (b reports only as a NodeStatus in an enforcing cluster, c does not enforce)", e.a.hold)
	}
	noKeyReused(t, e.xk)
}
