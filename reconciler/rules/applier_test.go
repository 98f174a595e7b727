package rules

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

func rule(h desired.Hook, a desired.Action, peer, ip string) desired.Rule {
	return desired.Rule{Hook: h, Action: a, Peer: peer, PeerIP: netip.MustParseAddr(ip)}
}

var enforceRules = []desired.Rule{
	rule(desired.HookIn, desired.Drop, "b", "198.18.0.2"),
	rule(desired.HookIn, desired.Drop, "c", "198.18.0.3"),
	rule(desired.HookOut, desired.Drop, "b", "198.18.0.2"),
}

func TestRender(t *testing.T) {
	got := Render(append(enforceRules, rule(desired.HookOut, desired.Count, "we ird\"name", "198.18.0.9")))
	want := map[string][]string{
		ChainIn: {
			`-A SECUREOVERLAY-IN -s 198.18.0.2/32 -p 4 -m policy --dir in --pol none -m comment --comment "secureoverlay drop plaintext IPIP from b" -j DROP`,
			`-A SECUREOVERLAY-IN -s 198.18.0.3/32 -p 4 -m policy --dir in --pol none -m comment --comment "secureoverlay drop plaintext IPIP from c" -j DROP`,
		},
		ChainOut: {
			`-A SECUREOVERLAY-OUT -d 198.18.0.2/32 -p 4 -m policy --dir out --pol none -m comment --comment "secureoverlay drop plaintext IPIP to b" -j DROP`,
			`-A SECUREOVERLAY-OUT -d 198.18.0.9/32 -p 4 -m policy --dir out --pol none -m comment --comment "secureoverlay count plaintext IPIP to we_ird_name"`,
		},
	}
	for c := range want {
		if !slices.Equal(got[c], want[c]) {
			t.Errorf("%s:\n got %q\nwant %q", c, got[c], want[c])
		}
	}
	n, pk, by := normalize(`-A X -s 1.2.3.4/32 -p ipencap -m comment --comment "a b" -c 12 3400 -j DROP`)
	if n != `-A X -s 1.2.3.4/32 -p 4 -m comment --comment "a b" -j DROP` || pk != 12 || by != 3400 {
		t.Errorf("normalize: %q %d %d", n, pk, by)
	}
}

func jumpAtTop(t *testing.T, f *Fake) {
	t.Helper()
	for _, c := range chains {
		lines := f.Chain(Table, c[1])
		if len(lines) == 0 || !isJump(lines[0], c[1], c[0]) {
			t.Fatalf("%s: jump not first: %q", c[1], lines)
		}
		n := 0
		for _, l := range lines {
			if isJump(l, c[1], c[0]) {
				n++
			}
		}
		if n != 1 {
			t.Fatalf("%s: %d jumps: %q", c[1], n, lines)
		}
	}
}

func TestApplySequence(t *testing.T) {
	f := NewFake()
	a := NewApplier(f)
	res, err := a.Apply(enforceRules)
	if err != nil {
		t.Fatal(err)
	}
	if !res.Full || res.ChainsCreated != 2 || res.ChainsWritten != 2 || res.JumpsInserted != 2 || f.Restores != 1 {
		t.Fatalf("first %+v", res)
	}
	jumpAtTop(t, f)
	if got := f.Chain(Table, ChainIn); !slices.Equal(got, Render(enforceRules)[ChainIn]) {
		t.Fatalf("in chain %q", got)
	}
	// Unchanged: nothing written, incremental or full.
	for _, full := range []bool{false, true} {
		if full {
			a.QueueResync()
		}
		res, err = a.Apply(enforceRules)
		if err != nil || res.RestoreInvoked || res.JumpsInserted+res.JumpsDeleted != 0 || res.Full != full {
			t.Fatalf("repeat (full=%v) %+v %v", full, res, err)
		}
	}
	// One rule changes: one chain rewritten in one transaction.
	res, err = a.Apply(enforceRules[:2])
	if err != nil || res.ChainsWritten != 1 || f.Restores != 2 {
		t.Fatalf("change %+v %v", res, err)
	}
	if len(f.Chain(Table, ChainOut)) != 0 {
		t.Fatal("out chain not emptied")
	}
}

// Someone inserts their rule above our jump (felix does this in filter; here a stray
// rule in raw) and someone else flushes our chain: the jump goes back to position 1 on
// the next Apply, the chain on the next full resync.
func TestApplyRepairsJumpAndFlush(t *testing.T) {
	f := NewFake()
	a := NewApplier(f)
	if _, err := a.Apply(enforceRules); err != nil {
		t.Fatal(err)
	}
	if err := f.Insert(Table, HookIn, 1, "-j", "ACCEPT"); err != nil {
		t.Fatal(err)
	}
	if err := f.Insert(Table, HookOut, 1, jumpSpec(ChainOut)...); err != nil { // a duplicate
		t.Fatal(err)
	}
	res, err := a.Apply(enforceRules)
	if err != nil || res.JumpsInserted != 1 || res.JumpsDeleted != 2 {
		t.Fatalf("repair jumps %+v %v", res, err)
	}
	jumpAtTop(t, f)
	if got := f.Chain(Table, HookIn); len(got) != 2 || got[1] != "-A PREROUTING -j ACCEPT" {
		t.Fatalf("foreign rule lost: %q", got)
	}
	f.Flush(Table, ChainIn)
	a.QueueResync()
	res, err = a.Apply(enforceRules)
	if err != nil || res.ChainsWritten != 1 {
		t.Fatalf("repair flush %+v %v", res, err)
	}
	if got := f.Chain(Table, ChainIn); !slices.Equal(got, Render(enforceRules)[ChainIn]) {
		t.Fatalf("in chain after repair %q", got)
	}
}

func TestApplyFailureForcesFullResync(t *testing.T) {
	f := NewFake()
	a := NewApplier(f)
	if _, err := a.Apply(nil); err != nil {
		t.Fatal(err)
	}
	f.Fail = func(op string) error {
		if op == "restore" {
			return errors.New("iptables-restore: exit status 4: Another app is currently holding the xtables lock")
		}
		return nil
	}
	res, err := a.Apply(enforceRules)
	if err == nil || !strings.Contains(err.Error(), "write chains SECUREOVERLAY-IN, SECUREOVERLAY-OUT in raw") {
		t.Fatalf("failure not reported: %v", err)
	}
	if res.ChainsWritten != 0 || len(f.Chain(Table, ChainIn)) != 0 {
		t.Fatal("partial write")
	}
	f.Fail = nil
	res, err = a.Apply(enforceRules)
	if err != nil || !res.Full || res.ChainsWritten != 2 {
		t.Fatalf("after failure %+v %v", res, err)
	}
	// A listing failure is reported and retried.
	f.Fail = func(op string) error {
		if op == "list" {
			return errors.New("boom")
		}
		return nil
	}
	if _, err := a.Apply(enforceRules); err == nil {
		t.Fatal("list failure hidden")
	}
	f.Fail = nil
	if res, err := a.Apply(enforceRules); err != nil || !res.Full || res.RestoreInvoked {
		t.Fatalf("after list failure %+v %v", res, err)
	}
}

func TestCountersAndCleanup(t *testing.T) {
	f := NewFake()
	a := NewApplier(f)
	// Before any rule was written our chains do not exist: no counters, no error.
	if cs, err := a.Counters(); err != nil || len(cs) != 0 {
		t.Fatalf("counters before the first Apply: %v %v", cs, err)
	}
	if _, err := a.Apply(enforceRules); err != nil {
		t.Fatal(err)
	}
	cs, err := a.Counters()
	if err != nil || len(cs) != 3 {
		t.Fatalf("counters %v %v", cs, err)
	}
	for i, c := range cs {
		if c.Rule != enforceRules[i] {
			t.Errorf("counter %d maps to %+v", i, c.Rule)
		}
	}
	if err := f.Insert(Table, HookIn, 1, "-j", "ACCEPT"); err != nil {
		t.Fatal(err)
	}
	if err := a.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if f.Chain(Table, ChainIn) != nil || f.Chain(Table, ChainOut) != nil {
		t.Fatal("chains left")
	}
	if got := f.Chain(Table, HookIn); len(got) != 1 || len(f.Chain(Table, HookOut)) != 0 {
		t.Fatalf("hooks after cleanup %q %q", got, f.Chain(Table, HookOut))
	}
}
