package image

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"
)

// EnvBuildah opts in to TestDockerfileBuildsWithBuildah. It is not part of `make
// test`: the build takes many minutes of both cores (docs/architecture.md).
const EnvBuildah = "SECUREOVERLAY_BUILDAH"

// TestDockerfileBuildsWithBuildah builds the unmodified Dockerfile with buildah
// (hack/buildah-dockerfile.sh: local stand-ins for its FROM images, --pull=never,
// vfs storage, chroot isolation) and checks the result as TestImageMatchesDockerfile
// checks `make image`'s. Then it compares the two images: the same paths with the
// same type, mode, owner and link target (apart from logs and run-time caches), the
// same binaries byte for byte (both are built with the same Go, sources and flags),
// the same Debian packages, the same config.
func TestDockerfileBuildsWithBuildah(t *testing.T) {
	if os.Getenv(EnvBuildah) != "1" {
		t.Skipf("opt-in (%s=1, or make image-dockerfile): builds the Dockerfile with buildah, ≈10–20 min on 2 cores", EnvBuildah)
	}
	if os.Geteuid() != 0 {
		t.Skip("buildah with chroot isolation and mmdebstrap --mode=root need root")
	}
	mine, _ := builtImage(t) // also the rootfs the golang stand-in starts from
	start := time.Now()
	cmd := exec.Command(filepath.Join(repoRoot(t), "hack", "buildah-dockerfile.sh"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("hack/buildah-dockerfile.sh: %v\n%s", err, out)
	}
	t.Logf("%s(%s)", out, time.Since(start).Round(time.Second))
	cache := filepath.Dir(imageDir(t))
	img, err := Open(filepath.Join(cache, "buildah", "oci"), "", KeepContent)
	if err != nil {
		t.Fatal(err)
	}
	rt := runtimeStage(t)
	for _, err := range Check(img, rt, dockerContextHasGit(t)) {
		t.Errorf("buildah's image: %v", err)
	}

	// The two roads give the same image content.
	for dst := range rt.Files {
		a, _ := mine.Data(dst)
		b, _ := img.Data(dst)
		if !bytes.Equal(a, b) {
			t.Errorf("%s differs between make image (%d bytes) and the Dockerfile (%d bytes)", dst, len(a), len(b))
		}
	}
	// Every path, apart from what a Dockerfile build leaves behind and mmdebstrap
	// cleans for reproducibility (logs, caches regenerated at run time), /dev, and the
	// files a container engine manages (buildah leaves a 0755 placeholder /etc/hosts
	// from its RUN bind mounts; docker keeps the base image's).
	ignored := func(p string) bool {
		for _, pre := range []string{"/dev", "/var/log/", "/var/cache/ldconfig/", "/var/cache/debconf/", "/var/lib/apt/lists/"} {
			if p == pre || strings.HasPrefix(p, pre) {
				return true
			}
		}
		return p == "/" || p == "/etc/hosts" || p == "/etc/hostname" || p == "/etc/resolv.conf"
	}
	var onlyA, onlyB, kinds []string
	for p, e := range mine.Files {
		f, ok := img.Files[p]
		switch {
		case ignored(p):
		case !ok:
			onlyA = append(onlyA, p)
		case e.Type != f.Type || e.Mode != f.Mode || e.UID != f.UID || e.GID != f.GID || e.Linkname != f.Linkname:
			kinds = append(kinds, fmt.Sprintf("%s (%c %o %d:%d %s vs %c %o %d:%d %s)", p, e.Type, e.Mode, e.UID, e.GID, e.Linkname, f.Type, f.Mode, f.UID, f.GID, f.Linkname))
		}
	}
	for p := range img.Files {
		if _, ok := mine.Files[p]; !ok && !ignored(p) {
			onlyB = append(onlyB, p)
		}
	}
	sort.Strings(onlyA)
	sort.Strings(onlyB)
	sort.Strings(kinds)
	if len(onlyA)+len(onlyB)+len(kinds) > 0 {
		t.Errorf("file systems differ: only in make image's %v; only in the Dockerfile's %v; type, mode, owner or link differs: %v", onlyA, onlyB, kinds)
	}
	sa, _ := mine.Data("/var/lib/dpkg/status")
	sb, _ := img.Data("/var/lib/dpkg/status")
	pa, pb := packageVersions(sa), packageVersions(sb)
	var onlyMine, onlyDockerfile, versions []string
	for p, v := range pa {
		w, ok := pb[p]
		switch {
		case !ok:
			onlyMine = append(onlyMine, p)
		case v != w:
			versions = append(versions, p+" "+v+" (make image) "+w+" (Dockerfile)")
		}
	}
	for p := range pb {
		if _, ok := pa[p]; !ok {
			onlyDockerfile = append(onlyDockerfile, p)
		}
	}
	sort.Strings(onlyMine)
	sort.Strings(onlyDockerfile)
	sort.Strings(versions)
	if len(onlyMine)+len(onlyDockerfile) > 0 {
		t.Errorf("Debian packages only in make image's: %v; only in the Dockerfile's: %v", onlyMine, onlyDockerfile)
	}
	if len(versions) > 0 {
		// The lock pins versions; the Dockerfile installs the archive's current ones.
		t.Logf("package versions differ (hack/image-packages.lock is older than the archive): %s", strings.Join(versions, "; "))
	}
	ca, cb := mine.Config.Config, img.Config.Config
	if ca.User != cb.User || strings.Join(ca.Entrypoint, " ") != strings.Join(cb.Entrypoint, " ") || strings.Join(ca.Env, " ") != strings.Join(cb.Env, " ") {
		t.Errorf("configs differ: make image %+v, Dockerfile %+v", ca, cb)
	}
	t.Logf("buildah's image: %d layers, %d paths (make image: %d layers, %d paths); %d packages in both",
		img.Layers, len(img.Files), mine.Layers, len(mine.Files), len(pa))
}

func packageVersions(status []byte) map[string]string {
	m := map[string]string{}
	for _, para := range strings.Split(string(status), "\n\n") {
		var pkg, ver string
		ok := false
		for _, l := range strings.Split(para, "\n") {
			if v, f := strings.CutPrefix(l, "Package: "); f {
				pkg = v
			}
			if v, f := strings.CutPrefix(l, "Version: "); f {
				ver = v
			}
			ok = ok || l == "Status: install ok installed"
		}
		if pkg != "" && ok {
			m[pkg] = ver
		}
	}
	return m
}
