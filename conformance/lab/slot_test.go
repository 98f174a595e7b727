package lab

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"
)

// TestVMSlotSerialises: while one holder has the machine-wide VM slot, another Boot waits
// and gives up with its context; once the slot is freed the next holder gets it at once.
func TestVMSlotSerialises(t *testing.T) {
	t.Setenv("SECUREOVERLAY_LAB_LOCK", filepath.Join(t.TempDir(), "vm.lock"))
	first, err := acquireSlot(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 600*time.Millisecond)
	defer cancel()
	start := time.Now()
	if f, err := acquireSlot(ctx); err == nil {
		f.Close()
		t.Fatal("second holder got the slot while the first held it")
	} else if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("second holder: %v, want a deadline error", err)
	}
	if waited := time.Since(start); waited < 500*time.Millisecond {
		t.Fatalf("second holder gave up after %v, before its deadline", waited)
	}
	vm := &VM{slot: first}
	vm.releaseSlot()
	vm.releaseSlot() // idempotent
	ctx2, cancel2 := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel2()
	second, err := acquireSlot(ctx2)
	if err != nil {
		t.Fatalf("slot not free after release: %v", err)
	}
	second.Close()
}
