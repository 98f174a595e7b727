package install

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/secureoverlay/secureoverlay/internal/testutil"
)

// The tests in this file run the installer against real temporary directories, with
// real inotify watches and real concurrent writers.

type lab struct {
	t            *testing.T
	conf, bin    string
	pluginSource string
	plugin       []byte
	logs         *testutil.SyncBuffer
}

func newLab(t *testing.T) *lab {
	t.Helper()
	root := t.TempDir()
	l := &lab{t: t, conf: filepath.Join(root, "net.d"), bin: filepath.Join(root, "bin"), logs: &testutil.SyncBuffer{}}
	for _, d := range []string{l.conf, l.bin, filepath.Join(root, "image")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	l.plugin = bytes.Repeat([]byte("\x7fELF secureoverlay plugin "), 4096)
	l.pluginSource = filepath.Join(root, "image", "secureoverlay")
	if err := os.WriteFile(l.pluginSource, l.plugin, 0o755); err != nil {
		t.Fatal(err)
	}
	return l
}

func (l *lab) installer(tune func(*Config)) *Installer {
	l.t.Helper()
	cfg := Config{
		CNIBinDir: l.bin, CNIConfDir: l.conf, PluginBinary: l.pluginSource, Entry: testEntry,
		Log: slog.New(slog.NewTextHandler(l.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	if tune != nil {
		tune(&cfg)
	}
	in, err := New(cfg)
	if err != nil {
		l.t.Fatal(err)
	}
	return in
}

func (l *lab) write(name, content string, mode fs.FileMode) {
	l.t.Helper()
	p := filepath.Join(l.conf, name)
	if err := os.WriteFile(p, []byte(content), mode); err != nil {
		l.t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil {
		l.t.Fatal(err)
	}
}

// rewrite writes content into name the way Calico's install-cni does: in place, truncating
// first, in two chunks with a gap (a reader in the gap sees a half-written file).
func (l *lab) rewrite(name, content string, gap time.Duration) {
	l.t.Helper()
	f, err := os.OpenFile(filepath.Join(l.conf, name), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		l.t.Error(err)
		return
	}
	defer f.Close()
	half := len(content) / 2
	f.WriteString(content[:half])
	time.Sleep(gap)
	f.WriteString(content[half:])
}

func (l *lab) read(name string) string {
	l.t.Helper()
	b, err := os.ReadFile(filepath.Join(l.conf, name))
	if err != nil {
		l.t.Fatal(err)
	}
	return string(b)
}

func (l *lab) hasEntry(name string) bool {
	b, err := os.ReadFile(filepath.Join(l.conf, name))
	if err != nil {
		return false
	}
	ok, _ := InEntry(b, testEntry)
	return ok
}

func (l *lab) mode(path string) fs.FileMode {
	l.t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		l.t.Fatal(err)
	}
	return st.Mode().Perm()
}

// run starts in.Run and returns a stop function that waits for it.
func (l *lab) run(in *Installer) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- in.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				l.t.Errorf("Run: %v", err)
			}
		})
	}
	l.t.Cleanup(stop)
	return stop
}

func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > timeout {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return time.Since(start)
}

// recorder logs fsnotify events of some dirs in the kernel's order (one inotify instance).
type recorder struct {
	t      *testing.T
	dir    string // the first watched dir: stop's sentinel goes there
	w      *fsnotify.Watcher
	mu     sync.Mutex
	events []fsnotify.Event
	done   chan struct{}
	once   sync.Once
	result []fsnotify.Event
}

// recorderSentinel names the file stop creates to learn that every earlier event has
// been delivered.
const recorderSentinel = ".recorder-sentinel"

func record(t *testing.T, dirs ...string) *recorder {
	t.Helper()
	w, err := fsnotify.NewWatcher()
	if err != nil {
		t.Fatal(err)
	}
	r := &recorder{t: t, dir: dirs[0], w: w, done: make(chan struct{})}
	for _, d := range dirs {
		if err := w.Add(d); err != nil {
			t.Fatal(err)
		}
	}
	go func() {
		defer close(r.done)
		for ev := range w.Events {
			r.mu.Lock()
			r.events = append(r.events, ev)
			r.mu.Unlock()
		}
	}()
	t.Cleanup(func() { r.stop() })
	return r
}

// stop returns every event of the file operations that happened before it was called,
// then closes the watcher. One inotify instance queues the events of all its watches in
// order, so once the creation of a sentinel file shows up, everything before it has been
// delivered. The sentinel's events are not returned.
func (r *recorder) stop() []fsnotify.Event {
	r.once.Do(func() {
		sentinel := filepath.Join(r.dir, recorderSentinel)
		if err := os.WriteFile(sentinel, nil, 0o600); err != nil {
			r.t.Error(err)
		}
		waitFor(r.t, "the recorder's sentinel event", 10*time.Second, func() bool {
			r.mu.Lock()
			defer r.mu.Unlock()
			return index(r.events, sentinel, fsnotify.Create) >= 0
		})
		r.w.Close()
		<-r.done
		os.Remove(sentinel)
		r.mu.Lock()
		defer r.mu.Unlock()
		for _, ev := range r.events {
			if ev.Name != sentinel {
				r.result = append(r.result, ev)
			}
		}
	})
	return slices.Clone(r.result)
}

// index returns the position of the first event on name with op, or -1.
func index(evs []fsnotify.Event, name string, op fsnotify.Op) int {
	for i, ev := range evs {
		if ev.Name == name && ev.Has(op) {
			return i
		}
	}
	return -1
}

// checkTempNames asserts every file created in the observed dirs is either one of the
// final names or a temp file whose name libcni would never load.
func checkTempNames(t *testing.T, evs []fsnotify.Event, final ...string) {
	t.Helper()
	temps := 0
	for _, ev := range evs {
		if !ev.Has(fsnotify.Create) || slices.Contains(final, ev.Name) {
			continue
		}
		base := filepath.Base(ev.Name)
		if !strings.HasPrefix(base, TempPrefix) {
			t.Errorf("unexpected file created: %s", ev.Name)
		}
		if slices.Contains(ConfExtensions, filepath.Ext(base)) {
			t.Errorf("temp file %s has a libcni extension", base)
		}
		if files, _ := confFiles(filepath.Dir(ev.Name)); slices.Contains(files, ev.Name) {
			t.Errorf("libcni.ConfFiles lists temp file %s", ev.Name)
		}
		temps++
	}
	if temps == 0 {
		t.Error("no temp file observed: writes were not atomic renames")
	}
}

func TestInstallOnceAndIdempotent(t *testing.T) {
	for _, tc := range []struct {
		name, content string
		mode          fs.FileMode
	}{
		{"0.3.1 with portmap, bandwidth", calico031, 0o640},
		{"1.0.0 alone", calico100Alone, 0o600},
		{"1.0.0 with tuning", calico100Tuning, 0o644},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newLab(t)
			l.write("10-calico.conflist", tc.content, tc.mode)
			rec := record(t, l.conf, l.bin)
			in := l.installer(nil)
			if err := in.Install(context.Background()); err != nil {
				t.Fatal(err)
			}
			evs := rec.stop()
			bin := filepath.Join(l.bin, PluginType)
			got, err := os.ReadFile(bin)
			if err != nil || !bytes.Equal(got, l.plugin) {
				t.Fatalf("plugin binary not installed: %v", err)
			}
			if m := l.mode(bin); m != 0o755 {
				t.Fatalf("binary mode %v", m)
			}
			if !l.hasEntry("10-calico.conflist") {
				t.Fatalf("entry missing:\n%s", l.read("10-calico.conflist"))
			}
			if m := l.mode(filepath.Join(l.conf, "10-calico.conflist")); m != tc.mode {
				t.Fatalf("conflist mode %v, want %v", m, tc.mode)
			}
			// Binary in place before the config names it.
			binAt := index(evs, bin, fsnotify.Create)
			confAt := index(evs, filepath.Join(l.conf, "10-calico.conflist"), fsnotify.Create)
			if binAt < 0 || confAt < 0 || binAt > confAt {
				t.Fatalf("binary (event %d) not installed before the entry (event %d): %v", binAt, confAt, evs)
			}
			checkTempNames(t, evs, bin, filepath.Join(l.conf, "10-calico.conflist"))

			// Idempotent: a second installer (a restarted pod) writes nothing.
			st1, _ := os.Stat(filepath.Join(l.conf, "10-calico.conflist"))
			b1, _ := os.Stat(bin)
			in2 := l.installer(nil)
			if err := in2.Install(context.Background()); err != nil {
				t.Fatal(err)
			}
			st2, _ := os.Stat(filepath.Join(l.conf, "10-calico.conflist"))
			b2, _ := os.Stat(bin)
			if in2.ConfigWrites() != 0 || !os.SameFile(st1, st2) || !os.SameFile(b1, b2) {
				t.Fatalf("second install rewrote files (writes %d)", in2.ConfigWrites())
			}

			// Uninstall restores the original byte for byte, mode kept, binary gone.
			rec = record(t, l.conf, l.bin)
			if err := in2.Uninstall(context.Background()); err != nil {
				t.Fatal(err)
			}
			evs = rec.stop()
			if got := l.read("10-calico.conflist"); got != tc.content {
				t.Fatalf("uninstall did not restore the original:\n%s", got)
			}
			if m := l.mode(filepath.Join(l.conf, "10-calico.conflist")); m != tc.mode {
				t.Fatalf("mode after uninstall %v, want %v", m, tc.mode)
			}
			if _, err := os.Stat(bin); !os.IsNotExist(err) {
				t.Fatalf("binary still there: %v", err)
			}
			confAt = index(evs, filepath.Join(l.conf, "10-calico.conflist"), fsnotify.Create)
			binAt = index(evs, bin, fsnotify.Remove)
			if confAt < 0 || binAt < 0 || binAt < confAt {
				t.Fatalf("binary removed (event %d) before the entry (event %d): %v", binAt, confAt, evs)
			}
			// Idempotent uninstall.
			if err := in2.Uninstall(context.Background()); err != nil {
				t.Fatal(err)
			}
			if got := l.read("10-calico.conflist"); got != tc.content {
				t.Fatal("second uninstall changed the file")
			}
		})
	}
}

func TestOnlyFirstCalicoConfigTouched(t *testing.T) {
	l := newLab(t)
	other := `{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"calico"}]}`
	bridge := `{"cniVersion":"1.0.0","name":"br","plugins":[{"type":"bridge"}]}`
	l.write("20-calico.conflist", other, 0o644)
	l.write("10-calico.conflist", calico031, 0o644)
	l.write("05-bridge.conflist", bridge, 0o644)
	l.write("99-junk.conf", "{not json", 0o644) // after the target: never read as a blocker
	in := l.installer(nil)
	if err := in.Install(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !l.hasEntry("10-calico.conflist") {
		t.Fatal("first calico conflist has no entry")
	}
	if l.read("20-calico.conflist") != other || l.read("05-bridge.conflist") != bridge || l.read("99-junk.conf") != "{not json" {
		t.Fatal("another config was touched")
	}
	if !strings.Contains(l.logs.String(), "05-bridge.conflist") {
		t.Fatalf("no warning that 05-bridge.conflist shadows the calico network:\n%s", l.logs)
	}
	if in.ConfigWrites() != 1 {
		t.Fatalf("%d writes", in.ConfigWrites())
	}
}

func TestStaleEntryOnDisk(t *testing.T) {
	l := newLab(t)
	stale := strings.Replace(calico031, `"plugins": [`, `"plugins": [{"type":"secureoverlay","icvBytes":16,"mode":"warn"},`, 1)
	l.write("10-calico.conflist", stale, 0o644)
	in := l.installer(nil)
	if err := in.Install(context.Background()); err != nil {
		t.Fatal(err)
	}
	got := []byte(l.read("10-calico.conflist"))
	if ok, _ := InEntry(got, testEntry); !ok || strings.Count(string(got), `"secureoverlay"`) != 1 {
		t.Fatalf("stale entry not replaced:\n%s", got)
	}
	if err := in.Uninstall(context.Background()); err != nil {
		t.Fatal(err)
	}
	// The stale entry was the first element: the calico entry moves up into its place.
	want := strings.Replace(calico031, "\"plugins\": [\n    {", "\"plugins\": [{", 1)
	if got := l.read("10-calico.conflist"); got != want {
		t.Fatalf("uninstall left:\n%s\nwant\n%s", got, want)
	}
}

func TestConfPrimaryConverted(t *testing.T) {
	l := newLab(t)
	l.write("10-calico.conf", calicoConf, 0o640)
	conf, list := filepath.Join(l.conf, "10-calico.conf"), filepath.Join(l.conf, "10-calico.conflist")

	// Sample the dir continuously: there must never be a moment without a calico config.
	// One getdents of a small dir is a consistent snapshot (rename and unlink lock the
	// dir); both files only ever appear complete (written before, or renamed into place).
	// (A lister that reads files after listing them can still find the .conf gone: that
	// is inherent to removing a file and is retried by runtimes on the next dir event.)
	stopSampling := make(chan struct{})
	var gaps, samples int
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			select {
			case <-stopSampling:
				return
			default:
			}
			ents, err := os.ReadDir(l.conf)
			if err != nil {
				gaps++
			}
			if !slices.ContainsFunc(ents, func(e os.DirEntry) bool {
				return e.Name() == "10-calico.conf" || e.Name() == "10-calico.conflist"
			}) {
				gaps++
			}
			samples++
		}
	}()
	rec := record(t, l.conf)
	in := l.installer(nil)
	if err := in.Install(context.Background()); err != nil {
		t.Fatal(err)
	}
	evs := rec.stop()
	close(stopSampling)
	<-sampled
	if gaps > 0 {
		t.Fatalf("%d of %d samples saw no calico config", gaps, samples)
	}
	if _, err := os.Stat(conf); !os.IsNotExist(err) {
		t.Fatalf(".conf still present: %v", err)
	}
	if !l.hasEntry("10-calico.conflist") || l.mode(list) != 0o640 {
		t.Fatalf("converted list wrong (mode %v):\n%s", l.mode(list), l.read("10-calico.conflist"))
	}
	listAt, confGone := index(evs, list, fsnotify.Create), index(evs, conf, fsnotify.Remove)
	if listAt < 0 || confGone < 0 || confGone < listAt {
		t.Fatalf(".conf removed (event %d) before the .conflist was written (event %d)", confGone, listAt)
	}
	checkTempNames(t, evs, list)

	// Calico rewrites its .conf (it sorts first, so it wins): converted again.
	l.write("10-calico.conf", calicoConf, 0o640)
	if err := in.Install(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(conf); !os.IsNotExist(err) || !l.hasEntry("10-calico.conflist") {
		t.Fatal("rewritten .conf not converted again")
	}

	// Uninstall gives the .conf back (before removing the list) and the list goes.
	rec = record(t, l.conf)
	if err := in.Uninstall(context.Background()); err != nil {
		t.Fatal(err)
	}
	evs = rec.stop()
	if got := l.read("10-calico.conf"); got != calicoConf {
		t.Fatalf("restored .conf:\n%s", got)
	}
	if l.mode(conf) != 0o640 {
		t.Fatalf("restored mode %v", l.mode(conf))
	}
	if _, err := os.Stat(list); !os.IsNotExist(err) {
		t.Fatal("converted list left behind")
	}
	confAt, listGone := index(evs, conf, fsnotify.Create), index(evs, list, fsnotify.Remove)
	if confAt < 0 || listGone < confAt {
		t.Fatalf(".conflist removed (event %d) before the .conf was back (event %d)", listGone, confAt)
	}
}

// A foreign .conflist of the same base name is never overwritten by a conversion.
func TestConvertRefusesForeignList(t *testing.T) {
	l := newLab(t)
	l.write("10-calico.conf", calicoConf, 0o644)
	l.write("10-calico.conflist", calico100Tuning, 0o644)
	in := l.installer(nil)
	ctx, cancel := context.WithTimeout(context.Background(), 600*time.Millisecond)
	defer cancel()
	if err := in.Install(ctx); err == nil {
		t.Fatal("install overwrote a foreign conflist")
	}
	if l.read("10-calico.conflist") != calico100Tuning || l.read("10-calico.conf") != calicoConf {
		t.Fatal("files changed")
	}
}

func TestWaitsForPrimary(t *testing.T) {
	l := newLab(t)
	in := l.installer(nil)
	done := make(chan error, 1)
	go func() { done <- in.Install(context.Background()) }()
	select {
	case err := <-done:
		t.Fatalf("install finished without a calico config: %v", err)
	case <-time.After(500 * time.Millisecond):
	}
	l.write("10-calico.conflist", calico031, 0o644)
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("install did not pick up the new config")
	}
	if !l.hasEntry("10-calico.conflist") {
		t.Fatal("no entry")
	}
}

func TestHalfWrittenFileNeverOverwritten(t *testing.T) {
	l := newLab(t)
	half := calico031[:len(calico031)/2]
	l.write("10-calico.conflist", half, 0o644)
	in := l.installer(nil)
	l.run(in)
	time.Sleep(1500 * time.Millisecond) // several parse retries
	if got := l.read("10-calico.conflist"); got != half || in.ConfigWrites() != 0 {
		t.Fatalf("half-written file was written over (writes %d):\n%s", in.ConfigWrites(), got)
	}
	if !strings.Contains(l.logs.String(), "parse") {
		t.Fatalf("parse error not logged:\n%s", l.logs)
	}
	// The writer finishes (in place, as Calico does): the entry goes in.
	l.rewrite("10-calico.conflist", calico031, 0)
	d := waitFor(t, "entry after the file was completed", 2*time.Second, func() bool { return l.hasEntry("10-calico.conflist") })
	t.Logf("entry in place %v after the file was completed", d)
}

func TestReinsertAfterRewrite(t *testing.T) {
	l := newLab(t)
	l.write("10-calico.conflist", calico031, 0o644)
	in := l.installer(nil) // default tuning: the 2 s promise is about the defaults
	l.run(in)
	waitFor(t, "initial install", 2*time.Second, func() bool { return l.hasEntry("10-calico.conflist") })
	var worst time.Duration
	// The initial install is not throttled; the burst serves this many repairs at once.
	for i := range DefaultWriteBurst {
		l.rewrite("10-calico.conflist", calico031, 30*time.Millisecond)
		start := time.Now()
		waitFor(t, "re-insert", 2*time.Second, func() bool { return l.hasEntry("10-calico.conflist") })
		d := time.Since(start)
		worst = max(worst, d)
		t.Logf("rewrite %d: entry back after %v", i+1, d)
		time.Sleep(200 * time.Millisecond)
	}
	if worst >= 2*time.Second {
		t.Fatalf("re-insert took %v", worst)
	}
}

func TestConcurrentRewriterThrottled(t *testing.T) {
	l := newLab(t)
	l.write("10-calico.conflist", calico031, 0o644)
	const burst, every = 3, 2 * time.Second
	in := l.installer(func(c *Config) { c.WriteBurst, c.WriteEvery = burst, every })
	rec := record(t, l.conf)
	l.run(in)
	waitFor(t, "initial install", 2*time.Second, func() bool { return l.hasEntry("10-calico.conflist") })
	before := in.ConfigWrites()

	const fight = 4 * time.Second
	start := time.Now()
	rewrites := 0
	// The rewriter pauses longer than Settle between rewrites, so every rewrite gets its
	// own pass (a writer that never pauses is debounced to one pass per MaxSettle anyway):
	// only the token bucket bounds our writes here.
	for time.Since(start) < fight {
		l.rewrite("10-calico.conflist", calico031, 2*time.Millisecond)
		rewrites++
		time.Sleep(3 * DefaultSettle / 2)
	}
	during := in.ConfigWrites() - before
	// The bucket holds burst tokens after the (unthrottled) initial install and refills
	// one per `every`; allow one token of slack for timing.
	bound := int64(burst) + int64(fight/every) + 1
	t.Logf("rewriter wrote %d times in %v; we wrote %d times (bound %d)", rewrites, fight, during, bound)
	if during > bound {
		t.Fatalf("installer wrote %d times against a rewriter, bound %d", during, bound)
	}
	if during < 2 {
		t.Fatalf("installer wrote only %d times: it did not try to re-insert", during)
	}
	if !strings.Contains(l.logs.String(), "throttling") {
		t.Fatalf("throttling not logged:\n%s", l.logs)
	}
	// The writer stops: the entry comes back once a token is available.
	waitFor(t, "entry after the writer stopped", every+2*time.Second, func() bool { return l.hasEntry("10-calico.conflist") })
	evs := rec.stop()
	checkTempNames(t, evs, filepath.Join(l.conf, "10-calico.conflist"))
}

func TestRearmAfterDirReplaced(t *testing.T) {
	l := newLab(t)
	l.write("10-calico.conflist", calico031, 0o644)
	in := l.installer(nil)
	l.run(in)
	waitFor(t, "initial install", 2*time.Second, func() bool { return l.hasEntry("10-calico.conflist") })

	// The conf dir is moved away and a new one created (as a hostPath remount or an
	// operator would); Calico writes its config into the new dir.
	if err := os.Rename(l.conf, l.conf+".old"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	if err := os.Mkdir(l.conf, 0o755); err != nil {
		t.Fatal(err)
	}
	l.rewrite("10-calico.conflist", calico031, 0)
	d := waitFor(t, "entry in the new dir", 3*time.Second, func() bool { return l.hasEntry("10-calico.conflist") })
	t.Logf("entry in the recreated dir after %v", d)
	// And the new dir is watched: a rewrite there is repaired within 2 s.
	time.Sleep(100 * time.Millisecond)
	l.rewrite("10-calico.conflist", calico031, 10*time.Millisecond)
	d = waitFor(t, "re-insert in the new dir", 2*time.Second, func() bool { return l.hasEntry("10-calico.conflist") })
	t.Logf("re-insert in the recreated dir after %v", d)
	// The old (moved) dir is not ours any more: it keeps what it had.
	if ok, _ := InEntry([]byte(mustRead(t, filepath.Join(l.conf+".old", "10-calico.conflist"))), testEntry); !ok {
		t.Fatal("moved dir was modified")
	}
}

func TestBinaryRepaired(t *testing.T) {
	l := newLab(t)
	l.write("10-calico.conflist", calico031, 0o644)
	in := l.installer(nil)
	l.run(in)
	bin := filepath.Join(l.bin, PluginType)
	waitFor(t, "initial install", 2*time.Second, func() bool { return l.hasEntry("10-calico.conflist") })
	if err := os.Remove(bin); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "binary back", 2*time.Second, func() bool {
		b, err := os.ReadFile(bin)
		return err == nil && bytes.Equal(b, l.plugin)
	})
	// A truncated binary (another writer) is replaced too.
	if err := os.WriteFile(bin, []byte("junk"), 0o755); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "binary repaired", 2*time.Second, func() bool {
		b, err := os.ReadFile(bin)
		return err == nil && bytes.Equal(b, l.plugin)
	})
}

// Uninstall keeps the binary when an entry cannot be removed: a config must never name a
// plugin that is not there.
func TestUninstallKeepsBinaryOnFailure(t *testing.T) {
	l := newLab(t)
	l.write("10-calico.conflist", calico031, 0o644)
	in := l.installer(nil)
	if err := in.Install(context.Background()); err != nil {
		t.Fatal(err)
	}
	onlyOurs := `{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"secureoverlay"}]}`
	l.write("50-ours.conflist", onlyOurs, 0o644)
	err := in.Uninstall(context.Background())
	if err == nil {
		t.Fatal("uninstall succeeded although an entry could not be removed")
	}
	if _, err := os.Stat(filepath.Join(l.bin, PluginType)); err != nil {
		t.Fatalf("binary removed although an entry remains: %v", err)
	}
	if l.read("10-calico.conflist") != calico031 {
		t.Fatal("removable entry was not removed")
	}
}

func TestMissingPluginSourceFails(t *testing.T) {
	l := newLab(t)
	l.write("10-calico.conflist", calico031, 0o644)
	in := l.installer(func(c *Config) { c.PluginBinary = filepath.Join(l.bin, "nope") })
	if err := in.Install(context.Background()); err == nil {
		t.Fatal("install succeeded without a plugin binary")
	}
	if l.read("10-calico.conflist") != calico031 {
		t.Fatal("entry written without the binary")
	}
}

func mustRead(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// Another installer (of another version) keeps replacing the binary: our binary writes are
// bounded by the same bucket, and the binary is ours again once it stops.
func TestBinaryFightThrottled(t *testing.T) {
	l := newLab(t)
	l.write("10-calico.conflist", calico031, 0o644)
	const burst, every, fight = 2, time.Second, 3 * time.Second
	in := l.installer(func(c *Config) { c.WriteBurst, c.WriteEvery = burst, every })
	l.run(in)
	bin := filepath.Join(l.bin, PluginType)
	ours := func() bool { b, err := os.ReadFile(bin); return err == nil && bytes.Equal(b, l.plugin) }
	waitFor(t, "initial install", 2*time.Second, ours)

	rec := record(t, l.bin)
	other := filepath.Join(t.TempDir(), "other")
	start := time.Now()
	for time.Since(start) < fight {
		if err := os.WriteFile(other, []byte("other version"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(other, bin); err != nil {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	evs := rec.stop()
	writes := 0
	for _, ev := range evs {
		if ev.Has(fsnotify.Create) && strings.HasPrefix(filepath.Base(ev.Name), TempPrefix) {
			writes++
		}
	}
	bound := burst + int(fight/every) + 1
	t.Logf("we wrote the binary %d times in %v against another writer (bound %d)", writes, fight, bound)
	if writes > bound || writes < 1 {
		t.Fatalf("%d binary writes, want 1..%d", writes, bound)
	}
	waitFor(t, "binary ours again", every+2*time.Second, ours)
}

// writeAtomic never replaces a file another writer changed after we read it.
func TestWriteAtomicCompareAndSwap(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "10-calico.conflist")
	if err := os.WriteFile(p, []byte(calico031), 0o640); err != nil {
		t.Fatal(err)
	}
	_, read, err := readRegular(p, MaxConfigSize)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(calico100Alone), 0o640); err != nil { // the other writer, in place
		t.Fatal(err)
	}
	err = writeAtomic(p, []byte("ours"), 0o640, read, read)
	if !errors.Is(err, ErrChanged) {
		t.Fatalf("err = %v, want ErrChanged", err)
	}
	if got := mustRead(t, p); got != calico100Alone {
		t.Fatalf("the other writer's file was replaced: %q", got)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Fatalf("temp file left behind: %v", ents)
	}
	// Unchanged since read: replaced, mode kept.
	_, read, _ = readRegular(p, MaxConfigSize)
	if err := writeAtomic(p, []byte("ours"), read.Mode().Perm(), read, read); err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, p); got != "ours" {
		t.Fatalf("not replaced: %q", got)
	}
	if st, _ := os.Stat(p); st.Mode().Perm() != 0o640 {
		t.Fatalf("mode %v", st.Mode().Perm())
	}
}

// A .json primary (loaded by runtimes as a single-plugin config) is converted the same way;
// here the new .conflist sorts first, so it takes over as soon as it is written.
func TestJSONPrimaryConverted(t *testing.T) {
	l := newLab(t)
	l.write("10-calico.json", calicoConf, 0o644)
	in := l.installer(nil)
	if err := in.Install(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(l.conf, "10-calico.json")); !os.IsNotExist(err) || !l.hasEntry("10-calico.conflist") {
		t.Fatalf(".json not converted: %v", err)
	}
	if err := in.Uninstall(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := l.read("10-calico.json"); got != calicoConf {
		t.Fatalf("restored .json:\n%s", got)
	}
	if _, err := os.Stat(filepath.Join(l.conf, "10-calico.conflist")); !os.IsNotExist(err) {
		t.Fatal("converted list left behind")
	}
}
