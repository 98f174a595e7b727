// Package install puts the secureoverlay CNI plugin into a node's CNI chain and keeps it
// there: it copies the plugin binary into the CNI bin dir and inserts a
// {"type": "secureoverlay", ...} entry right after the calico entry of the node's Calico
// network config, re-inserting it whenever Calico's install-cni rewrites the file.
//
// Invariants:
//   - The target is the first file in libcni order (sort.Strings of the .conf, .conflist
//     and .json files of the config dir, which is how containerd and CRI-O pick the
//     node's network) that contains a plugin of type calico. No other file is written
//     on install.
//   - The binary is in place (written atomically, executable) before any config names it;
//     on uninstall every entry of ours is removed before the binary, and the binary is
//     kept if any entry could not be removed.
//   - Every write is atomic: a temp file in the same directory whose name has no libcni
//     extension (TempPrefix), fsynced, renamed over the target, keeping the target's mode
//     and owner; then the directory is fsynced.
//   - Edits are splices: every byte outside our entry (and the separator before it) is the
//     other writer's, so removing the entry restores the original byte for byte. The
//     network name and unknown fields are never touched.
//   - A file that does not parse is never written over; it is retried after a short
//     delay (Calico writes its config non-atomically).
//   - Only regular files of at most MaxConfigSize bytes are read; a FIFO, socket or
//     device is never opened for longer than a non-blocking open and an fstat, so no pass
//     blocks, and every wait (for a config, a retry, the throttle) ends with the context.
//   - A symlink is followed only to a regular file directly in the config dir, and edited
//     there (the temp file next to the target): the link stays a link and no write ever
//     leaves the config dir. Any other symlink is refused, never written through.
//   - A file that sorts before the calico config and cannot be loaded (does not parse,
//     is not a regular file, is too large, is a dangling symlink or a refused one) stops
//     the install instead of being skipped: containerd fails on it too, so the calico
//     config behind it is not the node's network.
//   - No write happens when our entry is already in place with the wanted configuration,
//     and the watch loop's writes are bounded by a token bucket so that the installer
//     never fights another writer in a loop.
package install

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/secureoverlay/secureoverlay/budget"
)

// Defaults for Config's tuning fields.
const (
	DefaultSettle     = 100 * time.Millisecond
	DefaultMaxSettle  = time.Second
	DefaultParseRetry = 250 * time.Millisecond
	DefaultMaxRetry   = 5 * time.Second
	DefaultResync     = 30 * time.Second
	DefaultWriteBurst = 5
	DefaultWriteEvery = 3 * time.Second
	noPrimaryPoll     = time.Second
	waitLogEvery      = 30 * time.Second
	uninstallParseFor = 5 * time.Second
)

// Config configures an Installer.
type Config struct {
	// CNIBinDir and CNIConfDir are the host's CNI directories (as mounted).
	CNIBinDir  string
	CNIConfDir string
	// PluginBinary is the plugin executable to copy into CNIBinDir as PluginType.
	PluginBinary string
	// Entry is the plugin configuration written into the conflist entry.
	Entry Entry
	// Log receives progress and problems; nil means slog.Default().
	Log *slog.Logger

	// Settle is how long file events must be quiet before a pass runs, and MaxSettle the
	// longest a pass waits after the first event of a burst.
	Settle, MaxSettle time.Duration
	// ParseRetry is the first delay after a parse error; it doubles up to MaxRetry.
	ParseRetry, MaxRetry time.Duration
	// Resync is the period of a full check even without events.
	Resync time.Duration
	// WriteBurst and WriteEvery shape the token bucket bounding config writes in Run.
	WriteBurst int
	WriteEvery time.Duration
}

// Validate checks the entry configuration the plugin will read.
func (e Entry) Validate() error {
	if !slices.Contains(PluginModes, e.Mode) {
		return fmt.Errorf("plugin mode %q invalid (want one of %s)", e.Mode, strings.Join(PluginModes, ", "))
	}
	if !budget.ValidICV(e.ICVBytes) {
		return fmt.Errorf("icv length %d bytes unsupported (want 8, 12 or 16)", e.ICVBytes)
	}
	if e.ExternalMTU != 0 {
		if _, err := budget.Budget(e.ExternalMTU, e.ICVBytes); err != nil {
			return fmt.Errorf("external mtu: %w", err)
		}
	}
	if _, err := budget.CompilePattern(e.InterfacePattern); err != nil {
		return err
	}
	for _, f := range [][2]string{{"plugin log file", e.LogFile}, {"boot gate state file", e.StateFile}, {"boot gate ready file", e.ReadyFile}} {
		if f[1] != "" && !filepath.IsAbs(f[1]) {
			return fmt.Errorf("%s %q is not an absolute path", f[0], f[1])
		}
	}
	return nil
}

// Installer installs, maintains and uninstalls the plugin on one node.
type Installer struct {
	cfg    Config
	log    *slog.Logger
	bucket *bucket
	writes atomic.Int64

	plugin   []byte    // PluginBinary's content, read once
	binStamp fileStamp // the installed binary as last verified or written
	shadowed string    // the shadowing files last warned about
	// linkTarget is the base name of the file in the config dir that the primary, a
	// symlink, resolves to: writes through the link show as events on that name.
	linkTarget string
}

type fileStamp struct {
	ino, size int64
	mtime     time.Time
}

func stampOf(st fs.FileInfo) fileStamp {
	s := fileStamp{size: st.Size(), mtime: st.ModTime()}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		s.ino = int64(sys.Ino)
	}
	return s
}

// New checks cfg and fills in defaults.
func New(cfg Config) (*Installer, error) {
	if cfg.CNIBinDir == "" || cfg.CNIConfDir == "" || cfg.PluginBinary == "" {
		return nil, errors.New("cni bin dir, cni conf dir and plugin binary are required")
	}
	if err := cfg.Entry.Validate(); err != nil {
		return nil, err
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&cfg.Settle, DefaultSettle)
	def(&cfg.MaxSettle, DefaultMaxSettle)
	def(&cfg.ParseRetry, DefaultParseRetry)
	def(&cfg.MaxRetry, DefaultMaxRetry)
	def(&cfg.Resync, DefaultResync)
	def(&cfg.WriteEvery, DefaultWriteEvery)
	if cfg.WriteBurst <= 0 {
		cfg.WriteBurst = DefaultWriteBurst
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	return &Installer{cfg: cfg, log: cfg.Log, bucket: newBucket(cfg.WriteBurst, cfg.WriteEvery)}, nil
}

// ConfigWrites is the number of config files the installer has written so far.
func (in *Installer) ConfigWrites() int64 { return in.writes.Load() }

func (in *Installer) binPath() string { return filepath.Join(in.cfg.CNIBinDir, PluginType) }

// errSource marks a problem with the plugin binary we ship: retrying cannot fix it.
type errSource struct{ err error }

func (e errSource) Error() string { return e.err.Error() }
func (e errSource) Unwrap() error { return e.err }

// throttled means a config write was due but the token bucket was empty.
type throttled struct{ wait time.Duration }

func (t throttled) Error() string { return fmt.Sprintf("config write throttled for %v", t.wait) }

// ensureBinary makes CNIBinDir/secureoverlay an executable copy of PluginBinary. With
// throttle set, a due write needs a token (two installers of different versions on one
// node must not flip the binary in a loop either).
func (in *Installer) ensureBinary(now time.Time, throttle bool) error {
	if in.plugin == nil {
		b, _, err := readRegular(in.cfg.PluginBinary, maxPluginSize)
		if err != nil {
			return errSource{fmt.Errorf("read plugin binary: %w", err)}
		}
		if len(b) == 0 {
			return errSource{fmt.Errorf("plugin binary %s is empty", in.cfg.PluginBinary)}
		}
		in.plugin = b
	}
	dst := in.binPath()
	if st, err := os.Stat(dst); err == nil && stampOf(st) == in.binStamp {
		return nil
	}
	same, st, err := sameFile(dst, in.plugin)
	if err != nil {
		return fmt.Errorf("check plugin binary %s: %w", dst, err)
	}
	if !same {
		if throttle {
			if ok, wait := in.bucket.take(now); !ok {
				return throttled{wait}
			}
		}
		if err := os.MkdirAll(in.cfg.CNIBinDir, 0o755); err != nil {
			return fmt.Errorf("create cni bin dir: %w", err)
		}
		if st, err = writeAtomicInfo(dst, in.plugin, 0o755, nil, nil); err != nil {
			return fmt.Errorf("install plugin binary: %w", err)
		}
		in.log.Info("installed plugin binary", "path", dst, "bytes", len(in.plugin))
	}
	// The stamp describes the file we compared or wrote (not a later stat, which could
	// describe another writer's file): any change after that shows as a different stamp.
	in.binStamp = stampOf(st)
	return nil
}

// step does one full pass: binary first, then the config entry. With throttle set, a due
// write (of the binary or a config) needs a token from the bucket.
func (in *Installer) step(now time.Time, throttle bool) error {
	if err := in.ensureBinary(now, throttle); err != nil {
		return err
	}
	p, err := findPrimary(in.cfg.CNIConfDir)
	if err != nil {
		return err
	}
	in.linkTarget = ""
	if p.linked() {
		in.linkTarget = filepath.Base(p.target)
	}
	if sh := strings.Join(p.shadowedBy, ","); sh != in.shadowed {
		in.shadowed = sh
		if sh != "" {
			in.log.Warn("configs without calico come first in libcni order; the runtime uses them, not the calico network",
				"files", p.shadowedBy, "calico", filepath.Base(p.path))
		}
	}
	if !p.list {
		return in.convert(now, p, throttle)
	}
	out, changed, err := InsertEntry(p.data, in.cfg.Entry)
	if err != nil {
		return &ParseError{Path: p.path, Err: err}
	}
	if !changed {
		return nil
	}
	if throttle {
		if ok, wait := in.bucket.take(now); !ok {
			return throttled{wait}
		}
	}
	if err := writeConf(p.confFile, out); err != nil {
		return err
	}
	in.writes.Add(1)
	if p.linked() {
		in.log.Info("inserted plugin entry after calico, through the symlink", "file", p.path, "target", p.target)
	} else {
		in.log.Info("inserted plugin entry after calico", "file", p.path)
	}
	return nil
}

// convert turns the .conf (or .json) primary p into a .conflist of the same base name
// holding our entry, then removes the .conf. The .conflist is complete on disk before the
// .conf goes, so the dir always holds a calico config. In libcni order "x.conf" sorts
// before "x.conflist", so while both exist runtimes keep using the original .conf; they
// switch to the converted list only when the .conf is removed.
//
// A symlinked .conf is not converted: the conversion removes the .conf, which would
// remove the link, and uninstall would write it back as a regular file.
func (in *Installer) convert(now time.Time, p *primary, throttle bool) error {
	if p.linked() {
		return &FileError{Path: p.path, Reason: fmt.Sprintf("is a symlink to %s, a single-plugin config; the installer would have to convert it to a .conflist and remove the link, so it refuses to convert a symlinked config: make it a regular file or a symlinked .conflist", filepath.Base(p.target))}
	}
	base := filepath.Base(p.path)
	list := strings.TrimSuffix(p.path, filepath.Ext(p.path)) + ".conflist"
	out, err := ConvertConf(p.data, base, in.cfg.Entry)
	if err != nil {
		return &ParseError{Path: p.path, Err: err}
	}
	if len(out) > MaxConfigSize {
		return &FileError{Path: p.path, Reason: fmt.Sprintf("converted with our entry it would be %d bytes, over the limit of %d bytes", len(out), MaxConfigSize)}
	}
	var cur []byte
	var listInfo fs.FileInfo
	cf, err := readConf(in.cfg.CNIConfDir, list)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return err
	default:
		cur, listInfo = cf.data, cf.info
		stripped, _, rerr := RemoveEntries(cur)
		if name, _, ok := RestoreConf(stripped); cf.linked() || rerr != nil || !ok || name != base {
			return fmt.Errorf("convert %s: %s exists and was not made by us; refusing to overwrite it", base, filepath.Base(list))
		}
	}
	if string(cur) != string(out) {
		if throttle {
			if ok, wait := in.bucket.take(now); !ok {
				return throttled{wait}
			}
		}
		if err := writeAtomic(list, out, p.info.Mode().Perm(), p.info, listInfo); err != nil {
			return err
		}
		in.writes.Add(1)
	}
	// Remove the .conf only if it is still the one we converted; a newer one is
	// converted by the next pass.
	if changedSince(p.path, p.info) {
		return fmt.Errorf("convert %s: %w", p.path, ErrChanged)
	}
	if err := os.Remove(p.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove converted %s: %w", p.path, err)
	}
	if err := syncDir(in.cfg.CNIConfDir); err != nil {
		return err
	}
	in.log.Info("converted calico conf to conflist with plugin entry", "from", base, "to", filepath.Base(list))
	return nil
}

// Install installs the binary and the entry once, waiting for a calico config to appear
// and retrying parse errors, until it succeeds or ctx ends. It is the init container's
// job (--once) and is not throttled.
func (in *Installer) Install(ctx context.Context) error {
	removeTemps(in.cfg.CNIConfDir)
	removeTemps(in.cfg.CNIBinDir)
	var lastWaitLog time.Time
	var problems problemLog
	failures := 0
	for {
		err := in.step(time.Now(), false)
		if err == nil {
			in.log.Info("plugin installed", "bin", in.binPath(), "confDir", in.cfg.CNIConfDir)
			return nil
		}
		var src errSource
		if errors.As(err, &src) {
			return err
		}
		delay := in.retryDelay(&failures)
		var fe *FileError
		switch {
		case errors.Is(err, ErrNoPrimary):
			delay = noPrimaryPoll
			if time.Since(lastWaitLog) >= waitLogEvery {
				lastWaitLog = time.Now()
				in.log.Info("waiting for a calico network config", "dir", in.cfg.CNIConfDir)
			}
		case errors.As(err, &fe):
			if problems.due(err, time.Now()) {
				in.log.Error(fileProblem, "err", err, "retryIn", delay)
			}
		default:
			in.log.Warn("install pass failed; retrying", "err", err, "in", delay)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("install: %w (last: %w)", ctx.Err(), err)
		case <-time.After(delay):
		}
	}
}

// fileProblem is logged for a *FileError that stops a pass.
const fileProblem = "a file in the cni config dir stops the install; retrying until it is fixed"

// problemLog rate-limits the log of a *FileError, which stays until an operator fixes
// the file: logged when it appears or changes, then every waitLogEvery.
type problemLog struct {
	last string
	at   time.Time
}

func (p *problemLog) due(err error, now time.Time) bool {
	msg := err.Error()
	if msg == p.last && now.Sub(p.at) < waitLogEvery {
		return false
	}
	p.last, p.at = msg, now
	return true
}

func (in *Installer) retryDelay(failures *int) time.Duration {
	d := in.cfg.ParseRetry << min(*failures, 16)
	*failures++
	return min(d, in.cfg.MaxRetry)
}

// Run installs and then keeps the installation in place until ctx ends: it watches the
// config and bin dirs (re-arming when a dir is replaced) and runs a pass once events have
// been quiet for Settle (at most MaxSettle after the first event of a burst), after
// retries, and every Resync. After the first successful pass, writes (repairs) are
// bounded by the token bucket. Run returns nil when ctx ends; it does not uninstall.
func (in *Installer) Run(ctx context.Context) error {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("create watcher: %w", err)
	}
	defer w.Close()
	removeTemps(in.cfg.CNIConfDir)
	removeTemps(in.cfg.CNIBinDir)

	armed := map[string]fileStamp{}
	sched := &passScheduler{settle: in.cfg.Settle, maxSettle: in.cfg.MaxSettle}
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	rearm := func() {
		if t, ok := sched.next(); ok {
			timer.Reset(time.Until(t))
		} else {
			timer.Stop()
		}
	}
	schedule := func(d time.Duration) { sched.after(time.Now(), d); rearm() }
	schedule(0)
	resync := time.NewTicker(in.cfg.Resync)
	defer resync.Stop()

	failures := 0
	installed, inThrottle := false, false
	var lastWaitLog time.Time
	var problems problemLog
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-w.Events:
			if !ok {
				return errors.New("watcher closed")
			}
			if in.relevant(ev) {
				sched.event(time.Now())
				rearm()
			}
		case err, ok := <-w.Errors:
			if !ok {
				return errors.New("watcher closed")
			}
			in.log.Warn("watch error; full pass", "err", err)
			schedule(in.cfg.Settle)
		case <-resync.C:
			in.binStamp = fileStamp{} // compare the binary's content, not just its stamp
			schedule(0)
		case <-timer.C:
			if t, ok := sched.next(); !ok || time.Now().Before(t) {
				rearm()
				continue
			}
			sched.ran()
			in.arm(w, armed)
			// The first install is not throttled (it is what --once does); repairs are.
			err := in.step(time.Now(), installed)
			var th throttled
			var src errSource
			switch {
			case err == nil:
				failures = 0
				installed = true
				problems = problemLog{}
				if inThrottle {
					inThrottle = false
					in.log.Info("config writes no longer throttled")
				}
			case errors.As(err, &th):
				if !inThrottle {
					inThrottle = true
					in.log.Warn("another writer keeps rewriting the calico config or the plugin binary; throttling our writes",
						"burst", in.cfg.WriteBurst, "every", in.cfg.WriteEvery)
				}
				schedule(th.wait)
			case errors.Is(err, ErrNoPrimary):
				if time.Since(lastWaitLog) >= waitLogEvery {
					lastWaitLog = time.Now()
					in.log.Info("waiting for a calico network config", "dir", in.cfg.CNIConfDir)
				}
				schedule(noPrimaryPoll)
			case errors.As(err, &src):
				in.log.Error("plugin binary unusable", "err", err)
				schedule(in.cfg.MaxRetry)
			default:
				d := in.retryDelay(&failures)
				var fe *FileError
				if !errors.As(err, &fe) {
					in.log.Warn("pass failed; retrying", "err", err, "in", d)
				} else if problems.due(err, time.Now()) {
					in.log.Error(fileProblem, "err", err, "retryIn", d)
				}
				schedule(d)
			}
		}
	}
}

// relevant reports whether ev may change what a pass would do.
func (in *Installer) relevant(ev fsnotify.Event) bool {
	if ev.Op == fsnotify.Chmod {
		return false
	}
	name := filepath.Clean(ev.Name)
	switch {
	case name == filepath.Clean(in.cfg.CNIConfDir) || name == filepath.Clean(in.cfg.CNIBinDir):
		return true // the dir itself went away or moved: re-arm
	case filepath.Dir(name) == filepath.Clean(in.cfg.CNIConfDir) && slices.Contains(ConfExtensions, filepath.Ext(name)):
		return true
	case filepath.Dir(name) == filepath.Clean(in.cfg.CNIConfDir) && filepath.Base(name) == in.linkTarget:
		return true // written through the primary's symlink
	case filepath.Dir(name) == filepath.Clean(in.cfg.CNIBinDir) && filepath.Base(name) == PluginType:
		return true
	}
	return false
}

// arm makes sure both dirs are watched by path, re-adding a watch when the directory at
// that path is a different one than the one watched (it was renamed away or recreated).
func (in *Installer) arm(w *fsnotify.Watcher, armed map[string]fileStamp) {
	for _, dir := range []string{in.cfg.CNIConfDir, in.cfg.CNIBinDir} {
		st, err := os.Stat(dir)
		if err != nil {
			if _, ok := armed[dir]; ok {
				_ = w.Remove(dir)
				delete(armed, dir)
			}
			continue
		}
		s := stampOf(st)
		s.size, s.mtime = 0, time.Time{} // identity only
		if cur, ok := armed[dir]; ok && cur == s {
			continue
		}
		_ = w.Remove(dir)
		if err := w.Add(dir); err != nil {
			in.log.Warn("watch dir", "dir", dir, "err", err)
			delete(armed, dir)
			continue
		}
		armed[dir] = s
	}
}

// Uninstall removes every entry of ours from the conflists in the config dir (restoring
// a .conf we converted), and only then removes the plugin binary. Files that do not parse
// are retried for a few seconds (or until ctx ends); files the installer does not read
// (see readConf) are skipped; if any entry could not be removed, the binary stays and the
// error is returned. Uninstall is idempotent.
func (in *Installer) Uninstall(ctx context.Context) error {
	dir := in.cfg.CNIConfDir
	removeTemps(dir)
	files, err := confFiles(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, f := range files {
		if filepath.Ext(f) != ".conflist" {
			continue
		}
		if err := in.uninstallFile(ctx, f); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("uninstall: plugin binary kept: %w", errors.Join(errs...))
	}
	if err := os.Remove(in.binPath()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove plugin binary: %w", err)
	}
	removeTemps(in.cfg.CNIBinDir)
	if err := syncDir(in.cfg.CNIBinDir); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	in.log.Info("plugin uninstalled", "bin", in.binPath(), "confDir", dir)
	return nil
}

// uninstallFile removes our entries from the conflist f. A file the installer does not
// read (readConf: not a regular file, over the size limit, a dangling symlink or one
// that leaves the config dir) is skipped with a warning: the installer never writes
// such a file, so it holds no entry the installer put there.
func (in *Installer) uninstallFile(ctx context.Context, f string) error {
	deadline := time.Now().Add(uninstallParseFor)
	failures := 0
	for {
		cf, err := readConf(in.cfg.CNIConfDir, f)
		var fe *FileError
		switch {
		case errors.Is(err, fs.ErrNotExist):
			return nil
		case errors.As(err, &fe):
			in.log.Warn("skipping a config file the installer does not read or write", "file", f, "reason", fe.Reason)
			return nil
		case errors.Is(err, ErrChanged):
		case err != nil:
			return err
		default:
			var out []byte
			var n int
			out, n, err = RemoveEntries(cf.data)
			if err == nil {
				if n == 0 {
					return nil
				}
				if err = in.writeStripped(cf, out); !errors.Is(err, ErrChanged) {
					return err
				}
			}
		}
		if errors.Is(err, ErrOnlyOurs) {
			return fmt.Errorf("%s: %w", f, err)
		}
		if errors.Is(err, ErrChanged) && time.Now().After(deadline) {
			return err
		}
		if time.Now().After(deadline) {
			return &ParseError{Path: f, Err: err}
		}
		d := in.retryDelay(&failures)
		in.log.Warn("cannot remove the plugin entry yet; retrying", "file", f, "err", err, "in", d)
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w (last: %w)", f, ctx.Err(), err)
		case <-time.After(d):
		}
	}
}

func (in *Installer) writeStripped(cf *confFile, out []byte) error {
	f, st := cf.path, cf.info
	name, conf, ok := RestoreConf(out)
	if !ok {
		if err := writeConf(cf, out); err != nil {
			return err
		}
		if cf.linked() {
			in.log.Info("removed plugin entry, through the symlink", "file", f, "target", cf.target)
		} else {
			in.log.Info("removed plugin entry", "file", f)
		}
		return nil
	}
	if cf.linked() {
		// We convert only regular files and never make links: leave it to an operator.
		return &FileError{Path: f, Reason: fmt.Sprintf("is a symlink to %s, a .conflist converted from %s; refusing to replace the link with the restored %s", filepath.Base(cf.target), name, name)}
	}
	// The .conf sorts before the .conflist, so it takes over as soon as it exists; remove
	// the list only after that.
	confPath := filepath.Join(filepath.Dir(f), name)
	switch cst, err := os.Lstat(confPath); {
	case errors.Is(err, fs.ErrNotExist):
		if err := writeAtomic(confPath, conf, st.Mode().Perm(), st, nil); err != nil {
			return err
		}
	case err != nil:
		return fmt.Errorf("restore %s: %w", confPath, err)
	case !cst.Mode().IsRegular():
		return &FileError{Path: confPath, Reason: fmt.Sprintf("is a %s where the converted config is to be restored; keeping %s", kindOf(cst.Mode()), filepath.Base(f))}
	}
	if changedSince(f, st) {
		return fmt.Errorf("remove converted %s: %w", f, ErrChanged)
	}
	if err := os.Remove(f); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove converted %s: %w", f, err)
	}
	in.log.Info("removed plugin entry and restored the original conf", "file", f, "conf", name)
	return syncDir(filepath.Dir(f))
}
