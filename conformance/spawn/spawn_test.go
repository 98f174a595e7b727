package spawn

import (
	"os/exec"
	"runtime"
	"syscall"
	"testing"
	"time"
)

// TestChildSurvivesItsCallersThread: a child started from a goroutine whose OS thread then
// exits (a goroutine ending while locked to its thread) must keep running. With a plain
// cmd.Start and Pdeathsig it is SIGKILLed as soon as that thread dies.
func TestChildSurvivesItsCallersThread(t *testing.T) {
	cmd := exec.Command("sleep", "30")
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with this goroutine
		started <- Start(cmd)
	}()
	if err := <-started; err != nil {
		t.Fatal(err)
	}
	if cmd.SysProcAttr.Pdeathsig != syscall.SIGKILL || !cmd.SysProcAttr.Setpgid {
		t.Fatalf("SysProcAttr not set: %+v", cmd.SysProcAttr)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() { _ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); <-exited })
	select {
	case err := <-exited:
		exited <- err
		t.Fatalf("child died when its caller's thread exited: %v", err)
	case <-time.After(1500 * time.Millisecond):
	}
}
