//go:build linux

package xfrm

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/secureoverlay/secureoverlay/conformance/lab"
	"github.com/secureoverlay/secureoverlay/conformance/lab/wire"
)

// TestLabDataPath boots the VM lab (Debian's kernel with esp4, ipip and gcm) and runs this
// package's kernel tests inside it with SECUREOVERLAY_REQUIRE_ESP=1, so SAs and the ESP data
// path are proven on a real kernel even where the host's kernel lacks them. The test binary
// itself is shared into the guest read-only over 9p.
func TestLabDataPath(t *testing.T) {
	if os.Getenv("SECUREOVERLAY_IN_LAB") == "1" {
		t.Skip("already inside the lab guest")
	}
	if testing.Short() {
		t.Skip("boots a VM (skipped with -short)")
	}
	if _, err := lab.FindImage(""); err != nil {
		if errors.Is(err, lab.ErrNoImage) {
			skipOrFail(t, "SECUREOVERLAY_REQUIRE_ALL", err.Error())
		}
		t.Fatal(err)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	opts := lab.Options{MemoryMiB: 768, CPUs: 2,
		Shares: []lab.Share{{Tag: "xfrmtest", HostPath: filepath.Dir(exe), GuestPath: "/mnt/xfrmtest"}}}
	vm, err := lab.Boot(ctx, opts)
	if err != nil && os.Getenv("SECUREOVERLAY_LAB_ACCEL") == "" && strings.Contains(err.Error(), "(kvm)") {
		// Nested hosts may pass the lab's KVM probe and still fail to start a vCPU.
		t.Logf("KVM boot failed, retrying with TCG: %v", err)
		opts.Accel = "tcg"
		vm, err = lab.Boot(ctx, opts)
	}
	if err != nil {
		t.Fatalf("boot lab: %v", err)
	}
	defer vm.Close()
	t.Logf("lab booted in %s (%s, kernel %s)", vm.BootDuration.Round(time.Millisecond), vm.Accel, vm.KernelRelease)
	resp, err := vm.Exec(ctx, wire.Request{
		Argv: []string{"/mnt/xfrmtest/" + filepath.Base(exe), "-test.v", "-test.count=1",
			"-test.run", "^(TestNetlinkStatesRealKernel|TestNetlinkPoliciesRealKernel|TestDataPathESPOverIPIP|TestDataPathCrossSubnetTunnel)$"},
		Env:           []string{"SECUREOVERLAY_IN_LAB=1", "SECUREOVERLAY_REQUIRE_ESP=1", "SECUREOVERLAY_REQUIRE_ALL=1"},
		TimeoutMillis: (8 * time.Minute).Milliseconds(),
	})
	if err != nil {
		t.Fatalf("run in lab: %v\nconsole:\n%s", err, vm.ConsoleTail(40))
	}
	out := string(resp.Stdout) + string(resp.Stderr)
	t.Logf("guest output:\n%s", out)
	if resp.Exit != 0 || resp.Error != "" {
		t.Fatalf("kernel tests failed in the lab (exit %d %s)", resp.Exit, resp.Error)
	}
	for _, name := range []string{"TestNetlinkStatesRealKernel", "TestNetlinkPoliciesRealKernel", "TestDataPathESPOverIPIP", "TestDataPathCrossSubnetTunnel"} {
		if !strings.Contains(out, "--- PASS: "+name) {
			t.Errorf("%s did not pass in the lab", name)
		}
	}
}
