package install

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"golang.org/x/sys/unix"
)

// The tests in this file put hostile or unusual files into the CNI config dir: FIFOs,
// sockets, devices, huge files, dangling symlinks and symlinks leading out of the dir.
// The installer must never block on them, never read without bound, never write outside
// the config dir, never turn a symlink into a regular file, and stop promptly on
// cancellation in every state.

// releaseFIFOs opens every FIFO among paths for writing and closes it again: a reader
// blocked in open(2) on one of them gets EOF. A failing test (an installer that opened a
// FIFO) calls it so that it ends instead of hanging.
func releaseFIFOs(paths ...string) {
	for _, p := range paths {
		if fd, err := unix.Open(p, unix.O_WRONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0); err == nil {
			unix.Close(fd)
		}
	}
}

// stepWithin runs one install pass and fails the test if it does not return within 5 s
// (it would block forever on a FIFO it opened).
func stepWithin(t *testing.T, in *Installer, fifos ...string) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- in.step(time.Now(), false) }()
	select {
	case err := <-done:
		return err
	case <-time.After(5 * time.Second):
		releaseFIFOs(fifos...)
		err := <-done
		t.Fatalf("install pass blocked for 5 s (released by opening the FIFOs; it then returned %v)", err)
		return nil
	}
}

func mkfifo(t *testing.T, path string) {
	t.Helper()
	if err := unix.Mkfifo(path, 0o644); err != nil {
		t.Fatal(err)
	}
}

func mknod(t *testing.T, path string, mode uint32, dev int) {
	t.Helper()
	if err := unix.Mknod(path, mode, dev); err != nil {
		t.Fatal(err)
	}
}

func symlink(t *testing.T, target, path string) {
	t.Helper()
	if err := os.Symlink(target, path); err != nil {
		t.Fatal(err)
	}
}

// wantFileError checks that err is a *FileError for name whose message has every one of
// want, and none of notWant.
func wantFileError(t *testing.T, err error, name string, want []string, notWant ...string) {
	t.Helper()
	var fe *FileError
	if !errors.As(err, &fe) {
		t.Fatalf("error %v (%T); want a *FileError for %s", err, err, name)
	}
	if filepath.Base(fe.Path) != name {
		t.Errorf("error names %s; want %s", fe.Path, name)
	}
	msg := err.Error()
	for _, w := range append([]string{name}, want...) {
		if !strings.Contains(msg, w) {
			t.Errorf("error %q lacks %q", msg, w)
		}
	}
	for _, w := range notWant {
		if strings.Contains(msg, w) {
			t.Errorf("error %q contains %q", msg, w)
		}
	}
}

func requireRootFor(t *testing.T, what string) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("SECUREOVERLAY_REQUIRE_ALL") == "1" {
		t.Fatalf("needs root to %s (SECUREOVERLAY_REQUIRE_ALL=1)", what)
	}
	t.Skipf("needs root to %s", what)
}

// TestFilesThatAreNotRegular puts a file the installer must not read before the calico
// config in libcni order. The pass must return promptly with an error that names the
// file and says why (never its content), and write nothing; the same file after the
// calico config is never looked at.
func TestFilesThatAreNotRegular(t *testing.T) {
	const secret = "TOP-SECRET-CONTENT"
	big := `{"cniVersion":"1.0.0","name":"` + secret + `","plugins":[{"type":"calico","x":"` +
		strings.Repeat("a", MaxConfigSize) + `"}]}`
	cases := []struct {
		name    string
		root    bool
		make    func(t *testing.T, path string)
		want    []string
		notWant []string
	}{
		{name: "fifo", make: func(t *testing.T, p string) { mkfifo(t, p) }, want: []string{"named pipe", "not a regular file"}},
		{name: "socket", make: func(t *testing.T, p string) { mknod(t, p, unix.S_IFSOCK|0o644, 0) }, want: []string{"socket", "not a regular file"}},
		{name: "char device", root: true, make: func(t *testing.T, p string) { mknod(t, p, unix.S_IFCHR|0o644, int(unix.Mkdev(1, 5))) }, want: []string{"device", "not a regular file"}},
		{name: "symlink to a FIFO", make: func(t *testing.T, p string) {
			mkfifo(t, filepath.Join(filepath.Dir(p), "pipe"))
			symlink(t, "pipe", p)
		}, want: []string{"named pipe", "not a regular file"}},
		{name: "symlink to a directory", make: func(t *testing.T, p string) {
			if err := os.Mkdir(filepath.Join(filepath.Dir(p), "sub"), 0o755); err != nil {
				t.Fatal(err)
			}
			symlink(t, "sub", p)
		}, want: []string{"directory", "not a regular file"}},
		{name: "symlink to /dev/zero", make: func(t *testing.T, p string) { symlink(t, "/dev/zero", p) }, want: []string{"/dev/zero", "outside the config dir"}},
		{name: "over the size limit", make: func(t *testing.T, p string) {
			if err := os.WriteFile(p, []byte(big), 0o644); err != nil {
				t.Fatal(err)
			}
		}, want: []string{fmt.Sprint(len(big)), fmt.Sprintf("limit of %d bytes", MaxConfigSize)}, notWant: []string{secret}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.root {
				requireRootFor(t, "create a device node")
			}
			l := newLab(t)
			l.write("10-calico.conflist", calico031, 0o644)
			bad := filepath.Join(l.conf, "00-hostile.conflist")
			tc.make(t, bad)
			t.Cleanup(func() { releaseFIFOs(bad, filepath.Join(l.conf, "pipe")) })
			before, _ := os.Lstat(bad)
			in := l.installer(nil)
			err := stepWithin(t, in, bad, filepath.Join(l.conf, "pipe"))
			wantFileError(t, err, "00-hostile.conflist", tc.want, tc.notWant...)
			if got := l.read("10-calico.conflist"); got != calico031 || in.ConfigWrites() != 0 {
				t.Fatalf("the calico config after a file the runtime cannot load was written (writes %d)", in.ConfigWrites())
			}
			if after, err := os.Lstat(bad); err != nil || after.Mode() != before.Mode() || !os.SameFile(before, after) {
				t.Fatalf("the hostile file was changed: %v %v -> %v", err, before.Mode(), after.Mode())
			}

			// The same file after the calico config is never read: the install succeeds,
			// and so does the uninstall, leaving it alone.
			after := filepath.Join(l.conf, "20-hostile.conflist")
			if err := os.Rename(bad, after); err != nil {
				t.Fatal(err)
			}
			if err := stepWithin(t, in, after, filepath.Join(l.conf, "pipe")); err != nil {
				t.Fatalf("a file after the calico config blocked the install: %v", err)
			}
			if !l.hasEntry("10-calico.conflist") {
				t.Fatal("no entry")
			}
			if err := uninstallWithin(t, in, after, filepath.Join(l.conf, "pipe")); err != nil {
				t.Fatalf("uninstall: %v", err)
			}
			if got := l.read("10-calico.conflist"); got != calico031 {
				t.Fatalf("uninstall did not restore the calico config:\n%s", got)
			}
			if st, err := os.Lstat(after); err != nil || st.Mode() != before.Mode() {
				t.Fatalf("uninstall changed the hostile file: %v", err)
			}
		})
	}
}

// uninstallWithin is stepWithin for Uninstall.
func uninstallWithin(t *testing.T, in *Installer, fifos ...string) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- in.Uninstall(context.Background()) }()
	select {
	case err := <-done:
		return err
	case <-time.After(10 * time.Second):
		releaseFIFOs(fifos...)
		err := <-done
		t.Fatalf("uninstall blocked for 10 s (released by opening the FIFOs; it then returned %v)", err)
		return nil
	}
}

// TestReadConfLimit reads files right at and just over MaxConfigSize.
func TestReadConfLimit(t *testing.T) {
	dir := t.TempDir()
	at := filepath.Join(dir, "at.conflist")
	over := filepath.Join(dir, "over.conflist")
	if err := os.WriteFile(at, bytes.Repeat([]byte{' '}, MaxConfigSize), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(over, bytes.Repeat([]byte{' '}, MaxConfigSize+1), 0o644); err != nil {
		t.Fatal(err)
	}
	cf, err := readConf(dir, at)
	if err != nil || len(cf.data) != MaxConfigSize {
		t.Fatalf("file of exactly the limit: %v", err)
	}
	_, err = readConf(dir, over)
	wantFileError(t, err, "over.conflist", []string{fmt.Sprintf("limit of %d bytes", MaxConfigSize)})
}

// TestDanglingSymlinkFirst: a dangling symlink that sorts before the calico config.
// containerd (go-cni's loadFromConfDir) and libcni's LoadConfList fail on the first file
// they cannot read instead of skipping it, so the runtime has no network: the installer
// must report the link and not splice into the calico config as if it were the node's
// network. Once the link is gone, the entry goes in.
func TestDanglingSymlinkFirst(t *testing.T) {
	l := newLab(t)
	l.write("10-calico.conflist", calico031, 0o644)
	link := filepath.Join(l.conf, "00-dangling.conflist")
	symlink(t, "gone.conflist", link)

	// What the runtime does with it.
	if _, err := libcni.LoadConfList(l.conf, "k8s-pod-network"); err == nil || !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("libcni.LoadConfList with a dangling first file: %v; want it to fail with ENOENT", err)
	}

	in := l.installer(nil)
	wantFileError(t, stepWithin(t, in), "00-dangling.conflist", []string{"dangling symlink", "gone.conflist"})
	if got := l.read("10-calico.conflist"); got != calico031 || in.ConfigWrites() != 0 {
		t.Fatal("the installer spliced into the calico config behind a dangling first file")
	}

	// The sidecar reports it, keeps away from the calico config, and installs once the
	// link is removed.
	stop := l.run(in)
	waitFor(t, "the dangling link reported", 5*time.Second, func() bool {
		return strings.Contains(l.logs.String(), "00-dangling.conflist") && strings.Contains(l.logs.String(), "dangling symlink")
	})
	if got := l.read("10-calico.conflist"); got != calico031 {
		t.Fatal("the sidecar spliced into the calico config behind a dangling first file")
	}
	if err := os.Remove(link); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "entry after the dangling link was removed", 10*time.Second, func() bool { return l.hasEntry("10-calico.conflist") })
	stop()

	// A dangling link after the calico config does not stop the install; uninstall skips
	// it and leaves it a link.
	late := filepath.Join(l.conf, "20-dangling.conflist")
	symlink(t, "gone.conflist", late)
	if err := stepWithin(t, in); err != nil {
		t.Fatalf("a dangling link after the calico config stopped the install: %v", err)
	}
	if err := in.Uninstall(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := l.read("10-calico.conflist"); got != calico031 {
		t.Fatalf("uninstall did not restore the calico config:\n%s", got)
	}
	if target, err := os.Readlink(late); err != nil || target != "gone.conflist" {
		t.Fatalf("uninstall changed the dangling link: %q %v", target, err)
	}
}

// isLink checks that path is still a symlink to target.
func isLink(t *testing.T, path, target string) {
	t.Helper()
	got, err := os.Readlink(path)
	if err != nil || got != target {
		t.Fatalf("%s is no longer a symlink to %s: %q, %v", filepath.Base(path), target, got, err)
	}
}

// TestSymlinkedConflistWrittenThrough: a calico conflist that is a symlink to a regular
// file directly in the config dir (directly, or through a chain of links) is edited in
// its target, atomically and with the target's mode; the link stays a link, through
// install, a Calico-style rewrite through the link, and uninstall.
func TestSymlinkedConflistWrittenThrough(t *testing.T) {
	for _, tc := range []struct {
		name  string
		links [][2]string // link name -> target, created in order
	}{
		{"one link", [][2]string{{"10-calico.conflist", "calico.conflist.real"}}},
		{"chain", [][2]string{{"mid.link", "calico.conflist.real"}, {"10-calico.conflist", "mid.link"}}},
		{"absolute link into the dir", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newLab(t)
			l.write("calico.conflist.real", calico031, 0o640)
			links := tc.links
			if links == nil {
				links = [][2]string{{"10-calico.conflist", filepath.Join(l.conf, "calico.conflist.real")}}
			}
			for _, ln := range links {
				symlink(t, ln[1], filepath.Join(l.conf, ln[0]))
			}
			list := filepath.Join(l.conf, "10-calico.conflist")
			real := filepath.Join(l.conf, "calico.conflist.real")
			target := links[len(links)-1][1]
			rec := record(t, l.conf)

			in := l.installer(nil)
			if err := in.Install(context.Background()); err != nil {
				t.Fatal(err)
			}
			evs := rec.stop()
			isLink(t, list, target)
			if !l.hasEntry("calico.conflist.real") {
				t.Fatalf("entry not written through to the target:\n%s", l.read("calico.conflist.real"))
			}
			if m := l.mode(real); m != 0o640 {
				t.Fatalf("target mode %v, want 0640", m)
			}
			checkTempNames(t, evs, real)

			// Calico's install-cni writes in place, through the link: the entry is repaired
			// in the target. The first rewrite may race with the sidecar's first pass; the
			// second is repaired on the watch event (the resync is 30 s away), which names
			// the target, not the link.
			stop := l.run(in)
			for i := range 2 {
				if err := os.WriteFile(list, []byte(calico031), 0o644); err != nil {
					t.Fatal(err)
				}
				waitFor(t, fmt.Sprintf("entry repaired through the link (rewrite %d)", i+1), 5*time.Second, func() bool { return l.hasEntry("calico.conflist.real") })
				isLink(t, list, target)
			}
			stop() // the sidecar ends before the uninstall, as in the binary

			if err := in.Uninstall(context.Background()); err != nil {
				t.Fatal(err)
			}
			isLink(t, list, target)
			if got := l.read("calico.conflist.real"); got != calico031 {
				t.Fatalf("uninstall did not restore the target:\n%s", got)
			}
			if m := l.mode(real); m != 0o640 {
				t.Fatalf("target mode after uninstall %v, want 0640", m)
			}
		})
	}
}

// TestSymlinkLeavingConfDirRefused: a calico conflist that is a symlink to a file outside
// the config dir (absolute or relative) or in a subdirectory of it is never written: the
// installer refuses with an error naming the link and where it leads, the target stays
// byte for byte (no temp file next to it either), the link stays a link. Uninstall does
// not write there either, even when the target carries an entry of ours.
func TestSymlinkLeavingConfDirRefused(t *testing.T) {
	for _, tc := range []struct {
		name   string
		target func(root string) (linkTarget, file string)
		want   string
	}{
		{"absolute outside", func(root string) (string, string) {
			f := filepath.Join(root, "outside", "calico.conflist")
			return f, f
		}, "outside the config dir"},
		{"relative outside", func(root string) (string, string) {
			return "../outside/calico.conflist", filepath.Join(root, "outside", "calico.conflist")
		}, "outside the config dir"},
		{"subdirectory", func(root string) (string, string) {
			return "sub/calico.conflist", filepath.Join(root, "net.d", "sub", "calico.conflist")
		}, "subdirectory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newLab(t)
			root := filepath.Dir(l.conf)
			linkTarget, file := tc.target(root)
			if err := os.MkdirAll(filepath.Dir(file), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(file, []byte(calico031), 0o644); err != nil {
				t.Fatal(err)
			}
			list := filepath.Join(l.conf, "10-calico.conflist")
			symlink(t, linkTarget, list)

			in := l.installer(nil)
			wantFileError(t, stepWithin(t, in), "10-calico.conflist", []string{linkTarget, tc.want})
			isLink(t, list, linkTarget)
			if got := mustRead(t, file); got != calico031 {
				t.Fatalf("target written:\n%s", got)
			}
			ents, _ := os.ReadDir(filepath.Dir(file))
			if len(ents) != 1 {
				t.Fatalf("files next to the target: %v", ents)
			}

			// An entry of ours planted in the target does not make uninstall write there.
			planted, _, err := InsertEntry([]byte(calico031), testEntry)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(file, planted, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := in.Uninstall(context.Background()); err != nil {
				t.Fatalf("uninstall: %v", err)
			}
			isLink(t, list, linkTarget)
			if got := mustRead(t, file); got != string(planted) {
				t.Fatalf("uninstall wrote the target:\n%s", got)
			}
			if !strings.Contains(l.logs.String(), "10-calico.conflist") {
				t.Fatalf("uninstall did not log the file it skipped:\n%s", l.logs)
			}
		})
	}
}

// TestSymlinkedConfNotConverted: a single-plugin calico .conf that is a symlink cannot be
// converted to a .conflist without replacing the link (the conversion removes the .conf
// and uninstall writes it back as a file): the installer refuses and leaves it alone.
func TestSymlinkedConfNotConverted(t *testing.T) {
	l := newLab(t)
	l.write("calico.conf.real", calicoConf, 0o644)
	link := filepath.Join(l.conf, "10-calico.conf")
	symlink(t, "calico.conf.real", link)
	in := l.installer(nil)
	wantFileError(t, stepWithin(t, in), "10-calico.conf", []string{"symlink", "convert"})
	isLink(t, link, "calico.conf.real")
	if _, err := os.Lstat(filepath.Join(l.conf, "10-calico.conflist")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a conflist was created: %v", err)
	}
	if got := l.read("calico.conf.real"); got != calicoConf {
		t.Fatalf("target changed:\n%s", got)
	}
}

// TestStopsPromptly cancels Run, Install and Uninstall in each state they can wait in
// (blocked by a FIFO before the calico config, waiting for a calico config, retrying a
// half-written file, throttled against a rewriter) and requires them to return within
// a second.
func TestStopsPromptly(t *testing.T) {
	type state struct {
		name  string
		setup func(l *lab) (stop func())
		// reached is the log line that shows the installer is in the state.
		reached string
	}
	fifoFirst := state{"FIFO first", func(l *lab) func() {
		l.write("10-calico.conflist", calico031, 0o644)
		mkfifo(l.t, filepath.Join(l.conf, "00-pipe.conflist"))
		return nil
	}, "00-pipe.conflist"}
	waiting := state{"waiting for a calico config", func(l *lab) func() { return nil }, "waiting for a calico network config"}
	halfWritten := state{"retrying a half-written file", func(l *lab) func() {
		l.write("10-calico.conflist", calico031[:len(calico031)/2], 0o644)
		return nil
	}, "retrying"}
	throttledState := state{"throttled", func(l *lab) func() {
		l.write("10-calico.conflist", calico031, 0o644)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { // Calico rewriting its config over and over
			defer close(done)
			for ctx.Err() == nil {
				if l.hasEntry("10-calico.conflist") {
					_ = os.WriteFile(filepath.Join(l.conf, "10-calico.conflist"), []byte(calico031), 0o644)
				}
				time.Sleep(10 * time.Millisecond) // the rewriter's pace, not synchronisation
			}
		}()
		return func() { cancel(); <-done }
	}, "throttling our writes"}

	stopsWithin := func(t *testing.T, l *lab, run func(context.Context) error, wantErr bool) {
		t.Helper()
		pipe := filepath.Join(l.conf, "00-pipe.conflist")
		t.Cleanup(func() { releaseFIFOs(pipe) })
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		done := make(chan error, 1)
		go func() { done <- run(ctx) }()
		cancel()
		start := time.Now()
		select {
		case err := <-done:
			if d := time.Since(start); d > time.Second {
				t.Fatalf("returned %v after cancellation", d)
			}
			if (err != nil) != wantErr {
				t.Fatalf("returned %v after cancellation (want error: %v)", err, wantErr)
			}
			if wantErr && !errors.Is(err, context.Canceled) {
				t.Fatalf("returned %v; want it to wrap context.Canceled", err)
			}
		case <-time.After(time.Second):
			releaseFIFOs(pipe)
			t.Fatalf("did not return within 1 s of cancellation\n%s", l.logs)
		}
	}
	// inState starts run, waits until the log shows it reached the state, then cancels.
	inState := func(t *testing.T, l *lab, st state, run func(context.Context) error, wantErr bool) {
		t.Helper()
		pipe := filepath.Join(l.conf, "00-pipe.conflist")
		t.Cleanup(func() { releaseFIFOs(pipe) })
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		done := make(chan error, 1)
		go func() { done <- run(ctx) }()
		deadline := time.Now().Add(10 * time.Second)
		for !strings.Contains(l.logs.String(), st.reached) {
			if time.Now().After(deadline) {
				releaseFIFOs(pipe)
				t.Fatalf("never reached the state (log line %q)\n%s", st.reached, l.logs)
			}
			time.Sleep(5 * time.Millisecond)
		}
		cancel()
		start := time.Now()
		select {
		case err := <-done:
			if d := time.Since(start); d > time.Second {
				t.Fatalf("returned %v after cancellation", d)
			}
			if (err != nil) != wantErr || (wantErr && !errors.Is(err, context.Canceled)) {
				t.Fatalf("returned %v after cancellation (want an error wrapping context.Canceled: %v)", err, wantErr)
			}
		case <-time.After(time.Second):
			releaseFIFOs(pipe)
			t.Fatalf("did not return within 1 s of cancellation\n%s", l.logs)
		}
	}

	for _, st := range []state{fifoFirst, waiting, halfWritten, throttledState} {
		t.Run("Run/"+st.name, func(t *testing.T) {
			l := newLab(t)
			if stop := st.setup(l); stop != nil {
				defer stop()
			}
			in := l.installer(func(c *Config) { c.WriteBurst, c.WriteEvery = 1, time.Hour })
			inState(t, l, st, in.Run, false)
		})
	}
	for _, st := range []state{fifoFirst, waiting, halfWritten} {
		t.Run("Install/"+st.name, func(t *testing.T) {
			l := newLab(t)
			st.setup(l)
			inState(t, l, st, l.installer(nil).Install, true)
		})
	}
	t.Run("Uninstall/retrying a half-written file", func(t *testing.T) {
		l := newLab(t)
		out, _, err := InsertEntry([]byte(calico031), testEntry)
		if err != nil {
			t.Fatal(err)
		}
		l.write("10-calico.conflist", string(out[:len(out)-40]), 0o644)
		stopsWithin(t, l, l.installer(nil).Uninstall, true)
		if got := l.read("10-calico.conflist"); got != string(out[:len(out)-40]) {
			t.Fatal("uninstall wrote over a half-written file")
		}
	})
}

// TestConfFilesLikeLibcni: confFiles lists exactly what libcni.ConfFiles lists (the
// runtimes' view), sorted, for a dir holding every kind of entry; a FIFO where the dir
// should be fails at once instead of blocking; a missing dir lists nothing.
func TestConfFilesLikeLibcni(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{"10-a.conflist", "20-b.conf", "30-c.json", "40-d.txt", "noext", ".hidden.conf"} {
		if err := os.WriteFile(filepath.Join(dir, f), []byte("{}"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "50-dir.conflist"), 0o755); err != nil {
		t.Fatal(err)
	}
	symlink(t, "50-dir.conflist", filepath.Join(dir, "60-linkdir.conflist"))
	symlink(t, "gone", filepath.Join(dir, "70-dangling.conf"))
	mkfifo(t, filepath.Join(dir, "80-fifo.json"))
	got, err := confFiles(dir)
	if err != nil {
		t.Fatal(err)
	}
	want, err := libcni.ConfFiles(dir, ConfExtensions)
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(want)
	if !slices.Equal(got, want) || len(got) != 7 {
		t.Fatalf("confFiles = %v\nlibcni.ConfFiles = %v (want 7 entries)", got, want)
	}

	fifo := filepath.Join(dir, "fifo-dir")
	mkfifo(t, fifo)
	done := make(chan error, 1)
	go func() { _, err := confFiles(fifo); done <- err }()
	select {
	case err := <-done:
		if !errors.Is(err, syscall.ENOTDIR) {
			t.Fatalf("confFiles on a FIFO: %v, want ENOTDIR", err)
		}
	case <-time.After(5 * time.Second):
		releaseFIFOs(fifo)
		t.Fatal("confFiles blocked on a FIFO at the dir's path")
	}

	if files, err := confFiles(filepath.Join(dir, "missing")); err != nil || files != nil {
		t.Fatalf("missing dir: %v, %v; want nothing, no error", files, err)
	}
}

// TestReadRegularSwapRace swaps the file between the stat(2) and the open(2) of a read:
// for a FIFO (the open must not block, and the opened FIFO must be refused), for another
// regular file (the read must not describe a file it did not check), and, for a config
// file readConf vetted as regular, for a symlink to /dev/zero (not followed).
func TestReadRegularSwapRace(t *testing.T) {
	viaReadRegular := func(dir, p string) error { _, _, err := readRegular(p, MaxConfigSize); return err }
	viaReadConf := func(dir, p string) error { _, err := readConf(dir, p); return err }
	for _, tc := range []struct {
		name    string
		read    func(dir, path string) error
		prepare func(t *testing.T, path string) // creates the replacement at path
		want    func(t *testing.T, err error)
	}{
		{"FIFO", viaReadRegular, mkfifo, func(t *testing.T, err error) {
			wantFileError(t, err, "10-calico.conflist", []string{"named pipe"})
		}},
		{"FIFO, config file", viaReadConf, mkfifo, func(t *testing.T, err error) {
			wantFileError(t, err, "10-calico.conflist", []string{"named pipe"})
		}},
		{"other file", viaReadRegular, func(t *testing.T, p string) {
			if err := os.WriteFile(p, []byte(calico100Alone), 0o644); err != nil {
				t.Fatal(err)
			}
		}, func(t *testing.T, err error) {
			if !errors.Is(err, ErrChanged) {
				t.Fatalf("err = %v, want ErrChanged", err)
			}
		}},
		{"symlink, config file", viaReadConf, func(t *testing.T, p string) { symlink(t, "/dev/zero", p) }, func(t *testing.T, err error) {
			if !errors.Is(err, ErrChanged) {
				t.Fatalf("err = %v, want ErrChanged", err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "10-calico.conflist")
			if err := os.WriteFile(p, []byte(calico031), 0o644); err != nil {
				t.Fatal(err)
			}
			repl := filepath.Join(dir, "replacement")
			tc.prepare(t, repl)
			var swapErr error
			testHookBeforeOpen = func(path string) { swapErr = os.Rename(repl, path) }
			t.Cleanup(func() { testHookBeforeOpen = nil; releaseFIFOs(p) })
			done := make(chan error, 1)
			go func() { done <- tc.read(dir, p) }()
			select {
			case err := <-done:
				if swapErr != nil {
					t.Fatal(swapErr)
				}
				tc.want(t, err)
			case <-time.After(5 * time.Second):
				releaseFIFOs(p)
				t.Fatalf("the read blocked on a FIFO swapped in before the open (then: %v)", <-done)
			}
		})
	}
}
