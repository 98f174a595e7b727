package agent

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/gate"
)

// TestBootGateFiles: the agent writes the boot gate's files (package gate) only for a
// kernel it has programmed — nothing after a failed sync; after a successful one, the
// state file holds the mode the kernel holds and the ready file this boot's ID — keeps
// the state file at each uninstall step's mode while the walk-down runs, and removes it
// when nothing of ours is left.
func TestBootGateFiles(t *testing.T) {
	boot, err := gate.BootID()
	if err != nil {
		t.Skipf("no boot ID on this host: %v", err)
	}
	dir := t.TempDir()
	cfg := Config{StateFile: filepath.Join(dir, "lib", "dataplane.json"), ReadyFile: filepath.Join(dir, "run", "ready.json")}

	// A failed sync programs nothing and records nothing.
	f := newEnv(t, api.ModeAccept, cfg)
	f.failXf.Store(true)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go f.src.Run(ctx)
	waitFor(t, "synced", f.src.HasSynced)
	if err := f.a.Sync(ctx); err == nil {
		t.Fatal("sync with failing xfrm writes succeeded")
	}
	for _, p := range []string{cfg.StateFile, cfg.ReadyFile} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s written after a failed sync (%v)", p, err)
		}
	}
	cancel()

	e, stop := enforcingEnvWith(t, cfg)
	defer stop()
	st, err := gate.ReadState(cfg.StateFile)
	if err != nil || st == nil || st.Mode != string(api.ModeEnforce) || st.Node != "a" {
		t.Fatalf("state file after an enforcing sync: %+v, %v", st, err)
	}
	r := gate.ReadReady(cfg.ReadyFile)
	if r == nil || r.BootID != boot || r.Mode != string(api.ModeEnforce) {
		t.Fatalf("ready file after an enforcing sync: %+v (boot %s)", r, boot)
	}
	if value(e.m.GateReady) != 1 || value(f.m.GateReady) != 0 {
		t.Errorf("boot_gate_ready: %v after a successful sync, %v after a failed one; want 1, 0", value(e.m.GateReady), value(f.m.GateReady))
	}
	if v := gate.Decide(st, nil, r, boot); !v.Open {
		t.Errorf("the plugin's gate stays closed after the agent programmed the node: %s", v.Why)
	}

	// Uninstall: each step's mode is recorded while it holds; at the end there is no record.
	var modes []string
	e.a.d.Sleep = func(ctx context.Context, d time.Duration) error {
		s, err := gate.ReadState(cfg.StateFile)
		if err != nil || s == nil {
			t.Errorf("state file during the walk-down: %+v, %v", s, err)
		} else {
			modes = append(modes, s.Mode)
		}
		e.now.Add(int64(d))
		return nil
	}
	if err := e.a.Uninstall(context.Background(), time.Second); err != nil {
		t.Fatal(err)
	}
	if want := []string{string(api.ModeEncrypt), string(api.ModeAccept)}; len(modes) != 2 || modes[0] != want[0] || modes[1] != want[1] {
		t.Errorf("modes recorded during the walk-down %v, want %v", modes, want)
	}
	if _, err := os.Stat(cfg.StateFile); !os.IsNotExist(err) {
		t.Errorf("state file left after the uninstall: %v", err)
	}
}

// TestBootGateWriteErrors: a state file that cannot be written is counted and retried at
// the next sync; the ready file is still written (the kernel is programmed either way).
func TestBootGateWriteErrors(t *testing.T) {
	if _, err := gate.BootID(); err != nil {
		t.Skipf("no boot ID on this host: %v", err)
	}
	dir := t.TempDir()
	blocker := filepath.Join(dir, "not-a-dir")
	if err := os.WriteFile(blocker, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := Config{StateFile: filepath.Join(blocker, "dataplane.json"), ReadyFile: filepath.Join(dir, "ready.json")}
	e, stop := enforcingEnvWith(t, cfg)
	defer stop()
	if got := value(e.m.GateErrors.WithLabelValues("state")); got != 1 {
		t.Errorf("state write errors %v after one sync, want 1", got)
	}
	if r := gate.ReadReady(cfg.ReadyFile); r == nil || value(e.m.GateReady) != 1 {
		t.Errorf("ready file %+v, boot_gate_ready %v: a failed state write must not hold this boot's pods", r, value(e.m.GateReady))
	}
	if err := e.a.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := value(e.m.GateErrors.WithLabelValues("state")); got != 2 {
		t.Errorf("state write errors %v after two syncs, want 2 (retried)", got)
	}
}
