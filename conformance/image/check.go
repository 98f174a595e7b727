package image

import (
	"archive/tar"
	"bytes"
	"debug/buildinfo"
	"debug/elf"
	"fmt"
	"path"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// Module is the Go module the image's binaries must be built from.
const Module = "github.com/secureoverlay/secureoverlay"

// KeepContent selects the files Check reads: the binaries, the account and package
// databases.
func KeepContent(p string) bool {
	return strings.HasPrefix(p, "/usr/local/bin/") || p == "/etc/passwd" || p == "/etc/group" || p == "/var/lib/dpkg/status"
}

// IPTablesVariants are the commands the agent may run (go-iptables runs iptables,
// iptables-restore and -save, by mode) and the multi-call binary each must be:
// Debian's default is the nf_tables variant, the legacy one is present as well.
var IPTablesVariants = map[string]string{
	"/usr/sbin/iptables":                "xtables-nft-multi",
	"/usr/sbin/iptables-restore":        "xtables-nft-multi",
	"/usr/sbin/iptables-save":           "xtables-nft-multi",
	"/usr/sbin/iptables-nft":            "xtables-nft-multi",
	"/usr/sbin/iptables-nft-restore":    "xtables-nft-multi",
	"/usr/sbin/iptables-nft-save":       "xtables-nft-multi",
	"/usr/sbin/iptables-legacy":         "xtables-legacy-multi",
	"/usr/sbin/iptables-legacy-restore": "xtables-legacy-multi",
	"/usr/sbin/iptables-legacy-save":    "xtables-legacy-multi",
	"/usr/sbin/ip6tables":               "xtables-nft-multi",
	"/usr/sbin/ip6tables-restore":       "xtables-nft-multi",
	"/usr/sbin/ip6tables-legacy":        "xtables-legacy-multi",
}

// Check compares img with what the Dockerfile's runtime stage rt says, and returns
// every difference. vcsStamped says whether the build context has the .git
// directory (the binaries then carry vcs.* build settings).
func Check(img *Image, rt *Runtime, vcsStamped bool) []error {
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }

	// Config.
	c := img.Config.Config
	if c.User != rt.User {
		bad("config User is %q, the Dockerfile's USER is %q", c.User, rt.User)
	}
	if !slices.Equal(c.Entrypoint, rt.Entrypoint) {
		bad("config Entrypoint is %q, the Dockerfile's ENTRYPOINT is %q", c.Entrypoint, rt.Entrypoint)
	}
	if len(c.Cmd) != 0 {
		bad("config Cmd is %q; the Dockerfile sets ENTRYPOINT, which clears the base image's CMD", c.Cmd)
	}
	for k, v := range rt.Labels {
		if got, ok := c.Labels[k]; !ok || got != v {
			bad("label %s is %q, the Dockerfile's is %q", k, got, v)
		}
	}
	for k, v := range c.Labels {
		if _, ok := rt.Labels[k]; !ok {
			bad("label %s=%q is not in the Dockerfile", k, v)
		}
	}
	if img.Config.OS != "linux" {
		bad("config os is %q", img.Config.OS)
	}
	pathEnv := ""
	for _, e := range c.Env {
		if v, ok := strings.CutPrefix(e, "PATH="); ok {
			pathEnv = v
		}
	}
	for _, d := range []string{"/usr/local/bin", "/usr/sbin", "/usr/bin"} {
		if !slices.Contains(strings.Split(pathEnv, ":"), d) {
			bad("config PATH %q lacks %s", pathEnv, d)
		}
	}

	// The binaries: one per COPY, built by the build loop with its flags.
	for dst, src := range rt.Files {
		name := path.Base(src)
		if path.Dir(src) != rt.GoBuild.OutputDir || !slices.Contains(rt.GoBinaries, name) {
			bad("COPY %s %s: not an output of the build loop (%s/$b for $b in %v)", src, dst, rt.GoBuild.OutputDir, rt.GoBinaries)
			continue
		}
		errs = append(errs, checkBinary(img, dst, name, rt.GoBuild, vcsStamped)...)
	}
	for _, b := range rt.GoBinaries {
		if !slices.Contains(mapValues(rt.Files), rt.GoBuild.OutputDir+"/"+b) {
			bad("the build loop builds %s but no COPY ships it", b)
		}
	}
	for link, target := range rt.Symlinks {
		e, ok := img.Files[path.Clean(link)]
		switch {
		case !ok:
			bad("symlink %s -> %s is missing", link, target)
		case e.Type != tar.TypeSymlink:
			bad("%s is not a symlink (tar type %q)", link, e.Type)
		case e.Linkname != target:
			bad("symlink %s points to %q, the Dockerfile's to %q", link, e.Linkname, target)
		default:
			if _, te, err := img.Resolve(link); err != nil || te.Type != tar.TypeReg {
				bad("symlink %s -> %s does not lead to a file: %v", link, target, err)
			}
		}
	}
	// Nothing else in the directories the binaries go to.
	shipped := map[string]bool{}
	for dst := range rt.Files {
		shipped[path.Clean(dst)] = true
	}
	for l := range rt.Symlinks {
		shipped[path.Clean(l)] = true
	}
	dirs := map[string]bool{}
	for p := range shipped {
		dirs[path.Dir(p)] = true
	}
	for p, e := range img.Files {
		if dirs[path.Dir(p)] && !shipped[p] && e.Type != tar.TypeDir {
			bad("%s is in the image but the Dockerfile does not put it there", p)
		}
	}

	// Packages, accounts, certificates, iptables.
	status, err := img.Data("/var/lib/dpkg/status")
	if err != nil {
		bad("dpkg status: %v", err)
	}
	installed := dpkgInstalled(status)
	for _, p := range rt.Packages {
		if !installed[p] {
			bad("Debian package %s (the Dockerfile's apt-get install) is not installed", p)
		}
	}
	errs = append(errs, checkAccounts(img, rt)...)
	if _, e, err := img.Resolve("/etc/ssl/certs/ca-certificates.crt"); err != nil || e.Size == 0 {
		bad("/etc/ssl/certs/ca-certificates.crt missing or empty (ca-certificates): %v", err)
	}
	for cmd, multi := range IPTablesVariants {
		rp, e, err := img.Resolve(cmd)
		switch {
		case err != nil:
			bad("%s: %v", cmd, err)
		case e.Type != tar.TypeReg || e.Mode&0o111 == 0:
			bad("%s resolves to %s, not an executable file", cmd, rp)
		case path.Base(rp) != multi:
			bad("%s resolves to %s, want %s", cmd, rp, multi)
		}
	}
	return errs
}

func mapValues(m map[string]string) []string {
	var v []string
	for _, x := range m {
		v = append(v, x)
	}
	return v
}

func checkBinary(img *Image, dst, name string, gb GoBuild, vcsStamped bool) []error {
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(dst+": "+format, a...)) }
	e, ok := img.Files[path.Clean(dst)]
	if !ok {
		bad("missing")
		return errs
	}
	if e.Type != tar.TypeReg {
		bad("not a regular file (tar type %q)", e.Type)
		return errs
	}
	if e.Mode&0o111 != 0o111 || e.UID != 0 || e.GID != 0 || e.Mode&0o022 != 0 {
		bad("mode %o owner %d:%d, want executable by all, writable by root only, owned by 0:0", e.Mode, e.UID, e.GID)
	}
	info, err := buildinfo.Read(bytes.NewReader(e.Data))
	if err != nil {
		bad("not a Go binary with build information: %v", err)
		return errs
	}
	if want := Module + "/cmd/" + name; info.Path != want {
		bad("built from %s, want %s", info.Path, want)
	}
	settings := map[string]string{}
	for _, s := range info.Settings {
		settings[s.Key] = s.Value
	}
	if settings["CGO_ENABLED"] != gb.CGOEnabled {
		bad("CGO_ENABLED=%q, the Dockerfile builds with %q", settings["CGO_ENABLED"], gb.CGOEnabled)
	}
	if (settings["-trimpath"] == "true") != gb.Trimpath {
		bad("-trimpath=%q, the Dockerfile's -trimpath: %v", settings["-trimpath"], gb.Trimpath)
	}
	if !gb.Trimpath {
		if settings["-ldflags"] != gb.LDFlags {
			bad("-ldflags=%q, the Dockerfile's %q", settings["-ldflags"], gb.LDFlags)
		}
	} else {
		// With -trimpath go build does not record -ldflags (go.dev/issue/52372):
		// check the effect of the flags instead.
		errs = append(errs, checkStripped(dst, e.Data, gb.LDFlags)...)
	}
	if settings["GOOS"] != "linux" {
		bad("GOOS=%q", settings["GOOS"])
	}
	if _, stamped := settings["vcs.revision"]; stamped != vcsStamped {
		bad("vcs stamp present: %v, want %v (the Dockerfile's build context has .git: %v)", stamped, vcsStamped, vcsStamped)
	}
	return errs
}

// checkStripped checks the effect of the linker flags -s (no symbol table) and -w
// (no DWARF) on an ELF binary; any other linker flag cannot be checked.
func checkStripped(dst string, data []byte, ldflags string) []error {
	var errs []error
	want := map[string]bool{}
	for _, f := range strings.Fields(ldflags) {
		switch f {
		case "-s", "-w":
			want[f] = true
		default:
			errs = append(errs, fmt.Errorf("%s: the Dockerfile's -ldflags %q: %s is not checked by conformance/image", dst, ldflags, f))
		}
	}
	ef, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		return append(errs, fmt.Errorf("%s: not an ELF file: %w", dst, err))
	}
	defer ef.Close()
	symtab, dwarf := false, false
	for _, s := range ef.Sections {
		symtab = symtab || s.Name == ".symtab"
		dwarf = dwarf || strings.HasPrefix(s.Name, ".debug_") || strings.HasPrefix(s.Name, ".zdebug_")
	}
	if symtab == want["-s"] {
		errs = append(errs, fmt.Errorf("%s: symbol table present: %v, but the Dockerfile's -ldflags %q says -s: %v", dst, symtab, ldflags, want["-s"]))
	}
	if dwarf == want["-w"] {
		errs = append(errs, fmt.Errorf("%s: DWARF present: %v, but the Dockerfile's -ldflags %q says -w: %v", dst, dwarf, ldflags, want["-w"]))
	}
	return errs
}

func dpkgInstalled(status []byte) map[string]bool {
	m := map[string]bool{}
	for _, para := range strings.Split(string(status), "\n\n") {
		var pkg string
		ok := false
		for _, l := range strings.Split(para, "\n") {
			if v, f := strings.CutPrefix(l, "Package: "); f {
				pkg = v
			}
			if l == "Status: install ok installed" {
				ok = true
			}
		}
		if pkg != "" && ok {
			m[pkg] = true
		}
	}
	return m
}

var userSpec = regexp.MustCompile(`^(\d+)(?::(\d+))?$`)

func checkAccounts(img *Image, rt *Runtime) []error {
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	groups, err := img.Data("/etc/group")
	if err != nil {
		bad("/etc/group: %v", err)
	}
	passwd, err := img.Data("/etc/passwd")
	if err != nil {
		bad("/etc/passwd: %v", err)
	}
	fields := func(db []byte, name string) []string {
		for _, l := range strings.Split(string(db), "\n") {
			if f := strings.Split(l, ":"); f[0] == name {
				return f
			}
		}
		return nil
	}
	for _, g := range rt.Groups {
		f := fields(groups, g.Name)
		if len(f) < 3 || f[2] != strconv.Itoa(g.ID) {
			bad("group %s with gid %d (the Dockerfile's groupadd) is not in /etc/group: %q", g.Name, g.ID, f)
		}
	}
	for _, u := range rt.Users {
		f := fields(passwd, u.Name)
		switch {
		case len(f) < 7:
			bad("user %s (the Dockerfile's useradd) is not in /etc/passwd", u.Name)
		case f[2] != strconv.Itoa(u.ID) || (u.GID >= 0 && f[3] != strconv.Itoa(u.GID)):
			bad("user %s is %s:%s in /etc/passwd, the Dockerfile's %d:%d", u.Name, f[2], f[3], u.ID, u.GID)
		case u.Shell != "" && f[6] != u.Shell:
			bad("user %s has shell %s, the Dockerfile's %s", u.Name, f[6], u.Shell)
		}
	}
	// The default user is one of those accounts (numeric USER: the process still
	// runs without one, but tools and the manifest's runAsUser expect the name).
	if m := userSpec.FindStringSubmatch(rt.User); m != nil {
		found := false
		for _, l := range strings.Split(string(passwd), "\n") {
			if f := strings.Split(l, ":"); len(f) >= 4 && f[2] == m[1] && (m[2] == "" || f[3] == m[2]) {
				found = true
			}
		}
		if !found {
			bad("the default user %s has no /etc/passwd entry", rt.User)
		}
	}
	return errs
}
