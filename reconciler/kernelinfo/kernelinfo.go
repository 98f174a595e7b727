// Package kernelinfo detects what of the node's kernel matters to the data plane where
// behaviour differs by kernel (issue 18): the release and the per-CPU SAs it implies
// (XFRMA_SA_PCPU, Linux >= 6.13), and the modules the data path uses or is hurt by
// (esp4_offload). Parsing and deriving are pure (table-tested); Read is the thin shell
// that reads the files under a root directory ("/" on a node).
//
// Module facts are honest about what /proc/modules cannot say: a module built into the
// kernel never appears there, and the modules the data path needs (esp4, xfrm_user, ipip,
// ...) are loaded by the kernel on first use, so "not in /proc/modules" is reported as
// not-loaded (present, built in, or loadable: unknown), never as missing. Only when
// modules.builtin (lib/modules/RELEASE/modules.builtin, usually not mounted into the
// agent's container) was read can a module be called absent or built in.
package kernelinfo

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
)

// Version is a kernel release's leading major.minor.patch ("6.12.57+deb13-amd64" →
// 6.12.57).
type Version struct{ Major, Minor, Patch int }

func (v Version) String() string { return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Patch) }

// AtLeast reports whether v >= major.minor.
func (v Version) AtLeast(major, minor int) bool {
	return v.Major > major || v.Major == major && v.Minor >= minor
}

// ParseRelease reads the version at the start of a kernel release string (the content
// of /proc/sys/kernel/osrelease, `uname -r`): "6.1.0-41-amd64", "6.12.57+deb13-amd64",
// "6.19.3+bpo-amd64", "6.13-rc1", "7.3". A missing patch level is 0; what follows the
// version (Debian's ABI and flavour, a distribution's suffix) is ignored.
func ParseRelease(s string) (Version, error) {
	s = strings.TrimSpace(s)
	rest := s
	var nums [3]int
	for i := range 3 {
		j := 0
		for j < len(rest) && rest[j] >= '0' && rest[j] <= '9' {
			j++
		}
		if j == 0 || j > 6 {
			if i < 2 {
				return Version{}, fmt.Errorf("kernel release %q: no major.minor version", s)
			}
			break
		}
		nums[i], _ = strconv.Atoi(rest[:j])
		rest = rest[j:]
		if i == 2 || !strings.HasPrefix(rest, ".") {
			if i == 0 {
				return Version{}, fmt.Errorf("kernel release %q: no major.minor version", s)
			}
			break
		}
		rest = rest[1:]
	}
	return Version{nums[0], nums[1], nums[2]}, nil
}

// ParseModules reads /proc/modules ("name size refcount deps state address" per line)
// and returns the names of the modules listed (loaded, or loading/unloading).
func ParseModules(r io.Reader) (map[string]bool, error) {
	out := map[string]bool{}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		out[f[0]] = true
	}
	return out, sc.Err()
}

// ParseBuiltin reads a modules.builtin file ("kernel/net/ipv4/esp4.ko" per line) and
// returns the module names built into the kernel ("-" in a file name is "_" in a module
// name, as in /proc/modules).
func ParseBuiltin(r io.Reader) (map[string]bool, error) {
	out := map[string]bool{}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if l == "" {
			continue
		}
		name := strings.TrimSuffix(path.Base(l), ".ko")
		out[strings.ReplaceAll(name, "-", "_")] = true
	}
	return out, sc.Err()
}

// ModuleState is what is known of one module.
type ModuleState string

const (
	// Loaded: listed in /proc/modules.
	Loaded ModuleState = "loaded"
	// Builtin: not a loaded module, but modules.builtin lists it (always active).
	Builtin ModuleState = "builtin"
	// Absent: neither loaded nor built in (modules.builtin was read). A needed module
	// may still be loadable on demand.
	Absent ModuleState = "absent"
	// NotLoaded: not in /proc/modules, and modules.builtin was not readable: absent,
	// built in or loadable on demand, not known which.
	NotLoaded ModuleState = "not-loaded"
	// Unknown: /proc/modules was not readable.
	Unknown ModuleState = "unknown"
)

// Active reports whether the module's code is in the running kernel (loaded or built in).
func (s ModuleState) Active() bool { return s == Loaded || s == Builtin }

// ESP4Offload is the module whose presence the lab found harmful (see Info.ESP4Offload).
const ESP4Offload = "esp4_offload"

// Modules are the modules reported: ESP4Offload, and those the data path uses (the
// kernel loads them on first use: xfrm_user with the first xfrm netlink socket, esp4 and
// authencesn with the first ESN SA, ipip/ip_tunnel with Calico's tunl0).
var Modules = []string{ESP4Offload, "esp4", "xfrm_user", "authencesn", "ipip", "ip_tunnel"}

// StateOf derives one module's state: loaded (nil: /proc/modules unreadable) and builtin
// (nil: modules.builtin unreadable).
func StateOf(name string, loaded, builtin map[string]bool) ModuleState {
	switch {
	case loaded == nil:
		if builtin != nil && builtin[name] {
			return Builtin
		}
		return Unknown
	case loaded[name]:
		return Loaded
	case builtin == nil:
		return NotLoaded
	case builtin[name]:
		return Builtin
	default:
		return Absent
	}
}

// PerCPUSAsSince is the first kernel with per-CPU SAs (XFRMA_SA_PCPU).
var PerCPUSAsSince = Version{6, 13, 0}

// Info is what the agent reports of its kernel.
type Info struct {
	// Release is the raw release string ("" when unreadable); Version its parsed form,
	// VersionOK false when it did not parse.
	Release   string
	Version   Version
	VersionOK bool
	// PerCPUSAs: the kernel keeps a state's CPU number (XFRMA_SA_PCPU): the agent's probe
	// said so (SetPerCPUProbe; PerCPUProbed), else by release, >= 6.13, which added them —
	// a guess: Debian's 6.12 has them too (docs/dataplane.md §10).
	PerCPUSAs    bool
	PerCPUProbed bool
	// Modules holds the state of each of Modules.
	Modules map[string]ModuleState
	// Problems are the files that could not be read or parsed (one line each).
	Problems []string
}

// SetPerCPUProbe puts the agent's probe of per-CPU SAs (xfrm.Netlink.ProbePerCPUStates)
// in place of the release's guess; a probe that failed leaves the guess and is a problem.
func (i *Info) SetPerCPUProbe(ok bool, err error) {
	if err != nil {
		i.Problems = append(i.Problems, "per-CPU SA probe: "+err.Error())
		return
	}
	i.PerCPUSAs, i.PerCPUProbed = ok, true
}

// ESP4Offload is the state of esp4_offload: with it loaded the lab (QEMU TCG) counted
// XfrmInStateProtoError on 10–20% of ESP packets (docs/performance.md §10).
func (i Info) ESP4Offload() ModuleState { return i.Modules[ESP4Offload] }

// Derive is the pure core of Read: the release string and the parsed module lists (nil:
// not readable).
func Derive(release string, loaded, builtin map[string]bool) Info {
	i := Info{Release: strings.TrimSpace(release), Modules: map[string]ModuleState{}}
	if i.Release != "" {
		v, err := ParseRelease(i.Release)
		if err != nil {
			i.Problems = append(i.Problems, err.Error())
		} else {
			i.Version, i.VersionOK = v, true
			i.PerCPUSAs = v.AtLeast(PerCPUSAsSince.Major, PerCPUSAsSince.Minor)
		}
	}
	for _, m := range Modules {
		i.Modules[m] = StateOf(m, loaded, builtin)
	}
	return i
}

// Read reads root/proc/sys/kernel/osrelease, root/proc/modules and, when present,
// root/lib/modules/RELEASE/modules.builtin, and derives Info. It never fails: what it
// could not read is in Problems (a missing modules.builtin is normal and not named).
func Read(root string) Info {
	var problems []string
	rel, err := os.ReadFile(filepath.Join(root, "proc", "sys", "kernel", "osrelease"))
	if err != nil {
		problems = append(problems, err.Error())
	}
	release := strings.TrimSpace(string(rel))
	loaded, err := parseFile(filepath.Join(root, "proc", "modules"), ParseModules)
	if err != nil {
		problems = append(problems, err.Error())
	}
	var builtin map[string]bool
	if release != "" && !strings.ContainsAny(release, "/\x00") {
		builtin, err = parseFile(filepath.Join(root, "lib", "modules", release, "modules.builtin"), ParseBuiltin)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			problems = append(problems, err.Error())
		}
	}
	i := Derive(release, loaded, builtin)
	i.Problems = append(problems, i.Problems...)
	return i
}

func parseFile(p string, parse func(io.Reader) (map[string]bool, error)) (map[string]bool, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	m, err := parse(f)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", p, err)
	}
	return m, nil
}

// LogAttrs are Info as slog key-value pairs, for the agent's one line at start.
func (i Info) LogAttrs() []any {
	a := []any{"release", i.Release, "perCPUSAs", i.PerCPUSAs, "perCPUSAsProbed", i.PerCPUProbed}
	for _, m := range Modules {
		a = append(a, m, string(i.Modules[m]))
	}
	if len(i.Problems) > 0 {
		a = append(a, "problems", strings.Join(i.Problems, "; "))
	}
	return a
}
