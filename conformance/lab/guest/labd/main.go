// Command labd is the lab guest's command channel. It runs inside the VM
// (started and respawned by busybox init, see ../inittab) and serves
// wire.Request over TCP: each connection runs one program and returns its
// stdout, stderr and exit status.
//
// Invariants: a program never outlives its timeout (its whole process group is
// killed); output is capped at wire.MaxOutput per stream; background children
// that keep stdout open do not hold the answer back for more than a second
// after the program itself exits (exec.Cmd.WaitDelay). labd logs failures
// with the program name and status only, never arguments or input, because
// tests pass key material through them.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"os/exec"
	"syscall"
	"time"

	"github.com/secureoverlay/secureoverlay/conformance/lab/wire"
)

func main() {
	listen := flag.String("listen", fmt.Sprintf(":%d", wire.GuestPort), "address to serve the command channel on")
	flag.Parse()
	log.SetPrefix("labd: ")
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatalf("listen %s: %v", *listen, err)
	}
	log.Printf("serving on %s", ln.Addr())
	for {
		c, err := ln.Accept()
		if err != nil {
			log.Printf("accept: %v", err)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		go serve(c)
	}
}

func serve(c net.Conn) {
	defer c.Close()
	var req wire.Request
	if err := json.NewDecoder(c).Decode(&req); err != nil {
		_ = json.NewEncoder(c).Encode(wire.Response{Exit: -1, Error: fmt.Sprintf("decode request: %v", err)})
		return
	}
	resp := run(req)
	if err := json.NewEncoder(c).Encode(resp); err != nil {
		log.Printf("write response: %v", err)
	}
}

// capped keeps the first wire.MaxOutput bytes written to it. The buffer is a
// field, not embedded: an embedded bytes.Buffer would promote ReadFrom, and
// io.Copy (which exec.Cmd uses) would bypass Write and the cap.
type capped struct {
	buf       bytes.Buffer
	truncated bool
}

func (b *capped) Write(p []byte) (int, error) {
	n := len(p)
	if room := wire.MaxOutput - b.buf.Len(); len(p) > room {
		b.truncated = true
		p = p[:max(room, 0)]
	}
	b.buf.Write(p)
	return n, nil
}

func (b *capped) Bytes() []byte { return b.buf.Bytes() }

func run(req wire.Request) wire.Response {
	if len(req.Argv) == 0 {
		return wire.Response{Exit: -1, Error: "empty argv"}
	}
	timeout := 10 * time.Minute
	if req.TimeoutMillis > 0 {
		timeout = time.Duration(req.TimeoutMillis) * time.Millisecond
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()

	cmd := exec.CommandContext(ctx, req.Argv[0], req.Argv[1:]...)
	cmd.Env = append([]string{
		"PATH=/sbin:/usr/sbin:/usr/bin:/bin",
		"HOME=/root",
		"TERM=dumb",
		"LANG=C",
	}, req.Env...)
	cmd.Dir = "/root"
	cmd.Stdin = bytes.NewReader(req.Stdin)
	var stdout, stderr capped
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = time.Second

	start := time.Now()
	err := cmd.Run()
	resp := wire.Response{Exit: -1}
	var exitErr *exec.ExitError
	switch {
	case err == nil:
		resp.Exit = 0
	case errors.As(err, &exitErr) && exitErr.Exited():
		resp.Exit = exitErr.ExitCode()
	case errors.Is(err, exec.ErrWaitDelay):
		// The program exited but a background child kept its output open.
		resp.Exit = cmd.ProcessState.ExitCode()
	default:
		resp.Error = err.Error()
	}
	if ctx.Err() != nil {
		resp.Exit = -1
		resp.Error = fmt.Sprintf("killed after timeout %s", timeout)
	}
	resp.Stdout, resp.Stderr = stdout.Bytes(), stderr.Bytes()
	resp.Truncated = stdout.truncated || stderr.truncated
	if resp.Exit != 0 {
		log.Printf("ran %s: exit %d in %s %s", req.Argv[0], resp.Exit, time.Since(start).Round(time.Millisecond), resp.Error)
	}
	return resp
}
