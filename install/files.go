package install

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"github.com/containernetworking/cni/libcni"
)

// ConfExtensions are the extensions container runtimes (containerd's go-cni, CRI-O's
// ocicni) load from the CNI config dir, through libcni.ConfFiles, in sort.Strings order
// of the full path; the first file that loads is the node's network.
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

// confFiles lists the config files of dir in libcni order.
func confFiles(dir string) ([]string, error) {
	files, err := libcni.ConfFiles(dir, ConfExtensions)
	if err != nil {
		return nil, fmt.Errorf("list cni config dir %s: %w", dir, err)
	}
	slices.Sort(files)
	return files, nil
}

// primary is the config file the installer edits.
type primary struct {
	path string
	data []byte
	info fs.FileInfo // of the file as read: mode, owner, and identity for changedSince
	mode fs.FileMode
	list bool // a .conflist (else a single-plugin .conf/.json to convert)
	// shadowedBy lists parseable configs earlier in libcni order that have no calico
	// plugin: a runtime uses the first of them, not Calico's network.
	shadowedBy []string
}

// findPrimary returns the first config in libcni order that contains a calico plugin.
// A file before it that does not parse stops the search with a *ParseError: it may be
// the calico config being rewritten.
func findPrimary(dir string) (*primary, error) {
	files, err := confFiles(dir)
	if err != nil {
		return nil, err
	}
	var shadowed []string
	for _, f := range files {
		data, st, err := readFile(f)
		if errors.Is(err, fs.ErrNotExist) {
			continue // renamed away between listing and reading
		}
		if err != nil {
			return nil, err
		}
		isList := filepath.Ext(f) == ".conflist"
		var calico bool
		if isList {
			calico, err = ListHasCalico(data)
		} else {
			calico, err = ConfIsCalico(data)
		}
		if err != nil {
			return nil, &ParseError{Path: f, Err: err}
		}
		if calico {
			return &primary{path: f, data: data, info: st, mode: st.Mode().Perm(), list: isList, shadowedBy: shadowed}, nil
		}
		shadowed = append(shadowed, filepath.Base(f))
	}
	return nil, ErrNoPrimary
}

func readFile(path string) ([]byte, fs.FileInfo, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, nil, err
	}
	var b bytes.Buffer
	if _, err := b.ReadFrom(f); err != nil {
		return nil, nil, fmt.Errorf("read %s: %w", path, err)
	}
	return b.Bytes(), st, nil
}

// ErrChanged means another writer changed a file between our read and our write; the
// pass is retried on the new content rather than overwriting it.
var ErrChanged = errors.New("changed by another writer while we edited it")

// changedSince reports whether path is no longer the file (inode, size, mtime) that was
// read as read.
func changedSince(path string, read fs.FileInfo) bool {
	cur, err := os.Stat(path)
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
	d, err := os.Open(dir)
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
	ents, err := os.ReadDir(dir)
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
	cur, err := os.ReadFile(path)
	if err != nil {
		return false, st, err
	}
	return bytes.Equal(cur, content), st, nil
}
