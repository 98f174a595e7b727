package image

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"testing"
)

const envRequireAll = "SECUREOVERLAY_REQUIRE_ALL"

func requireOrSkip(t testing.TB, reason string) {
	t.Helper()
	if os.Getenv(envRequireAll) == "1" {
		t.Fatalf("%s (%s=1, so this fails instead of skipping)", reason, envRequireAll)
	}
	t.Skip(reason)
}

func repoRoot(t testing.TB) string {
	t.Helper()
	dir, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

func imageDir(t testing.TB) string {
	if d := os.Getenv("SECUREOVERLAY_IMAGE_DIR"); d != "" {
		return d
	}
	cache := os.Getenv("SECUREOVERLAY_CACHE_DIR")
	if cache == "" {
		cache = filepath.Join(repoRoot(t), ".cache")
	}
	return filepath.Join(cache, "image")
}

func runtimeStage(t testing.TB) *Runtime {
	t.Helper()
	df, err := ParseDockerfileFile(filepath.Join(repoRoot(t), "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	rt, err := df.Runtime()
	if err != nil {
		t.Fatal(err)
	}
	return rt
}

// dockerContextHasGit says whether .dockerignore leaves .git in the build context
// (then go build stamps vcs.* settings into the Dockerfile's binaries).
func dockerContextHasGit(t testing.TB) bool {
	b, err := os.ReadFile(filepath.Join(repoRoot(t), ".dockerignore"))
	if err != nil {
		return true
	}
	for _, l := range strings.Split(string(b), "\n") {
		if l = strings.TrimSpace(l); l == ".git" || l == ".git/" || l == "/.git" {
			return false
		}
	}
	return true
}

// manifestImage returns the one image every container of manifests/secureoverlay.yaml
// runs, and every /usr/local/bin path it names.
func manifestImage(t testing.TB) (string, []string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot(t), "manifests", "secureoverlay.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	images := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^\s*image:\s*(\S+)`).FindAllStringSubmatch(string(b), -1) {
		images[m[1]] = true
	}
	if len(images) != 1 {
		t.Fatalf("manifests/secureoverlay.yaml runs %d images, want one: %v", len(images), images)
	}
	paths := map[string]bool{}
	for _, p := range regexp.MustCompile(`/usr/local/bin/[A-Za-z0-9._-]+`).FindAllString(string(b), -1) {
		paths[p] = true
	}
	var ref string
	for r := range images {
		ref = r
	}
	var ps []string
	for p := range paths {
		ps = append(ps, p)
	}
	sort.Strings(ps)
	return ref, ps
}

func readEnvFile(t testing.TB, path string) map[string]string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			m[k] = v
		}
	}
	return m
}

var (
	builtOnce sync.Once
	built     *Image
	builtEnv  map[string]string
	builtErr  string
)

// builtImage opens the image hack/tools-image.sh built (make image / make tools),
// skipping (failing under SECUREOVERLAY_REQUIRE_ALL=1) when it is missing or
// older than its inputs.
func builtImage(t testing.TB) (*Image, map[string]string) {
	t.Helper()
	if testing.Short() {
		t.Skip("reads a 100 MB image: not in -short mode")
	}
	builtOnce.Do(func() {
		dir := imageDir(t)
		if _, err := os.Stat(filepath.Join(dir, "image.env")); err != nil {
			builtErr = fmt.Sprintf("no image in %s: run `make image`", dir)
			return
		}
		check := exec.Command(filepath.Join(repoRoot(t), "hack", "tools-image.sh"), "--check")
		if out, err := check.CombinedOutput(); err != nil {
			builtErr = fmt.Sprintf("the image in %s is older than its inputs (hack/tools-image.sh --check: %v %s): run `make image`", dir, err, out)
			return
		}
		builtEnv = readEnvFile(t, filepath.Join(dir, "image.env"))
		img, err := Open(filepath.Join(dir, "oci"), builtEnv["TAG"], KeepContent)
		if err != nil {
			builtErr = err.Error()
			return
		}
		built = img
	})
	if built == nil {
		requireOrSkip(t, builtErr)
	}
	return built, builtEnv
}

// TestDockerfileRuntimeStage: the parser reads the repository's Dockerfile as the
// image check needs it.
func TestDockerfileRuntimeStage(t *testing.T) {
	rt := runtimeStage(t)
	if rt.Base != "debian:bookworm-slim" || rt.BuildBase != "golang:1.26-bookworm" {
		t.Errorf("bases %q and %q", rt.Base, rt.BuildBase)
	}
	if len(rt.Files) != len(rt.GoBinaries) || len(rt.GoBinaries) == 0 {
		t.Errorf("%d COPY lines, %d binaries built", len(rt.Files), len(rt.GoBinaries))
	}
	if rt.GoBuild.CGOEnabled != "0" || !rt.GoBuild.Trimpath || rt.GoBuild.LDFlags != "-s -w" {
		t.Errorf("go build %+v", rt.GoBuild)
	}
	if strings.Join(rt.Packages, " ") != "ca-certificates iptables" {
		t.Errorf("packages %v", rt.Packages)
	}
	if len(rt.Users) != 1 || rt.Users[0].ID != 65532 || len(rt.Groups) != 1 || rt.User != "65532:65532" {
		t.Errorf("accounts %+v %+v, USER %q", rt.Users, rt.Groups, rt.User)
	}
	if rt.Symlinks["/usr/local/bin/kubectl-secureoverlay"] != "secureoverlayctl" {
		t.Errorf("symlinks %v", rt.Symlinks)
	}
	if len(rt.Labels) != 3 || len(rt.Entrypoint) != 1 {
		t.Errorf("labels %v entrypoint %v", rt.Labels, rt.Entrypoint)
	}
}

// TestDockerfileParserRefusesWhatItCannotCheck: an instruction or RUN command the
// check does not interpret is an error, never silently passed over.
func TestDockerfileParserRefusesWhatItCannotCheck(t *testing.T) {
	base := "FROM golang:1 AS build\nRUN for b in x; do CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o /out/$b ./cmd/$b; done\nFROM debian:bookworm-slim\n"
	for _, tc := range []struct{ name, add, want string }{
		{"ENV", "ENV A=b\n", "ENV in the runtime stage"},
		{"RUN", "RUN curl -o /x http://x\n", `command "curl`},
		{"COPY without --from", "COPY x /x\n", "only COPY --from"},
		{"shell ENTRYPOINT", "ENTRYPOINT /bin/x\n", "JSON form"},
		{"useradd without uid", "RUN useradd nobody2\n", "without a name or a fixed id"},
	} {
		df, err := ParseDockerfile(strings.NewReader(base + tc.add))
		if err == nil {
			_, err = df.Runtime()
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v, want one containing %q", tc.name, err, tc.want)
		}
	}
}

// TestImageMatchesDockerfile compares the image `make image` builds (no registry,
// no engine: mmdebstrap → umoci → skopeo) with the Dockerfile's runtime stage:
// config (USER, ENTRYPOINT, LABELs, no CMD, PATH), every COPY'd binary at its path
// (executable, root-owned, a Go binary of this module's cmd/<name> built with the
// build loop's CGO_ENABLED, -trimpath and -ldflags, no VCS stamp as the build
// context has no .git), nothing else in /usr/local/bin, the kubectl-secureoverlay
// symlink, the apt-get packages installed, the nonroot group and user with the
// Dockerfile's ids and shell, the CA bundle, the iptables variants (nft default,
// legacy, -restore/-save), every /usr/local/bin path manifests/secureoverlay.yaml
// runs, and the manifest's image name and tag among the image's names.
func TestImageMatchesDockerfile(t *testing.T) {
	img, env := builtImage(t)
	rt := runtimeStage(t)
	for _, err := range Check(img, rt, dockerContextHasGit(t)) {
		t.Error(err)
	}
	ref, paths := manifestImage(t)
	for _, p := range paths {
		if _, _, err := img.Resolve(p); err != nil {
			t.Errorf("manifests/secureoverlay.yaml runs %s: %v", p, err)
		}
	}
	if want := env["IMAGE"] + ":" + env["TAG"]; ref != want {
		t.Errorf("manifests/secureoverlay.yaml runs %s, make image builds %s", ref, want)
	}
	tags, err := Tags(filepath.Join(imageDir(t), "oci"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(tags, " ") != env["CONTENT_TAG"]+" "+env["TAG"] && strings.Join(tags, " ") != env["TAG"]+" "+env["CONTENT_TAG"] {
		t.Errorf("OCI layout tags %v, want %s and %s", tags, env["TAG"], env["CONTENT_TAG"])
	}
	if !strings.HasPrefix(env["CONTENT_TAG"], env["TAG"]+"-") || !strings.Contains(env["CONFIG_DIGEST"], strings.TrimPrefix(env["CONTENT_TAG"], env["TAG"]+"-")) {
		t.Errorf("content tag %s is not derived from the config digest %s", env["CONTENT_TAG"], env["CONFIG_DIGEST"])
	}
	if img.Layers != 2 {
		t.Errorf("%d layers, want 2 (root file system, binaries)", img.Layers)
	}
	t.Logf("%s (%s): %d layers, %d paths, user %s, entrypoint %v, config %s",
		ref, env["CONTENT_TAG"], img.Layers, len(img.Files), img.Config.Config.User, img.Config.Config.Entrypoint, env["CONFIG_DIGEST"])
}

// TestImageCheckCatchesDrift: the comparison above fails when the Dockerfile says
// something the image does not hold (each mutation of the real Dockerfile must
// produce an error naming it).
func TestImageCheckCatchesDrift(t *testing.T) {
	img, _ := builtImage(t)
	orig, err := os.ReadFile(filepath.Join(repoRoot(t), "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, old, new, want string }{
		{"label", `org.opencontainers.image.title="secureoverlay"`, `org.opencontainers.image.title="other"`, "label org.opencontainers.image.title"},
		{"user", "USER 65532:65532", "USER 65533:65533", "config User"},
		{"entrypoint", `ENTRYPOINT ["/usr/local/bin/secureoverlayctl"]`, `ENTRYPOINT ["/usr/local/bin/secureoverlay-agent"]`, "Entrypoint"},
		{"package", "iptables ca-certificates", "iptables ca-certificates nftables", "nftables"},
		{"ldflags", "-ldflags '-s -w'", "-ldflags '-s'", "says -w: false"},
		{"trimpath", "go build -trimpath ", "go build ", "-trimpath"},
		{"binary path", "/out/secureoverlay-master /usr/local/bin/secureoverlay-master", "/out/secureoverlay-master /usr/bin/secureoverlay-master", "/usr/bin/secureoverlay-master"},
		{"symlink", "ln -s secureoverlayctl /usr/local/bin/kubectl-secureoverlay", "ln -s secureoverlayctl /usr/local/bin/kubectl-so", "kubectl-so"},
		{"uid", "--uid 65532", "--uid 65534", "user nonroot"},
	} {
		text := strings.Replace(string(orig), tc.old, tc.new, 1)
		if text == string(orig) {
			t.Fatalf("%s: %q is not in the Dockerfile", tc.name, tc.old)
		}
		df, err := ParseDockerfile(strings.NewReader(text))
		if err != nil {
			t.Fatal(err)
		}
		rt, err := df.Runtime()
		if err != nil {
			t.Fatal(err)
		}
		errs := Check(img, rt, dockerContextHasGit(t))
		found := false
		for _, e := range errs {
			found = found || strings.Contains(e.Error(), tc.want)
		}
		if !found {
			t.Errorf("%s: changing the Dockerfile went unnoticed (errors: %v)", tc.name, errs)
		}
	}
}

// TestImageRuns unpacks the image and runs what the agent and the CLI run, in a
// chroot: both iptables variants and iptables-restore load (their libraries are
// there), and secureoverlayctl starts as the image's default user.
func TestImageRuns(t *testing.T) {
	_, env := builtImage(t)
	if os.Geteuid() != 0 {
		requireOrSkip(t, "needs root to unpack the image and chroot into it")
	}
	root := t.TempDir()
	if out, err := exec.Command("umoci", "raw", "unpack", "--image", filepath.Join(imageDir(t), "oci")+":"+env["TAG"], root+"/rootfs").CombinedOutput(); err != nil {
		if _, lerr := exec.LookPath("umoci"); lerr != nil {
			requireOrSkip(t, "umoci not installed (run hack/install-deps.sh)")
		}
		t.Fatalf("umoci raw unpack: %v\n%s", err, out)
	}
	rootfs := root + "/rootfs"
	for _, tc := range []struct {
		argv   []string
		asUser bool // as the image's default user 65532
		want   string
	}{
		{[]string{"/usr/sbin/iptables", "--version"}, false, "(nf_tables)"},
		{[]string{"/usr/sbin/iptables-restore", "--version"}, false, "(nf_tables)"},
		{[]string{"/usr/sbin/iptables-legacy", "--version"}, false, "(legacy)"},
		{[]string{"/usr/sbin/iptables-legacy-restore", "--version"}, false, "(legacy)"},
		{[]string{"/usr/local/bin/kubectl-secureoverlay", "--help"}, true, "secureoverlayctl"},
	} {
		args := []string{}
		if tc.asUser {
			args = append(args, "--userspec=65532:65532")
		}
		args = append(append(args, rootfs), tc.argv...)
		out, err := exec.Command("chroot", args...).CombinedOutput()
		if !strings.Contains(string(out), tc.want) {
			t.Errorf("chroot %v: %v, output %q, want it to contain %q", args, err, out, tc.want)
		}
	}
}
