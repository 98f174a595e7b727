package lab

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/secureoverlay/secureoverlay/conformance/lab/wire"
)

// RequireAll reports whether SECUREOVERLAY_REQUIRE_ALL=1, under which a
// missing capability fails a test instead of skipping it.
func RequireAll() bool { return os.Getenv("SECUREOVERLAY_REQUIRE_ALL") == "1" }

// Unavailable says why the lab cannot boot here (no image, no QEMU), or "".
// In -short mode the lab is always unavailable: a boot takes tens of seconds.
func Unavailable(opts Options) string {
	if testing.Testing() && testing.Short() {
		return "lab VM tests are not run in -short mode"
	}
	if _, err := FindImage(opts.CacheDir); err != nil {
		if errors.Is(err, ErrNoImage) {
			return err.Error()
		}
		return "lab image: " + err.Error()
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		return "qemu-system-x86_64 not installed (run hack/install-deps.sh)"
	}
	if len(opts.GuestForwards) > 0 {
		if _, err := exec.LookPath("busybox"); err != nil {
			return "busybox not installed on the host (guest forwards relay through it)"
		}
	}
	return ""
}

// SkipUnlessAvailable skips t when the lab cannot boot here, or fails it
// under SECUREOVERLAY_REQUIRE_ALL=1 (except in -short mode, which always skips).
func SkipUnlessAvailable(t testing.TB, opts Options) {
	t.Helper()
	reason := Unavailable(opts)
	if reason == "" {
		return
	}
	if RequireAll() && !testing.Short() {
		t.Fatalf("SECUREOVERLAY_REQUIRE_ALL=1 but %s", reason)
	}
	t.Skip(reason)
}

// BootForTest boots a VM for t (skipping as SkipUnlessAvailable does),
// logs the boot time, and registers Close with t.Cleanup. When t has failed,
// the cleanup first logs the tail of the guest console.
func BootForTest(t testing.TB, opts Options) *VM {
	t.Helper()
	SkipUnlessAvailable(t, opts)
	timeout := opts.BootTimeout
	if timeout == 0 {
		timeout = 4 * time.Minute
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout+30*time.Second)
	defer cancel()
	vm, err := Boot(ctx, opts)
	if err != nil && opts.Accel == "" && os.Getenv("SECUREOVERLAY_LAB_ACCEL") == "" && strings.Contains(err.Error(), "(kvm)") {
		// Nested hosts may pass the lab's KVM probe and still fail to start a vCPU.
		t.Logf("KVM boot failed, retrying with TCG: %v", err)
		opts.Accel = "tcg"
		vm, err = Boot(ctx, opts)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("lab console (last 100 lines of %s):\n%s", vm.ConsoleLog(), vm.ConsoleTail(100))
		}
		if err := vm.Close(); err != nil {
			t.Error(err)
		}
	})
	for _, c := range vm.BootCrashes {
		t.Logf("lab vm: %s", c)
	}
	t.Logf("lab vm booted in %s (accel %s, kernel %s)", vm.BootDuration.Round(time.Millisecond), vm.Accel, vm.KernelRelease)
	return vm
}

// GuestTest is a run of the calling test binary inside a lab VM (RunInGuest).
type GuestTest struct {
	// Run is the -test.run pattern; Want the tests that must report "--- PASS".
	Run  string
	Want []string
	// Env is added to SECUREOVERLAY_IN_LAB=1 in the guest.
	Env []string
	// Timeout bounds the run in the guest (default 8 minutes).
	Timeout time.Duration
	// MemoryMiB for the VM (default 768).
	MemoryMiB int
}

// guestTestScript runs a test binary in the guest ("$@") so that a guest that hangs still
// says where: each test's start and end also go to the serial console (console.log on the
// host, which BootForTest prints when t fails, and which outlives a guest whose CPUs are
// all stuck), and the kernel prints the stacks of a soft lockup there, on every CPU
// (console loglevel 5: the stack lines are KERN_DEFAULT, hidden at the boot's loglevel=4).
// The exit status is the test binary's (busybox's ash has no pipefail).
const guestTestScript = `echo 5 >/proc/sys/kernel/printk 2>/dev/null
echo 1 >/proc/sys/kernel/softlockup_all_cpu_backtrace 2>/dev/null
rc=/tmp/guest-test.$$.rc
{ "$@" 2>&1; echo $? >$rc; } | while IFS= read -r l; do
	case "$l" in "=== RUN"*|"--- "*) echo "guest test: $l" >/dev/ttyS0;; esac
	printf '%s\n' "$l"
done
exit $(cat $rc 2>/dev/null || echo 125)`

// RunInGuest runs tests of the calling test binary on the lab's kernel: it skips t when
// already inside the guest (SECUREOVERLAY_IN_LAB=1) and as SkipUnlessAvailable does, boots
// a VM with the binary's directory shared read-only, runs the binary there with g.Run,
// logs its output, fails t unless it exits 0 and every test in g.Want passed, and returns
// the output.
func RunInGuest(t testing.TB, g GuestTest) string {
	t.Helper()
	if os.Getenv("SECUREOVERLAY_IN_LAB") == "1" {
		t.Skip("already inside the lab guest")
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	if g.Timeout == 0 {
		g.Timeout = 8 * time.Minute
	}
	if g.MemoryMiB == 0 {
		g.MemoryMiB = 768
	}
	const share = "/mnt/testbin"
	vm := BootForTest(t, Options{MemoryMiB: g.MemoryMiB, CPUs: 2,
		Shares: []Share{{Tag: "testbin", HostPath: filepath.Dir(exe), GuestPath: share}}})
	ctx, cancel := context.WithTimeout(context.Background(), g.Timeout+time.Minute)
	defer cancel()
	resp, err := vm.Exec(ctx, wire.Request{
		Argv: append([]string{"/bin/sh", "-c", guestTestScript, "guest-test"},
			share+"/"+filepath.Base(exe), "-test.v", "-test.count=1", "-test.run", g.Run),
		Env:           append([]string{"SECUREOVERLAY_IN_LAB=1"}, g.Env...),
		TimeoutMillis: g.Timeout.Milliseconds(),
	})
	if err != nil {
		t.Fatalf("run %s in the lab: %v", g.Run, err)
	}
	out := string(resp.Stdout) + string(resp.Stderr)
	t.Logf("guest output:\n%s", out)
	if resp.Exit != 0 || resp.Error != "" {
		t.Fatalf("%s failed in the lab (exit %d %s)", g.Run, resp.Exit, resp.Error)
	}
	for _, name := range g.Want {
		if !strings.Contains(out, "--- PASS: "+name) {
			t.Errorf("%s did not pass in the lab", name)
		}
	}
	return out
}
