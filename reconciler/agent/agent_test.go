package agent

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	fakediscovery "k8s.io/client-go/discovery/fake"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/internal/testkinds"
	"github.com/secureoverlay/secureoverlay/internal/testutil"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/ledger"
	"github.com/secureoverlay/secureoverlay/reconciler/rules"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
	"github.com/secureoverlay/secureoverlay/reconciler/xfrm"
)

func testRing(t *testing.T, mode api.Mode, names ...string) *keys.Ring {
	t.Helper()
	r := keys.NewRing()
	r.Mode, r.Target, r.LastGeneration = mode, mode, 1
	root := make([]byte, keys.RootKeyBytes)
	if _, err := rand.Read(root); err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	r.Generations = []keys.Generation{{Number: 1, State: keys.StateActive, Cipher: keys.AES128GCM, ICVBytes: 8,
		Root: root, Reason: "initial", Created: now, Activated: now}}
	for i, n := range names {
		r.Nodes = append(r.Nodes, keys.NodeID{Name: n, ID: uint32(i + 1)})
	}
	return r
}

// testNode is a Node with UID "uid-NAME" whose agent has published an empty report with SA
// epoch "e-NAME" (so peers derive its keys with testInc(name, boot)).
func testNode(name, ip, boot string) *corev1.Node {
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, UID: types.UID("uid-" + name), Annotations: map[string]string{api.CalicoIPv4AddressAnnotation: ip + "/24"}}}
	rep, _ := json.Marshal(watch.Report{NodeReport: api.NodeReport{Mode: api.ModeOff, Incarnation: boot, UID: "uid-" + name, Epoch: "e-" + name}})
	n.Annotations[api.ReportAnnotation] = string(rep)
	n.Status.NodeInfo.BootID = boot
	n.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue}}
	return n
}

// seededLedger is a ledger directory whose ledger an earlier agent of testNode(name, ip,
// boot) made in this boot, with SA epoch "e-NAME" and no keys yet: the agent adopts that
// epoch, as its report on the Node says.
func seededLedger(t *testing.T, name, boot string) string {
	t.Helper()
	dir := t.TempDir()
	l, _, err := ledger.Open(dir, ledger.Identity{Node: name, BootID: boot, UID: "uid-" + name}, ledger.Options{NewEpoch: func() string { return "e-" + name }})
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	return dir
}

// testInc is the key incarnation of a testNode whose agent kept its epoch.
func testInc(name, boot string) string { return watch.KeyIncarnation(boot, "uid-"+name, "e-"+name) }

// testTag is the per-pair tag of testInc.
func testTag(name, boot string) string { return watch.IncarnationTag(testInc(name, boot)) }

// gated is a real watch.Watcher whose HasSynced can be held false.
type gated struct {
	*watch.Watcher
	open atomic.Bool
}

func (g *gated) HasSynced() bool { return g.open.Load() && g.Watcher.HasSynced() }

type env struct {
	t         *testing.T
	cs        *fake.Clientset
	dc        *dynamicfake.FakeDynamicClient
	src       *gated
	xk        *xfrm.Fake
	rk        *rules.Fake
	m         *Metrics
	a         *Agent
	failXf    atomic.Bool
	block     chan struct{} // the rules fake blocks its next chain listing on it when blockNext
	blockNext atomic.Bool
	atBlock   atomic.Pointer[float64] // syncs counted when the blocked sync blocked
	now       atomic.Int64
}

func newEnv(t *testing.T, mode api.Mode, cfg Config) *env {
	t.Helper()
	e := &env{t: t}
	ring := testRing(t, mode, "a", "b", "c")
	data, err := keys.Marshal(ring)
	if err != nil {
		t.Fatal(err)
	}
	e.cs = fake.NewClientset(testNode("a", "198.18.0.1", "boot-a"), testNode("b", "198.18.0.2", "boot-b"),
		&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: api.Namespace, Name: api.SecretName}, Data: map[string][]byte{api.SecretDataKey: data}})
	e.cs.Discovery().(*fakediscovery.FakeDiscovery).Resources = []*metav1.APIResourceList{{GroupVersion: "crd.projectcalico.org/v1",
		APIResources: []metav1.APIResource{{Name: "ipamblocks"}, {Name: "ippools"}}}}
	gv := schema.GroupVersion{Group: "crd.projectcalico.org", Version: "v1"}
	dc := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), testkinds.With(map[schema.GroupVersionResource]string{gv.WithResource("ipamblocks"): "IPAMBlockList", gv.WithResource("ippools"): "IPPoolList"}))
	e.dc = dc
	e.src = &gated{Watcher: watch.New(watch.Config{Self: "a", Client: e.cs, Dynamic: dc, DiscoveryRetry: 10 * time.Millisecond})}
	e.src.open.Store(true)
	e.xk = xfrm.NewFake()
	e.xk.Fail = func(op, id string) error {
		if e.failXf.Load() && op == "add-state" {
			return syscall.EIO
		}
		return nil
	}
	e.rk = rules.NewFake()
	e.block = make(chan struct{})
	e.rk.Fail = func(op string) error {
		if op == "list-chains" && e.blockNext.CompareAndSwap(true, false) {
			n := e.syncs("ok") + e.syncs("error") // every sync before this one (one at a time)
			e.atBlock.Store(&n)
			<-e.block
		}
		return nil
	}
	e.m = NewMetrics(filepath.Join(t.TempDir(), "missing-xfrm_stat"))
	cfg.NodeName = "a"
	if cfg.ExternalMTU == 0 {
		cfg.ExternalMTU = 1500
	}
	cfg.RetryMin, cfg.RetryMax = 10*time.Millisecond, 50*time.Millisecond
	if cfg.LedgerDir == "" {
		cfg.LedgerDir = seededLedger(t, "a", "boot-a")
	}
	e.now.Store(time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC).UnixNano())
	e.a, err = New(cfg, Deps{Client: e.cs, Source: e.src, Xfrm: xfrm.NewApplier(e.xk, cfg.Dataplane),
		Rules: rules.NewApplier(e.rk), Metrics: e.m, Now: func() time.Time { return time.Unix(0, e.now.Load()) }})
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// cached is report annotation raw of node name as the agent's cache holds it: a peer's
// report trimmed to what concerns this agent's node "a" (watch.NodeTransform).
func (e *env) cached(name, raw string) string {
	if name == "a" {
		return raw
	}
	return api.TrimReport(raw, "a")
}

func (e *env) run() (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { e.a.Run(ctx); close(done) }()
	return func() { cancel(); <-done }
}

// blockedSync waits until no sync ran for 200 ms (the start's syncs, and the full syncs
// the publishing ones hand over to, are done), then starts a full sync that blocks in the
// rules applier until e.block is closed; it returns the syncs counted before the one that
// blocked. That is counted when it blocks, not before asking for it: a sync already on its
// way may still be the one that blocks, and the one asked for then runs after it.
func (e *env) blockedSync() float64 {
	e.t.Helper()
	for last := -1.0; ; {
		time.Sleep(200 * time.Millisecond)
		n := e.syncs("ok")
		if n == last {
			break
		}
		last = n
	}
	e.blockNext.Store(true)
	e.a.Resync()
	waitFor(e.t, "the sync to block", func() bool { return !e.blockNext.Load() })
	return *e.atBlock.Load()
}

// versionSecret gives the key Secret a resourceVersion. The fake API sets none, and the
// watcher parses a Secret without one at every snapshot (it parses the ring once per
// resourceVersion, the memo's KeysVersion): every sync would then recompute everything.
// With one, as a real API server gives, the memo's incremental paths run.
func (e *env) versionSecret(ctx context.Context) {
	e.t.Helper()
	sec, err := e.cs.CoreV1().Secrets(api.Namespace).Get(ctx, api.SecretName, metav1.GetOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	sec.ResourceVersion = "7"
	if _, err := e.cs.CoreV1().Secrets(api.Namespace).Update(ctx, sec, metav1.UpdateOptions{}); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) report() *watch.Report {
	n, err := e.cs.CoreV1().Nodes().Get(context.Background(), "a", metav1.GetOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	raw, ok := n.Annotations[api.ReportAnnotation]
	if !ok {
		return nil
	}
	r, err := watch.ParseReport(raw)
	if err != nil {
		e.t.Fatalf("report: %v", err)
	}
	return r
}

func (e *env) patches() int {
	n := 0
	for _, a := range e.cs.Actions() {
		if a.GetVerb() == "patch" && a.GetResource().Resource == "nodes" {
			n++
		}
	}
	return n
}

func (e *env) syncs(result string) float64 {
	return value(e.m.Syncs.WithLabelValues("full", result)) + value(e.m.Syncs.WithLabelValues("partial", result))
}

// value reads a counter or gauge.
func value(c prometheus.Collector) float64 {
	ch := make(chan prometheus.Metric, 1)
	c.Collect(ch)
	close(ch)
	var d dto.Metric
	if err := (<-ch).Write(&d); err != nil {
		panic(err)
	}
	if d.Counter != nil {
		return d.Counter.GetValue()
	}
	return d.Gauge.GetValue()
}

func waitFor(t *testing.T, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestNothingWrittenBeforeCachesSync(t *testing.T) {
	e := newEnv(t, api.ModeAccept, Config{})
	e.src.open.Store(false)
	stop := e.run()
	defer stop()
	waitFor(t, "watcher synced", e.src.Watcher.HasSynced)
	for range 20 {
		e.a.Trigger("test")
	}
	waitFor(t, "sync attempts", func() bool { return e.a.Status().Syncs >= 1 })
	time.Sleep(50 * time.Millisecond)
	states, policies := e.xk.Snapshot()
	if len(states) != 0 || len(policies) != 0 || e.xk.Lists != 0 || e.rk.Chain(rules.Table, rules.ChainIn) != nil {
		t.Fatalf("kernel touched before caches synced: %d states %d policies", len(states), len(policies))
	}
	if e.patches() != 0 {
		t.Fatal("report written before caches synced")
	}
	if s := e.a.Status(); s.Ready || s.Synced {
		t.Errorf("status before sync = %+v", s)
	}
	e.src.open.Store(true)
	e.a.Trigger("test")
	waitFor(t, "programmed", func() bool { s, _ := e.xk.Snapshot(); return len(s) == 2 })
	waitFor(t, "ready", func() bool { return e.a.Status().Ready })
}

func TestEventsCoalesceIntoOneSync(t *testing.T) {
	e := newEnv(t, api.ModeAccept, Config{})
	stop := e.run()
	defer stop()
	waitFor(t, "ready", func() bool { return e.a.Status().Ready })
	before := e.blockedSync()
	// That sync is now blocked inside the rules applier; 100 events arrive meanwhile.
	for range 100 {
		e.a.Trigger("burst")
	}
	close(e.block)
	waitFor(t, "two syncs", func() bool { return e.syncs("ok")-before >= 2 })
	time.Sleep(200 * time.Millisecond)
	if got := e.syncs("ok") + e.syncs("error") - before; got != 2 {
		t.Fatalf("%v syncs for one running sync and 100 events, want 2", got)
	}
}

func TestFailureIsReportedThenFullResyncRepairs(t *testing.T) {
	e := newEnv(t, api.ModeAccept, Config{})
	e.failXf.Store(true)
	// Program before advertise: whenever a report claiming inbound SAs is written, the
	// kernel already holds them.
	var violations atomic.Int32
	e.cs.PrependReactor("patch", "nodes", func(action k8stesting.Action) (bool, runtime.Object, error) {
		p := action.(k8stesting.PatchAction).GetPatch()
		var body struct {
			Metadata struct {
				Annotations map[string]string `json:"annotations"`
			} `json:"metadata"`
		}
		if err := json.Unmarshal(p, &body); err != nil {
			violations.Add(1)
			return false, nil, nil
		}
		r, err := watch.ParseReport(body.Metadata.Annotations[api.ReportAnnotation])
		if err != nil {
			violations.Add(1)
			return false, nil, nil
		}
		if len(r.InboundFrom) > 0 {
			states, _ := e.xk.Snapshot()
			if len(states) < 2*len(r.InboundFrom) {
				violations.Add(1)
			}
		}
		return false, nil, nil
	})
	stop := e.run()
	defer stop()
	waitFor(t, "failed sync reported", func() bool { r := e.report(); return r != nil && r.Error != "" })
	r := e.report()
	if len(r.InboundFrom) != 0 || len(r.Generations) != 0 || r.Mode != api.ModeOff || !strings.Contains(r.Error, "add xfrm state") {
		t.Errorf("report after a failed first sync claims %+v", r)
	}
	if e.a.Status().Ready {
		t.Error("ready after a failed sync")
	}
	e.failXf.Store(false)
	waitFor(t, "repaired report", func() bool { r := e.report(); return r != nil && r.Error == "" && r.Mode == api.ModeAccept })
	r = e.report()
	if r.InboundFrom["b"] != testTag("b", "boot-b") || len(r.Generations) != 1 || r.Incarnation != "boot-a" ||
		r.BudgetMTU != 1452 || r.ExternalMTU != 1500 || r.PeersExpected != 1 {
		t.Errorf("report after repair = %+v", r)
	}
	if got := value(e.m.Syncs.WithLabelValues("full", "error")); got < 1 {
		t.Errorf("failed full syncs = %v", got)
	}
	// The metric is counted when Sync returns, just after the report write.
	waitFor(t, "a successful full sync", func() bool { return value(e.m.Syncs.WithLabelValues("full", "ok")) >= 1 })
	if violations.Load() != 0 {
		t.Errorf("%d report writes claimed state the kernel did not hold", violations.Load())
	}
	waitFor(t, "ready after repair", func() bool { return e.a.Status().Ready })
}

func TestReportWritesAreBounded(t *testing.T) {
	e := newEnv(t, api.ModeAccept, Config{HeartbeatInterval: 5 * time.Minute})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go e.src.Run(ctx)
	waitFor(t, "synced", e.src.HasSynced)
	step := func(d time.Duration) {
		t.Helper()
		e.now.Add(int64(d))
		if err := e.a.Sync(ctx); err != nil {
			t.Fatal(err)
		}
		if e.a.full.Load() { // a partial sync handed publishing over to a full one
			if err := e.a.Sync(ctx); err != nil {
				t.Fatal(err)
			}
		}
	}
	step(0)
	if e.patches() != 1 {
		t.Fatalf("patches after the first sync = %d", e.patches())
	}
	first := e.report()
	for range 10 {
		step(10 * time.Second)
	}
	if e.patches() != 1 {
		t.Errorf("unchanged syncs patched the report (%d patches)", e.patches())
	}
	step(5 * time.Minute)
	if e.patches() != 2 {
		t.Errorf("heartbeat: %d patches, want 2", e.patches())
	}
	if hb := e.report(); !hb.LastSync.After(first.LastSync) {
		t.Errorf("heartbeat did not refresh LastSync: %v then %v", first.LastSync, hb.LastSync)
	}
	// A new peer changes the claims: written at once.
	if _, err := e.cs.CoreV1().Nodes().Create(ctx, testNode("c", "198.18.0.3", "boot-c"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "node c in cache", func() bool { s := e.src.Snapshot(); return s.Node("c") != nil })
	step(time.Second)
	if e.patches() != 3 {
		t.Errorf("new peer: %d patches, want 3", e.patches())
	}
	if r := e.report(); r.InboundFrom["c"] == "" || r.PeersExpected != 2 {
		t.Errorf("report with c = %+v", r)
	}
	// The only thing patched is our annotation.
	for _, a := range e.cs.Actions() {
		if a.GetVerb() == "patch" {
			var body map[string]map[string]map[string]string
			p := a.(k8stesting.PatchAction).GetPatch()
			if err := json.Unmarshal(p, &body); err != nil || len(body) != 1 || len(body["metadata"]) != 1 ||
				len(body["metadata"]["annotations"]) != 1 || body["metadata"]["annotations"][api.ReportAnnotation] == "" {
				t.Errorf("patch touches more than the report annotation: %s", p)
			}
		}
	}
}

func TestShutdownLeavesTheDataPlane(t *testing.T) {
	e := newEnv(t, api.ModeAccept, Config{})
	stop := e.run()
	waitFor(t, "programmed and reported", func() bool { r := e.report(); return r != nil && r.Mode == api.ModeAccept })
	states, policies := e.xk.Snapshot()
	chainIn := e.rk.Chain(rules.Table, rules.HookIn)
	stop()
	s2, p2 := e.xk.Snapshot()
	if len(s2) != len(states) || len(p2) != len(policies) || len(states) != 2 || len(policies) != 1 {
		t.Errorf("after shutdown: %d/%d states, %d/%d policies", len(s2), len(states), len(p2), len(policies))
	}
	if got := e.rk.Chain(rules.Table, rules.HookIn); len(got) != len(chainIn) || len(got) == 0 {
		t.Errorf("jump rules after shutdown: %v (before %v)", got, chainIn)
	}
}

func TestPeriodicResyncRepairsDrift(t *testing.T) {
	e := newEnv(t, api.ModeAccept, Config{ResyncInterval: 50 * time.Millisecond})
	stop := e.run()
	defer stop()
	waitFor(t, "programmed", func() bool { _, p := e.xk.Snapshot(); return len(p) == 1 })
	if n := e.xk.Remove("policy", func(string) bool { return true }); n != 1 {
		t.Fatalf("flushed %d policies", n)
	}
	e.rk.Flush(rules.Table, rules.HookIn)
	waitFor(t, "policy restored by a resync", func() bool { _, p := e.xk.Snapshot(); return len(p) == 1 })
	waitFor(t, "jump restored by a resync", func() bool { return len(e.rk.Chain(rules.Table, rules.HookIn)) == 1 })
}

func TestHealthReadyMetrics(t *testing.T) {
	e := newEnv(t, api.ModeAccept, Config{})
	stat := filepath.Join(t.TempDir(), "xfrm_stat")
	if err := os.WriteFile(stat, []byte(sampleXfrmStat), 0o600); err != nil {
		t.Fatal(err)
	}
	e.m = NewMetrics(stat)
	e.a.d.Metrics = e.m
	srv := httptest.NewServer(e.a.Handler())
	defer srv.Close()
	get := func(path string) (int, string) {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if c, _ := get("/healthz"); c != 200 {
		t.Errorf("healthz before start = %d", c)
	}
	if c, body := get("/readyz"); c != 503 || !strings.Contains(body, "not synced") {
		t.Errorf("readyz before start = %d %q", c, body)
	}
	stop := e.run()
	defer stop()
	waitFor(t, "ready", func() bool { c, _ := get("/readyz"); return c == 200 })
	// The sync that made the agent ready records its duration as it returns, just after
	// readiness: wait for that, then read every metric.
	waitFor(t, "the full sync's duration", func() bool {
		_, m := get("/metrics")
		return strings.Contains(m, `secureoverlay_agent_sync_duration_seconds_bucket{kind="full"`)
	})
	_, metrics := get("/metrics")
	for _, want := range []string{
		`secureoverlay_agent_sync_duration_seconds_bucket{kind="full"`,
		`secureoverlay_agent_xfrm_states 2`,
		`secureoverlay_agent_xfrm_policies 1`,
		`secureoverlay_xfrm_stat_total{counter="XfrmInNoStates"} 17`,
		`secureoverlay_agent_mode{mode="accept"} 1`,
		`secureoverlay_agent_budget_mtu_bytes 1452`,
		`secureoverlay_agent_max_sequence_fraction 0`,
		`secureoverlay_agent_kernel_writes_total{object="state",op="add"} 2`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	// A wedged sync fails /healthz.
	e.a.syncStart.Store(time.Now().Add(-time.Hour).UnixNano())
	e.now.Store(time.Now().UnixNano())
	if c, _ := get("/healthz"); c != 503 {
		t.Errorf("healthz with a wedged sync = %d", c)
	}
}

func TestKeysNeverInReportsOrMetrics(t *testing.T) {
	e := newEnv(t, api.ModeAccept, Config{})
	stop := e.run()
	defer stop()
	waitFor(t, "reported", func() bool { r := e.report(); return r != nil && r.Mode == api.ModeAccept })
	states, _ := e.xk.Snapshot()
	n, _ := e.cs.CoreV1().Nodes().Get(context.Background(), "a", metav1.GetOptions{})
	raw := n.Annotations[api.ReportAnnotation]
	for _, s := range states {
		k := s.SA.Key.Bytes()
		for _, enc := range encodings(k) {
			if strings.Contains(raw, enc) {
				t.Fatal("report annotation contains key material")
			}
		}
	}
}

func encodings(k []byte) []string {
	var hex strings.Builder
	for _, b := range k {
		hex.WriteString(strings.ToLower(string("0123456789abcdef"[b>>4]) + string("0123456789abcdef"[b&15])))
	}
	b, _ := json.Marshal(k) // base64
	return []string{hex.String(), strings.Trim(string(b), `"`)}
}

func TestNewRejectsBadConfig(t *testing.T) {
	e := newEnv(t, api.ModeAccept, Config{})
	if _, err := New(Config{}, e.a.d); err == nil {
		t.Error("no node name: no error")
	}
	if _, err := New(Config{NodeName: "a", ExternalMTU: 1500, Dataplane: desired.Config{ICVBytes: 10}}, e.a.d); err == nil {
		t.Error("bad icv: no error")
	}
	d := e.a.d
	d.DetectMTU = nil
	if _, err := New(Config{NodeName: "a"}, d); err == nil {
		t.Error("no mtu source: no error")
	}
	for _, c := range []struct {
		cfg  Config
		want string
	}{
		{Config{ReportLists: "sometimes"}, `report lists "sometimes": want auto or always`},
		{Config{NodeReports: "never"}, `node reports "never": want auto or always`},
	} {
		c.cfg.NodeName, c.cfg.ExternalMTU = "a", 1500
		if _, err := New(c.cfg, e.a.d); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: error %v, want %q", c.cfg, err, c.want)
		}
	}
	a, err := New(Config{NodeName: "a", ExternalMTU: 1500, LedgerDir: t.TempDir()}, e.a.d)
	if err != nil {
		t.Fatal(err)
	}
	if a.cfg.ReportLists != ListsAuto || a.cfg.NodeReports != NodeReportsAuto {
		t.Errorf("defaults: report lists %q, node reports %q; want auto", a.cfg.ReportLists, a.cfg.NodeReports)
	}
	a.Close()
}

// TestDropRulesNeverOutliveTheirPolicies checks the sync order: when a peer stops being
// an encryption target, our outbound drop rule toward it is gone before the xfrm
// applier deletes the outbound policy it backs.
func TestDropRulesNeverOutliveTheirPolicies(t *testing.T) {
	e := newEnv(t, api.ModeEnforce, Config{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	setReport := func(r watch.Report) {
		t.Helper()
		b, _ := json.Marshal(r)
		n, err := e.cs.CoreV1().Nodes().Get(ctx, "b", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		n.Annotations[api.ReportAnnotation] = string(b)
		if _, err := e.cs.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "report in cache", func() bool {
			s := e.src.Snapshot()
			return s.Node("b").RawReport == e.cached("b", string(b))
		})
	}
	tag := testTag("a", "boot-a")
	ready := watch.Report{NodeReport: api.NodeReport{Mode: api.ModeEnforce, Incarnation: "boot-b", UID: "uid-b", Epoch: "e-b", Generations: []uint32{1}},
		InboundFrom: map[string]string{"a": tag}, EncryptingTo: map[string]string{"a": tag}}
	go e.src.Run(ctx)
	waitFor(t, "synced", e.src.HasSynced)
	setReport(ready)
	if err := e.a.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	outRule := func() bool {
		return strings.Contains(strings.Join(e.rk.Chain(rules.Table, rules.ChainOut), "\n"), "198.18.0.2")
	}
	outPolicy := func(f *xfrm.Fake) bool {
		_, ps := f.Snapshot()
		for _, p := range ps {
			if p.Policy.Dir == desired.Out {
				return true
			}
		}
		return false
	}
	if !outRule() || !outPolicy(e.xk) {
		t.Fatalf("enforce toward b not programmed: rule %v policy %v", outRule(), outPolicy(e.xk))
	}
	var violations, deletes atomic.Int32
	e.xk.OnWrite = func(f *xfrm.Fake) {
		if !outPolicy(f) {
			deletes.Add(1)
			if outRule() {
				violations.Add(1)
			}
		}
	}
	// b no longer reports inbound SAs from a (e.g. it rebooted): stop encrypting to it.
	gone := ready
	gone.InboundFrom = nil
	setReport(gone)
	if err := e.a.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if e.a.full.Load() {
		if err := e.a.Sync(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if outPolicy(e.xk) || outRule() || deletes.Load() == 0 {
		t.Fatalf("after the change: policy %v rule %v", outPolicy(e.xk), outRule())
	}
	if violations.Load() != 0 {
		t.Errorf("%d kernel writes saw the outbound drop rule without its policy", violations.Load())
	}
}

func TestMaxSeq(t *testing.T) {
	self := netip.MustParseAddr("198.18.0.1")
	spi := func(gen, node uint32) uint32 { s, _ := keys.SPI(gen, node); return s }
	obs := []xfrm.KernelSA{
		{SA: desired.SA{Src: self, Dst: netip.MustParseAddr("198.18.0.2"), SPI: spi(5, 2)}, OutSeq: 1 << 30},
		{SA: desired.SA{Src: self, Dst: netip.MustParseAddr("198.18.0.3"), SPI: spi(6, 3)}, OutSeq: 1 << 31},
		// Inbound SAs never count, however high.
		{SA: desired.SA{Src: netip.MustParseAddr("198.18.0.2"), Dst: self, SPI: spi(6, 2)}, OutSeq: 1 << 33},
	}
	got := MaxSeq(obs, self, 1<<32, []uint32{5, 6})
	if got.Fraction != 0.5 || got.Generation != 6 {
		t.Errorf("MaxSeq = %+v, want 0.5 of generation 6", got)
	}
	if got := MaxSeq(nil, self, 1<<32, nil); got.Fraction != 0 || got.Generation != 0 {
		t.Errorf("no SAs: %+v", got)
	}
	// Inbound: the highest received sequence number of the SAs toward self.
	obs = append(obs,
		xfrm.KernelSA{SA: desired.SA{Src: netip.MustParseAddr("198.18.0.3"), Dst: self, SPI: spi(5, 3)}, InSeq: 1 << 29},
		xfrm.KernelSA{SA: desired.SA{Src: netip.MustParseAddr("198.18.0.2"), Dst: self, SPI: spi(6, 2)}, InSeq: 3 << 30},
		// Outbound SAs never count, however high.
		xfrm.KernelSA{SA: desired.SA{Src: self, Dst: netip.MustParseAddr("198.18.0.2"), SPI: spi(6, 2)}, InSeq: 1 << 33})
	if got := MaxInSeq(obs, self, 1<<32, []uint32{5, 6}); got.Fraction != 0.75 || got.Generation != 6 {
		t.Errorf("MaxInSeq = %+v, want 0.75 of generation 6", got)
	}
	// A tunnel SA (CrossSubnet's same-subnet pairs) and a per-CPU lane's SA name their
	// generation as well as a transport SA does.
	for _, kind := range []keys.Kind{keys.KindTunnel, keys.KindTransport} {
		for _, lane := range []uint16{0, 3} {
			s, err := keys.LaneSPI(kind, lane, 5, 4)
			if err != nil {
				t.Fatal(err)
			}
			heavy := append(slices.Clone(obs), xfrm.KernelSA{SA: desired.SA{Src: self, Dst: netip.MustParseAddr("198.18.0.4"), SPI: s}, OutSeq: 3 << 30})
			if got := MaxSeq(heavy, self, 1<<32, []uint32{5, 6}); got.Fraction != 0.75 || got.Generation != 5 {
				t.Errorf("%s lane %d: MaxSeq = %+v, want 0.75 of generation 5", kind, lane, got)
			}
		}
	}
	for in, want := range map[float64]float64{0: 0, 0.001: 0.01, 0.5: 0.5, 0.501: 0.51, 1.2: 1.2} {
		if g := reportedFraction(in); g != want {
			t.Errorf("reportedFraction(%v) = %v, want %v", in, g, want)
		}
	}
}

// TestNoCalicoIsReported: without any Calico API group the kernel is never touched and
// the reason is published on the Node and in /readyz.
func TestNoCalicoIsReported(t *testing.T) {
	e := newEnv(t, api.ModeAccept, Config{})
	fd := e.cs.Discovery().(*fakediscovery.FakeDiscovery)
	fd.Lock()
	fd.Resources = nil
	fd.Unlock()
	stop := e.run()
	defer stop()
	waitFor(t, "error report", func() bool { r := e.report(); return r != nil && strings.Contains(r.Error, "no calico") })
	if r := e.report(); r.Mode != api.ModeOff || len(r.InboundFrom) != 0 || r.Incarnation != "boot-a" {
		t.Errorf("report = %+v", r)
	}
	states, policies := e.xk.Snapshot()
	if len(states)+len(policies) != 0 || e.xk.Lists != 0 || e.rk.Chain(rules.Table, rules.ChainIn) != nil {
		t.Error("kernel touched without Calico")
	}
	srv := httptest.NewServer(e.a.Handler())
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 503 || !strings.Contains(string(body), "no calico") {
		t.Errorf("readyz = %d %q", resp.StatusCode, body)
	}
}

// A report the API server refuses is logged and counted, the agent is not ready, and the
// retried sync writes it once the API server accepts it.
func TestFailedReportWriteIsLoggedAndRetried(t *testing.T) {
	e := newEnv(t, api.ModeAccept, Config{})
	var logs testutil.SyncBuffer
	e.a.log = slog.New(slog.NewTextHandler(&logs, nil))
	var refuse atomic.Bool
	refuse.Store(true)
	e.cs.PrependReactor("patch", "nodes", func(k8stesting.Action) (bool, runtime.Object, error) {
		if refuse.Load() {
			return true, nil, apierrors.NewServiceUnavailable("etcd is down")
		}
		return false, nil, nil
	})
	stop := e.run()
	defer stop()
	waitFor(t, "a refused report write logged", func() bool {
		return strings.Contains(logs.String(), "cannot write this node's report")
	})
	if !strings.Contains(logs.String(), "etcd is down") {
		t.Errorf("the log does not say why:\n%s", logs.String())
	}
	if got := value(e.m.ReportWrites.WithLabelValues("changed", "error")); got < 1 {
		t.Errorf("report write errors counted = %v", got)
	}
	if e.a.Status().Ready {
		t.Error("ready while the report cannot be written")
	}
	refuse.Store(false)
	waitFor(t, "the report written after the API server recovers", func() bool {
		r := e.report()
		return r != nil && r.Mode == api.ModeAccept && r.InboundFrom["b"] != ""
	})
	waitFor(t, "ready", func() bool { return e.a.Status().Ready })
}

func TestReportErrorIsBounded(t *testing.T) {
	if got := reportError(errors.New("short")); got != "short" {
		t.Errorf("reportError(short) = %q", got)
	}
	long := "x" + strings.Repeat("é", maxReportError) // 2 bytes each: the cut falls inside a rune
	got := reportError(errors.New(long))
	if !utf8.ValidString(got) || len(got) > maxReportError+64 || !strings.HasSuffix(got, fmt.Sprintf("(%d more bytes in the agent's log)", len(long)-(maxReportError-1))) {
		t.Errorf("reportError(%d bytes) = %d bytes, valid %v, tail %q", len(long), len(got), utf8.ValidString(got), got[len(got)-60:])
	}
}

// TestReportNamesCalicoGroupAndNeighbours: the report says which Calico group the agent
// read (and a switch in progress) and, as short codes, the Calico modes it does not cover.
func TestReportNamesCalicoGroupAndNeighbours(t *testing.T) {
	e := newEnv(t, api.ModeAccept, Config{})
	stop := e.run()
	defer stop()
	waitFor(t, "first report", func() bool { r := e.report(); return r != nil && r.LastSync.Unix() > 0 })
	if r := e.report(); r.CalicoAPI != "crd.projectcalico.org/v1" || len(r.Neighbours) != 0 {
		t.Errorf("report calicoAPI %q neighbours %q", r.CalicoAPI, r.Neighbours)
	}
	st := desired.State{Mode: api.ModeAccept, Neighbours: []string{desired.NeighbourBPF, desired.NeighbourVXLAN}}
	snap := &watch.Snapshot{Calico: watch.CalicoAPI{GroupVersion: "crd.projectcalico.org/v1"}, CalicoSwitching: "projectcalico.org/v3"}
	r := BuildReport(st, snap, "boot-a", Budget{}, SeqUse{}, SeqUse{}, time.Now())
	if r.CalicoAPI != "crd.projectcalico.org/v1→projectcalico.org/v3" || !slices.Equal(r.Neighbours, st.Neighbours) {
		t.Errorf("BuildReport: calicoAPI %q neighbours %q", r.CalicoAPI, r.Neighbours)
	}
	b, _ := json.Marshal(r)
	if !strings.Contains(string(b), `"neighbours":["ebpf","vxlan-pool"]`) {
		t.Errorf("report JSON %s", b)
	}
}

// TestReportListsSendingGenerations: the report's sending lists every generation an
// outbound SA uses, once each and sorted — the master ends a retiring generation on it.
func TestReportListsSendingGenerations(t *testing.T) {
	st := desired.State{Mode: api.ModeEnforce, Generations: []uint32{2, 3}, Peers: []desired.PeerStatus{
		{Name: "b", SendGeneration: 3}, {Name: "c", SendGeneration: 2}, {Name: "d", SendGeneration: 3}, {Name: "e"},
	}}
	r := BuildReport(st, &watch.Snapshot{}, "boot-a", Budget{}, SeqUse{}, SeqUse{}, time.Unix(0, 0))
	if !slices.Equal(r.Sending, []uint32{2, 3}) || r.PeersEncrypted != 3 {
		t.Fatalf("sending %v, peers encrypted %d; want [2 3], 3", r.Sending, r.PeersEncrypted)
	}
	st.Mode, st.Peers = api.ModeAccept, []desired.PeerStatus{{Name: "b"}}
	if r := BuildReport(st, &watch.Snapshot{}, "boot-a", Budget{}, SeqUse{}, SeqUse{}, time.Unix(0, 0)); len(r.Sending) != 0 {
		t.Fatalf("accept mode sends with %v", r.Sending)
	}
}

// TestPartialSyncsUseTheWatchersHint: after the first (full) sync, Node events reach the
// desired state through the watcher's hint — the memo recomputes the named nodes only —
// and the state is still what Compute gives for the inputs.
func TestPartialSyncsUseTheWatchersHint(t *testing.T) {
	e := newEnv(t, api.ModeAccept, Config{})
	ctx := context.Background()
	e.versionSecret(ctx)
	stop := e.run()
	defer stop()
	count := func(c prometheus.Counter) float64 {
		var m dto.Metric
		if err := c.Write(&m); err != nil {
			t.Fatal(err)
		}
		return m.GetCounter().GetValue()
	}
	hinted := func() float64 { return count(e.m.MemoUpdates.WithLabelValues("hint")) }
	waitFor(t, "first sync", func() bool { return e.a.Status().Ready })
	recomputed, fullSyncs := count(e.m.MemoUpdates.WithLabelValues("full")), count(e.m.Syncs.WithLabelValues("full", "ok"))
	// Each join waits for the agent to be idle, so its event meets no hand-over full sync
	// (which would absorb it by comparing every Node) and a partial sync takes it.
	idle := func() bool { return !e.a.full.Load() && e.a.syncStart.Load() == 0 && e.a.q.Len() == 0 }
	inState := func(name string) bool {
		e.a.mu.Lock()
		defer e.a.mu.Unlock()
		st := e.a.lastState
		return st != nil && (slices.ContainsFunc(st.Skipped, func(s desired.Skip) bool { return s.Object == "node/"+name }) ||
			slices.ContainsFunc(st.Peers, func(p desired.PeerStatus) bool { return p.Name == name }))
	}
	hinted0 := hinted()
	for i, name := range []string{"c", "d", "e"} {
		waitFor(t, "the agent idle", idle)
		if _, err := e.cs.CoreV1().Nodes().Create(ctx, testNode(name, fmt.Sprintf("198.18.0.%d", 3+i), "boot-"+name), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, name+" in the desired state", func() bool { return inState(name) })
	}
	if n := hinted() - hinted0; n < 1 {
		t.Errorf("%v of the three joins reached the desired state through the watcher's hint", n)
	}
	waitFor(t, "the state of every node", func() bool {
		snap := e.src.Snapshot()
		in, err := watch.Inputs("a", snap, desired.Config{}, e.a.Epoch())
		if err != nil || len(in.Nodes) != 5 {
			return false
		}
		want, err := desired.Compute(in)
		e.a.mu.Lock()
		st := e.a.lastState
		e.a.mu.Unlock()
		return err == nil && st != nil && reflect.DeepEqual(*st, want)
	})
	// The joins changed this node's report, so partial syncs handed over to full ones,
	// which re-read the kernel without recomputing the desired state whole.
	waitFor(t, "a hand-over full sync", func() bool { return count(e.m.Syncs.WithLabelValues("full", "ok")) > fullSyncs })
	if n := count(e.m.MemoUpdates.WithLabelValues("full")); n != recomputed {
		t.Errorf("the desired state was recomputed whole %v times after the first sync", n-recomputed)
	}
}

// TestStopSkipsQueuedSync: once Run's context ends, the sync in progress finishes and a sync
// queued meanwhile does not run (it would only delay the end, and an uninstall's first step).
func TestStopSkipsQueuedSync(t *testing.T) {
	e := newEnv(t, api.ModeAccept, Config{})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); e.a.Run(ctx) }()
	defer func() { cancel(); <-done }()
	waitFor(t, "ready", func() bool { return e.a.Status().Ready })
	before := e.blockedSync()
	e.a.Trigger("queued while stopping")
	cancel()
	close(e.block)
	<-done
	if got := e.syncs("ok") + e.syncs("error") - before; got != 1 {
		t.Fatalf("%v syncs after the stop (one in progress, one queued), want 1", got)
	}
}
