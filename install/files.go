package install

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
)

// ConfExtensions are the extensions container runtimes (containerd's go-cni, CRI-O's
// ocicni) load from the CNI config dir, through libcni.ConfFiles, in sort.Strings order
// of the full path. containerd takes the first file as the node's network and fails when
// it cannot load it; CRI-O skips files it cannot load and takes the first that loads.
var ConfExtensions = []string{".conf", ".conflist", ".json"}

// TempPrefix starts the name of every temporary file the installer creates. The names
// have no libcni extension (filepath.Ext of ".secureoverlay-tmp-123" is the whole name),
// so neither a runtime nor Calico ever loads a half-written file of ours.
const TempPrefix = ".secureoverlay-tmp-"

// ErrNoPrimary means the CNI config dir holds no config with a calico plugin yet.
var ErrNoPrimary = errors.New("no calico network config yet")

// ParseError is a config file that does not parse. It is usually a file another writer
// (Calico's install-cni writes non-atomically) is in the middle of writing: callers retry
// after a short delay and never write over it.
type ParseError struct {
	Path string
	Err  error
}

func (e *ParseError) Error() string { return fmt.Sprintf("parse %s: %v", e.Path, e.Err) }
func (e *ParseError) Unwrap() error { return e.Err }

// MaxConfigSize bounds every config file the installer reads or writes. Calico's
// conflist is a few KiB; a file over the limit is refused without being read, so a huge
// file (or a device that never ends) cannot run the installer out of memory.
const MaxConfigSize = 1 << 20

// maxPluginSize bounds the plugin binary read from the image and compared in the bin dir.
const maxPluginSize = 256 << 20

// FileError is a file in the config dir that the installer does not read or write: not
// a regular file (a FIFO, socket, device or directory, also behind a symlink), larger
// than MaxConfigSize, a dangling symlink, or a symlink that does not resolve to a file
// directly in the config dir. The message names the file and the reason, never its
// content. Unlike a ParseError it is not a writer caught mid-write; it stays until an
// operator fixes the file.
type FileError struct {
	Path   string
	Reason string
}

func (e *FileError) Error() string { return e.Path + ": " + e.Reason }

// confFiles lists the config files of dir in libcni order: what libcni.ConfFiles lists
// (every entry that is not itself a directory, so also symlinks, FIFOs and devices, whose
// extension is one of ConfExtensions), sorted. It reads the directory itself rather than
// calling libcni.ConfFiles so that the open has O_DIRECTORY: a FIFO at the dir's path
// fails instead of blocking. A missing dir lists nothing, as in libcni.
func confFiles(dir string) ([]string, error) {
	ents, err := readDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list cni config dir %s: %w", dir, err)
	}
	var files []string
	for _, e := range ents {
		if !e.IsDir() && slices.Contains(ConfExtensions, filepath.Ext(e.Name())) {
			files = append(files, filepath.Join(dir, e.Name()))
		}
	}
	slices.Sort(files)
	return files, nil
}

// readDir lists dir, opened with O_DIRECTORY (never blocks on a non-directory).
func readDir(dir string) ([]fs.DirEntry, error) {
	f, err := os.OpenFile(dir, os.O_RDONLY|syscall.O_DIRECTORY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return f.ReadDir(-1)
}

// confFile is a config file as read by readConf.
type confFile struct {
	path string // as listed in the config dir
	// target is the file edits replace: path itself, or, when path is a symlink, the
	// regular file directly in the config dir it resolves to (so the link stays a link).
	target string
	data   []byte
	info   fs.FileInfo // of target as read: mode, owner, and identity for changedSince
}

func (c *confFile) linked() bool { return c.target != c.path }

// readConf reads the config file path of dir. It reads only a regular file of at most
// MaxConfigSize bytes; a symlink is followed only when it resolves to such a file directly
// in dir (the only place where the installer's view, with the host's config dir mounted,
// and the host's agree, and the only place it writes). Anything else is a *FileError. A
// path that no longer exists (renamed away after the listing) is fs.ErrNotExist.
func readConf(dir, path string) (*confFile, error) {
	lst, err := os.Lstat(path)
	if err != nil {
		return nil, err
	}
	target := path
	if lst.Mode()&fs.ModeSymlink != 0 {
		if target, err = resolveLink(dir, path); err != nil {
			return nil, err
		}
	}
	data, info, err := readLimited(target, MaxConfigSize, false)
	var fe *FileError
	switch {
	case err == nil:
		return &confFile{path: path, target: target, data: data, info: info}, nil
	case target != path && errors.Is(err, fs.ErrNotExist):
		// The target went away after the link was resolved: the link dangles now (or
		// is gone itself).
		if _, err := resolveLink(dir, path); err != nil {
			return nil, err
		}
		return nil, fmt.Errorf("read %s: %w", path, ErrChanged)
	case target != path && errors.As(err, &fe):
		return nil, &FileError{Path: path, Reason: "symlink to " + filepath.Base(target) + ": " + fe.Reason}
	}
	return nil, err
}

// resolveLink returns the file the symlink path resolves to if that is directly in dir,
// else a *FileError saying where the link leads (or that it dangles).
func resolveLink(dir, path string) (string, error) {
	raw, err := os.Readlink(path)
	if err != nil {
		return "", err
	}
	hint := ""
	if filepath.IsAbs(raw) {
		hint = fmt.Sprintf(" (an absolute link target is resolved in the installer's own file system, where the host's config dir is %s: use a relative link)", dir)
	}
	resolved, err := filepath.EvalSymlinks(path)
	if errors.Is(err, fs.ErrNotExist) {
		if _, err := os.Lstat(path); err != nil {
			return "", err // the link itself is gone
		}
		return "", &FileError{Path: path, Reason: fmt.Sprintf("dangling symlink to %s%s; container runtimes cannot load it", raw, hint)}
	}
	if err != nil {
		return "", &FileError{Path: path, Reason: fmt.Sprintf("symlink to %s cannot be resolved: %v", raw, err)}
	}
	rdir, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return "", fmt.Errorf("resolve cni config dir %s: %w", dir, err)
	}
	const only = "the installer follows a symlink only to a file directly in the config dir"
	switch {
	case filepath.Dir(resolved) == rdir:
		return resolved, nil
	case strings.HasPrefix(resolved, rdir+string(filepath.Separator)):
		return "", &FileError{Path: path, Reason: fmt.Sprintf("symlink to %s resolves to %s, in a subdirectory of the config dir; %s", raw, resolved, only)}
	default:
		return "", &FileError{Path: path, Reason: fmt.Sprintf("symlink to %s resolves to %s, outside the config dir %s%s; %s", raw, resolved, rdir, hint, only)}
	}
}

// readRegular reads path if it is a regular file of at most limit bytes, following
// symlinks, without ever opening anything else: the type and size are checked with
// stat(2) first; the open has O_NONBLOCK (a FIFO swapped in after the check cannot block
// it) and O_NOCTTY; the opened file is checked again with fstat(2) and must be the file
// stat(2) saw (else ErrChanged); at most limit+1 bytes are read.
func readRegular(path string, limit int64) ([]byte, fs.FileInfo, error) {
	return readLimited(path, limit, true)
}

// readLimited is readRegular; without follow, path itself must be the regular file (the
// caller vetted it): lstat(2) instead of stat(2), O_NOFOLLOW, and a symlink swapped in
// at path is ErrChanged.
func readLimited(path string, limit int64, follow bool) ([]byte, fs.FileInfo, error) {
	stat, flags := os.Stat, os.O_RDONLY|syscall.O_NONBLOCK|syscall.O_NOCTTY
	if !follow {
		stat, flags = os.Lstat, flags|syscall.O_NOFOLLOW
	}
	st, err := stat(path)
	if err != nil {
		return nil, nil, err
	}
	if st.Mode()&fs.ModeSymlink != 0 {
		return nil, nil, fmt.Errorf("stat %s: %w", path, ErrChanged)
	}
	if err := checkRegular(path, st, limit); err != nil {
		return nil, nil, err
	}
	if testHookBeforeOpen != nil {
		testHookBeforeOpen(path)
	}
	f, err := os.OpenFile(path, flags, 0)
	if !follow && errors.Is(err, syscall.ELOOP) {
		return nil, nil, fmt.Errorf("open %s: %w", path, ErrChanged)
	}
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	fst, err := f.Stat()
	if err != nil {
		return nil, nil, err
	}
	if err := checkRegular(path, fst, limit); err != nil {
		return nil, nil, err
	}
	if !os.SameFile(st, fst) {
		return nil, nil, fmt.Errorf("open %s: %w", path, ErrChanged)
	}
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, nil, fmt.Errorf("read %s: %w", path, err)
	}
	if int64(len(data)) > limit {
		return nil, nil, &FileError{Path: path, Reason: fmt.Sprintf("grew over the limit of %d bytes while being read", limit)}
	}
	return data, fst, nil
}

// testHookBeforeOpen runs between readRegular's stat and open (tests swap the file there).
var testHookBeforeOpen func(path string)

func checkRegular(path string, st fs.FileInfo, limit int64) error {
	if !st.Mode().IsRegular() {
		return &FileError{Path: path, Reason: fmt.Sprintf("is a %s, not a regular file; the installer reads only regular files", kindOf(st.Mode()))}
	}
	if st.Size() > limit {
		return &FileError{Path: path, Reason: fmt.Sprintf("is %d bytes, over the limit of %d bytes", st.Size(), limit)}
	}
	return nil
}

func kindOf(m fs.FileMode) string {
	switch {
	case m.IsDir():
		return "directory"
	case m&fs.ModeSymlink != 0:
		return "symlink"
	case m&fs.ModeNamedPipe != 0:
		return "named pipe (FIFO)"
	case m&fs.ModeSocket != 0:
		return "socket"
	case m&fs.ModeCharDevice != 0:
		return "character device"
	case m&fs.ModeDevice != 0:
		return "block device"
	}
	return "file of mode " + m.String()
}

// primary is the config file the installer edits.
type primary struct {
	*confFile
	list bool // a .conflist (else a single-plugin .conf/.json to convert)
	// shadowedBy lists parseable configs earlier in libcni order that have no calico
	// plugin: a runtime uses the first of them, not Calico's network.
	shadowedBy []string
}

// findPrimary returns the first config in libcni order that contains a calico plugin.
// A file before it that does not parse stops the search with a *ParseError (it may be
// the calico config being rewritten), one that the installer does not read (readConf)
// with a *FileError: containerd fails to load its network on the first file it cannot
// load, so a later calico config is not the node's network and must not be edited as if
// it were.
func findPrimary(dir string) (*primary, error) {
	files, err := confFiles(dir)
	if err != nil {
		return nil, err
	}
	var shadowed []string
	for _, f := range files {
		cf, err := readConf(dir, f)
		if errors.Is(err, fs.ErrNotExist) {
			continue // renamed away between listing and reading
		}
		if err != nil {
			return nil, err
		}
		isList := filepath.Ext(f) == ".conflist"
		var calico bool
		if isList {
			calico, err = ListHasCalico(cf.data)
		} else {
			calico, err = ConfIsCalico(cf.data)
		}
		if err != nil {
			return nil, &ParseError{Path: f, Err: err}
		}
		if calico {
			return &primary{confFile: cf, list: isList, shadowedBy: shadowed}, nil
		}
		shadowed = append(shadowed, filepath.Base(f))
	}
	return nil, ErrNoPrimary
}

// ErrChanged means another writer changed a file between our read and our write; the
// pass is retried on the new content rather than overwriting it.
var ErrChanged = errors.New("changed by another writer while we edited it")

// changedSince reports whether path is no longer the file (inode, size, mtime) that was
// read as read. A symlink at path (which replaced the regular file) is a change.
func changedSince(path string, read fs.FileInfo) bool {
	cur, err := os.Lstat(path)
	return err != nil || stampOf(cur) != stampOf(read)
}

// writeAtomic replaces path with data: a temp file in the same directory (TempPrefix,
// no libcni extension) is written, given mode (and the old file's owner when owner is
// non-nil), fsynced and renamed over the target; then the directory is fsynced. A reader
// sees the old file or the new one, never a mix, and never an empty file. When expect is
// non-nil and path is no longer that file just before the rename, nothing is replaced
// and the error wraps ErrChanged.
func writeAtomic(path string, data []byte, mode fs.FileMode, owner, expect fs.FileInfo) error {
	_, err := writeAtomicInfo(path, data, mode, owner, expect)
	return err
}

// writeConf replaces the config file cf with data, atomically, in cf's target (the file
// itself, or the file directly in the config dir its symlink resolves to: the link stays
// a link, and no write ever leaves the config dir), keeping the target's mode and owner,
// and only if the target is still the file that was read (else ErrChanged).
func writeConf(cf *confFile, data []byte) error {
	if len(data) > MaxConfigSize {
		return &FileError{Path: cf.path, Reason: fmt.Sprintf("would grow to %d bytes with our entry, over the limit of %d bytes", len(data), MaxConfigSize)}
	}
	return writeAtomic(cf.target, data, cf.info.Mode().Perm(), cf.info, cf.info)
}

// writeAtomicInfo is writeAtomic that also returns the written file's info, taken from the
// temp file before the rename (so it describes what we wrote even if another writer
// replaces the file right after).
func writeAtomicInfo(path string, data []byte, mode fs.FileMode, owner, expect fs.FileInfo) (fs.FileInfo, error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, TempPrefix+"*")
	if err != nil {
		return nil, fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if _, err := f.Write(data); err != nil {
		return nil, fmt.Errorf("write %s: %w", tmp, err)
	}
	if owner != nil {
		if st, _ := owner.Sys().(*syscall.Stat_t); st != nil && os.Geteuid() == 0 {
			if err := f.Chown(int(st.Uid), int(st.Gid)); err != nil {
				return nil, fmt.Errorf("chown %s: %w", tmp, err)
			}
		}
	}
	if err := f.Chmod(mode); err != nil {
		return nil, fmt.Errorf("chmod %s: %w", tmp, err)
	}
	if err := f.Sync(); err != nil {
		return nil, fmt.Errorf("fsync %s: %w", tmp, err)
	}
	info, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat %s: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("close %s: %w", tmp, err)
	}
	if expect != nil && changedSince(path, expect) {
		os.Remove(tmp)
		ok = true
		return nil, fmt.Errorf("write %s: %w", path, ErrChanged)
	}
	if err := os.Rename(tmp, path); err != nil {
		return nil, fmt.Errorf("rename %s to %s: %w", tmp, path, err)
	}
	ok = true
	return info, syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.OpenFile(dir, os.O_RDONLY|syscall.O_DIRECTORY, 0)
	if err != nil {
		return fmt.Errorf("open dir %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil && !errors.Is(err, syscall.EINVAL) {
		return fmt.Errorf("fsync dir %s: %w", dir, err)
	}
	return nil
}

// removeTemps deletes temp files a crashed run of ours left in dir.
func removeTemps(dir string) {
	ents, err := readDir(dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), TempPrefix) {
			os.Remove(filepath.Join(dir, e.Name()))
		}
	}
}

// sameFile reports whether path exists with exactly content and is executable.
func sameFile(path string, content []byte) (bool, fs.FileInfo, error) {
	st, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil, nil
	}
	if err != nil {
		return false, nil, err
	}
	if !st.Mode().IsRegular() || st.Size() != int64(len(content)) || st.Mode().Perm()&0o111 == 0 {
		return false, st, nil
	}
	cur, _, err := readRegular(path, int64(len(content)))
	var fe *FileError
	if errors.As(err, &fe) || errors.Is(err, ErrChanged) {
		return false, st, nil // swapped for something else since the stat: replace it
	}
	if err != nil {
		return false, st, err
	}
	return bytes.Equal(cur, content), st, nil
}
