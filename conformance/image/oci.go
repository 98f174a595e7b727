package image

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
)

// Config is the part of an OCI image configuration the checks read.
type Config struct {
	Created      string `json:"created"`
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
	Config       struct {
		User       string            `json:"User"`
		Env        []string          `json:"Env"`
		Entrypoint []string          `json:"Entrypoint"`
		Cmd        []string          `json:"Cmd"`
		Labels     map[string]string `json:"Labels"`
		WorkingDir string            `json:"WorkingDir"`
	} `json:"config"`
	RootFS struct {
		DiffIDs []string `json:"diff_ids"`
	} `json:"rootfs"`
}

type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations"`
}

type manifest struct {
	Config descriptor   `json:"config"`
	Layers []descriptor `json:"layers"`
}

// Entry is one path of the image's merged file system.
type Entry struct {
	Type     byte // tar.TypeReg, tar.TypeDir, tar.TypeSymlink, tar.TypeLink, …
	Mode     int64
	UID, GID int
	Size     int64
	Linkname string
	Data     []byte // regular files that the Keep function of Open selected
}

// Image is an image of an OCI layout: its config and its layers merged into one
// file system view (whiteouts applied).
type Image struct {
	Manifest string // digest
	Config   Config
	Files    map[string]*Entry // clean absolute paths
	Layers   int
}

// Tags lists the ref names of an OCI layout's index.
func Tags(layout string) ([]string, error) {
	idx, err := index(layout)
	if err != nil {
		return nil, err
	}
	var tags []string
	for _, d := range idx {
		if n := d.Annotations["org.opencontainers.image.ref.name"]; n != "" {
			tags = append(tags, n)
		}
	}
	sort.Strings(tags)
	return tags, nil
}

func index(layout string) ([]descriptor, error) {
	b, err := os.ReadFile(filepath.Join(layout, "index.json"))
	if err != nil {
		return nil, err
	}
	var idx struct {
		Manifests []descriptor `json:"manifests"`
	}
	if err := json.Unmarshal(b, &idx); err != nil {
		return nil, fmt.Errorf("%s/index.json: %w", layout, err)
	}
	return idx.Manifests, nil
}

func blob(layout, digest string) (*os.File, error) {
	algo, hex, ok := strings.Cut(digest, ":")
	if !ok || algo != "sha256" || strings.ContainsAny(hex, "/.") {
		return nil, fmt.Errorf("blob digest %q not understood", digest)
	}
	return os.Open(filepath.Join(layout, "blobs", algo, hex))
}

func readJSON(layout, digest string, v any) error {
	f, err := blob(layout, digest)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := json.NewDecoder(f).Decode(v); err != nil {
		return fmt.Errorf("blob %s: %w", digest, err)
	}
	return nil
}

// Open reads the image tagged tag in the OCI layout at layout (a tag "" takes the
// only image). keep selects the regular files whose content is loaded into Data.
func Open(layout, tag string, keep func(p string) bool) (*Image, error) {
	idx, err := index(layout)
	if err != nil {
		return nil, err
	}
	var md *descriptor
	for i := range idx {
		if tag == "" && len(idx) == 1 || idx[i].Annotations["org.opencontainers.image.ref.name"] == tag {
			md = &idx[i]
			break
		}
	}
	if md == nil {
		tags, _ := Tags(layout)
		return nil, fmt.Errorf("%s: no image tagged %q (tags: %v)", layout, tag, tags)
	}
	var m manifest
	if err := readJSON(layout, md.Digest, &m); err != nil {
		return nil, err
	}
	img := &Image{Manifest: md.Digest, Files: map[string]*Entry{}, Layers: len(m.Layers)}
	if err := readJSON(layout, m.Config.Digest, &img.Config); err != nil {
		return nil, err
	}
	for _, l := range m.Layers {
		if err := img.apply(layout, l, keep); err != nil {
			return nil, fmt.Errorf("layer %s: %w", l.Digest, err)
		}
	}
	return img, nil
}

func (img *Image) apply(layout string, l descriptor, keep func(string) bool) error {
	f, err := blob(layout, l.Digest)
	if err != nil {
		return err
	}
	defer f.Close()
	br := bufio.NewReader(f)
	var r io.Reader = br
	if magic, _ := br.Peek(2); bytes.Equal(magic, []byte{0x1f, 0x8b}) {
		gz, err := gzip.NewReader(br)
		if err != nil {
			return err
		}
		defer gz.Close()
		r = gz
	} else if strings.Contains(l.MediaType, "zstd") {
		return fmt.Errorf("zstd layers are not supported (%s)", l.MediaType)
	}
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		p := path.Clean("/" + h.Name)
		dir, base := path.Split(p)
		if base == ".wh..wh..opq" {
			d := path.Clean(dir)
			for k := range img.Files {
				if strings.HasPrefix(k, d+"/") {
					delete(img.Files, k)
				}
			}
			continue
		}
		if victim, ok := strings.CutPrefix(base, ".wh."); ok {
			v := path.Join(dir, victim)
			delete(img.Files, v)
			for k := range img.Files {
				if strings.HasPrefix(k, v+"/") {
					delete(img.Files, k)
				}
			}
			continue
		}
		e := &Entry{Type: h.Typeflag, Mode: h.Mode & 0o7777, UID: h.Uid, GID: h.Gid, Size: h.Size, Linkname: h.Linkname}
		if h.Typeflag == tar.TypeLink {
			e.Linkname = path.Clean("/" + h.Linkname)
		}
		if h.Typeflag == tar.TypeReg && keep != nil && keep(p) {
			if e.Data, err = io.ReadAll(tr); err != nil {
				return err
			}
		}
		img.Files[p] = e // an upper layer's entry replaces the lower one (a directory: its metadata)
	}
}

// Resolve follows symbolic links (relative or absolute, in any component) within
// the image and returns the final path and its entry.
func (img *Image) Resolve(p string) (string, *Entry, error) {
	p = path.Clean("/" + p)
	for hops := 0; hops < 40; hops++ {
		// Resolve the directory components first.
		parts := strings.Split(strings.TrimPrefix(p, "/"), "/")
		cur := "/"
		changed := false
		for i, part := range parts {
			next := path.Join(cur, part)
			e, ok := img.Files[next]
			if !ok {
				return next, nil, fmt.Errorf("%s: %s does not exist in the image", p, next)
			}
			if e.Type == tar.TypeSymlink {
				target := e.Linkname
				if !path.IsAbs(target) {
					target = path.Join(cur, target)
				}
				p = path.Join(append([]string{target}, parts[i+1:]...)...)
				changed = true
				break
			}
			cur = next
		}
		if !changed {
			e := img.Files[p]
			if e.Type == tar.TypeLink {
				return e.Linkname, img.Files[e.Linkname], nil
			}
			return p, e, nil
		}
	}
	return p, nil, fmt.Errorf("%s: too many levels of symbolic links", p)
}

// Data returns the content of the regular file at p (following hard links), which
// Open's keep must have selected.
func (img *Image) Data(p string) ([]byte, error) {
	rp, e, err := img.Resolve(p)
	if err != nil {
		return nil, err
	}
	if e.Type != tar.TypeReg {
		return nil, fmt.Errorf("%s (%s) is not a regular file", p, rp)
	}
	if e.Data == nil && e.Size > 0 {
		return nil, fmt.Errorf("%s: content not loaded", rp)
	}
	return e.Data, nil
}
