package ctl

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/master"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
)

// startMaster runs the real master in-process with short intervals.
func (e *env) startMaster() {
	e.t.Helper()
	cs, err := kubernetes.NewForConfig(e.cluster.AdminConfig())
	if err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(e.ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			_ = master.Run(ctx, cs, master.Options{Identity: "master-0", LeaseDuration: 4 * time.Second, RenewDeadline: 3 * time.Second,
				RetryPeriod: 200 * time.Millisecond, Resync: 300 * time.Millisecond,
				Policy: keys.Config{Grace: time.Second, NodeTimeout: time.Minute, SeqThreshold: 0.5, Cipher: keys.AES128GCM, ICVBytes: 8},
				Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		}
	}()
	e.t.Cleanup(func() { cancel(); <-done })
}

// simAgent follows the ring in the Secret like an agent and reports it on its Node
// after a random "install" delay; paused, it stops reporting. Pausing waits for an
// iteration in flight to end, so no report made from a ring read before or after the
// pause lands once it has returned.
type simAgent struct {
	name, boot string
	mu         sync.Mutex // held for one iteration: read the ring, report it
	paused     bool
}

func (a *simAgent) setPaused(p bool) {
	a.mu.Lock()
	a.paused = p
	a.mu.Unlock()
}

func (e *env) startAgent(name, boot string) *simAgent {
	a := &simAgent{name: name, boot: boot}
	ctx, cancel := context.WithCancel(e.ctx)
	done := make(chan struct{})
	e.t.Cleanup(func() { cancel(); <-done })
	last := ""
	// step is one iteration; false once ctx ends.
	step := func() bool {
		a.mu.Lock()
		defer a.mu.Unlock()
		if a.paused {
			return true
		}
		sec, err := e.cs.CoreV1().Secrets(api.Namespace).Get(ctx, api.SecretName, metav1.GetOptions{})
		if err != nil {
			return ctx.Err() == nil
		}
		ring, err := keys.Parse(sec.Data[api.SecretDataKey])
		if err != nil {
			return true
		}
		rep := watch.Report{NodeReport: api.NodeReport{Mode: ring.Mode, Generations: ring.Numbers(), Incarnation: boot,
			BudgetMTU: 1452, ExternalMTU: 1500, PeersEncrypted: 2, PeersExpected: 2}}
		if ring.Mode.Rank() < api.ModeEncrypt.Rank() {
			rep.PeersEncrypted = 0
		}
		b, _ := json.Marshal(rep)
		if string(b) == last {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(time.Duration(rand.IntN(200)) * time.Millisecond):
		}
		rep.LastSync = time.Now().UTC().Truncate(time.Second)
		full, _ := json.Marshal(rep)
		patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]string{api.ReportAnnotation: string(full)}}})
		if _, err := e.cs.CoreV1().Nodes().Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{}); err == nil {
			last = string(b)
		}
		return true
	}
	go func() {
		defer close(done)
		for {
			select {
			case <-ctx.Done():
				return
			case <-time.After(50 * time.Millisecond):
			}
			if !step() {
				return
			}
		}
	}()
	return a
}

func (e *env) waitMasterStatus() {
	e.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := e.cs.CoreV1().ConfigMaps(api.Namespace).Get(e.ctx, api.StatusConfigMapName, metav1.GetOptions{}); err == nil {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	e.t.Fatal("the master published no status within 30s")
}

func (e *env) ringNow() *keys.Ring {
	e.t.Helper()
	sec, err := e.cs.CoreV1().Secrets(api.Namespace).Get(e.ctx, api.SecretName, metav1.GetOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	r, err := keys.Parse(sec.Data[api.SecretDataKey])
	if err != nil {
		e.t.Fatal(err)
	}
	return r
}

// TestCutoverAndRotateWait: enable --wait, rotate --wait and disable --wait complete
// against the real master with simulated agents; a lagging node makes --wait time out
// naming it; rotate refuses when encryption is off.
func TestCutoverAndRotateWait(t *testing.T) {
	e := newEnv(t)
	for _, n := range testNodes {
		e.createNode(n.name, n.ip, n.boot, nil)
	}
	agents := map[string]*simAgent{}
	for _, n := range testNodes {
		agents[n.name] = e.startAgent(n.name, n.boot)
	}
	e.startMaster()
	e.waitMasterStatus()
	run := func(args ...string) result { t.Helper(); return e.runClock(time.Now, args...) }

	r := run("rotate")
	if r.code != ExitNotOK || r.stderr != "error: encryption is off: there is no key to rotate (enable it first)\n" {
		t.Fatalf("rotate while off:\n%s", r)
	}

	r = run("enable", "--wait", "--timeout", "60s")
	t.Logf("enable --wait:\n%s", r.stdout)
	if r.code != ExitOK || r.stderr != "" {
		t.Fatalf("enable --wait:\n%s", r)
	}
	for _, want := range []string{"requested target mode enforce", "mode accept (target enforce)", "mode encrypt (target enforce)", "done: mode enforce on all 3 nodes"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("enable --wait output lacks %q", want)
		}
	}
	if ring := e.ringNow(); ring.Mode != api.ModeEnforce || ring.Active() == nil || ring.Active().Number != 1 {
		t.Fatalf("after enable: ring %s", keys.Summary(ring))
	}
	if r := run("status"); r.code != ExitOK || !strings.HasPrefix(r.stdout, "Summary:  all 3 nodes encrypting and enforcing, generation 1\n") {
		t.Fatalf("status after enable:\n%s", r)
	}

	r = run("rotate", "--wait", "--timeout", "60s")
	t.Logf("rotate --wait:\n%s", r.stdout)
	if r.code != ExitOK || r.stderr != "" {
		t.Fatalf("rotate --wait:\n%s", r)
	}
	for _, want := range []string{"(active generation 1)", "done: generation 2 active on all 3 nodes"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("rotate --wait output lacks %q", want)
		}
	}
	if ring := e.ringNow(); ring.Active() == nil || ring.Active().Number != 2 || ring.LastGeneration != 2 {
		t.Fatalf("after rotate: ring %s", keys.Summary(ring))
	}

	// node-c's agent stops: the next rotation cannot activate; --wait names it and
	// times out with exit 5.
	agents["node-c"].setPaused(true)
	r = run("rotate", "--wait", "--timeout", "5s")
	t.Logf("rotate --wait with node-c paused:\n%s", r)
	if r.code != ExitTimeout || strings.Count(r.stderr, "\n") != 1 ||
		!strings.HasPrefix(r.stderr, "error: timed out after 5s: generation 3 pending") || !strings.Contains(r.stderr, "node-c") {
		t.Fatalf("rotate --wait with a lagging node:\n%s", r)
	}
	agents["node-c"].setPaused(false)

	r = run("disable", "--wait", "--timeout", "60s")
	t.Logf("disable --wait:\n%s", r.stdout)
	if r.code != ExitOK || r.stderr != "" {
		t.Fatalf("disable --wait:\n%s", r)
	}
	for _, want := range []string{"requested target mode off", "done: mode off on all 3 nodes"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("disable --wait output lacks %q", want)
		}
	}
	if ring := e.ringNow(); ring.Mode != api.ModeOff || len(ring.Generations) != 0 {
		t.Fatalf("after disable: ring %s", keys.Summary(ring))
	}

	// Stop a rollout at accept.
	r = run("enable", "--mode", "accept", "--wait", "--timeout", "60s")
	if r.code != ExitOK || !strings.Contains(r.stdout, "done: mode accept on all 3 nodes") {
		t.Fatalf("enable --mode accept --wait:\n%s", r)
	}
	if ring := e.ringNow(); ring.Mode != api.ModeAccept || ring.Active() == nil || ring.Active().Number != 4 {
		t.Fatalf("after enable --mode accept: ring %s", keys.Summary(ring))
	}
}
