package lab

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestVMSlot: the machine-wide VM slot excludes other processes (checked with flock(1) as
// the other process) while any VM of this process holds it; VMs of one process share it
// (a package never waits for itself); the last release frees it.
func TestVMSlot(t *testing.T) {
	if _, err := exec.LookPath("flock"); err != nil {
		t.Skip("flock(1) from util-linux not installed")
	}
	lock := filepath.Join(t.TempDir(), "vm.lock")
	t.Setenv("SECUREOVERLAY_LAB_LOCK", lock)
	othersCanLock := func() bool {
		return exec.Command("flock", "-n", lock, "true").Run() == nil
	}
	if !othersCanLock() {
		t.Fatal("slot taken before anyone acquired it")
	}
	a, err := acquireSlot()
	if err != nil {
		t.Fatal(err)
	}
	b, err := acquireSlot() // a second VM of this process shares the slot at once
	if err != nil {
		t.Fatal(err)
	}
	if othersCanLock() {
		t.Fatal("another process got the slot while two VMs of this process held it")
	}
	(&VM{slot: a}).releaseSlot()
	(&VM{slot: a}).releaseSlot() // idempotent per handle
	if othersCanLock() {
		t.Fatal("slot freed while a VM of this process still held it")
	}
	(&VM{slot: b}).releaseSlot()
	if !othersCanLock() {
		t.Fatal("slot not freed after the last VM released it")
	}
}

// TestVMSlotForbidden: with ForbiddenEnv set (make test's host stream, hack/test.sh) no VM
// takes the slot, and the error says why.
func TestVMSlotForbidden(t *testing.T) {
	t.Setenv("SECUREOVERLAY_LAB_LOCK", filepath.Join(t.TempDir(), "vm.lock"))
	t.Setenv(ForbiddenEnv, "host stream")
	h, err := acquireSlot()
	if err == nil {
		(&VM{slot: h}).releaseSlot()
		t.Fatal("slot acquired although the lab VM is forbidden")
	}
	if !strings.Contains(err.Error(), "host stream") {
		t.Errorf("error %q does not say why", err)
	}
}
