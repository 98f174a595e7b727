package e2e

import (
	"context"
	"flag"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/secureoverlay/secureoverlay/conformance/lab"
)

// The scenarios share one lab (one VM boot, one API server): 3 registered
// nodes plus a spare for the join scenario, 2 master replicas.
var (
	sharedOnce sync.Once
	shared     *Lab
	sharedErr  error
	// sharedRelease is the Config.Release the shared lab was started from.
	sharedRelease string
	keepState     = flag.String("e2e.state", "", "keep the lab's logs in this directory")
	suiteStart    = time.Now()
)

func TestMain(m *testing.M) {
	flag.Parse()
	code := m.Run()
	if shared != nil {
		if code != 0 {
			fmt.Fprintf(os.Stderr, "lab logs in %s\n", shared.StateDir())
		}
		_ = shared.Close()
	}
	fmt.Fprintf(os.Stderr, "e2e: total %s\n", time.Since(suiteStart).Round(time.Second))
	os.Exit(code)
}

// sharedLab returns the shared lab, starting it on first use; it skips t
// when the lab cannot run here (fails under SECUREOVERLAY_REQUIRE_ALL=1).
func sharedLab(t *testing.T) *Lab {
	t.Helper()
	return sharedLabFrom(t, "")
}

// sharedLabFrom is sharedLab started from an earlier release's binaries (Config.Release;
// "" for this tree's). Only the first test to use the shared lab can choose: the upgrade
// scenario, first in file order, upgrades the lab the later scenarios then use; asked
// for a release the lab was not started from, it fails t.
func sharedLabFrom(t *testing.T, release string) *Lab {
	t.Helper()
	if testing.Short() {
		t.Skip("the VM lab is not run in -short mode")
	}
	if r := Unavailable(); r != "" {
		if lab.RequireAll() {
			t.Fatalf("SECUREOVERLAY_REQUIRE_ALL=1 but %s", r)
		}
		t.Skip(r)
	}
	sharedOnce.Do(func() {
		// Generous: Boot waits for the machine's VM slot while other
		// packages' lab tests run (`go test ./...` runs packages in parallel).
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
		defer cancel()
		state := *keepState
		if state == "" {
			state = os.Getenv("SECUREOVERLAY_E2E_STATE")
		}
		sharedRelease = release
		shared, sharedErr = Up(ctx, Config{Nodes: 3, SpareNodes: 1, Masters: 2, StateDir: state, Release: release,
			Progress: func(s string) { fmt.Fprintf(os.Stderr, "e2e: %s\n", s) }})
	})
	if sharedErr != nil {
		t.Fatalf("lab: %v", sharedErr)
	}
	if release != "" && release != sharedRelease {
		t.Fatalf("the shared lab was started from this tree's binaries, not from %s: run this test first (file order) or alone", release)
	}
	return shared
}

// fail logs diagnostics (master status, agent log tails) and fails t.
func diagnose(t *testing.T, l *Lab) {
	t.Helper()
	if !t.Failed() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if st, err := l.Status(ctx); err == nil {
		t.Logf("master status: mode %s target %s active %d pending %d waiting %q lagging %v lastError %q",
			st.Mode, st.Target, st.ActiveGeneration, st.PendingGeneration, st.Waiting, st.Lagging, st.LastError)
	}
	for _, i := range l.RegisteredNodes() {
		t.Logf("agent node%d log tail:\n%s", i, l.AgentLogTail(ctx, i, 15))
	}
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
