package kernelinfo

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestParseRelease(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Version
		pcpu bool
		err  bool
	}{
		{in: "6.1.0-41-amd64", want: Version{6, 1, 0}},                // bookworm
		{in: "6.12.57+deb13-amd64", want: Version{6, 12, 57}},         // trixie
		{in: "6.19.3+bpo-amd64", want: Version{6, 19, 3}, pcpu: true}, // trixie-backports
		{in: "6.12.57+deb13-cloud-arm64\n", want: Version{6, 12, 57}},
		{in: "6.13.0", want: Version{6, 13, 0}, pcpu: true},
		{in: "6.13-rc1", want: Version{6, 13, 0}, pcpu: true},
		{in: "7.3", want: Version{7, 3, 0}, pcpu: true},
		{in: "6.18.44-fc-v1272", want: Version{6, 18, 44}, pcpu: true},
		{in: "5.15.0-1034-azure", want: Version{5, 15, 0}},
		{in: "4.18.0-553.el8_10.x86_64", want: Version{4, 18, 0}},
		{in: "6.12", want: Version{6, 12, 0}},
		{in: "6.1.", want: Version{6, 1, 0}},
		{in: "10.0.1", want: Version{10, 0, 1}, pcpu: true},
		{in: "", err: true},
		{in: "6", err: true},
		{in: "6.", err: true},
		{in: "v6.1.0", err: true},
		{in: "linux", err: true},
		{in: "99999999.1", err: true},
	} {
		got, err := ParseRelease(tc.in)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("ParseRelease(%q) = %v, %v; want %v, error %v", tc.in, got, err, tc.want, tc.err)
		}
		if err == nil && got.AtLeast(6, 13) != tc.pcpu {
			t.Errorf("ParseRelease(%q).AtLeast(6, 13) = %v, want %v", tc.in, got.AtLeast(6, 13), tc.pcpu)
		}
	}
}

const procModules = `esp4_offload 16384 0 - Live 0x0000000000000000
esp4 28672 4 esp4_offload, Live 0x0000000000000000
xfrm_user 57344 2 - Live 0x0000000000000000
xfrm_algo 16384 1 xfrm_user, Live 0x0000000000000000
ipip 20480 0 - Live 0x0000000000000000
ip_tunnel 36864 1 ipip, Live 0x0000000000000000

tunnel4 12288 1 ipip, Unloading 0x0000000000000000
`

func TestParseModules(t *testing.T) {
	got, err := ParseModules(strings.NewReader(procModules))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]bool{"esp4_offload": true, "esp4": true, "xfrm_user": true, "xfrm_algo": true, "ipip": true, "ip_tunnel": true, "tunnel4": true}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("ParseModules = %v, want %v", got, want)
	}
	got, err = ParseBuiltin(strings.NewReader("kernel/net/ipv4/esp4.ko\nkernel/crypto/authencesn.ko\n\nkernel/net/xfrm/xfrm-user.ko\n"))
	if err != nil {
		t.Fatal(err)
	}
	want = map[string]bool{"esp4": true, "authencesn": true, "xfrm_user": true}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("ParseBuiltin = %v, want %v", got, want)
	}
}

func TestStateOf(t *testing.T) {
	loaded := map[string]bool{"esp4": true}
	builtin := map[string]bool{"xfrm_user": true}
	for _, tc := range []struct {
		name            string
		loaded, builtin map[string]bool
		want            ModuleState
	}{
		{"esp4", loaded, nil, Loaded},
		{"esp4", loaded, builtin, Loaded},
		// Built-in modules never appear in /proc/modules: without modules.builtin, a
		// module not listed is not-loaded, never absent.
		{"xfrm_user", loaded, nil, NotLoaded},
		{"xfrm_user", loaded, builtin, Builtin},
		{"esp4_offload", loaded, builtin, Absent},
		{"esp4_offload", loaded, nil, NotLoaded},
		{"esp4_offload", map[string]bool{}, nil, NotLoaded},
		{"esp4", nil, nil, Unknown},
		{"xfrm_user", nil, builtin, Builtin},
		{"esp4", nil, builtin, Unknown},
	} {
		if got := StateOf(tc.name, tc.loaded, tc.builtin); got != tc.want {
			t.Errorf("StateOf(%s, %v, %v) = %s, want %s", tc.name, tc.loaded, tc.builtin, got, tc.want)
		}
	}
	for s, active := range map[ModuleState]bool{Loaded: true, Builtin: true, Absent: false, NotLoaded: false, Unknown: false} {
		if s.Active() != active {
			t.Errorf("%s.Active() = %v", s, !active)
		}
	}
}

func TestDerive(t *testing.T) {
	mods, _ := ParseModules(strings.NewReader(procModules))
	for _, tc := range []struct {
		name     string
		release  string
		loaded   map[string]bool
		builtin  map[string]bool
		pcpu     bool
		offload  ModuleState
		esp4     ModuleState
		problems int
	}{
		{name: "bookworm with esp4_offload", release: "6.1.0-41-amd64\n", loaded: mods, offload: Loaded, esp4: Loaded},
		{name: "trixie, nothing loaded yet", release: "6.12.57+deb13-amd64", loaded: map[string]bool{}, offload: NotLoaded, esp4: NotLoaded},
		{name: "backports with modules.builtin", release: "6.19.3+bpo-amd64", loaded: map[string]bool{}, builtin: map[string]bool{"esp4": true},
			pcpu: true, offload: Absent, esp4: Builtin},
		{name: "esp4_offload built in", release: "6.19.3+bpo-amd64", loaded: map[string]bool{}, builtin: map[string]bool{"esp4_offload": true},
			pcpu: true, offload: Builtin, esp4: Absent},
		{name: "no /proc/modules", release: "6.13.2", pcpu: true, offload: Unknown, esp4: Unknown},
		{name: "release unparsable", release: "custom", loaded: mods, offload: Loaded, esp4: Loaded, problems: 1},
		{name: "release unreadable", release: "", loaded: mods, offload: Loaded, esp4: Loaded},
	} {
		t.Run(tc.name, func(t *testing.T) {
			i := Derive(tc.release, tc.loaded, tc.builtin)
			if i.PerCPUSAs != tc.pcpu || i.ESP4Offload() != tc.offload || i.Modules["esp4"] != tc.esp4 || len(i.Problems) != tc.problems {
				t.Errorf("Derive = %+v; want pcpu %v, esp4_offload %s, esp4 %s, %d problems", i, tc.pcpu, tc.offload, tc.esp4, tc.problems)
			}
			if i.Release != strings.TrimSpace(tc.release) || len(i.Modules) != len(Modules) {
				t.Errorf("Derive = %+v", i)
			}
			if len(i.LogAttrs()) < 2*(2+len(Modules)) {
				t.Errorf("LogAttrs = %v", i.LogAttrs())
			}
		})
	}
}

func write(t *testing.T, root, rel, content string) {
	t.Helper()
	p := filepath.Join(root, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestRead: the shell reads the files under an injected root.
func TestRead(t *testing.T) {
	t.Run("node with esp4_offload, no modules.builtin", func(t *testing.T) {
		root := t.TempDir()
		write(t, root, "proc/sys/kernel/osrelease", "6.1.0-41-amd64\n")
		write(t, root, "proc/modules", procModules)
		i := Read(root)
		if i.Release != "6.1.0-41-amd64" || !i.VersionOK || i.PerCPUSAs || i.ESP4Offload() != Loaded ||
			i.Modules["authencesn"] != NotLoaded || len(i.Problems) != 0 {
			t.Errorf("Read = %+v", i)
		}
	})
	t.Run("with modules.builtin", func(t *testing.T) {
		root := t.TempDir()
		write(t, root, "proc/sys/kernel/osrelease", "6.19.3+bpo-amd64\n")
		write(t, root, "proc/modules", "xfrm_user 57344 2 - Live 0x0\n")
		write(t, root, "lib/modules/6.19.3+bpo-amd64/modules.builtin", "kernel/crypto/authencesn.ko\n")
		i := Read(root)
		if !i.PerCPUSAs || i.ESP4Offload() != Absent || i.Modules["authencesn"] != Builtin || i.Modules["xfrm_user"] != Loaded ||
			i.Modules["esp4"] != Absent || len(i.Problems) != 0 {
			t.Errorf("Read = %+v", i)
		}
	})
	t.Run("nothing readable", func(t *testing.T) {
		i := Read(t.TempDir())
		if i.Release != "" || i.VersionOK || i.PerCPUSAs || i.ESP4Offload() != Unknown || len(i.Problems) != 2 {
			t.Errorf("Read = %+v", i)
		}
	})
	t.Run("a release that is not a file name", func(t *testing.T) {
		root := t.TempDir()
		write(t, root, "proc/sys/kernel/osrelease", "../../etc\n")
		write(t, root, "proc/modules", "")
		if i := Read(root); i.VersionOK || i.ESP4Offload() != NotLoaded || len(i.Problems) != 1 {
			t.Errorf("Read = %+v", i)
		}
	})
}

// SetPerCPUProbe: the probe's answer replaces the release's guess either way; a failed
// probe keeps the guess and says why.
func TestSetPerCPUProbe(t *testing.T) {
	i := Derive("6.12.117+deb13-amd64", nil, nil)
	if i.PerCPUSAs || i.PerCPUProbed {
		t.Fatalf("6.12 by release: %+v", i)
	}
	i.SetPerCPUProbe(true, nil)
	if !i.PerCPUSAs || !i.PerCPUProbed {
		t.Fatalf("probed true: %+v", i)
	}
	j := Derive("6.18.5", nil, nil)
	j.SetPerCPUProbe(false, nil)
	if j.PerCPUSAs || !j.PerCPUProbed {
		t.Fatalf("6.18 probed false: %+v", j)
	}
	k := Derive("6.18.5", nil, nil)
	k.SetPerCPUProbe(false, errors.New("netlink: operation not permitted"))
	if !k.PerCPUSAs || k.PerCPUProbed || len(k.Problems) != 1 || !strings.Contains(k.Problems[0], "per-CPU SA probe") {
		t.Fatalf("probe failed: %+v", k)
	}
}
