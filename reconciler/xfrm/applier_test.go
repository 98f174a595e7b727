package xfrm

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/ledger"
)

func testKeys(gen uint32, kind desired.Kind, lane uint16, src, dst desired.Endpoint) (uint32, desired.Key, error) {
	spi, err := keys.LaneSPI(kind, lane, gen, src.NodeID)
	if err != nil {
		return 0, desired.Key{}, err
	}
	h := sha256.Sum256(fmt.Appendf(nil, "%d|%d|%d|%s|%s|%s|%s", gen, kind, lane, src.IP, src.Incarnation, dst.IP, dst.Incarnation))
	return spi, desired.NewKey(h[:20]), nil
}

// cluster builds node "n1"'s inputs in a cluster of n nodes (IDs 1..n) where every peer
// reports mode with the given generations installed and is ready toward n1.
func cluster(n int, mode api.Mode, gens []desired.Generation, reported ...uint32) desired.Inputs {
	in := desired.Inputs{Self: "n1", Ring: desired.Ring{Mode: mode, Generations: gens}, Keys: testKeys,
		Pools: []desired.Pool{{Name: "default", IPIPMode: desired.IPIPAlways}}}
	for i := 1; i <= n; i++ {
		nd := desired.Node{Name: fmt.Sprintf("n%d", i), IPv4Address: fmt.Sprintf("198.18.%d.%d/16", i/250, i%250+1),
			Incarnation: fmt.Sprintf("boot-%d", i), NodeID: uint32(i)}
		if i > 1 {
			nd.Report = &desired.Report{Incarnation: nd.Incarnation, Mode: mode, Generations: reported,
				InboundFromSelf: true, EncryptsToSelf: mode.Rank() >= api.ModeEncrypt.Rank()}
		}
		in.Nodes = append(in.Nodes, nd)
	}
	return in
}

func compute(t *testing.T, in desired.Inputs) desired.State {
	t.Helper()
	st, err := desired.Compute(in)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func active(id uint32) desired.Generation {
	return desired.Generation{ID: id, State: desired.GenActive}
}
func pending(id uint32) desired.Generation {
	return desired.Generation{ID: id, State: desired.GenPending}
}
func retiring(id uint32) desired.Generation {
	return desired.Generation{ID: id, State: desired.GenRetiring}
}

// assertKernelIs checks the fake holds exactly want (ours) plus the given foreign objects.
func assertKernelIs(t *testing.T, f *Fake, want desired.State, foreign int) {
	t.Helper()
	states, policies := f.Snapshot()
	var gotS, wantS, gotP, wantP []string
	nForeign := 0
	cfg := desired.Config{}.WithDefaults()
	for _, s := range states {
		if s.Foreign || !cfg.OwnsSA(s.SA.ReqID) {
			nForeign++
			continue
		}
		gotS = append(gotS, s.SA.String())
	}
	for _, p := range policies {
		if p.Foreign || !cfg.OwnsPolicy(p.Policy) {
			nForeign++
			continue
		}
		gotP = append(gotP, p.Policy.String())
	}
	for _, s := range want.SAs {
		s.Peer, s.Generation, s.Dir = "", 0, 0
		wantS = append(wantS, s.String())
	}
	for _, p := range want.Policies {
		wantP = append(wantP, p.String())
	}
	slices.Sort(gotS)
	slices.Sort(wantS)
	slices.Sort(gotP)
	slices.Sort(wantP)
	if !slices.Equal(gotS, wantS) || !slices.Equal(gotP, wantP) || nForeign != foreign {
		t.Fatalf("kernel mismatch (foreign %d, want %d)\nstates got %d want %d\npolicies got:\n%s\nwant:\n%s",
			nForeign, foreign, len(gotS), len(wantS), strings.Join(gotP, "\n"), strings.Join(wantP, "\n"))
	}
	// Keys too: the fake must hold the exact key of every desired SA.
	for _, w := range want.SAs {
		found := false
		for _, s := range states {
			found = found || (s.SA.ID() == w.ID() && s.SA.SameKernelObject(w))
		}
		if !found {
			t.Fatalf("kernel lacks exact %s", w)
		}
	}
}

// refsOK fails the test if any outbound policy template names an SA not in the fake.
func refsOK(t *testing.T) func(f *Fake) {
	return func(f *Fake) {
		states, policies := f.Snapshot()
		have := map[string]bool{}
		for _, s := range states {
			have[s.SA.ID()] = true
		}
		for _, p := range policies {
			tm := p.Policy.Tmpl
			if p.Policy.Dir == desired.Out && !tm.IsZero() && tm.SPI != 0 {
				if !have[desired.SA{Dst: tm.Dst, SPI: tm.SPI}.ID()] {
					t.Errorf("after %q: %s points at a missing SA", f.Log[len(f.Log)-1], p.Policy)
				}
			}
		}
	}
}

func TestApplyFreshThenIdempotent(t *testing.T) {
	f := NewFake()
	f.OnWrite = refsOK(t)
	a := NewApplier(f, desired.Config{})
	st := compute(t, cluster(4, api.ModeEncrypt, []desired.Generation{active(1)}, 1))
	res, err := a.Apply(st)
	if err != nil {
		t.Fatal(err)
	}
	// 3 peers: 2 SAs + in + out policy each.
	if !res.Full || res.StatesAdded != 6 || res.PoliciesAdded != 6 || res.Writes() != 12 {
		t.Fatalf("first apply %+v", res)
	}
	assertKernelIs(t, f, st, 0)
	for _, full := range []bool{false, true} {
		if full {
			a.QueueResync()
		}
		res, err = a.Apply(st)
		if err != nil || res.Writes() != 0 || res.Full != full {
			t.Fatalf("repeat apply (full=%v): %+v %v", full, res, err)
		}
	}
}

// An agent restart adopts what the kernel holds: identical SAs are kept, an SA under the
// same SPI with another key is replaced, foreign objects are untouched.
func TestApplyAdoptsAndReplaces(t *testing.T) {
	f := NewFake()
	st := compute(t, cluster(3, api.ModeEncrypt, []desired.Generation{active(1)}, 1))
	if _, err := NewApplier(f, desired.Config{}).Apply(st); err != nil {
		t.Fatal(err)
	}
	// Another tool's SA and policy, and a stale key on one of our SAs.
	f.PutState(KernelSA{SA: desired.SA{Src: st.SAs[0].Src, Dst: st.SAs[0].Dst, SPI: 0x77770000, ReqID: 1, Kind: desired.Transport}})
	f.PutPolicy(KernelPolicy{Policy: desired.Policy{Dir: desired.Out, Src: st.Policies[0].Src, Dst: st.Policies[0].Dst, Proto: 17,
		Tmpl: desired.Template{Src: st.SAs[0].Src, Dst: st.SAs[0].Dst, Kind: desired.Tunnel, ReqID: 9}}})
	f.PutPolicy(KernelPolicy{Policy: desired.Policy{Dir: desired.In, Src: st.Policies[0].Src, Dst: st.Policies[0].Dst, Proto: 6}, Foreign: true})
	stale := st.SAs[1]
	stale.Key = desired.NewKey([]byte("0123456789abcdefghij"))
	f.PutState(KernelSA{SA: stale})

	f.Log = nil
	f.OnWrite = refsOK(t)
	res, err := NewApplier(f, desired.Config{}).Apply(st) // a restarted agent
	if err != nil {
		t.Fatal(err)
	}
	if res.StatesReplaced != 1 || res.Writes() != 2 {
		t.Fatalf("restart apply %+v, log %q", res, f.Log)
	}
	want := []string{"delete-state " + stale.ID(), "add-state " + stale.ID()}
	if !slices.Equal(f.Log, want) {
		t.Fatalf("log %q, want %q", f.Log, want)
	}
	assertKernelIs(t, f, st, 3)
}

// A generation switch updates outbound policies in place; retiring the old generation
// then deletes only its SAs, after no policy points at them.
func TestApplyRotationUpdatesInPlace(t *testing.T) {
	f := NewFake()
	f.OnWrite = refsOK(t)
	a := NewApplier(f, desired.Config{})
	steps := []struct {
		gens     []desired.Generation
		reported []uint32
		want     Result
	}{
		{[]desired.Generation{active(1)}, []uint32{1}, Result{StatesAdded: 6, PoliciesAdded: 6}},
		{[]desired.Generation{active(1), pending(2)}, []uint32{1}, Result{StatesAdded: 6}},
		{[]desired.Generation{active(1), pending(2)}, []uint32{1, 2}, Result{}},
		{[]desired.Generation{retiring(1), active(2)}, []uint32{1, 2}, Result{PoliciesUpdated: 3}},
		{[]desired.Generation{active(2)}, []uint32{2}, Result{StatesDeleted: 6}},
	}
	for i, s := range steps {
		st := compute(t, cluster(4, api.ModeEncrypt, s.gens, s.reported...))
		f.Log = nil
		res, err := a.Apply(st)
		if err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		res.Full = false
		if res != s.want {
			t.Fatalf("step %d: %+v, want %+v; log %q", i, res, s.want, f.Log)
		}
		for _, l := range f.Log {
			if strings.HasPrefix(l, "delete-policy") || strings.HasPrefix(l, "add-policy") && i > 0 {
				t.Fatalf("step %d: policy churn %q (switches must be updates)", i, l)
			}
		}
		assertKernelIs(t, f, st, 0)
	}
}

// Injected failures: Apply keeps going, returns every error naming the object, and the
// next Apply re-lists the kernel and finishes the job.
func TestApplyPartialFailureThenFullResync(t *testing.T) {
	f := NewFake()
	f.OnWrite = refsOK(t)
	a := NewApplier(f, desired.Config{})
	st := compute(t, cluster(4, api.ModeEncrypt, []desired.Generation{active(1)}, 1))
	var failing string
	f.Fail = func(op, id string) error {
		if op == "add-state" && failing == "" && strings.Contains(id, "dst=198.18.0.4") {
			failing = id
		}
		if op == "add-state" && id == failing {
			return syscall.ENOMEM
		}
		if op == "add-policy" && strings.Contains(id, "dir=in") && strings.Contains(id, "198.18.0.3/32") {
			return syscall.EPERM
		}
		return nil
	}
	res, err := a.Apply(st)
	if err == nil {
		t.Fatal("no error")
	}
	for _, want := range []string{"add xfrm state", strings.TrimPrefix(failing, "esp "), "cannot allocate memory",
		"operation not permitted", "dir=in", "skipped, its " + failing + " is missing"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
	if res.StatesAdded != 5 || res.PoliciesAdded != 4 {
		t.Errorf("did not keep going: %+v", res)
	}
	f.Fail = nil
	lists := f.Lists
	res, err = a.Apply(st)
	if err != nil {
		t.Fatal(err)
	}
	if !res.Full || f.Lists != lists+2 || res.StatesAdded != 1 || res.PoliciesAdded != 2 {
		t.Fatalf("repair apply %+v (lists %d→%d)", res, lists, f.Lists)
	}
	assertKernelIs(t, f, st, 0)
	// Listing failures are reported and retried next time.
	f.Fail = func(op, id string) error {
		if op == "list-policies" {
			return errors.New("dump interrupted")
		}
		return nil
	}
	a.QueueResync()
	if _, err := a.Apply(st); err == nil || !strings.Contains(err.Error(), "list xfrm policies") {
		t.Fatalf("list failure: %v", err)
	}
	f.Fail = nil
	if res, err := a.Apply(st); err != nil || !res.Full || res.Writes() != 0 {
		t.Fatalf("after list failure: %+v %v", res, err)
	}
}

// Drift: another tool flushes our policies (`ip xfrm policy flush`); the periodic resync
// puts them back and touches nothing else. Flushed states are NOT put back under the same
// keys (their ESP sequence, hence their GCM IVs, would restart): Apply refuses and writes
// nothing; once the caller has changed its incarnation (new SA epoch) every key is new.
func TestApplyRepairsDrift(t *testing.T) {
	f := NewFake()
	a := NewApplier(f, desired.Config{})
	in := cluster(5, api.ModeEnforce, []desired.Generation{active(1)}, 1)
	st := compute(t, in)
	if _, err := a.Apply(st); err != nil {
		t.Fatal(err)
	}
	n := f.Remove("policy", func(string) bool { return true })
	a.QueueResync()
	res, err := a.Apply(st)
	if err != nil {
		t.Fatal(err)
	}
	if res.PoliciesAdded != n || res.Writes() != n {
		t.Fatalf("repair %+v after removing %d policies", res, n)
	}
	assertKernelIs(t, f, st, 0)

	m := f.Remove("state", func(id string) bool { return strings.Contains(id, "198.18.0.3") })
	if m == 0 {
		t.Fatal("removed no state")
	}
	a.QueueResync()
	log := len(f.Log)
	res, err = a.Apply(st)
	var kr *KeyReuseError
	if !errors.Is(err, ErrKeyReuse) || !errors.As(err, &kr) || len(kr.SAs) != m || res.Writes() != 0 || len(f.Log) != log {
		t.Fatalf("re-adding %d flushed states: %+v %v (writes %v)", m, res, err, f.Log[log:])
	}
	// New epoch: n1's incarnation changes, so does every key of every pair.
	in.Nodes[0].Incarnation += "/epoch-2"
	for i := range in.Nodes[1:] {
		in.Nodes[i+1].Report.InboundFromSelf = false // peers are not ready for the new keys yet
	}
	st2 := compute(t, in)
	a.SetLedger(MemoryLedger{}) // the new epoch's ledger
	if _, err := a.Apply(st2); err != nil {
		t.Fatal(err)
	}
	if r := f.ReusedKeys(); len(r) != 0 {
		t.Errorf("SAs re-created under a used key: %v", r)
	}
	st = st2
	assertKernelIs(t, f, st, 0)
}

// A foreign policy on one of our selectors is reported, never overwritten or deleted.
func TestApplyForeignSelectorConflict(t *testing.T) {
	f := NewFake()
	st := compute(t, cluster(3, api.ModeEncrypt, []desired.Generation{active(1)}, 1))
	var out desired.Policy
	for _, p := range st.Policies {
		if p.Dir == desired.Out {
			out = p
			break
		}
	}
	theirs := out
	theirs.Peer = ""
	theirs.Tmpl.ReqID, theirs.Tmpl.SPI, theirs.Priority = 42, 0x1234, 100
	f.PutPolicy(KernelPolicy{Policy: theirs})
	a := NewApplier(f, desired.Config{})
	res, err := a.Apply(st)
	if err == nil || res.Conflicts != 1 || !strings.Contains(err.Error(), "foreign policy") {
		t.Fatalf("conflict not reported: %+v %v", res, err)
	}
	_, pols := f.Snapshot()
	for _, p := range pols {
		if p.Policy.ID() == out.ID() && p.Policy != theirs {
			t.Fatalf("foreign policy overwritten: %s", p.Policy)
		}
	}
	if _, err := a.Cleanup(); err != nil {
		t.Fatal(err)
	}
	states, pols := f.Snapshot()
	if len(states) != 0 || len(pols) != 1 || pols[0].Policy != theirs {
		t.Fatalf("cleanup left %d states and %v", len(states), pols)
	}
}

// Incremental cost: adding one node to a 1,000-node cluster makes exactly 2 SA writes per
// live generation plus 2 policy writes (inbound and outbound) — here 6 with two live
// generations — and no listing; removing it again makes the same number of deletes.
func TestApplyOneNodeJoinIn1000NodeCluster(t *testing.T) {
	gens := []desired.Generation{retiring(1), active(2)}
	in := cluster(1001, api.ModeEnforce, gens, 1, 2)
	small := in
	small.Nodes = in.Nodes[:1000]
	before := compute(t, small)
	after := compute(t, in)
	f := NewFake()
	a := NewApplier(f, desired.Config{})
	res, err := a.Apply(before)
	if err != nil {
		t.Fatal(err)
	}
	if res.Writes() != 999*(4+2) {
		t.Fatalf("initial writes %d", res.Writes())
	}
	lists := f.Lists
	res, err = a.Apply(after)
	if err != nil {
		t.Fatal(err)
	}
	if res.Writes() != 2*len(gens)+2 || res.StatesAdded != 4 || res.PoliciesAdded != 2 || f.Lists != lists {
		t.Fatalf("join writes %+v (lists %d→%d)", res, lists, f.Lists)
	}
	res, err = a.Apply(before)
	if err != nil || res.Writes() != 6 || res.StatesDeleted != 4 || res.PoliciesDeleted != 2 {
		t.Fatalf("leave %+v %v", res, err)
	}
	t.Logf("join/leave of one node in a 1000-node cluster: %d kernel writes each (2 SAs x %d generations + 2 policies)", res.Writes(), len(gens))
}

// A failed policy update during a rotation keeps the old generation's SA that the
// unchanged policy still uses; the next Apply finishes both.
func TestApplyKeepsSAOfUnswitchedPolicy(t *testing.T) {
	f := NewFake()
	f.OnWrite = refsOK(t)
	a := NewApplier(f, desired.Config{})
	if _, err := a.Apply(compute(t, cluster(3, api.ModeEncrypt, []desired.Generation{retiring(1), active(2)}, 1))); err != nil {
		t.Fatal(err)
	}
	// Peers now report 2; generation 1 is gone from the ring in the same step (the
	// worst case: switch and removal in one Apply).
	st := compute(t, cluster(3, api.ModeEncrypt, []desired.Generation{active(2)}, 2))
	f.Fail = func(op, id string) error {
		if op == "update-policy" && strings.Contains(id, "198.18.0.3/32 proto=4 dir=out") {
			return syscall.EBUSY
		}
		return nil
	}
	res, err := a.Apply(st)
	if err == nil || !strings.Contains(err.Error(), "still used by") {
		t.Fatalf("expected a kept SA, got %v", err)
	}
	if res.PoliciesUpdated != 1 || res.StatesDeleted != 3 {
		t.Fatalf("%+v", res)
	}
	f.Fail = nil
	if res, err = a.Apply(st); err != nil || res.PoliciesUpdated != 1 || res.StatesDeleted != 1 {
		t.Fatalf("repair %+v %v", res, err)
	}
	assertKernelIs(t, f, st, 0)
}

// An SA is never added twice under one key within an SA epoch: not after we removed it
// ourselves (a peer that left and came back with the same incarnation), not when the
// ledger says it was installed (before a restart, then lost by the kernel). A new epoch (a
// new ledger, with new incarnations) starts afresh.
func TestApplyNeverReaddsAKeyOfTheEpoch(t *testing.T) {
	f := NewFake()
	a := NewApplier(f, desired.Config{})
	in := cluster(3, api.ModeAccept, []desired.Generation{active(1)}, 1)
	full := compute(t, in)
	if _, err := a.Apply(full); err != nil {
		t.Fatal(err)
	}
	// n3 leaves (its SAs are deleted), then comes back unchanged.
	without := in
	without.Nodes = in.Nodes[:2]
	if _, err := a.Apply(compute(t, without)); err != nil {
		t.Fatal(err)
	}
	log := len(f.Log)
	if _, err := a.Apply(full); !errors.Is(err, ErrKeyReuse) || len(f.Log) != log {
		t.Fatalf("re-adding n3's SAs: %v, writes %v", err, f.Log[log:])
	}
	// Recorded in the ledger (by an earlier process), missing from the kernel: refused too.
	f2 := NewFake()
	b := NewApplier(f2, desired.Config{})
	b.SetLedger(ledgerOf(full.SAs[:1]))
	if _, err := b.Apply(full); !errors.Is(err, ErrKeyReuse) || len(f2.Log) != 0 {
		t.Fatalf("adding a marked SA: %v, writes %v", err, f2.Log)
	}
	// Present in the kernel (adopted): fine.
	f3 := NewFake()
	c := NewApplier(f3, desired.Config{})
	if _, err := c.Apply(full); err != nil {
		t.Fatal(err)
	}
	d := NewApplier(f3, desired.Config{})
	d.SetLedger(ledgerOf(full.SAs))
	if res, err := d.Apply(full); err != nil || res.Writes() != 0 {
		t.Fatalf("adopting recorded SAs: %+v %v", res, err)
	}
	// Adopted SAs that the ledger lacks (a ledger lost while the kernel kept its state)
	// are recorded, so that losing them later is caught.
	e := NewApplier(f3, desired.Config{})
	fresh := MemoryLedger{}
	e.SetLedger(fresh)
	if res, err := e.Apply(full); err != nil || res.Writes() != 0 || len(fresh) != len(full.SAs) {
		t.Fatalf("adopting unrecorded SAs: %+v %v, %d recorded", res, err, len(fresh))
	}
	// The error names SAs, never keys.
	_, err := a.Apply(full)
	for _, sa := range full.SAs {
		if strings.Contains(err.Error(), fmt.Sprintf("%x", sa.Key.Bytes())) {
			t.Fatal("key bytes in the error")
		}
	}
}

// A kernel that refuses every SA (no esp4) yields a bounded error: the first MaxErrors
// failures and a count of the rest, not one line per SA.
func TestApplyErrorsAreBounded(t *testing.T) {
	f := NewFake()
	f.Fail = func(op, id string) error {
		if op == "add-state" {
			return syscall.EPROTONOSUPPORT
		}
		return nil
	}
	st := compute(t, cluster(200, api.ModeEncrypt, []desired.Generation{active(1)}, 1))
	res, err := NewApplier(f, desired.Config{}).Apply(st)
	if err == nil {
		t.Fatal("no error")
	}
	lines := strings.Split(err.Error(), "\n")
	// Every SA fails, and every outbound policy is skipped for its missing SA.
	failures := len(st.SAs) + len(st.Policies)/2
	if len(lines) != MaxErrors+1 {
		t.Fatalf("%d error lines for %d SAs, want %d", len(lines), len(st.SAs), MaxErrors+1)
	}
	if want := fmt.Sprintf("and %d more xfrm errors like these", failures-MaxErrors); lines[MaxErrors] != want {
		t.Errorf("last line %q, want %q", lines[MaxErrors], want)
	}
	if !strings.Contains(lines[0], "protocol not supported") || len(err.Error()) > 4096 {
		t.Errorf("error (%d bytes) = %.300q", len(err.Error()), err)
	}
	if res.StatesAdded != 0 || res.PoliciesAdded == 0 {
		t.Errorf("result %+v: inbound policies should still be written", res)
	}
}

func ledgerOf(sas []desired.SA) MemoryLedger {
	l := MemoryLedger{}
	for _, sa := range sas {
		l[fingerprint(sa.Key)] = sa.Generation
	}
	return l
}

// failingLedger refuses every Record.
type failingLedger struct{ MemoryLedger }

func (failingLedger) Record(es []ledger.Entry) error {
	if len(es) == 0 {
		return nil
	}
	return errors.New("disk full")
}

// Keys are recorded before they are written: when recording fails nothing is written, and
// every SA the kernel receives was in the ledger at that moment.
func TestApplyRecordsKeysBeforeWritingThem(t *testing.T) {
	in := cluster(4, api.ModeAccept, []desired.Generation{active(1)}, 1)
	st := compute(t, in)
	f := NewFake()
	a := NewApplier(f, desired.Config{})
	a.SetLedger(failingLedger{MemoryLedger{}})
	res, err := a.Apply(st)
	if err == nil || !strings.Contains(err.Error(), "disk full") || res.StatesAdded+res.StatesReplaced != 0 || res.PoliciesAdded != 3 { // inbound policies (optional templates) only
		t.Fatalf("Apply with a failing ledger: %+v %v, writes %v", res, err, f.Log)
	}
	for _, w := range f.Log {
		if strings.HasPrefix(w, "add-state") {
			t.Fatalf("a state was written whose key could not be recorded: %s", w)
		}
	}
	l := MemoryLedger{}
	a.SetLedger(l)
	f.Fail = func(op, id string) error {
		if op != "add-state" {
			return nil
		}
		for _, sa := range st.SAs {
			if sa.ID() == id && !l.Installed(fingerprint(sa.Key)) {
				t.Errorf("%s written before its key was recorded", sa)
			}
		}
		return nil
	}
	if _, err := a.Apply(st); err != nil {
		t.Fatal(err)
	}
	if len(l) != len(st.SAs) {
		t.Fatalf("%d keys recorded, want %d", len(l), len(st.SAs))
	}
}

// TestApplyLanesFallback: an outbound policy that sends on lanes names no SPI, so the
// applier holds it to the lanes' fallback state (desired.Policy.Fallback) as it holds
// other policies to their SA: not written before the fallback is, and the fallback not
// deleted while a policy still relies on it — also after a restart, when the policy is
// adopted from the kernel's list, which has no bookkeeping.
func TestApplyLanesFallback(t *testing.T) {
	in := cluster(2, api.ModeEncrypt, []desired.Generation{active(1)}, 1)
	for i := range in.Nodes {
		in.Nodes[i].Lanes, in.Nodes[i].TakesLanes = 2, true
	}
	st := compute(t, in)
	var pol desired.Policy
	for _, p := range st.Policies {
		if p.Dir == desired.Out {
			pol = p
		}
	}
	if pol.Tmpl.SPI != 0 || pol.Fallback == 0 {
		t.Fatalf("want a policy on lanes, got %s (fallback 0x%x)", pol, pol.Fallback)
	}
	fallback := desired.SA{Dst: pol.Tmpl.Dst, SPI: pol.Fallback}.ID()

	f := NewFake()
	f.Fail = func(op, id string) error {
		if op == "add-state" && id == fallback {
			return syscall.ENOMEM
		}
		return nil
	}
	a := NewApplier(f, desired.Config{})
	if _, err := a.Apply(st); err == nil || !strings.Contains(err.Error(), "skipped, its "+fallback+" is missing") {
		t.Fatalf("policy written without its fallback state: %v", err)
	}
	f.Fail = nil
	if _, err := a.Apply(st); err != nil {
		t.Fatal(err)
	}
	_, policies := f.Snapshot()
	if !slices.ContainsFunc(policies, func(k KernelPolicy) bool { return k.Policy.SameKernelObject(pol) }) {
		t.Fatalf("policy %s not written once the fallback is", pol)
	}

	// A restarted agent adopts the policy from the kernel; a state without the fallback
	// (which Compute never asks for while a policy relies on it) must not delete it.
	b := NewApplier(f, desired.Config{})
	if _, err := b.Apply(st); err != nil {
		t.Fatal(err)
	}
	broken := st
	broken.SAs = slices.DeleteFunc(slices.Clone(st.SAs), func(sa desired.SA) bool { return sa.ID() == fallback })
	_, err := b.Apply(broken)
	if err == nil || !strings.Contains(err.Error(), "skipped, still used by") {
		t.Fatalf("fallback deleted while a policy relies on it: %v", err)
	}
	states, _ := f.Snapshot()
	if !slices.ContainsFunc(states, func(k KernelSA) bool { return k.SA.ID() == fallback }) {
		t.Fatal("fallback state gone")
	}
}
