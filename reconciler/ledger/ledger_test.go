package ledger

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/secureoverlay/secureoverlay/keys"
)

var idA = Identity{Node: "a", BootID: "boot-1", UID: "uid-a"}

func epochs() func() string {
	n := 0
	return func() string { n++; return fmt.Sprintf("e%d", n) }
}

func fp(i int) Fingerprint { return KeyFingerprint([]byte{byte(i), byte(i >> 8), 1, 2, 3}) }

func open(t *testing.T, dir string, id Identity, next func() string) (*Ledger, string) {
	t.Helper()
	l, why, err := Open(dir, id, Options{NewEpoch: next})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.Close)
	return l, why
}

func ring(last uint32, live ...uint32) *keys.Ring {
	r := keys.NewRing()
	r.LastGeneration = last
	for _, g := range live {
		root := make(keys.Key, keys.RootKeyBytes)
		root[0] = byte(g)
		r.Generations = append(r.Generations, keys.Generation{Number: g, Root: root})
	}
	return r
}

func TestAdoptedAcrossReopen(t *testing.T) {
	dir := t.TempDir()
	next := epochs()
	l, why := open(t, dir, idA, next)
	if why != ReasonNew || l.Epoch() != "e1" || l.Len() != 0 {
		t.Fatalf("first open: %s epoch %s len %d", why, l.Epoch(), l.Len())
	}
	if err := l.Record([]Entry{{1, fp(1)}, {1, fp(2)}, {1, fp(1)}}); err != nil {
		t.Fatal(err)
	}
	h := keys.History{}.Observe(ring(2, 1, 2))
	if err := l.SetHistory(h); err != nil {
		t.Fatal(err)
	}
	l.Close()
	l2, why := open(t, dir, idA, next)
	if why != ReasonAdopted || l2.Epoch() != "e1" || l2.Len() != 2 || !l2.Installed(fp(1)) || !l2.Installed(fp(2)) || l2.Installed(fp(3)) {
		t.Fatalf("reopen: %s epoch %s len %d", why, l2.Epoch(), l2.Len())
	}
	if !l2.History().Equal(h) {
		t.Fatalf("history %+v, want %+v", l2.History(), h)
	}
}

func TestOtherIdentityOrDamageStartsANewEpoch(t *testing.T) {
	for _, c := range []struct {
		name string
		id   Identity
		edit func(path string)
		want string
	}{
		{"rebooted", Identity{Node: "a", BootID: "boot-2", UID: "uid-a"}, nil, ReasonOther},
		{"node re-created", Identity{Node: "a", BootID: "boot-1", UID: "uid-a2"}, nil, ReasonOther},
		{"another node", Identity{Node: "b", BootID: "boot-1", UID: "uid-a"}, nil, ReasonOther},
		{"garbage line", idA, func(p string) { appendTo(t, p, "k 1 nothex\n") }, ReasonDamaged},
		{"unknown record", idA, func(p string) { appendTo(t, p, "z 1 2\n") }, ReasonDamaged},
		{"no header", idA, func(p string) { write(t, p, "k 1 "+strings.Repeat("00", 32)+"\n") }, ReasonDamaged},
		{"empty", idA, func(p string) { write(t, p, "") }, ReasonDamaged},
		{"fifo", idA, func(p string) { _ = os.Remove(p); mustNil(t, syscall.Mkfifo(p, 0o600)) }, ReasonDamaged},
		{"symlink", idA, func(p string) { _ = os.Remove(p); mustNil(t, os.Symlink("/dev/zero", p)) }, ReasonDamaged},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			next := epochs()
			l, _ := open(t, dir, idA, next)
			mustNil(t, l.Record([]Entry{{1, fp(1)}}))
			l.Close()
			if c.edit != nil {
				c.edit(filepath.Join(dir, fileName))
			}
			done := make(chan struct{})
			var l2 *Ledger
			var why string
			go func() { defer close(done); l2, why = open(t, dir, c.id, next) }()
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				t.Fatal("Open blocked")
			}
			if why != c.want || l2.Epoch() != "e2" || l2.Installed(fp(1)) {
				t.Fatalf("open: %s epoch %s installed %v, want %s with a new epoch and no keys", why, l2.Epoch(), l2.Installed(fp(1)), c.want)
			}
			if st, err := os.Lstat(filepath.Join(dir, fileName)); err != nil || !st.Mode().IsRegular() {
				t.Fatalf("ledger is not a regular file after Open: %v %v", st, err)
			}
		})
	}
}

func TestPartialLastLineIsDropped(t *testing.T) {
	dir := t.TempDir()
	next := epochs()
	l, _ := open(t, dir, idA, next)
	mustNil(t, l.Record([]Entry{{1, fp(1)}}))
	l.Close()
	p := filepath.Join(dir, fileName)
	appendTo(t, p, "k 1 "+strings.Repeat("ab", 20)) // cut by a crash: no newline
	l2, why := open(t, dir, idA, next)
	if why != ReasonAdopted || l2.Len() != 1 {
		t.Fatalf("open: %s len %d", why, l2.Len())
	}
	mustNil(t, l2.Record([]Entry{{1, fp(2)}}))
	l2.Close()
	l3, why := open(t, dir, idA, next)
	if why != ReasonAdopted || l3.Len() != 2 || !l3.Installed(fp(2)) {
		t.Fatalf("after appending past the cut line: %s len %d", why, l3.Len())
	}
}

func TestNewEpochKeepsHistoryAndDropsKeys(t *testing.T) {
	dir := t.TempDir()
	next := epochs()
	l, _ := open(t, dir, idA, next)
	h := keys.History{}.Observe(ring(3, 2, 3))
	mustNil(t, l.SetHistory(h))
	mustNil(t, l.Record([]Entry{{3, fp(1)}}))
	mustNil(t, l.NewEpoch("x"))
	if l.Epoch() != "x" || l.Installed(fp(1)) || !l.History().Equal(h) {
		t.Fatalf("after NewEpoch: epoch %s installed %v history %+v", l.Epoch(), l.Installed(fp(1)), l.History())
	}
	l.Close()
	l2, _ := open(t, dir, idA, next)
	if l2.Epoch() != "x" || l2.Len() != 0 || !l2.History().Equal(h) {
		t.Fatalf("reopened: epoch %s len %d history %+v", l2.Epoch(), l2.Len(), l2.History())
	}
}

func TestFloorRiseCompacts(t *testing.T) {
	dir := t.TempDir()
	l, _ := open(t, dir, idA, epochs())
	h := keys.History{}.Observe(ring(2, 1, 2))
	mustNil(t, l.SetHistory(h))
	var es []Entry
	for i := range 100 {
		es = append(es, Entry{uint32(1 + i%2), fp(i)})
	}
	mustNil(t, l.Record(es))
	before := size(t, dir)
	h = h.Observe(ring(3, 2, 3))
	mustNil(t, l.SetHistory(h))
	if l.Len() != 50 || l.Installed(fp(0)) || !l.Installed(fp(1)) {
		t.Fatalf("after the floor rose to 2: %d keys", l.Len())
	}
	if after := size(t, dir); after >= before {
		t.Fatalf("file %d bytes, was %d: not compacted", after, before)
	}
	l.Close()
	l2, _ := open(t, dir, idA, epochs())
	if l2.Len() != 50 || l2.History().Floor != 2 {
		t.Fatalf("reopened: %d keys, floor %d", l2.Len(), l2.History().Floor)
	}
}

func TestFailedWriteRecordsNothing(t *testing.T) {
	dir := t.TempDir()
	l, _ := open(t, dir, idA, epochs())
	boom := errors.New("killed")
	l.Fail = func(string) error { return boom }
	if err := l.Record([]Entry{{1, fp(1)}}); !errors.Is(err, boom) {
		t.Fatalf("Record = %v", err)
	}
	if l.Installed(fp(1)) {
		t.Fatal("a failed Record marked the key")
	}
	if err := l.NewEpoch("y"); !errors.Is(err, boom) || l.Epoch() != "e1" {
		t.Fatalf("NewEpoch = %v, epoch %s", err, l.Epoch())
	}
}

func TestNoKeyMaterialInTheFile(t *testing.T) {
	dir := t.TempDir()
	l, _ := open(t, dir, idA, epochs())
	key := []byte("0123456789abcdefSALT")
	r := ring(1, 1)
	mustNil(t, l.SetHistory(keys.History{}.Observe(r)))
	mustNil(t, l.Record([]Entry{{1, KeyFingerprint(key)}}))
	b, err := os.ReadFile(filepath.Join(dir, fileName))
	mustNil(t, err)
	for _, secret := range [][]byte{key, r.Generations[0].Root} {
		if strings.Contains(string(b), string(secret)) || strings.Contains(string(b), fmt.Sprintf("%x", secret)) {
			t.Fatal("the ledger holds key material")
		}
	}
}

func TestLockIsExclusive(t *testing.T) {
	dir := t.TempDir()
	a, err := TryLock(dir)
	mustNil(t, err)
	if _, err := TryLock(dir); !errors.Is(err, ErrLocked) {
		t.Fatalf("second TryLock = %v, want ErrLocked", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	waited := false
	if _, err := WaitLock(ctx, dir, 20*time.Millisecond, func() { waited = true }); !errors.Is(err, context.DeadlineExceeded) || !waited {
		t.Fatalf("WaitLock on a held lock = %v (waited %v)", err, waited)
	}
	a.Unlock()
	b, err := WaitLock(context.Background(), dir, 20*time.Millisecond, nil)
	mustNil(t, err)
	b.Unlock()
}

func TestRemove(t *testing.T) {
	dir := t.TempDir()
	next := epochs()
	l, _ := open(t, dir, idA, next)
	mustNil(t, l.Record([]Entry{{1, fp(1)}}))
	mustNil(t, l.Remove())
	l2, why := open(t, dir, idA, next)
	if why != ReasonNew || l2.Epoch() != "e2" || l2.Len() != 0 {
		t.Fatalf("after Remove: %s epoch %s", why, l2.Epoch())
	}
}

func appendTo(t *testing.T, p, s string) {
	t.Helper()
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)
	mustNil(t, err)
	_, err = f.WriteString(s)
	mustNil(t, err)
	mustNil(t, f.Close())
}

func write(t *testing.T, p, s string) { t.Helper(); mustNil(t, os.WriteFile(p, []byte(s), 0o600)) }

func size(t *testing.T, dir string) int64 {
	t.Helper()
	st, err := os.Stat(filepath.Join(dir, fileName))
	mustNil(t, err)
	return st.Size()
}

func mustNil(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// The ring history is the cluster's: a ledger made for another boot or Node object hands
// it on, with no keys and a new epoch.
func TestHistorySurvivesAnotherIdentity(t *testing.T) {
	dir := t.TempDir()
	next := epochs()
	l, _ := open(t, dir, idA, next)
	h := keys.History{}.Observe(ring(4, 3, 4))
	mustNil(t, l.SetHistory(h))
	mustNil(t, l.Record([]Entry{{4, fp(1)}}))
	l.Close()
	l2, why := open(t, dir, Identity{Node: "a", BootID: "boot-1", UID: "uid-a2"}, next)
	if why != ReasonOther || l2.Installed(fp(1)) || !l2.History().Equal(h) {
		t.Fatalf("re-created Node: %s, installed %v, history %+v", why, l2.Installed(fp(1)), l2.History())
	}
}

// TestSideFiles: a side file is replaced whole (no temporary left), read back, refused
// under a name that is not one, and removed with the ledger by Remove and by RemoveFile.
func TestSideFiles(t *testing.T) {
	dir := t.TempDir()
	if _, err := ReadSide(dir, SideReadiness); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("no side file yet: %v", err)
	}
	mustNil(t, WriteSide(dir, SideReadiness, []byte("first")))
	mustNil(t, WriteSide(dir, SideReadiness, []byte("second")))
	if b, err := ReadSide(dir, SideReadiness); err != nil || string(b) != "second" {
		t.Fatalf("read back %q, %v", b, err)
	}
	if err := WriteSide(dir, "../ledger", []byte("x")); err == nil {
		t.Error("a side file named ../ledger was written")
	}
	if _, err := ReadSide(dir, "ledger"); err == nil {
		t.Error("the ledger was read as a side file")
	}
	entries, err := os.ReadDir(dir)
	mustNil(t, err)
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ".tmp") {
			t.Errorf("temporary file left: %s", e.Name())
		}
	}

	l, _ := open(t, dir, idA, epochs())
	mustNil(t, l.Remove())
	if _, err := ReadSide(dir, SideReadiness); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("after Remove the side file is still there: %v", err)
	}
	mustNil(t, WriteSide(dir, SideReadiness, []byte("third")))
	mustNil(t, RemoveFile(dir))
	if _, err := ReadSide(dir, SideReadiness); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("after RemoveFile the side file is still there: %v", err)
	}
}
