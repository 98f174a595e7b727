package ledger

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// Lock is the exclusive right to program this node's kernel: one agent (or cleanup) at a
// time, so two processes (an old and a new pod during a DaemonSet update) never keep two
// in-memory views of one ledger. The kernel releases it when the process dies.
type Lock struct{ f *os.File }

// ErrLocked is returned by TryLock while another process holds the lock.
var ErrLocked = errors.New("another secureoverlay agent on this node holds the ledger lock")

// TryLock takes dir's lock without waiting.
func TryLock(dir string) (*Lock, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("ledger directory %s: %w", dir, err)
	}
	p := filepath.Join(dir, lockName)
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("ledger lock %s: %w", p, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		_ = f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, ErrLocked
		}
		return nil, fmt.Errorf("ledger lock %s: %w", p, err)
	}
	return &Lock{f: f}, nil
}

// WaitLock takes dir's lock, retrying every interval until ctx ends; waiting is called
// once when the lock is busy (to log it).
func WaitLock(ctx context.Context, dir string, interval time.Duration, waiting func()) (*Lock, error) {
	told := false
	for {
		l, err := TryLock(dir)
		if !errors.Is(err, ErrLocked) {
			return l, err
		}
		if !told && waiting != nil {
			waiting()
			told = true
		}
		t := time.NewTimer(interval)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-t.C:
		}
	}
}

// Unlock releases the lock.
func (l *Lock) Unlock() {
	if l != nil && l.f != nil {
		_ = l.f.Close()
		l.f = nil
	}
}
