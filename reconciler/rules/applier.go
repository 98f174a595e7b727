package rules

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// IPTables is the seam to iptables (one address family, IPv4). Lines are in -S format.
type IPTables interface {
	ListChains(table string) ([]string, error)
	NewChain(table, chain string) error
	List(table, chain string) ([]string, error)
	ListWithCounters(table, chain string) ([]string, error)
	Insert(table, chain string, pos int, rulespec ...string) error
	DeleteById(table, chain string, id int) error
	ClearAndDeleteChain(table, chain string) error
	// Restore runs iptables-restore --noflush with data (one atomic transaction).
	Restore(data []byte) error
}

// Result counts what one Apply did.
type Result struct {
	Full           bool
	ChainsWritten  int // chains rewritten by the restore transaction
	JumpsInserted  int
	JumpsDeleted   int // stray or displaced jumps removed
	ChainsCreated  int
	RestoreInvoked bool
}

// Counter is one rule's counters.
type Counter struct {
	Rule    desired.Rule
	Packets uint64
	Bytes   uint64
}

// Applier owns our chains and jumps. Not safe for concurrent use.
type Applier struct {
	ipt      IPTables
	last     map[string][]string // what we believe our chains hold
	lastWant []desired.Rule
	needFull bool
}

// NewApplier returns an applier whose first Apply reads the kernel.
func NewApplier(ipt IPTables) *Applier { return &Applier{ipt: ipt, needFull: true} }

// QueueResync makes the next Apply re-read our chains (periodic drift repair).
func (a *Applier) QueueResync() { a.needFull = true }

// jumpSpec is the jump rule from hook to chain.
func jumpSpec(chain string) []string {
	return []string{"-m", "comment", "--comment", "secureoverlay plaintext IPIP rules", "-j", chain}
}

func isJump(line, hook, chain string) bool {
	f := strings.Fields(line)
	return len(f) >= 2 && f[0] == "-A" && f[1] == hook && slices.Contains(f, "-j") && f[len(f)-1] == chain
}

// Apply makes our chains hold exactly rules and puts each jump at position 1.
func (a *Applier) Apply(rules []desired.Rule) (Result, error) {
	var res Result
	want := Render(rules)
	var errs []error

	full := a.needFull || a.last == nil
	res.Full = full
	var write []string
	if full {
		existing, err := a.ipt.ListChains(Table)
		if err != nil {
			a.needFull = true
			return res, fmt.Errorf("list %s chains: %w", Table, err)
		}
		a.last = map[string][]string{}
		for _, c := range chains {
			chain := c[0]
			if !slices.Contains(existing, chain) {
				if err := a.ipt.NewChain(Table, chain); err != nil {
					errs = append(errs, fmt.Errorf("create chain %s/%s: %w", Table, chain, err))
					continue
				}
				res.ChainsCreated++
			}
			lines, err := a.ipt.List(Table, chain)
			if err != nil {
				errs = append(errs, fmt.Errorf("list chain %s/%s: %w", Table, chain, err))
				continue
			}
			var have []string
			for _, l := range lines {
				if strings.HasPrefix(l, "-A ") {
					n, _, _ := normalize(l)
					have = append(have, n)
				}
			}
			a.last[chain] = have
		}
	}
	for _, c := range chains {
		if !slices.Equal(a.last[c[0]], want[c[0]]) {
			write = append(write, c[0])
		}
	}
	if len(write) > 0 && len(errs) == 0 {
		res.RestoreInvoked = true
		if err := a.ipt.Restore(restoreInput(want, write)); err != nil {
			errs = append(errs, fmt.Errorf("write chains %s in %s: %w", strings.Join(write, ", "), Table, err))
		} else {
			res.ChainsWritten = len(write)
			for _, c := range write {
				a.last[c] = want[c]
			}
		}
	}
	// Jumps: checked on every Apply (cheap), after the chains hold the right rules.
	if len(errs) == 0 {
		for _, c := range chains {
			ins, del, err := a.ensureJump(c[1], c[0])
			res.JumpsInserted += ins
			res.JumpsDeleted += del
			if err != nil {
				errs = append(errs, err)
			}
		}
	}
	if len(errs) > 0 {
		a.needFull = true
		return res, errors.Join(errs...)
	}
	a.needFull = false
	a.lastWant = slices.Clone(rules)
	return res, nil
}

// ensureJump makes rule 1 of hook the jump to chain and removes any other copy.
func (a *Applier) ensureJump(hook, chain string) (inserted, deleted int, err error) {
	lines, err := a.ipt.List(Table, hook)
	if err != nil {
		return 0, 0, fmt.Errorf("list chain %s/%s: %w", Table, hook, err)
	}
	var pos []int // 1-based rule numbers of our jumps
	n := 0
	for _, l := range lines {
		if !strings.HasPrefix(l, "-A ") {
			continue
		}
		n++
		if isJump(l, hook, chain) {
			pos = append(pos, n)
		}
	}
	if len(pos) == 1 && pos[0] == 1 {
		return 0, 0, nil
	}
	if len(pos) == 0 || pos[0] != 1 {
		// Insert first, then remove the displaced copies: never a moment without a jump.
		if err := a.ipt.Insert(Table, hook, 1, jumpSpec(chain)...); err != nil {
			return 0, 0, fmt.Errorf("insert jump %s/%s -> %s at 1: %w", Table, hook, chain, err)
		}
		inserted = 1
		for i := range pos {
			pos[i]++
		}
	} else {
		pos = pos[1:] // keep the one at position 1
	}
	for i := len(pos) - 1; i >= 0; i-- {
		if pos[i] == 1 {
			continue
		}
		if err := a.ipt.DeleteById(Table, hook, pos[i]); err != nil {
			return inserted, deleted, fmt.Errorf("delete stray jump %s/%s rule %d -> %s: %w", Table, hook, pos[i], chain, err)
		}
		deleted++
	}
	return inserted, deleted, nil
}

// Counters reads the packet and byte counters of the rules last applied (plaintext drops
// per peer in enforce, would-be drops in encrypt).
func (a *Applier) Counters() ([]Counter, error) {
	if len(a.lastWant) == 0 {
		// No rule of ours to count: nothing to list (our chains may not exist yet, as
		// when every sync so far failed before the rules were written).
		return nil, nil
	}
	byLine := map[string]desired.Rule{}
	for _, r := range a.lastWant {
		byLine["-A "+chainOf(r.Hook)+" "+Spec(r)] = r
	}
	var out []Counter
	for _, c := range chains {
		lines, err := a.ipt.ListWithCounters(Table, c[0])
		if err != nil {
			return nil, fmt.Errorf("list counters of %s/%s: %w", Table, c[0], err)
		}
		for _, l := range lines {
			n, pk, by := normalize(l)
			if r, ok := byLine[n]; ok {
				out = append(out, Counter{Rule: r, Packets: pk, Bytes: by})
			}
		}
	}
	return out, nil
}

// Cleanup removes our jumps and chains (`secureoverlay-agent cleanup`).
func (a *Applier) Cleanup() error {
	var errs []error
	for _, c := range chains {
		lines, err := a.ipt.List(Table, c[1])
		if err != nil {
			errs = append(errs, fmt.Errorf("list chain %s/%s: %w", Table, c[1], err))
			continue
		}
		var pos []int
		n := 0
		for _, l := range lines {
			if strings.HasPrefix(l, "-A ") {
				n++
				if isJump(l, c[1], c[0]) {
					pos = append(pos, n)
				}
			}
		}
		for i := len(pos) - 1; i >= 0; i-- {
			if err := a.ipt.DeleteById(Table, c[1], pos[i]); err != nil {
				errs = append(errs, fmt.Errorf("delete jump %s/%s rule %d: %w", Table, c[1], pos[i], err))
			}
		}
	}
	if len(errs) == 0 {
		existing, err := a.ipt.ListChains(Table)
		if err != nil {
			return fmt.Errorf("list %s chains: %w", Table, err)
		}
		for _, c := range chains {
			if slices.Contains(existing, c[0]) {
				if err := a.ipt.ClearAndDeleteChain(Table, c[0]); err != nil {
					errs = append(errs, fmt.Errorf("delete chain %s/%s: %w", Table, c[0], err))
				}
			}
		}
	}
	a.needFull = true
	return errors.Join(errs...)
}
