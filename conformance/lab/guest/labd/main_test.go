package main

import (
	"encoding/json"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/secureoverlay/secureoverlay/conformance/lab/wire"
)

// labd's run on the host's /bin/sh: the semantics the lab relies on.

func TestRunReportsOutputAndStatus(t *testing.T) {
	r := run(wire.Request{Argv: []string{"/bin/sh", "-c", "cat; echo oops >&2; exit 3"}, Stdin: []byte("in\n")})
	if string(r.Stdout) != "in\n" || string(r.Stderr) != "oops\n" || r.Exit != 3 || r.Error != "" {
		t.Fatalf("run = %+v", r)
	}
	if r := run(wire.Request{Argv: []string{"/nonexistent/program"}}); r.Exit != -1 || r.Error == "" {
		t.Fatalf("missing program: %+v", r)
	}
	if r := run(wire.Request{}); r.Exit != -1 || r.Error == "" {
		t.Fatalf("empty argv: %+v", r)
	}
	if r := run(wire.Request{Argv: []string{"/bin/sh", "-c", `echo "$LAB_X"`}, Env: []string{"LAB_X=y"}}); string(r.Stdout) != "y\n" {
		t.Fatalf("env: %+v", r)
	}
}

func TestRunKillsTheProcessGroupOnTimeout(t *testing.T) {
	start := time.Now()
	r := run(wire.Request{Argv: []string{"/bin/sh", "-c", "sleep 30 & sleep 30; echo never"}, TimeoutMillis: 300})
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("timeout took %s", d)
	}
	if r.Exit != -1 || !strings.Contains(r.Error, "timeout") || strings.Contains(string(r.Stdout), "never") {
		t.Fatalf("run = %+v", r)
	}
}

func TestRunDoesNotWaitForBackgroundChildren(t *testing.T) {
	start := time.Now()
	r := run(wire.Request{Argv: []string{"/bin/sh", "-c", "sleep 20 & echo started"}})
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("a background child held the answer for %s", d)
	}
	if r.Exit != 0 || string(r.Stdout) != "started\n" {
		t.Fatalf("run = %+v", r)
	}
}

func TestRunCapsOutput(t *testing.T) {
	r := run(wire.Request{Argv: []string{"/bin/sh", "-c", "head -c 17000000 /dev/zero"}})
	if !r.Truncated || len(r.Stdout) != wire.MaxOutput || r.Exit != 0 {
		t.Fatalf("truncated=%v len=%d exit=%d", r.Truncated, len(r.Stdout), r.Exit)
	}
}

func TestServeOneExchangePerConnection(t *testing.T) {
	a, b := net.Pipe()
	go serve(b)
	if err := json.NewEncoder(a).Encode(wire.Request{Argv: []string{"/bin/sh", "-c", "echo hi"}}); err != nil {
		t.Fatal(err)
	}
	var r wire.Response
	if err := json.NewDecoder(a).Decode(&r); err != nil {
		t.Fatal(err)
	}
	if string(r.Stdout) != "hi\n" || r.Exit != 0 {
		t.Fatalf("serve = %+v", r)
	}
	a.Close()
}
