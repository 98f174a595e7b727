package agent

import (
	"context"
	"encoding/json"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/rules"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
	"github.com/secureoverlay/secureoverlay/reconciler/xfrm"
)

// kernelView is what the fakes hold: policies and SAs as text (no keys), rules as lines.
type kernelView struct {
	at       time.Time
	policies []string
	states   []string
	rulesIn  []string
	rulesOut []string
	chains   []string
}

func viewOf(e *env) kernelView {
	sts, pols := e.xk.Snapshot()
	v := kernelView{at: time.Unix(0, e.now.Load())}
	for _, p := range pols {
		v.policies = append(v.policies, p.Policy.String())
	}
	for _, s := range sts {
		v.states = append(v.states, s.SA.ID())
	}
	slices.Sort(v.policies)
	slices.Sort(v.states)
	v.rulesIn = e.rk.Chain(rules.Table, rules.ChainIn)
	v.rulesOut = e.rk.Chain(rules.Table, rules.ChainOut)
	v.chains, _ = e.rk.ListChains(rules.Table)
	return v
}

// policiesOf renders st's policies as the fake lists them.
func policiesOf(st desired.State) []string {
	var out []string
	for _, p := range st.Policies {
		p.Peer = ""
		out = append(out, p.String())
	}
	slices.Sort(out)
	return out
}

func statesOf(st desired.State) []string {
	var out []string
	for _, s := range st.SAs {
		out = append(out, s.ID())
	}
	slices.Sort(out)
	return out
}

func countLines(lines []string, sub string) int {
	n := 0
	for _, l := range lines {
		if strings.Contains(l, sub) {
			n++
		}
	}
	return n
}

// inRequired counts inbound policies that require ESP (outbound ones always do).
func inRequired(v kernelView) int {
	n := 0
	for _, p := range v.policies {
		if strings.Contains(p, "dir=in") && strings.Contains(p, "level=required") {
			n++
		}
	}
	return n
}

// enforcingEnv is node a enforcing toward b (b reports a's SAs installed and sends ESP).
func enforcingEnv(t *testing.T) (*env, context.CancelFunc) {
	t.Helper()
	return enforcingEnvWith(t, Config{})
}

func enforcingEnvWith(t *testing.T, cfg Config) (*env, context.CancelFunc) {
	t.Helper()
	e := newEnv(t, api.ModeEnforce, cfg)
	ctx, cancel := context.WithCancel(context.Background())
	tag := testTag("a", "boot-a")
	b, _ := json.Marshal(watch.Report{NodeReport: api.NodeReport{Mode: api.ModeEnforce, Incarnation: "boot-b", UID: "uid-b", Epoch: "e-b", Generations: []uint32{1}},
		InboundFrom: map[string]string{"a": tag}, EncryptingTo: map[string]string{"a": tag}})
	n, err := e.cs.CoreV1().Nodes().Get(ctx, "b", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	n.Annotations[api.ReportAnnotation] = string(b)
	if _, err := e.cs.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	go e.src.Run(ctx)
	waitFor(t, "synced", e.src.HasSynced) // Snapshot only after the caches synced
	waitFor(t, "b's report in the cache", func() bool {
		s := e.src.Snapshot()
		return s.Node("b").RawReport == e.cached("b", string(b))
	})
	if err := e.a.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	v := viewOf(e)
	if countLines(v.rulesIn, "DROP") != 1 || countLines(v.rulesOut, "DROP") != 1 || inRequired(v) != 1 ||
		countLines(v.policies, "dir=out") != 1 {
		t.Fatalf("a does not enforce toward b: %+v", v)
	}
	return e, cancel
}

// TestUninstallWalkDown drives the walk-down with a fake clock: step 1 at once (encrypt:
// no drop rules, inbound optional, ESP still sent), step 2 one step later (accept: no
// outbound policy, SAs kept), step 3 another step later (nothing of ours left), and each
// step's kernel state is exactly desired.Compute of the last sync's inputs in the lower mode.
func TestUninstallWalkDown(t *testing.T) {
	e, cancel := enforcingEnv(t)
	defer cancel()
	in := *e.a.lastIn
	want, err := WalkDownStates(in)
	if err != nil {
		t.Fatal(err)
	}
	for i, m := range WalkDownModes {
		if want[i].Mode != m {
			t.Fatalf("step %d mode %s, want %s", i, want[i].Mode, m)
		}
	}
	// The lower modes are what the cluster disable would program.
	for i, m := range []api.Mode{api.ModeEncrypt, api.ModeAccept} {
		lower := in
		lower.Ring.Mode = m
		st, err := desired.Compute(lower)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(policiesOf(st), policiesOf(want[i])) || !slices.Equal(st.Rules, want[i].Rules) || !slices.Equal(statesOf(st), statesOf(want[i])) {
			t.Fatalf("walk-down step %s differs from Compute in mode %s", WalkDownModes[i], m)
		}
	}

	const step = 7 * time.Second
	start := time.Unix(0, e.now.Load())
	var sleeps []time.Duration
	var seen []kernelView
	e.a.d.Sleep = func(ctx context.Context, d time.Duration) error {
		seen = append(seen, viewOf(e)) // what the kernel held during this wait
		sleeps = append(sleeps, d)
		e.now.Add(int64(d))
		return nil
	}
	// Applying takes time (a busy node: the real-node story once took 18 s for step 1):
	// every xfrm write advances the clock; the next step still waits a whole step after
	// the previous one is in place.
	prevFail := e.xk.Fail
	e.xk.Fail = func(op, id string) error {
		e.now.Add(int64(300 * time.Millisecond))
		return prevFail(op, id)
	}
	logBefore := len(e.xk.Log)
	if err := e.a.Uninstall(context.Background(), step); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(sleeps, []time.Duration{step, step}) {
		t.Fatalf("waits %v, want two of %v", sleeps, step)
	}
	// Step 1 (at once, held a step after it is in place).
	s1 := seen[0]
	if s1.at.Before(start) || s1.at.Sub(start) > 2*time.Second {
		t.Errorf("step 1 in place at %v, want at once (plus its writes)", s1.at.Sub(start))
	}
	if !slices.Equal(s1.policies, policiesOf(want[0])) || !slices.Equal(s1.states, statesOf(want[0])) {
		t.Errorf("step 1 kernel\n%v\nwant\n%v", s1.policies, policiesOf(want[0]))
	}
	if countLines(s1.rulesIn, "DROP")+countLines(s1.rulesOut, "DROP") != 0 || inRequired(s1) != 0 ||
		countLines(s1.policies, "dir=out") != 1 || countLines(s1.rulesOut, "198.18.0.2") != 1 {
		t.Errorf("step 1 must accept plaintext and still send ESP (with a count rule): %+v", s1)
	}
	// Step 2 (a step after step 1 is in place: its own writes took time too).
	s2 := seen[1]
	if got := s2.at.Sub(s1.at); got <= step {
		t.Errorf("step 2 in place %v after step 1, want a step (%v) and its writes", got, step)
	}
	if !slices.Equal(s2.policies, policiesOf(want[1])) || !slices.Equal(s2.states, statesOf(want[1])) {
		t.Errorf("step 2 kernel\n%v\nwant\n%v", s2.policies, policiesOf(want[1]))
	}
	if countLines(s2.policies, "dir=out") != 0 || len(s2.rulesIn)+len(s2.rulesOut) != 0 || len(s2.states) != 2 {
		t.Errorf("step 2 must stop sending ESP and keep the SAs: %+v", s2)
	}
	// Step 3 (a step after step 2 is in place): nothing of ours.
	end := viewOf(e)
	if got := end.at.Sub(s2.at); got <= step {
		t.Errorf("step 3 done %v after step 2, want a step (%v) and its writes", got, step)
	}
	if len(end.policies)+len(end.states) != 0 || slices.Contains(end.chains, rules.ChainIn) || slices.Contains(end.chains, rules.ChainOut) {
		t.Errorf("left after the walk-down: %+v", end)
	}
	for _, c := range []string{"PREROUTING", "OUTPUT"} {
		if l := e.rk.Chain(rules.Table, c); countLines(l, "secureoverlay") != 0 {
			t.Errorf("jump left in %s: %v", c, l)
		}
	}
	// The SAs were never re-created on the way down (same keys): only deletions at the end.
	for _, w := range e.xk.Log[logBefore:] {
		if strings.HasPrefix(w, "add-state") || strings.HasPrefix(w, "replace-state") {
			t.Errorf("walk-down wrote an SA: %s", w)
		}
	}
	t.Logf("xfrm writes during the walk-down: %v", e.xk.Log[logBefore:])
}

// TestUninstallFromOffCleansUpAtOnce: a kernel in mode off holds no SAs, so nobody can
// send it ESP; there is nothing to wait for.
func TestUninstallFromOffCleansUpAtOnce(t *testing.T) {
	e := newEnv(t, api.ModeOff, Config{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go e.src.Run(ctx)
	waitFor(t, "synced", e.src.HasSynced)
	if err := e.a.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	e.a.d.Sleep = func(context.Context, time.Duration) error { t.Error("waited although the mode is off"); return nil }
	if err := e.a.Uninstall(ctx, time.Hour); err != nil {
		t.Fatal(err)
	}
	if v := viewOf(e); len(v.policies)+len(v.states) != 0 || slices.Contains(v.chains, rules.ChainIn) {
		t.Errorf("left: %+v", v)
	}
}

// TestUninstallUnknownStateLeavesTheKernel: with no successful sync and caches that never
// synced, the agent does not know what the kernel holds and touches nothing.
func TestUninstallUnknownStateLeavesTheKernel(t *testing.T) {
	e := newEnv(t, api.ModeEnforce, Config{})
	e.src.open.Store(false)
	e.xk.PutPolicy(xfrm.KernelPolicy{Policy: desired.Policy{Dir: desired.In, Src: netip.MustParsePrefix("198.18.0.2/32"), Dst: netip.MustParsePrefix("198.18.0.1/32"),
		Proto: 4, Priority: desired.DefaultPriority, Tmpl: desired.Template{Src: netip.MustParseAddr("198.18.0.2"), Dst: netip.MustParseAddr("198.18.0.1"),
			Kind: desired.Transport, ReqID: desired.DefaultReqID}}})
	e.a.d.Sleep = func(context.Context, time.Duration) error { t.Error("waited"); return nil }
	err := e.a.Uninstall(context.Background(), time.Second)
	if err == nil || !strings.Contains(err.Error(), "unknown") {
		t.Fatalf("err = %v, want unknown state", err)
	}
	if len(e.xk.Log) != 0 {
		t.Errorf("kernel writes: %v", e.xk.Log)
	}
	if _, pols := e.xk.Snapshot(); len(pols) != 1 {
		t.Errorf("policies %v", pols)
	}
}

// TestUninstallInterrupted: a cancelled wait stops the walk-down where it is (the kernel
// keeps the last step's working state).
func TestUninstallInterrupted(t *testing.T) {
	e, cancel := enforcingEnv(t)
	defer cancel()
	e.a.d.Sleep = func(ctx context.Context, d time.Duration) error { return context.Canceled }
	err := e.a.Uninstall(context.Background(), time.Second)
	if err == nil || !strings.Contains(err.Error(), "interrupted before the accept step") {
		t.Fatalf("err = %v", err)
	}
	v := viewOf(e)
	if countLines(v.policies, "dir=out") != 1 || inRequired(v) != 0 || countLines(v.rulesIn, "DROP")+countLines(v.rulesOut, "DROP") != 0 {
		t.Errorf("kernel after the interrupted walk-down is not step 1: %+v", v)
	}
}

func TestWalkDownInputsNeverRaise(t *testing.T) {
	for _, tc := range []struct{ from, capAt, want api.Mode }{
		{api.ModeEnforce, api.ModeEncrypt, api.ModeEncrypt},
		{api.ModeEnforce, api.ModeAccept, api.ModeAccept},
		{api.ModeEncrypt, api.ModeEncrypt, api.ModeEncrypt},
		{api.ModeAccept, api.ModeEncrypt, api.ModeAccept},
		{api.ModeOff, api.ModeEncrypt, api.ModeOff},
		{api.ModeEnforce, api.ModeOff, api.ModeOff},
	} {
		in := desired.Inputs{Ring: desired.Ring{Mode: tc.from, Generations: []desired.Generation{{ID: 1, State: desired.GenActive}}}}
		got := WalkDownInputs(in, tc.capAt)
		if got.Ring.Mode != tc.want {
			t.Errorf("%s capped at %s = %s, want %s", tc.from, tc.capAt, got.Ring.Mode, tc.want)
		}
		if (got.Ring.Mode == api.ModeOff) != (len(got.Ring.Generations) == 0) {
			t.Errorf("%s capped at %s: generations %v", tc.from, tc.capAt, got.Ring.Generations)
		}
		if in.Ring.Mode != tc.from {
			t.Error("input modified")
		}
	}
}
