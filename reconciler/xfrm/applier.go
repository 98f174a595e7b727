package xfrm

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"syscall"

	"github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/ledger"
)

// Result counts what one Apply did.
type Result struct {
	Full bool // the kernel was listed (not the cache trusted)
	// Kernel writes by kind.
	StatesAdded, StatesReplaced, StatesDeleted      int
	PoliciesAdded, PoliciesUpdated, PoliciesDeleted int
	// Conflicts counts foreign objects in the way of ours (left untouched).
	Conflicts int
}

// Writes is the number of kernel write calls (a replacement is two).
func (r Result) Writes() int {
	return r.StatesAdded + 2*r.StatesReplaced + r.StatesDeleted + r.PoliciesAdded + r.PoliciesUpdated + r.PoliciesDeleted
}

// MaxErrors bounds the errors one Apply returns; the rest are counted in a last line.
// A kernel that refuses every SA (no esp4 module) would otherwise produce one error per
// SA: 10,000 lines in a log line and an error too long for the node's report.
const MaxErrors = 10

// Applier owns our xfrm objects in one network namespace. It is not safe for concurrent
// use; the agent's single sync worker drives it.
type Applier struct {
	k   Kernel
	cfg desired.Config
	// cache is what we believe the kernel holds of ours, valid unless needFull.
	states   map[saID]desired.SA
	policies map[policyID]desired.Policy
	// foreign objects at identities we want (from the last listing).
	foreignStates   map[saID]bool
	foreignPolicies map[policyID]bool
	needFull        bool
	observed        []KernelSA
	// ledger remembers, outside the process, the fingerprint of every key installed in
	// the current SA epoch; an SA with one of these keys is never written again (its ESP
	// sequence, and so its GCM IVs, would restart; an inbound SA's replay window would
	// reset). Keys are recorded there before they are written (write-ahead).
	ledger KeyLedger
	// at is the desired.Memo version the cache was last brought to (zero: none, e.g.
	// after a plain Apply or a failure); ApplyChange from it needs only the difference.
	at desired.Version
}

// KeyLedger is the applier's memory of the keys installed in the current SA epoch
// (ledger.Ledger in the agent, kept in a file on the node so that it survives restarts;
// MemoryLedger in tests). Record must have reached storage that outlives the process when
// it returns.
//
// Release is called for a key the kernel definitely did not install (it answered the add
// with an error): the ledger may forget it in memory, so that the next Apply retries it
// instead of changing the epoch. The durable record keeps it (a superset is safe).
type KeyLedger interface {
	Installed(ledger.Fingerprint) bool
	Record([]ledger.Entry) error
	Release(ledger.Fingerprint)
}

// MemoryLedger is a KeyLedger that lives as long as the process (tests, benchmarks and
// cleanup, which installs nothing).
type MemoryLedger map[ledger.Fingerprint]uint32

// Installed implements KeyLedger.
func (m MemoryLedger) Installed(f ledger.Fingerprint) bool { _, ok := m[f]; return ok }

// Record implements KeyLedger.
func (m MemoryLedger) Record(es []ledger.Entry) error {
	for _, e := range es {
		m[e.Key] = e.Generation
	}
	return nil
}

// Release implements KeyLedger.
func (m MemoryLedger) Release(f ledger.Fingerprint) { delete(m, f) }

// refused reports whether err is the kernel's definite answer that it did not add the SA
// (an errno in the netlink acknowledgement), as opposed to a failure that leaves it
// unknown whether the add happened (ENOBUFS: the acknowledgement may have been dropped).
func refused(err error) bool {
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		return false
	}
	switch errno {
	case syscall.EEXIST, syscall.ENOMEM, syscall.EPERM, syscall.EACCES, syscall.EINVAL, syscall.ENOENT,
		syscall.ESRCH, syscall.EPROTONOSUPPORT, syscall.EAFNOSUPPORT, syscall.ENOSYS, syscall.EOPNOTSUPP,
		syscall.ENOPROTOOPT, syscall.E2BIG, syscall.ERANGE:
		return true
	}
	return false
}

// ErrKeyReuse is wrapped by Apply's error when the desired state would write an SA whose
// key an SA of the current epoch already used (the kernel lost it: another tool flushed
// it, the agent was restarted after cleanup, or the SA was removed and is wanted again).
// Apply then writes nothing; the agent starts a new SA epoch (which changes every key)
// and applies again.
var ErrKeyReuse = errors.New("an SA of the current SA epoch would be re-created under the same key")

// KeyReuseError lists the SAs (never their keys) Apply refused to re-create.
type KeyReuseError struct {
	SAs []string
}

func (e *KeyReuseError) Error() string {
	return fmt.Sprintf("%v: %s", ErrKeyReuse, strings.Join(e.SAs, "; "))
}

// Unwrap makes errors.Is(err, ErrKeyReuse) hold.
func (e *KeyReuseError) Unwrap() error { return ErrKeyReuse }

func fingerprint(k desired.Key) ledger.Fingerprint {
	b := k.Bytes()
	f := ledger.KeyFingerprint(b)
	clear(b)
	return f
}

// SetLedger makes the applier record and check keys in l (call it before the first
// Apply, and again with the new ledger state whenever the caller starts a new epoch).
func (a *Applier) SetLedger(l KeyLedger) { a.ledger = l }

// NewApplier returns an applier whose first Apply lists the kernel (adopting what an
// earlier agent left there).
func NewApplier(k Kernel, cfg desired.Config) *Applier {
	return &Applier{k: k, cfg: cfg.WithDefaults(), needFull: true, ledger: MemoryLedger{}}
}

// QueueResync makes the next Apply list the kernel (periodic drift repair).
func (a *Applier) QueueResync() { a.needFull = true }

// Observed returns our states as listed by the last full Apply (sequence numbers and
// counters for metrics).
func (a *Applier) Observed() []KernelSA { return a.observed }

func (a *Applier) resync() error {
	sts, err := a.k.ListStates()
	if err != nil {
		return fmt.Errorf("list xfrm states: %w", err)
	}
	pols, err := a.k.ListPolicies()
	if err != nil {
		return fmt.Errorf("list xfrm policies: %w", err)
	}
	a.states, a.policies = make(map[saID]desired.SA, len(sts)), make(map[policyID]desired.Policy, len(pols))
	a.foreignStates, a.foreignPolicies = map[saID]bool{}, map[policyID]bool{}
	a.observed = nil
	for _, s := range sts {
		if s.Foreign || !a.cfg.OwnsSA(s.SA.ReqID) {
			a.foreignStates[saIDOf(s.SA)] = true
			continue
		}
		a.states[saIDOf(s.SA)] = s.SA
		a.observed = append(a.observed, s)
	}
	for _, p := range pols {
		if p.Foreign || !a.cfg.OwnsPolicy(p.Policy) {
			a.foreignPolicies[policyIDOf(p.Policy)] = true
			continue
		}
		a.policies[policyIDOf(p.Policy)] = p.Policy
	}
	return nil
}

// Apply makes the kernel hold exactly want's SAs and policies (of ours). It returns what
// it wrote and every error it met; after an error the next Apply lists the kernel again.
func (a *Applier) Apply(want desired.State) (Result, error) {
	a.at = desired.Version{}
	return a.apply(want)
}

func (a *Applier) apply(want desired.State) (Result, error) {
	var res Result
	if a.needFull || a.states == nil {
		if err := a.resync(); err != nil {
			a.needFull = true
			return res, err
		}
		res.Full = true
	}
	// A fresh kernel (first Apply, or after a flush) gets maps of the right size at once.
	if len(a.states) == 0 {
		a.states = make(map[saID]desired.SA, len(want.SAs))
	}
	if len(a.policies) == 0 {
		a.policies = make(map[policyID]desired.Policy, len(want.Policies))
	}
	fps, err := a.checkKeys(want.SAs)
	if err != nil {
		return res, err
	}
	var errs errList
	wantStates := make(map[saID]struct{}, len(want.SAs))
	for _, sa := range want.SAs {
		wantStates[saIDOf(sa)] = struct{}{}
	}
	wantPolicies := make(map[policyID]struct{}, len(want.Policies))
	for _, p := range want.Policies {
		wantPolicies[policyIDOf(p)] = struct{}{}
	}
	a.writeSAs(want.SAs, fps, &res, &errs)
	a.writePolicies(want.Policies, &res, &errs)
	// 3. Stale policies, then 4. stale SAs, each in the order of their ID text.
	a.deletePolicies(stale(a.policies, wantPolicies, desired.Policy.ID), &res, &errs)
	a.deleteSAs(stale(a.states, wantStates, desired.SA.ID), a.referenced, &res, &errs)
	return res, a.finish(&errs)
}

// ApplyChange brings the kernel to the state of ch.To. When the applier holds the state
// of ch.From (its last apply, of the same memo's From, succeeded and no resync is
// queued), it works on the difference alone: it writes the changed peers' SAs and
// policies that the cache lacks or holds otherwise, and deletes the changed peers' old
// identities that the new objects lack — the same checks, order and errors as Apply,
// for work proportional to the change. Otherwise (a full change, a queued resync, an
// earlier failure, another memo) it applies want() as Apply does, walking everything.
func (a *Applier) ApplyChange(ch desired.Change, want func() desired.State) (Result, error) {
	from := a.at
	a.at = desired.Version{}
	var (
		res Result
		err error
	)
	if ch.Full || ch.From.IsZero() || ch.From != from || a.needFull || a.states == nil {
		res, err = a.apply(want())
	} else {
		res, err = a.applyDiff(ch)
	}
	if err == nil {
		a.at = ch.To
	}
	return res, err
}

func (a *Applier) applyDiff(ch desired.Change) (Result, error) {
	var res Result
	fps, err := a.checkKeys(ch.SAs)
	if err != nil {
		return res, err
	}
	var errs errList
	newStates := make(map[saID]struct{}, len(ch.SAs))
	for _, sa := range ch.SAs {
		newStates[saIDOf(sa)] = struct{}{}
	}
	newPolicies := make(map[policyID]struct{}, len(ch.Policies))
	for _, p := range ch.Policies {
		newPolicies[policyIDOf(p)] = struct{}{}
	}
	a.writeSAs(ch.SAs, fps, &res, &errs)
	a.writePolicies(ch.Policies, &res, &errs)
	// The changed peers' old identities that are gone, as held in the cache (what is
	// not in the cache is not in the kernel).
	oldPolicies := map[policyID]desired.Policy{}
	for _, p := range ch.OldPolicies {
		id := policyIDOf(p)
		if have, ok := a.policies[id]; ok {
			oldPolicies[id] = have
		}
	}
	oldStates := map[saID]desired.SA{}
	for _, sa := range ch.OldSAs {
		id := saIDOf(sa)
		if have, ok := a.states[id]; ok {
			oldStates[id] = have
		}
	}
	a.deletePolicies(stale(oldPolicies, newPolicies, desired.Policy.ID), &res, &errs)
	// Only the changed peers' policies can name their SAs (every other peer's policies
	// name SAs of their own peer, unchanged).
	refs := func() map[saID]desired.Policy {
		m := map[saID]desired.Policy{}
		for _, ps := range [][]desired.Policy{ch.OldPolicies, ch.Policies} {
			for _, p := range ps {
				if have, ok := a.policies[policyIDOf(p)]; ok && have.Dir == desired.Out && !have.Tmpl.IsZero() && have.Tmpl.SPI != 0 {
					m[saID{dst: have.Tmpl.Dst, spi: have.Tmpl.SPI}] = have
				}
			}
		}
		return m
	}
	a.deleteSAs(stale(oldStates, newStates, desired.SA.ID), refs, &res, &errs)
	return res, a.finish(&errs)
}

// checkKeys is step 0: never re-create an SA under a key used in this epoch; refuse the
// whole state before writing anything. Adopted SAs the ledger lacks are recorded now;
// every key about to be written is recorded immediately before its own write (step 1),
// so an agent killed in the middle of a batch leaves recorded only keys it had reached —
// those the kernel then holds are adopted after a restart, and a recorded key the kernel
// lacks is never written again. It returns each SA's key fingerprint.
func (a *Applier) checkKeys(sas []desired.SA) ([]ledger.Fingerprint, error) {
	var reused []string
	var adopted []ledger.Entry
	fps := make([]ledger.Fingerprint, len(sas)) // key fingerprints, each computed once
	for i, sa := range sas {
		fps[i] = fingerprint(sa.Key)
		installed := a.ledger.Installed(fps[i])
		if have, ok := a.states[saIDOf(sa)]; ok && have.SameKernelObject(sa) {
			if !installed {
				adopted = append(adopted, ledger.Entry{Generation: sa.Generation, Key: fps[i]})
			}
			continue
		}
		if installed {
			reused = append(reused, sa.String())
		}
	}
	if len(reused) > 0 {
		a.needFull = true
		return nil, &KeyReuseError{SAs: reused}
	}
	if err := a.ledger.Record(adopted); err != nil {
		a.needFull = true
		return nil, fmt.Errorf("record %d adopted sa keys: %w", len(adopted), err)
	}
	return fps, nil
}

// errList collects an apply's errors, at most MaxErrors of them.
type errList struct {
	errs []error
	more int
}

func (l *errList) fail(err error) {
	if len(l.errs) < MaxErrors {
		l.errs = append(l.errs, err)
		return
	}
	l.more++
}

// finish ends an apply: with errors, the next one lists the kernel.
func (a *Applier) finish(l *errList) error {
	if len(l.errs) > 0 {
		if l.more > 0 {
			l.errs = append(l.errs, fmt.Errorf("and %d more xfrm errors like these", l.more))
		}
		a.needFull = true
		return errors.Join(l.errs...)
	}
	a.needFull = false
	return nil
}

// writeSAs is step 1: add missing SAs, replace changed ones (same identity, other key or
// parameters).
func (a *Applier) writeSAs(sas []desired.SA, fps []ledger.Fingerprint, res *Result, errs *errList) {
	for i, sa := range sas {
		id := saIDOf(sa)
		have, ok := a.states[id]
		switch {
		case ok && have.SameKernelObject(sa):
			continue // adopt
		case ok:
			if err := a.ledger.Record([]ledger.Entry{{Generation: sa.Generation, Key: fps[i]}}); err != nil {
				errs.fail(fmt.Errorf("replace xfrm state %s: record its key before writing it: %w", sa, err))
				continue
			}
			if err := a.k.DeleteState(have); err != nil {
				errs.fail(fmt.Errorf("replace xfrm state %s: delete: %w", sa, err))
				continue
			}
			delete(a.states, id)
			if err := a.k.AddState(sa); err != nil {
				if refused(err) {
					a.ledger.Release(fps[i])
				}
				errs.fail(fmt.Errorf("replace xfrm state %s: add: %w", sa, err))
				continue
			}
			a.states[id] = sa
			res.StatesReplaced++
		case a.foreignStates[id]:
			res.Conflicts++
			errs.fail(fmt.Errorf("add xfrm state %s: a foreign state holds %s", sa, sa.ID()))
		default:
			if err := a.ledger.Record([]ledger.Entry{{Generation: sa.Generation, Key: fps[i]}}); err != nil {
				errs.fail(fmt.Errorf("add xfrm state %s: record its key before writing it: %w", sa, err))
				continue
			}
			if err := a.k.AddState(sa); err != nil {
				if refused(err) {
					a.ledger.Release(fps[i])
				}
				errs.fail(fmt.Errorf("add xfrm state %s: %w", sa, err))
				continue
			}
			a.states[id] = sa
			res.StatesAdded++
		}
	}
}

// writePolicies is step 2: add missing policies, update changed ones in place. An
// outbound policy whose SA could not be written is not written either (it would
// black-hole the peer); the previous policy, if any, stays.
func (a *Applier) writePolicies(pols []desired.Policy, res *Result, errs *errList) {
	for _, p := range pols {
		id := policyIDOf(p)
		have, ok := a.policies[id]
		if ok && have.SameKernelObject(p) {
			if have.Fallback != p.Fallback {
				a.policies[id] = p // a listed policy has no bookkeeping: referenced needs it
			}
			continue
		}
		if ref, missing := a.missingSA(p); missing {
			errs.fail(fmt.Errorf("write xfrm %s: skipped, its %s is missing", p, ref))
			continue
		}
		switch {
		case ok:
			if err := a.k.UpdatePolicy(p); err != nil {
				errs.fail(fmt.Errorf("update xfrm %s: %w", p, err))
				continue
			}
			a.policies[id] = p
			res.PoliciesUpdated++
		case a.foreignPolicies[id]:
			// Weave #3666: never take over a selector someone else programs.
			res.Conflicts++
			errs.fail(fmt.Errorf("add xfrm %s: a foreign policy holds this selector", p))
		default:
			if err := a.k.AddPolicy(p); err != nil {
				errs.fail(fmt.Errorf("add xfrm %s: %w", p, err))
				continue
			}
			a.policies[id] = p
			res.PoliciesAdded++
		}
	}
}

// deletePolicies is step 3: delete stale policies.
func (a *Applier) deletePolicies(pols []desired.Policy, res *Result, errs *errList) {
	for _, p := range pols {
		if err := a.k.DeletePolicy(p); err != nil {
			errs.fail(fmt.Errorf("delete xfrm %s: %w", p, err))
			continue
		}
		delete(a.policies, policyIDOf(p))
		res.PoliciesDeleted++
	}
}

// deleteSAs is step 4: delete stale SAs that no policy of ours names any more (refs
// gives the SAs named, computed once when first needed).
func (a *Applier) deleteSAs(sas []desired.SA, refsOf func() map[saID]desired.Policy, res *Result, errs *errList) {
	var refs map[saID]desired.Policy
	for _, sa := range sas {
		id := saIDOf(sa)
		if refs == nil {
			refs = refsOf()
		}
		if p, used := refs[id]; used {
			errs.fail(fmt.Errorf("delete xfrm state %s: skipped, still used by %s", sa, p))
			continue
		}
		if err := a.k.DeleteState(sa); err != nil {
			errs.fail(fmt.Errorf("delete xfrm state %s: %w", sa, err))
			continue
		}
		delete(a.states, id)
		res.StatesDeleted++
	}
}

// missingSA reports whether p is an outbound policy naming an SA we do not hold, and names
// that SA.
func (a *Applier) missingSA(p desired.Policy) (string, bool) {
	spi := sentSPI(p)
	if spi == 0 {
		return "", false
	}
	ref := desired.SA{Dst: p.Tmpl.Dst, SPI: spi}
	if _, ok := a.states[saIDOf(ref)]; ok {
		return "", false
	}
	return ref.ID(), true
}

// referenced returns the SAs our outbound policies name, with one policy each.
func (a *Applier) referenced() map[saID]desired.Policy {
	refs := map[saID]desired.Policy{}
	for _, p := range a.policies {
		if spi := sentSPI(p); spi != 0 {
			refs[saID{dst: p.Tmpl.Dst, spi: spi}] = p
		}
	}
	return refs
}

// sentSPI is the SPI of the state an outbound policy cannot do without: the one its
// template names, or for a policy that sends on lanes (a template without an SPI) the
// lanes' fallback (desired.Policy.Fallback), which carries every CPU without a state of
// its own. 0 for other policies.
func sentSPI(p desired.Policy) uint32 {
	if p.Dir != desired.Out || p.Tmpl.IsZero() {
		return 0
	}
	if p.Tmpl.SPI != 0 {
		return p.Tmpl.SPI
	}
	return p.Fallback
}

// saID and policyID are the kernel identities of an SA (destination and SPI; the protocol
// is always ESP) and of a policy (selector and direction) as map keys: desired.SA.ID and
// desired.Policy.ID name the same identities as text, at the cost of formatting a string
// per lookup (a quarter of an Apply's CPU at 1,000 peers).
type saID struct {
	dst netip.Addr
	spi uint32
}

func saIDOf(s desired.SA) saID { return saID{dst: s.Dst, spi: s.SPI} }

type policyID struct {
	src, dst netip.Prefix
	proto    uint8
	dir      desired.Dir
}

func policyIDOf(p desired.Policy) policyID {
	return policyID{src: p.Src, dst: p.Dst, proto: p.Proto, dir: p.Dir}
}

// stale returns the values of have whose keys want lacks, sorted by their ID text (a
// deterministic order for deletions and their errors).
func stale[K comparable, V any](have map[K]V, want map[K]struct{}, id func(V) string) []V {
	type named struct {
		id string
		v  V
	}
	var out []named
	for k, v := range have {
		if _, ok := want[k]; !ok {
			out = append(out, named{id(v), v})
		}
	}
	slices.SortFunc(out, func(a, b named) int { return strings.Compare(a.id, b.id) })
	vs := make([]V, len(out))
	for i, n := range out {
		vs[i] = n.v
	}
	return vs
}

// Cleanup deletes every object of ours (policies first), for `secureoverlay-agent cleanup`.
func (a *Applier) Cleanup() (Result, error) {
	a.needFull = true
	return a.Apply(desired.State{})
}
