package main

import (
	"os"
	"runtime/debug"
	"testing"
)

// TestGCDefault: without $GOGC the agent collects at agentGOGC; an operator's GOGC is left
// as the runtime read it.
func TestGCDefault(t *testing.T) {
	prev := debug.SetGCPercent(100)
	defer debug.SetGCPercent(prev)
	if v, ok := os.LookupEnv("GOGC"); ok {
		defer os.Setenv("GOGC", v)
	} else {
		defer os.Unsetenv("GOGC")
	}

	os.Unsetenv("GOGC")
	gcDefault()
	if got := debug.SetGCPercent(100); got != agentGOGC {
		t.Errorf("GOGC unset: GC percent %d, want %d", got, agentGOGC)
	}
	os.Setenv("GOGC", "100")
	gcDefault()
	if got := debug.SetGCPercent(100); got != 100 {
		t.Errorf("GOGC=100 set: GC percent %d, want 100 (the operator's)", got)
	}
}
