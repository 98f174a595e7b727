package lab

import (
	"context"
	"fmt"
	"strconv"
	"strings"
)

// Background starts cmd (shell text) in the guest as a daemon in its own
// session, with stdout and stderr appended to logPath, and returns its PID.
// It outlives the Run that started it; stop it with Signal. Agents and
// masters run this way, e.g.
//
//	vm.Background(ctx, "ip netns exec node1 "+lab.GuestBinDir+"/secureoverlay-agent …", "/tmp/agent1.log")
func (vm *VM) Background(ctx context.Context, cmd, logPath string) (int, error) {
	script := fmt.Sprintf("setsid /bin/sh -c %s >>%s 2>&1 </dev/null & echo $!", ShellQuote(cmd), ShellQuote(logPath))
	out, _, err := vm.Run(ctx, script)
	if err != nil {
		return 0, fmt.Errorf("start background process (log %s): %w", logPath, err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil || pid <= 1 {
		return 0, fmt.Errorf("start background process (log %s): no pid in %q", logPath, out)
	}
	return pid, nil
}

// Signal sends sig (a name such as "TERM" or "KILL") to the guest process pid.
func (vm *VM) Signal(ctx context.Context, pid int, sig string) error {
	if _, _, err := vm.Run(ctx, fmt.Sprintf("kill -%s %d", ShellQuote(sig), pid)); err != nil {
		return fmt.Errorf("signal %s to guest pid %d: %w", sig, pid, err)
	}
	return nil
}

// Running reports whether guest process pid exists and is not a zombie.
func (vm *VM) Running(ctx context.Context, pid int) (bool, error) {
	out, _, err := vm.Run(ctx, fmt.Sprintf("if [ -e /proc/%d/stat ]; then cut -d')' -f2 /proc/%d/stat | cut -d' ' -f2; fi", pid, pid))
	if err != nil {
		return false, fmt.Errorf("check guest pid %d: %w", pid, err)
	}
	s := strings.TrimSpace(out)
	return s != "" && s != "Z", nil
}

// ReadFile returns a guest file's contents.
func (vm *VM) ReadFile(ctx context.Context, path string) ([]byte, error) {
	out, _, err := vm.Run(ctx, "cat "+ShellQuote(path))
	if err != nil {
		return nil, fmt.Errorf("read guest file %s: %w", path, err)
	}
	return []byte(out), nil
}

// WriteFile writes data to a guest file with the given mode, creating parent
// directories.
func (vm *VM) WriteFile(ctx context.Context, path string, data []byte, mode uint32) error {
	q := ShellQuote(path)
	cmd := fmt.Sprintf("mkdir -p \"$(dirname %s)\" && cat >%s && chmod %o %s", q, q, mode, q)
	if _, _, err := vm.RunInput(ctx, cmd, data); err != nil {
		return fmt.Errorf("write guest file %s: %w", path, err)
	}
	return nil
}
