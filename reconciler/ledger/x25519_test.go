package ledger

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/secureoverlay/secureoverlay/keys"
)

// pubs returns the public keys the ledger holds, by generation.
func pubs(l *Ledger) map[uint32]keys.PublicKey {
	m := map[uint32]keys.PublicKey{}
	for _, g := range l.PrivateKeyGenerations() {
		k, _ := l.PrivateKey(g)
		m[g] = k.Public()
	}
	return m
}

func keep(t *testing.T, l *Ledger, want bool, gens ...uint32) {
	t.Helper()
	changed, err := l.KeepPrivateKeys(gens, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if changed != want {
		t.Fatalf("KeepPrivateKeys(%v) changed = %v, want %v", gens, changed, want)
	}
	if got := l.PrivateKeyGenerations(); !slices.Equal(got, gens) {
		t.Fatalf("after KeepPrivateKeys(%v): holds %v", gens, got)
	}
}

// TestPrivateKeysAdoptedPerEpoch: a restart in the same epoch finds the same key pairs
// (published public keys never change within one key incarnation); a generation no longer
// wanted is erased from memory and file; a new epoch, boot or Node object draws new ones.
func TestPrivateKeysAdoptedPerEpoch(t *testing.T) {
	dir := t.TempDir()
	next := epochs()
	l, _ := open(t, dir, idA, next)
	keep(t, l, true, 5)
	keep(t, l, false, 5)
	keep(t, l, true, 5, 6)
	first := pubs(l)
	if first[5] == first[6] {
		t.Fatal("two generations got the same key pair")
	}
	if st, err := os.Stat(l.path()); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("ledger mode: %v %v", st.Mode(), err)
	}
	old5, _ := l.PrivateKey(5)
	old5hex := hex.EncodeToString(old5.Bytes())
	l.Close()

	l, why := open(t, dir, idA, next)
	if why != ReasonAdopted || !equalPubs(pubs(l), first) {
		t.Fatalf("reopen: %s, keys %v, want %v", why, pubs(l), first)
	}
	adopted5, _ := l.PrivateKey(5)
	keep(t, l, true, 6)
	if adopted5.Bytes() != nil {
		t.Fatal("generation 5's private key was not erased in memory")
	}
	if data, _ := os.ReadFile(l.path()); strings.Contains(string(data), old5hex) || strings.Contains(string(data), "x 5 ") {
		t.Fatal("generation 5's private key is still in the file")
	}
	if got := pubs(l); got[6] != first[6] || len(got) != 1 {
		t.Fatalf("after dropping 5: %v", got)
	}
	// Compaction (the floor rising) keeps the private keys.
	if err := l.SetHistory(keys.History{}.Observe(ring(7, 6, 7))); err != nil {
		t.Fatal(err)
	}
	if err := l.SetHistory(keys.History{}.Observe(ring(8, 8))); err != nil {
		t.Fatal(err)
	}
	l.Close()
	l, why = open(t, dir, idA, next)
	if got := pubs(l); why != ReasonAdopted || got[6] != first[6] || len(got) != 1 {
		t.Fatalf("after compaction and reopen: %s %v", why, got)
	}

	// A new epoch: no private key survives, and the next ones are new.
	k6, _ := l.PrivateKey(6)
	if err := l.NewEpoch("e-new"); err != nil {
		t.Fatal(err)
	}
	if len(l.PrivateKeyGenerations()) != 0 || k6.Bytes() != nil {
		t.Fatal("a new epoch kept a private key")
	}
	keep(t, l, true, 6)
	if pubs(l)[6] == first[6] {
		t.Fatal("a new epoch reused generation 6's key pair")
	}
	l.Close()
	// Another boot (or Node object): the file's keys are not adopted.
	other := idA
	other.BootID = "boot-2"
	l, why = open(t, dir, other, next)
	if why != ReasonOther || len(l.PrivateKeyGenerations()) != 0 {
		t.Fatalf("another boot: %s, %v", why, l.PrivateKeyGenerations())
	}
	if data, _ := os.ReadFile(l.path()); strings.Contains(string(data), "\nx ") {
		t.Fatal("the ledger of a new boot still holds the old boot's private keys")
	}
}

func equalPubs(a, b map[uint32]keys.PublicKey) bool {
	if len(a) != len(b) {
		return false
	}
	for g, k := range a {
		if b[g] != k {
			return false
		}
	}
	return true
}

// TestPrivateKeysWriteAhead: a failed write changes nothing (no key held that is not in
// the file), a torn x line is dropped, two keys for one generation make the file damaged
// (new epoch), and no error names key bytes.
func TestPrivateKeysWriteAhead(t *testing.T) {
	dir := t.TempDir()
	next := epochs()
	fail := errors.New("killed")
	var failOp string
	l, _, err := Open(dir, idA, Options{NewEpoch: next, Fail: func(op string) error {
		if op == failOp {
			return fail
		}
		return nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	keep(t, l, true, 3)
	failOp = "x25519"
	if _, err := l.KeepPrivateKeys([]uint32{3, 4}, rand.Reader); !errors.Is(err, fail) {
		t.Fatalf("append failure: %v", err)
	}
	if _, err := l.KeepPrivateKeys([]uint32{4}, rand.Reader); !errors.Is(err, fail) {
		t.Fatalf("rewrite failure: %v", err)
	}
	if got := l.PrivateKeyGenerations(); !slices.Equal(got, []uint32{3}) {
		t.Fatalf("after failed writes: %v", got)
	}
	k3, _ := l.PrivateKey(3)
	if k3.Bytes() == nil {
		t.Fatal("a failed rewrite erased a key still held")
	}
	pub3 := k3.Public()
	// The random source failing: an error without key bytes, nothing changed.
	failOp = ""
	if _, err := l.KeepPrivateKeys([]uint32{3, 9}, bytes.NewReader(make([]byte, 5))); err == nil {
		t.Fatal("a failing random source was not reported")
	} else if strings.Contains(err.Error(), hex.EncodeToString(k3.Bytes())) {
		t.Fatal("error holds key bytes")
	}
	l.Close()

	// A torn x line (cut by a crash before its newline) is dropped.
	data, _ := os.ReadFile(l.path())
	torn := append(bytes.Clone(data), []byte("x 7 0011")...)
	if err := os.WriteFile(l.path(), torn, 0o600); err != nil {
		t.Fatal(err)
	}
	l2, why := open(t, dir, idA, next)
	if got := pubs(l2); why != ReasonAdopted || len(got) != 1 || got[3] != pub3 {
		t.Fatalf("torn line: %s %v", why, got)
	}
	l2.Close()

	// Two private keys for one generation: damaged, a new epoch without them.
	k3b, _ := keys.GeneratePrivateKey(rand.Reader)
	dup := append(bytes.Clone(data), []byte("x 3 "+hex.EncodeToString(k3b.Bytes())+"\n")...)
	if err := os.WriteFile(l.path(), dup, 0o600); err != nil {
		t.Fatal(err)
	}
	l3, why := open(t, dir, idA, next)
	if why != ReasonDamaged || len(l3.PrivateKeyGenerations()) != 0 {
		t.Fatalf("two keys for generation 3: %s %v", why, l3.PrivateKeyGenerations())
	}
}

// TestRemoveErasesPrivateKeys: cleanup leaves no private key in memory or on disk.
func TestRemoveErasesPrivateKeys(t *testing.T) {
	dir := t.TempDir()
	l, _ := open(t, dir, idA, epochs())
	keep(t, l, true, 2)
	k, _ := l.PrivateKey(2)
	if err := l.Remove(); err != nil {
		t.Fatal(err)
	}
	if k.Bytes() != nil || len(l.PrivateKeyGenerations()) != 0 {
		t.Fatal("Remove kept a private key in memory")
	}
	if _, err := os.Stat(l.path()); !os.IsNotExist(err) {
		t.Fatalf("ledger file after Remove: %v", err)
	}
}
