// Package ledger is the agent's write-ahead record, outside its process, of every SA key it
// has installed in the current boot of its node, and of the key rings it accepted.
//
// Why (docs/keys.md §3, "No key twice"): an SA added twice under one AES-GCM key restarts
// its ESP sequence number and so repeats the kernel's seqiv IVs (nonce reuse), and an
// inbound SA added twice resets its replay window. The agent's keys are a function of its
// SA epoch; within one epoch the ledger remembers every key fingerprint, so "is this key
// new?" survives process restarts, kill -9 at any point, `ip xfrm state flush`, cleanup and
// stale reports. The file lives on the node (default /run/secureoverlay, a tmpfs cleared
// at reboot; a reboot changes the boot ID and so every key anyway).
//
// Invariants:
//   - Write-ahead: Record returns only after the fingerprints are in the file (written; the
//     file must outlive the process, not the machine: a machine crash is a reboot, which
//     changes every key); the caller installs each key right after recording it. A kill
//     between the two leaves a fingerprint of a key never installed: harmless (the key is
//     treated as used, and the agent takes a new epoch if it is wanted again).
//   - A ledger's epoch and keys are used only by the boot, Node object and node it was made
//     for (Identity); anything else, or a file that does not parse, is replaced by a new
//     ledger with a new random epoch: every key the agent then derives is new. The key
//     ring history of a parseable ledger is kept either way (it is the cluster's).
//   - Only whole lines count: a line cut short by a crash is dropped (its Record never
//     returned, so nothing was installed under it).
//   - One agent per node: Lock takes an exclusive flock on the directory's lock file for the
//     process's life.
//   - No SA key material: fingerprints are SHA-256 of a domain label and the key; root
//     fingerprints the same (keys.RootFingerprint). The one secret the file holds is this
//     node's X25519 private keys of protocol v2 (docs/keys.md §10): they are this node's
//     own, bound to its epoch like the SA keys (a new epoch drops them: new key pairs),
//     and erased by a rewrite when their generation is no longer published. The file is
//     mode 0600 in a root-only tmpfs, as the kernel's SA state it stands beside.
//
// File format (text, one record per line):
//
//	secureoverlay-ledger v1 {"node":"…","bootID":"…","uid":"…","epoch":"…"}
//	h HIGH FLOOR              key ring history (keys.History watermarks)
//	r GEN HEX64               root fingerprint of a live generation
//	k GEN HEX64               fingerprint of an SA key of generation GEN
//	x GEN HEX64               this node's X25519 private key for generation GEN (v2)
//
// An agent that predates the x record finds a ledger with one damaged and starts a new
// epoch (every key new): a downgrade is safe.
//
// Side files (WriteSide) sit beside the ledger in the same directory and go with it: each
// replaced whole, atomically. SideReadiness holds the agent's readiness confirmations
// (readiness.Saved: node IDs and digests of public key incarnations, no key material).
package ledger

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/secureoverlay/secureoverlay/keys"
)

// DefaultDir is where the agent keeps its ledger (a hostPath in the DaemonSet).
const DefaultDir = "/run/secureoverlay"

const (
	fileName = "ledger"
	lockName = "agent.lock"
	magic    = "secureoverlay-ledger v1 "
	// maxFile bounds what Open reads: a ledger holds a few SAs per peer and live
	// generation (60,000 lines at 5,000 peers), far below this.
	maxFile = 64 << 20
)

// Fingerprint identifies an SA key without revealing it.
type Fingerprint [32]byte

// KeyFingerprint is the fingerprint of an SA key blob (AES key ‖ salt).
func KeyFingerprint(key []byte) Fingerprint {
	h := sha256.New()
	h.Write([]byte("secureoverlay sa key fingerprint v1\x00"))
	h.Write(key)
	var f Fingerprint
	copy(f[:], h.Sum(nil))
	return f
}

// Entry is one key to record: its fingerprint and generation.
type Entry struct {
	Generation uint32
	Key        Fingerprint
}

// Identity is what a ledger is valid for: this node, this boot, this Node object.
type Identity struct {
	Node   string `json:"node"`
	BootID string `json:"bootID"`
	UID    string `json:"uid"`
}

type header struct {
	Identity
	Epoch string `json:"epoch"`
}

// Ledger is one node's open ledger. It is not safe for concurrent use (the agent's sync
// worker owns it).
type Ledger struct {
	dir   string
	id    Identity
	epoch string
	used  map[Fingerprint]uint32
	hist  keys.History
	// priv holds this node's X25519 private keys of the epoch, by generation (x records).
	priv map[uint32]*keys.PrivateKey
	f    *os.File
	// compactAt is the floor at the last rewrite: when the history's floor rises past it,
	// the next write drops the entries of generations below it.
	compactAt uint32
	// Fail, if set, is called before every write to the file ("record", "history",
	// "epoch", "remove"); a non-nil error fails the write before it happens. Tests use it
	// to kill the agent at any point.
	Fail func(op string) error
}

// Why Open started a new epoch instead of adopting the file's.
const (
	ReasonAdopted  = "adopted"  // same node, boot and Node object: epoch kept
	ReasonNew      = "new"      // no ledger yet
	ReasonOther    = "other"    // made for another boot, Node object or node
	ReasonDamaged  = "damaged"  // did not parse
	ReasonRequired = "required" // the caller asked for a new epoch (NewEpoch)
)

// Options of Open.
type Options struct {
	// NewEpoch returns a fresh random SA epoch (required).
	NewEpoch func() string
	// Seed is the key ring history the caller knows from elsewhere (its last report);
	// it is merged into the file's.
	Seed keys.History
	// Fail becomes Ledger.Fail, also for the writes Open makes.
	Fail func(op string) error
}

// Open reads dir's ledger for id. If it was made for id and parses, its epoch, keys and
// history are adopted; otherwise a new ledger with epoch o.NewEpoch() and history o.Seed
// is written. It returns why it adopted or replaced the file.
func Open(dir string, id Identity, o Options) (*Ledger, string, error) {
	if id.Node == "" || id.BootID == "" || id.UID == "" {
		return nil, "", errors.New("ledger: node name, boot ID and node UID are required")
	}
	if o.NewEpoch == nil {
		return nil, "", errors.New("ledger: no epoch source")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, "", fmt.Errorf("ledger directory %s: %w", dir, err)
	}
	seed := o.Seed
	l := &Ledger{dir: dir, id: id, used: map[Fingerprint]uint32{}, priv: map[uint32]*keys.PrivateKey{}, Fail: o.Fail}
	reason := ReasonNew
	data, err := readBounded(l.path())
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		reason = ReasonDamaged
	default:
		h, used, hist, priv, good, perr := parse(data)
		switch {
		case perr != nil:
			reason = ReasonDamaged
		case h.Identity != id || h.Epoch == "":
			// Made for another boot or Node object: its keys and epoch are of no use,
			// but the key ring history is the cluster's and stays true.
			reason = ReasonOther
			seed = seed.Merge(hist)
			erase(priv)
		default:
			l.epoch, l.used, l.hist, l.priv = h.Epoch, used, hist.Merge(seed), priv
			// Drop a line cut short by a crash so appends start on a line boundary.
			if good < len(data) {
				if err := l.fail("truncate"); err != nil {
					return nil, "", err
				}
				if err := os.Truncate(l.path(), int64(good)); err != nil {
					return nil, "", fmt.Errorf("ledger %s: drop a partial line: %w", l.path(), err)
				}
			}
			if err := l.openAppend(); err != nil {
				return nil, "", err
			}
			l.compactAt = l.hist.Floor
			return l, ReasonAdopted, nil
		}
	}
	l.hist = seed
	if err := l.rewrite(o.NewEpoch()); err != nil {
		return nil, "", err
	}
	return l, reason, nil
}

func (l *Ledger) path() string { return filepath.Join(l.dir, fileName) }

// Epoch is the SA epoch this ledger records keys for.
func (l *Ledger) Epoch() string { return l.epoch }

// History is the key ring history recorded so far.
func (l *Ledger) History() keys.History { return l.hist }

// Len is the number of key fingerprints recorded in the current epoch.
func (l *Ledger) Len() int { return len(l.used) }

// Installed reports whether a key with fingerprint f was recorded in the current epoch.
func (l *Ledger) Installed(f Fingerprint) bool {
	_, ok := l.used[f]
	return ok
}

// Record appends the entries not recorded yet and syncs the file. Only after it returns
// nil may the caller install the keys.
func (l *Ledger) Record(es []Entry) error {
	var b bytes.Buffer
	for _, e := range es {
		if _, ok := l.used[e.Key]; ok {
			continue
		}
		fmt.Fprintf(&b, "k %d %s\n", e.Generation, hex.EncodeToString(e.Key[:]))
	}
	if b.Len() == 0 {
		return nil
	}
	if err := l.append("record", b.Bytes()); err != nil {
		return err
	}
	for _, e := range es {
		l.used[e.Key] = e.Generation
	}
	return nil
}

// SetHistory records h (the history after accepting a ring) before the caller uses the
// ring. When the floor rose, the file is rewritten without the keys of generations that
// can never come back.
func (l *Ledger) SetHistory(h keys.History) error {
	if h.Equal(l.hist) {
		return nil
	}
	if h.Floor > l.compactAt {
		old := l.hist
		l.hist = h
		if err := l.rewrite(l.epoch); err != nil {
			l.hist = old
			return err
		}
		return nil
	}
	var b bytes.Buffer
	writeHistory(&b, h)
	if err := l.append("history", b.Bytes()); err != nil {
		return err
	}
	l.hist = h
	return nil
}

// NewEpoch starts epoch e: the file is replaced (atomically) by one holding the history and
// no keys (SA fingerprints or private keys). Every key the caller derives from now on is
// new.
func (l *Ledger) NewEpoch(e string) error {
	return l.rewrite(e)
}

// Remove deletes the ledger file and its side files (cleanup and uninstall: the node keeps
// nothing of ours).
// The next Open starts a new epoch.
func (l *Ledger) Remove() error {
	if err := l.fail("remove"); err != nil {
		return err
	}
	l.Close()
	erase(l.priv)
	l.priv = map[uint32]*keys.PrivateKey{}
	if err := os.Remove(l.path()); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove ledger %s: %w", l.path(), err)
	}
	for _, name := range sideFiles {
		if err := os.Remove(filepath.Join(l.dir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove ledger side file: %w", err)
		}
	}
	return syncDir(l.dir)
}

// Close closes the file (the lock is separate: see Lock).
func (l *Ledger) Close() {
	if l.f != nil {
		_ = l.f.Close()
		l.f = nil
	}
}

func (l *Ledger) fail(op string) error {
	if l.Fail != nil {
		if err := l.Fail(op); err != nil {
			return fmt.Errorf("ledger %s: %w", op, err)
		}
	}
	return nil
}

func (l *Ledger) append(op string, b []byte) error {
	if err := l.fail(op); err != nil {
		return err
	}
	if l.f == nil {
		if err := l.openAppend(); err != nil {
			return err
		}
	}
	// No fsync: the ledger must outlive the process (a write(2) that returned is in the
	// page cache, which a killed process cannot take with it), not the machine — a crash
	// of the machine is a reboot, a new boot ID, and so new keys for everything. One
	// write(2) per SA costs microseconds (4,000 appends of a ledger line took 12 ms on the
	// busy 2-core test host), next to the netlink add it precedes.
	if _, err := l.f.Write(b); err != nil {
		l.Close() // reopen (and re-check) on the next write
		return fmt.Errorf("write ledger %s: %w", l.path(), err)
	}
	return nil
}

func (l *Ledger) openAppend() error {
	f, err := os.OpenFile(l.path(), os.O_WRONLY|os.O_APPEND|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return fmt.Errorf("open ledger %s: %w", l.path(), err)
	}
	l.f = f
	return nil
}

// rewrite replaces the file with header(epoch), the history and the keys of the current
// epoch at or above the floor (none when the epoch changes).
func (l *Ledger) rewrite(epoch string) error {
	op := "epoch"
	if epoch == l.epoch {
		op = "compact"
	}
	used, priv := l.used, l.priv
	if epoch != l.epoch {
		used, priv = map[Fingerprint]uint32{}, nil
	}
	return l.rewriteWith(op, epoch, used, priv)
}

// rewriteWith replaces the file with header(epoch), the history, the SA key fingerprints
// used at or above the floor and the private keys priv; on success they are the ledger's
// (the private keys it held and does not keep are erased).
func (l *Ledger) rewriteWith(op, epoch string, used map[Fingerprint]uint32, priv map[uint32]*keys.PrivateKey) error {
	if err := l.fail(op); err != nil {
		return err
	}
	var b bytes.Buffer
	defer func() { clear(b.Bytes()[:b.Cap()]) }() // it holds the private keys
	hb, _ := json.Marshal(header{Identity: l.id, Epoch: epoch})
	b.WriteString(magic)
	b.Write(hb)
	b.WriteByte('\n')
	writeHistory(&b, l.hist)
	kept := make(map[Fingerprint]uint32, len(used))
	for f, g := range used {
		if g < l.hist.Floor {
			continue
		}
		kept[f] = g
		fmt.Fprintf(&b, "k %d %s\n", g, hex.EncodeToString(f[:]))
	}
	keptPriv := make(map[uint32]*keys.PrivateKey, len(priv))
	for _, g := range slices.Sorted(maps.Keys(priv)) {
		keptPriv[g] = priv[g]
		writePrivate(&b, g, priv[g])
	}
	tmp := filepath.Join(l.dir, "."+fileName+".tmp")
	if err := writeSynced(tmp, b.Bytes()); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("write ledger %s: %w", tmp, err)
	}
	l.Close()
	if err := os.Rename(tmp, l.path()); err != nil {
		return fmt.Errorf("replace ledger %s: %w", l.path(), err)
	}
	if err := syncDir(l.dir); err != nil {
		return err
	}
	for g, k := range l.priv {
		if keptPriv[g] != k {
			k.Erase()
		}
	}
	l.epoch, l.used, l.priv, l.compactAt = epoch, kept, keptPriv, l.hist.Floor
	return l.openAppend()
}

func writeHistory(b *bytes.Buffer, h keys.History) {
	fmt.Fprintf(b, "h %d %d\n", h.High, h.Floor)
	for _, g := range h.Generations() {
		f := h.Roots[g]
		fmt.Fprintf(b, "r %d %s\n", g, hex.EncodeToString(f[:]))
	}
}

func writeSynced(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		_ = f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		_ = f.Close()
		return err
	}
	return f.Close()
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync ledger directory %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync ledger directory %s: %w", dir, err)
	}
	return nil
}

// readBounded reads a regular file of at most maxFile bytes (never a FIFO or a device:
// the directory is the node's, not ours alone).
func readBounded(path string) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("ledger %s is not a regular file", path)
	}
	if st.Size() > maxFile {
		return nil, fmt.Errorf("ledger %s is %d bytes, more than %d", path, st.Size(), maxFile)
	}
	return io.ReadAll(io.LimitReader(f, maxFile+1))
}

// parse reads a ledger; good is the length of the prefix made of whole lines (a last line
// without its newline was cut by a crash and is ignored). Any malformed whole line fails.
func parse(data []byte) (h header, used map[Fingerprint]uint32, hist keys.History, priv map[uint32]*keys.PrivateKey, good int, err error) {
	defer func() {
		if err != nil {
			erase(priv)
			priv = nil
		}
	}()
	used = map[Fingerprint]uint32{}
	priv = map[uint32]*keys.PrivateKey{}
	hist.Roots = map[uint32][32]byte{}
	if i := bytes.LastIndexByte(data, '\n'); i >= 0 {
		good = i + 1
	}
	sc := bufio.NewScanner(bytes.NewReader(data[:good]))
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	line := 0
	for sc.Scan() {
		line++
		s := sc.Text()
		if line == 1 {
			rest, ok := strings.CutPrefix(s, magic)
			if !ok {
				return h, nil, hist, priv, 0, fmt.Errorf("line 1: not a ledger header")
			}
			if err := json.Unmarshal([]byte(rest), &h); err != nil {
				return h, nil, hist, priv, 0, fmt.Errorf("line 1: header does not parse")
			}
			continue
		}
		f := strings.Fields(s)
		bad := func() error { return fmt.Errorf("line %d: malformed %q record", line, f[0]) }
		if len(f) != 3 {
			return h, nil, hist, priv, 0, fmt.Errorf("line %d: malformed record", line)
		}
		a, err := strconv.ParseUint(f[1], 10, 32)
		if err != nil {
			return h, nil, hist, priv, 0, bad()
		}
		switch f[0] {
		case "h":
			b, err := strconv.ParseUint(f[2], 10, 32)
			if err != nil {
				return h, nil, hist, priv, 0, bad()
			}
			hist.High, hist.Floor = uint32(a), uint32(b)
			for g := range hist.Roots {
				if g < hist.Floor {
					delete(hist.Roots, g)
				}
			}
		case "r", "k", "x":
			var fp [32]byte
			if n, err := hex.Decode(fp[:], []byte(f[2])); err != nil || n != 32 || len(f[2]) != 64 {
				return h, nil, hist, priv, 0, bad()
			}
			switch f[0] {
			case "r":
				hist.Roots[uint32(a)] = fp
			case "k":
				used[Fingerprint(fp)] = uint32(a)
			default:
				k, err := keys.NewPrivateKey(bytes.Clone(fp[:]))
				clear(fp[:])
				if err != nil || priv[uint32(a)] != nil {
					// Two private keys for one generation: never written by an agent.
					return h, nil, hist, priv, 0, bad()
				}
				priv[uint32(a)] = k
			}
		default:
			return h, nil, hist, priv, 0, fmt.Errorf("line %d: unknown record", line)
		}
	}
	if line == 0 {
		return h, nil, hist, priv, 0, errors.New("empty ledger")
	}
	return h, used, hist, priv, good, nil
}

// Release forgets f in memory only: the kernel definitely did not install it (its add was
// refused), so the caller may try it again in this process. The file keeps the entry, so a
// later process treats the key as used: a superset of the installed keys is safe.
func (l *Ledger) Release(f Fingerprint) { delete(l.used, f) }

// RemoveFile deletes dir's ledger and its side files (WriteSide) without opening it
// (`secureoverlay-agent cleanup`, which holds the lock).
func RemoveFile(dir string) error {
	for _, name := range append([]string{fileName}, sideFiles...) {
		if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove ledger: %w", err)
		}
	}
	return nil
}

// SideReadiness is the side file of the agent's saved readiness confirmations
// (readiness.Saved).
const SideReadiness = "readiness"

// sideFiles are the names WriteSide accepts.
var sideFiles = []string{SideReadiness}

// WriteSide replaces the side file name in dir (one of the Side names) with data: written
// to a temporary file, synced, renamed over it, the directory synced. The side files hold
// what the agent keeps beside its ledger across its own restarts, for the same boot; they
// go with the ledger (RemoveFile).
func WriteSide(dir, name string, data []byte) error {
	if !slices.Contains(sideFiles, name) {
		return fmt.Errorf("ledger side file %q: not one of %v", name, sideFiles)
	}
	tmp := filepath.Join(dir, "."+name+".tmp")
	if err := writeSynced(tmp, data); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("write %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		return fmt.Errorf("replace %s: %w", filepath.Join(dir, name), err)
	}
	return syncDir(dir)
}

// ReadSide reads the side file name in dir (os.ErrNotExist when there is none), bounded as
// the ledger is.
func ReadSide(dir, name string) ([]byte, error) {
	if !slices.Contains(sideFiles, name) {
		return nil, fmt.Errorf("ledger side file %q: not one of %v", name, sideFiles)
	}
	return readBounded(filepath.Join(dir, name))
}
