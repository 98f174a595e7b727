package ledger

// This node's X25519 private keys of protocol v2 (docs/keys.md §10, "Published keys"): one
// per published generation and SA epoch, kept in the ledger (x records) so that a restart
// in the same epoch publishes the same public keys — within one key incarnation (boot ID,
// Node UID, epoch) a node's public keys never change, and a new epoch always draws new
// ones.

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"io"
	"maps"
	"slices"

	"github.com/secureoverlay/secureoverlay/keys"
)

// PrivateKey returns this node's private key for generation g in the current epoch.
func (l *Ledger) PrivateKey(g uint32) (*keys.PrivateKey, bool) {
	k, ok := l.priv[g]
	return k, ok
}

// PrivateKeyGenerations lists, ascending, the generations this node holds a private key
// for.
func (l *Ledger) PrivateKeyGenerations() []uint32 {
	return slices.Sorted(maps.Keys(l.priv))
}

// KeepPrivateKeys makes the ledger hold a private key for exactly the generations gens in
// the current epoch: a missing one is drawn from rand and recorded before it returns
// (write-ahead: its public half may be published only after), one no longer wanted is
// erased — the file is rewritten without it and the copy in memory zeroed. It reports
// whether anything changed. On error nothing changed.
func (l *Ledger) KeepPrivateKeys(gens []uint32, rand io.Reader) (changed bool, err error) {
	want := make(map[uint32]bool, len(gens))
	for _, g := range gens {
		want[g] = true
	}
	drop := false
	for g := range l.priv {
		if !want[g] {
			drop = true
		}
	}
	fresh := map[uint32]*keys.PrivateKey{}
	defer func() {
		if err != nil {
			erase(fresh)
		}
	}()
	for _, g := range slices.Sorted(maps.Keys(want)) {
		if l.priv[g] != nil {
			continue
		}
		k, err := keys.GeneratePrivateKey(rand)
		if err != nil {
			return false, fmt.Errorf("ledger: draw the x25519 key of generation %d: %w", g, err)
		}
		fresh[g] = k
	}
	if !drop && len(fresh) == 0 {
		return false, nil
	}
	if drop {
		next := make(map[uint32]*keys.PrivateKey, len(want))
		for g := range want {
			if k := l.priv[g]; k != nil {
				next[g] = k
			} else {
				next[g] = fresh[g]
			}
		}
		return true, l.rewriteWith("x25519", l.epoch, l.used, next)
	}
	var b bytes.Buffer
	defer func() { clear(b.Bytes()[:b.Cap()]) }()
	for _, g := range slices.Sorted(maps.Keys(fresh)) {
		writePrivate(&b, g, fresh[g])
	}
	if err := l.append("x25519", b.Bytes()); err != nil {
		return false, err
	}
	maps.Copy(l.priv, fresh)
	return true, nil
}

// writePrivate appends the x record of private key k of generation g to b.
func writePrivate(b *bytes.Buffer, g uint32, k *keys.PrivateKey) {
	raw := k.Bytes()
	enc := make([]byte, hex.EncodedLen(len(raw)))
	hex.Encode(enc, raw)
	fmt.Fprintf(b, "x %d %s\n", g, enc)
	clear(enc)
}

// erase zeroes every private key of m.
func erase(m map[uint32]*keys.PrivateKey) {
	for _, k := range m {
		k.Erase()
	}
}
