package xfrm

import (
	"fmt"
	"sync"
	"syscall"

	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// Fake is an in-memory Kernel for tests, with the kernel's error semantics (EEXIST on a
// duplicate add, ESRCH/ENOENT on deleting what is not there, UPDPOLICY creates or
// replaces) and injectable failures. It is safe for concurrent use.
type Fake struct {
	mu       sync.Mutex
	states   map[string]KernelSA
	policies map[string]KernelPolicy
	// Fail, if set, is asked before every operation ("list-states", "add-state",
	// "delete-state", "list-policies", "add-policy", "update-policy", "delete-policy")
	// with the object's ID ("" for listings); a non-nil error fails the operation.
	Fail func(op, id string) error
	// Log records every successful write as "op id".
	Log []string
	// Lists counts listing calls.
	Lists int
	// keyAdds counts AddState calls per key fingerprint over the fake's whole life
	// (flushes included): a count above 1 is an SA re-created under a used key.
	keyAdds map[[32]byte]int
	reused  []string
	// OnWrite, if set, runs after every successful write with the lock held released;
	// tests use it to check invariants between kernel operations.
	OnWrite func(f *Fake)
}

// NewFake returns an empty fake kernel.
func NewFake() *Fake {
	return &Fake{states: map[string]KernelSA{}, policies: map[string]KernelPolicy{}}
}

func (f *Fake) fail(op, id string) error {
	if f.Fail != nil {
		return f.Fail(op, id)
	}
	return nil
}

func (f *Fake) wrote(op, id string) {
	f.Log = append(f.Log, op+" "+id)
	if cb := f.OnWrite; cb != nil {
		f.mu.Unlock()
		cb(f)
		f.mu.Lock()
	}
}

// ListStates implements Kernel.
func (f *Fake) ListStates() ([]KernelSA, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.Lists++
	if err := f.fail("list-states", ""); err != nil {
		return nil, err
	}
	out := make([]KernelSA, 0, len(f.states))
	for _, id := range sortedKeys(f.states) {
		out = append(out, f.states[id])
	}
	return out, nil
}

// AddState implements Kernel.
func (f *Fake) AddState(sa desired.SA) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	id := sa.ID()
	if err := f.fail("add-state", id); err != nil {
		return err
	}
	if _, ok := f.states[id]; ok {
		return syscall.EEXIST
	}
	f.states[id] = KernelSA{SA: kernelFields(sa)}
	if f.keyAdds == nil {
		f.keyAdds = map[[32]byte]int{}
	}
	fp := fingerprint(sa.Key)
	f.keyAdds[fp]++
	if f.keyAdds[fp] > 1 {
		f.reused = append(f.reused, sa.String())
	}
	f.wrote("add-state", id)
	return nil
}

// DeleteState implements Kernel.
func (f *Fake) DeleteState(sa desired.SA) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	id := sa.ID()
	if err := f.fail("delete-state", id); err != nil {
		return err
	}
	if _, ok := f.states[id]; !ok {
		return syscall.ESRCH
	}
	delete(f.states, id)
	f.wrote("delete-state", id)
	return nil
}

// ListPolicies implements Kernel.
func (f *Fake) ListPolicies() ([]KernelPolicy, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.Lists++
	if err := f.fail("list-policies", ""); err != nil {
		return nil, err
	}
	out := make([]KernelPolicy, 0, len(f.policies))
	for _, id := range sortedKeys(f.policies) {
		out = append(out, f.policies[id])
	}
	return out, nil
}

// AddPolicy implements Kernel.
func (f *Fake) AddPolicy(p desired.Policy) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	id := p.ID()
	if err := f.fail("add-policy", id); err != nil {
		return err
	}
	if _, ok := f.policies[id]; ok {
		return syscall.EEXIST
	}
	p.Peer, p.Fallback = "", 0 // bookkeeping: the kernel keeps none
	f.policies[id] = KernelPolicy{Policy: p}
	f.wrote("add-policy", id)
	return nil
}

// UpdatePolicy implements Kernel.
func (f *Fake) UpdatePolicy(p desired.Policy) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	id := p.ID()
	if err := f.fail("update-policy", id); err != nil {
		return err
	}
	p.Peer, p.Fallback = "", 0 // bookkeeping: the kernel keeps none
	f.policies[id] = KernelPolicy{Policy: p}
	f.wrote("update-policy", id)
	return nil
}

// DeletePolicy implements Kernel.
func (f *Fake) DeletePolicy(p desired.Policy) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	id := p.ID()
	if err := f.fail("delete-policy", id); err != nil {
		return err
	}
	if _, ok := f.policies[id]; !ok {
		return syscall.ENOENT
	}
	delete(f.policies, id)
	f.wrote("delete-policy", id)
	return nil
}

// PutState places a state directly (an earlier agent's or another tool's).
func (f *Fake) PutState(s KernelSA) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.states[s.SA.ID()] = s
}

// PutPolicy places a policy directly.
func (f *Fake) PutPolicy(p KernelPolicy) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.policies[p.Policy.ID()] = p
}

// Remove deletes objects behind the applier's back ("ip xfrm policy flush" by another
// tool): kind is "state" or "policy"; match selects which.
func (f *Fake) Remove(kind string, match func(id string) bool) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	switch kind {
	case "state":
		for id := range f.states {
			if match(id) {
				delete(f.states, id)
				n++
			}
		}
	case "policy":
		for id := range f.policies {
			if match(id) {
				delete(f.policies, id)
				n++
			}
		}
	default:
		panic(fmt.Sprintf("fake xfrm: unknown kind %q", kind))
	}
	return n
}

// Snapshot returns copies of the tables.
func (f *Fake) Snapshot() (states []KernelSA, policies []KernelPolicy) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, id := range sortedKeys(f.states) {
		states = append(states, f.states[id])
	}
	for _, id := range sortedKeys(f.policies) {
		policies = append(policies, f.policies[id])
	}
	return states, policies
}

// kernelFields drops the bookkeeping fields, as a kernel listing would.
func kernelFields(sa desired.SA) desired.SA {
	sa.Dir, sa.Peer, sa.Generation = 0, "", 0
	return sa
}

// ReusedKeys lists every AddState (as the SA's name, never its key) whose key an earlier
// AddState of this fake already installed: an SA re-created under a key it used before.
func (f *Fake) ReusedKeys() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.reused...)
}

// KeysAdded is how many distinct keys AddState has installed.
func (f *Fake) KeysAdded() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.keyAdds)
}
