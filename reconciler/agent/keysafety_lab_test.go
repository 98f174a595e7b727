//go:build linux

package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"testing"

	"github.com/secureoverlay/secureoverlay/conformance/lab"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/ledger"
	"github.com/secureoverlay/secureoverlay/reconciler/rules"
	"github.com/secureoverlay/secureoverlay/reconciler/xfrm"
)

// TestLabKeySafety runs TestKeySafetyRealKernel in the VM lab (Debian's kernel with esp4
// and gcm): the flush, restart, kill and cleanup cases of the key-safety property with
// real xfrm states.
func TestLabKeySafety(t *testing.T) {
	lab.RunInGuest(t, lab.GuestTest{Run: "^TestKeySafetyRealKernel$", Want: []string{"TestKeySafetyRealKernel"},
		Env: []string{"SECUREOVERLAY_REQUIRE_ESP=1", "SECUREOVERLAY_REQUIRE_ALL=1"}})
}

// keyRecorder is a real netns kernel that remembers the fingerprint of every key it was
// asked to add, and can be killed (every call fails from a given call on).
type keyRecorder struct {
	netnsKernel
	mu      sync.Mutex
	adds    map[ledger.Fingerprint][]string
	killIn  int // calls until death; <0: never
	dead    bool
	written int
}

var errLabKilled = errors.New("killed")

func (k *keyRecorder) gate() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.dead {
		return errLabKilled
	}
	if k.killIn == 0 {
		k.dead = true
		return errLabKilled
	}
	if k.killIn > 0 {
		k.killIn--
	}
	return nil
}

func (k *keyRecorder) AddState(sa desired.SA) error {
	if err := k.gate(); err != nil {
		return err
	}
	if err := k.netnsKernel.AddState(sa); err != nil {
		return err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	k.written++
	fp := ledger.KeyFingerprint(sa.Key.Bytes())
	k.adds[fp] = append(k.adds[fp], sa.String())
	return nil
}

func (k *keyRecorder) DeleteState(sa desired.SA) error {
	if err := k.gate(); err != nil {
		return err
	}
	k.mu.Lock()
	k.written++
	k.mu.Unlock()
	return k.netnsKernel.DeleteState(sa)
}

func (k *keyRecorder) AddPolicy(p desired.Policy) error {
	if err := k.gate(); err != nil {
		return err
	}
	k.mu.Lock()
	k.written++
	k.mu.Unlock()
	return k.netnsKernel.AddPolicy(p)
}

func (k *keyRecorder) UpdatePolicy(p desired.Policy) error {
	if err := k.gate(); err != nil {
		return err
	}
	k.mu.Lock()
	k.written++
	k.mu.Unlock()
	return k.netnsKernel.UpdatePolicy(p)
}

func (k *keyRecorder) DeletePolicy(p desired.Policy) error {
	if err := k.gate(); err != nil {
		return err
	}
	k.mu.Lock()
	k.written++
	k.mu.Unlock()
	return k.netnsKernel.DeletePolicy(p)
}

func (k *keyRecorder) reused() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	var out []string
	for _, sas := range k.adds {
		if len(sas) > 1 {
			out = append(out, fmt.Sprint(sas))
		}
	}
	return out
}

// kernelKeys lists the fingerprints of the keys of our states in the real kernel.
func (k *keyRecorder) kernelKeys(t *testing.T) map[ledger.Fingerprint]bool {
	t.Helper()
	sts, err := k.netnsKernel.ListStates()
	if err != nil {
		t.Fatal(err)
	}
	out := map[ledger.Fingerprint]bool{}
	for _, s := range sts {
		out[ledger.KeyFingerprint(s.SA.Key.Bytes())] = true
	}
	return out
}

// TestKeySafetyRealKernel: node a's real agent code (ledger, applier, Netlink) on a real
// kernel (the VM lab), with peers b and c simulated through their reports. Each of the
// review's cases in turn; after each, the kernel holds SAs and no key was ever added twice.
func TestKeySafetyRealKernel(t *testing.T) {
	if os.Geteuid() != 0 {
		skipOrFail(t, "needs root")
	}
	if reason := espMissing(t); reason != "" {
		if os.Getenv("SECUREOVERLAY_REQUIRE_ESP") == "1" {
			t.Fatalf("%s (required by SECUREOVERLAY_REQUIRE_ESP=1)", reason)
		}
		t.Skip(reason)
	}
	sys, err := rules.NewSystem()
	if err != nil {
		skipOrFail(t, "iptables: "+err.Error())
	}
	netns := newNetNS(t)
	if err := shell(netns, "ip", "link", "set", "lo", "up"); err != nil {
		t.Fatal(err)
	}
	kern := &keyRecorder{netnsKernel: netnsKernel{netns}, adds: map[ledger.Fingerprint][]string{}, killIn: -1}
	s := newSim(t, 7)
	start := func() {
		if s.a != nil {
			s.a.Close()
		}
		kern.mu.Lock()
		kern.dead, kern.killIn = false, -1
		kern.mu.Unlock()
		a, err := New(Config{NodeName: "a", ExternalMTU: 1500, LedgerDir: s.dir},
			Deps{Client: s.cs, Source: s.src, Xfrm: xfrm.NewApplier(kern, desired.Config{}), Rules: rules.NewApplier(nsIPT{ns: netns, sys: sys}),
				Metrics: NewMetrics(""), Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Now: s.now})
		if err != nil {
			t.Fatal(err)
		}
		s.a = a
	}
	ctx := context.Background()
	sync := func(what string) {
		t.Helper()
		for range 3 {
			if err := s.a.Sync(ctx); err != nil {
				t.Fatalf("%s: sync: %v", what, err)
			}
		}
		if r := kern.reused(); len(r) != 0 {
			t.Fatalf("%s: SAs re-created under a key they used before: %v", what, r)
		}
	}
	flush := func() {
		t.Helper()
		if err := shell(netns, "ip", "xfrm", "state", "flush"); err != nil {
			t.Fatal(err)
		}
	}
	countStates := func() int { return len(kern.kernelKeys(t)) }
	start()
	// Enable (off → accept) with generation 1; both peers ready toward a.
	s.ring.Generations = append(s.ring.Generations, s.newGeneration("active"))
	s.ring.Mode, s.ring.Target = "accept", "enforce"
	s.writeRing()
	sync("first sync")
	for _, p := range []string{"b", "c"} {
		s.publishPeer(p)
	}
	sync("peers published")
	if n := countStates(); n != 8 { // 2 peers × (transport, tunnel) × (in, out)
		t.Fatalf("%d states in the kernel, want 8", n)
	}
	epoch := s.a.Epoch()
	before := kern.kernelKeys(t)

	// `ip xfrm state flush` by another tool: a new epoch, every key new.
	flush()
	s.a.Resync()
	sync("after ip xfrm state flush")
	if s.a.Epoch() == epoch || countStates() != 8 {
		t.Fatalf("after the flush: epoch %s (was %s), %d states", s.a.Epoch(), epoch, countStates())
	}
	for fp := range kern.kernelKeys(t) {
		if before[fp] {
			t.Fatal("a key installed before the flush is in the kernel again")
		}
	}

	// A clean restart adopts: no kernel write at all.
	epoch = s.a.Epoch()
	start()
	w := kern.written
	sync("after a clean restart")
	if s.a.Epoch() != epoch || kern.written != w {
		t.Fatalf("clean restart: epoch %s (was %s), %d kernel writes (want 0)", s.a.Epoch(), epoch, kern.written-w)
	}

	// Killed after programming a new generation but before the report, then a flush and
	// a restart: nothing under a key the killed process used.
	s.ring.Generations = append(s.ring.Generations, s.newGeneration("pending"))
	s.writeRing()
	s.killIn = 0 // the report patch is the process's first operation outside the kernel
	s.a.Resync() // a full sync publishes (a partial one hands over to a full one)
	_ = s.a.Sync(ctx)
	if !s.dead {
		t.Fatal("setup: the sync did not reach its report")
	}
	s.killIn = -1
	if countStates() != 16 {
		t.Fatalf("setup: %d states after the killed sync, want 16", countStates())
	}
	flush()
	s.dead = false
	start()
	sync("killed before the report, flushed, restarted")
	if countStates() != 16 {
		t.Fatalf("after the restart: %d states, want 16", countStates())
	}

	// Killed in the middle of the kernel writes, at every position of a re-key.
	for k := 0; k < 12; k++ {
		flush()
		kern.mu.Lock()
		kern.killIn = k
		kern.mu.Unlock()
		s.a.Resync()
		_ = s.a.Sync(ctx)
		start()
		sync(fmt.Sprintf("killed after %d kernel writes, restarted", k))
	}

	// cleanup (kernel and ledger), then a new agent: a new epoch.
	epoch = s.a.Epoch()
	if _, err := Cleanup(kern, nsIPT{ns: netns, sys: sys}, desired.Config{}); err != nil {
		t.Fatal(err)
	}
	if err := ledger.RemoveFile(s.dir); err != nil {
		t.Fatal(err)
	}
	start()
	sync("cleanup and restart")
	if s.a.Epoch() == epoch || countStates() != 16 {
		t.Fatalf("after cleanup: epoch %s (was %s), %d states", s.a.Epoch(), epoch, countStates())
	}
	t.Logf("%d distinct keys installed on the real kernel, none twice", len(kern.adds))
}
