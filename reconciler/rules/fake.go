package rules

import (
	"fmt"
	"slices"
	"strings"
	"sync"
)

// Fake is an in-memory IPTables for tests (one table's worth of chains per table name),
// with injectable failures. Rules are kept as -S lines.
type Fake struct {
	mu     sync.Mutex
	chains map[string][]string // "table/chain" → lines "-A chain ..."
	// Fail, if set, is asked before every operation with its name ("list-chains",
	// "new-chain", "list", "insert", "delete", "restore", ...).
	Fail func(op string) error
	// Restores counts successful restore transactions.
	Restores int
}

// NewFake returns a fake with the raw table's built-in chains.
func NewFake() *Fake {
	return &Fake{chains: map[string][]string{"raw/PREROUTING": {}, "raw/OUTPUT": {}}}
}

func (f *Fake) fail(op string) error {
	if f.Fail != nil {
		return f.Fail(op)
	}
	return nil
}

// ListChains implements IPTables.
func (f *Fake) ListChains(table string) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail("list-chains"); err != nil {
		return nil, err
	}
	var out []string
	for k := range f.chains {
		if t, c, _ := strings.Cut(k, "/"); t == table {
			out = append(out, c)
		}
	}
	slices.Sort(out)
	return out, nil
}

// NewChain implements IPTables.
func (f *Fake) NewChain(table, chain string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail("new-chain"); err != nil {
		return err
	}
	if _, ok := f.chains[table+"/"+chain]; ok {
		return fmt.Errorf("chain %s already exists", chain)
	}
	f.chains[table+"/"+chain] = []string{}
	return nil
}

func (f *Fake) list(table, chain string, counters bool) ([]string, error) {
	lines, ok := f.chains[table+"/"+chain]
	if !ok {
		return nil, fmt.Errorf("chain %s does not exist", chain)
	}
	out := []string{"-N " + chain}
	for _, l := range lines {
		if counters {
			l += " -c 0 0"
		}
		out = append(out, l)
	}
	return out, nil
}

// List implements IPTables.
func (f *Fake) List(table, chain string) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail("list"); err != nil {
		return nil, err
	}
	return f.list(table, chain, false)
}

// ListWithCounters implements IPTables (counters are always zero).
func (f *Fake) ListWithCounters(table, chain string) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail("list-counters"); err != nil {
		return nil, err
	}
	return f.list(table, chain, true)
}

func quoteSpec(spec []string) string {
	q := make([]string, len(spec))
	for i, s := range spec {
		if strings.ContainsRune(s, ' ') {
			s = `"` + s + `"`
		}
		q[i] = s
	}
	return strings.Join(q, " ")
}

// Insert implements IPTables.
func (f *Fake) Insert(table, chain string, pos int, spec ...string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail("insert"); err != nil {
		return err
	}
	k := table + "/" + chain
	lines, ok := f.chains[k]
	if !ok || pos < 1 || pos > len(lines)+1 {
		return fmt.Errorf("insert %s at %d: bad chain or position", chain, pos)
	}
	f.chains[k] = slices.Insert(lines, pos-1, "-A "+chain+" "+quoteSpec(spec))
	return nil
}

// DeleteById implements IPTables.
func (f *Fake) DeleteById(table, chain string, id int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail("delete"); err != nil {
		return err
	}
	k := table + "/" + chain
	lines := f.chains[k]
	if id < 1 || id > len(lines) {
		return fmt.Errorf("delete %s rule %d: no such rule", chain, id)
	}
	f.chains[k] = slices.Delete(lines, id-1, id)
	return nil
}

// ClearAndDeleteChain implements IPTables.
func (f *Fake) ClearAndDeleteChain(table, chain string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail("delete-chain"); err != nil {
		return err
	}
	delete(f.chains, table+"/"+chain)
	return nil
}

// Restore implements IPTables for the subset restoreInput writes, atomically.
func (f *Fake) Restore(data []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail("restore"); err != nil {
		return err
	}
	next := map[string][]string{}
	for k, v := range f.chains {
		next[k] = slices.Clone(v)
	}
	table := ""
	for _, l := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		switch {
		case strings.HasPrefix(l, "*"):
			table = l[1:]
		case strings.HasPrefix(l, ":"):
			c := strings.Fields(l[1:])[0]
			if _, ok := next[table+"/"+c]; !ok {
				next[table+"/"+c] = []string{}
			}
		case strings.HasPrefix(l, "-F "):
			next[table+"/"+l[3:]] = []string{}
		case strings.HasPrefix(l, "-A "):
			c := strings.Fields(l)[1]
			if _, ok := next[table+"/"+c]; !ok {
				return fmt.Errorf("restore: chain %s does not exist", c)
			}
			next[table+"/"+c] = append(next[table+"/"+c], l)
		case l == "COMMIT":
		default:
			return fmt.Errorf("restore: unsupported line %q", l)
		}
	}
	f.chains = next
	f.Restores++
	return nil
}

// Chain returns a copy of a chain's rules, or nil if it does not exist.
func (f *Fake) Chain(table, chain string) []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.chains[table+"/"+chain])
}

// Flush empties a chain behind the applier's back.
func (f *Fake) Flush(table, chain string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.chains[table+"/"+chain] = []string{}
}
