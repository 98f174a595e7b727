// Package spawn starts the test harnesses' child processes (etcd, kube-apiserver, QEMU,
// agents) so that they die with the test binary but never before it.
//
// Linux delivers PR_SET_PDEATHSIG when the *thread* that forked the child exits, not the
// process. Go runs exec.Cmd.Start on whatever OS thread the goroutine happens to be on,
// and a thread can exit under us: a goroutine that ends while locked to its thread (as
// containernetworking's testutils.NewNS and ns.Do do after entering a network namespace)
// takes the thread with it, which would SIGKILL every child that thread forked — an API
// server dying in the middle of an unrelated test. Start therefore forks every child from
// one dedicated goroutine that is locked to its thread and never returns, so the parent
// thread lives exactly as long as the process.
package spawn

import (
	"os/exec"
	"runtime"
	"sync"
	"syscall"
)

type request struct {
	cmd  *exec.Cmd
	done chan error
}

var (
	once     sync.Once
	requests chan request
)

func forker() {
	runtime.LockOSThread() // never unlocked: this thread must outlive every child
	for r := range requests {
		r.done <- r.cmd.Start()
	}
}

// Start is cmd.Start with the child in its own process group and SIGKILLed when the test
// process dies (Pdeathsig), forked from a thread that lives as long as the process.
// Existing SysProcAttr fields are kept; Setpgid and Pdeathsig are set.
func Start(cmd *exec.Cmd) error {
	once.Do(func() {
		requests = make(chan request)
		go forker()
	})
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	done := make(chan error, 1)
	requests <- request{cmd: cmd, done: done}
	return <-done
}
