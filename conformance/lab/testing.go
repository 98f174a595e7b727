package lab

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"testing"
	"time"
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
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("lab console (last 40 lines of %s):\n%s", vm.ConsoleLog(), vm.ConsoleTail(40))
		}
		if err := vm.Close(); err != nil {
			t.Error(err)
		}
	})
	t.Logf("lab vm booted in %s (accel %s, kernel %s)", vm.BootDuration.Round(time.Millisecond), vm.Accel, vm.KernelRelease)
	return vm
}
