package install

import (
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"

	"github.com/secureoverlay/secureoverlay/plugin"
)

// Calico's install-cni output (cniVersion 0.3.1, portmap and bandwidth after calico),
// with the unknown fields Calico writes.
const calico031 = `{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "calico",
      "log_level": "info",
      "log_file_path": "/var/log/calico/cni/cni.log",
      "datastore_type": "kubernetes",
      "nodename": "node-1",
      "mtu": 0,
      "ipam": {
          "type": "calico-ipam"
      },
      "policy": {
          "type": "k8s"
      },
      "kubernetes": {
          "kubeconfig": "/etc/cni/net.d/calico-kubeconfig"
      }
    },
    {
      "type": "portmap",
      "snat": true,
      "capabilities": {"portMappings": true}
    },
    {
      "type": "bandwidth",
      "capabilities": {"bandwidth": true}
    }
  ]
}
`

// cniVersion 1.0.0, calico alone, extra top-level fields.
const calico100Alone = `{
  "name": "k8s-pod-network",
  "cniVersion": "1.0.0",
  "disableCheck": false,
  "x-operator-note": {"managedBy": "tigera-operator", "weird": "a \"quoted\" ] } value"},
  "plugins": [
    {
      "type": "calico",
      "datastore_type": "kubernetes",
      "mtu": 1440,
      "ipam": {"type": "calico-ipam", "assign_ipv4": "true"},
      "container_settings": {"allow_ip_forwarding": false}
    }
  ]
}
`

// cniVersion 1.0.0, tuning after calico, tab indentation.
const calico100Tuning = "{\n\t\"cniVersion\": \"1.0.0\",\n\t\"name\": \"calico\",\n\t\"plugins\": [\n\t\t{\n\t\t\t\"type\": \"calico\",\n\t\t\t\"ipam\": {\"type\": \"calico-ipam\"}\n\t\t},\n\t\t{\n\t\t\t\"type\": \"tuning\",\n\t\t\t\"sysctl\": {\"net.core.somaxconn\": \"500\"}\n\t\t}\n\t]\n}\n"

// A compact one-line list with a plugin before calico.
const compactList = `{"cniVersion":"0.4.0","name":"net","plugins":[{"type":"bridge-pre"},{"type":"calico","ipam":{"type":"calico-ipam"}},{"type":"portmap","capabilities":{"portMappings":true}}]}`

var testEntry = Entry{Mode: "enforce", ICVBytes: 8, ExternalMTU: 1500, LogFile: "/var/log/secureoverlay/cni.log"}

func pluginTypes(t *testing.T, data []byte) []string {
	t.Helper()
	l, err := libcni.ConfListFromBytes(data)
	if err != nil {
		t.Fatalf("libcni cannot parse result: %v\n%s", err, data)
	}
	var out []string
	for _, p := range l.Plugins {
		out = append(out, p.Network.Type)
	}
	return out
}

func decode(t *testing.T, b []byte) any {
	t.Helper()
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatal(err)
	}
	return v
}

func TestInsertEntry(t *testing.T) {
	cases := []struct {
		name, in string
		want     []string
	}{
		{"0.3.1 with portmap and bandwidth", calico031, []string{"calico", PluginType, "portmap", "bandwidth"}},
		{"1.0.0 calico alone", calico100Alone, []string{"calico", PluginType}},
		{"1.0.0 with tuning, tabs", calico100Tuning, []string{"calico", PluginType, "tuning"}},
		{"compact, plugin before calico", compactList, []string{"bridge-pre", "calico", PluginType, "portmap"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			in := []byte(tc.in)
			out, changed, err := InsertEntry(in, testEntry)
			if err != nil || !changed {
				t.Fatalf("InsertEntry: changed=%v err=%v", changed, err)
			}
			if got := pluginTypes(t, out); !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("plugin order %v, want %v\n%s", got, tc.want, out)
			}
			orig, _ := libcni.ConfListFromBytes(in)
			res, _ := libcni.ConfListFromBytes(out)
			if res.Name != orig.Name || res.CNIVersion != orig.CNIVersion {
				t.Fatalf("name/version changed: %q %q -> %q %q", orig.Name, orig.CNIVersion, res.Name, res.CNIVersion)
			}
			// Every other plugin entry is unchanged, unknown fields included.
			j := 0
			for _, p := range res.Plugins {
				if p.Network.Type == PluginType {
					continue
				}
				if !reflect.DeepEqual(decode(t, p.Bytes), decode(t, orig.Plugins[j].Bytes)) {
					t.Fatalf("plugin %d changed:\n%s\nwas\n%s", j, p.Bytes, orig.Plugins[j].Bytes)
				}
				j++
			}
			// Top-level unknown fields kept.
			var a, b map[string]any
			json.Unmarshal(in, &a)
			json.Unmarshal(out, &b)
			delete(a, "plugins")
			delete(b, "plugins")
			if !reflect.DeepEqual(a, b) {
				t.Fatalf("top level changed: %v -> %v", a, b)
			}
			// Our entry carries the configuration and the plugin accepts it as libcni
			// would hand it over (name and cniVersion injected).
			for _, p := range res.Plugins {
				if p.Network.Type != PluginType {
					continue
				}
				if !testEntry.sameConfig(p.Bytes) {
					t.Fatalf("entry config %s", p.Bytes)
				}
				inj, err := libcni.InjectConf(p, map[string]any{"name": res.Name, "cniVersion": res.CNIVersion})
				if err != nil {
					t.Fatal(err)
				}
				c, err := plugin.ParseConfig(inj.Bytes)
				if err != nil {
					t.Fatalf("plugin rejects our entry %s: %v", inj.Bytes, err)
				}
				if c.ExternalMTU != 1500 || c.ICVBytes != 8 || string(c.Mode) != "enforce" || c.LogFile != testEntry.LogFile {
					t.Fatalf("plugin read %+v", c)
				}
			}
			// Idempotent: a second insert changes nothing.
			again, changed, err := InsertEntry(out, testEntry)
			if err != nil || changed || string(again) != string(out) {
				t.Fatalf("second insert: changed=%v err=%v", changed, err)
			}
			// Removing restores the original byte for byte.
			back, n, err := RemoveEntries(out)
			if err != nil || n != 1 {
				t.Fatalf("RemoveEntries: n=%d err=%v", n, err)
			}
			if string(back) != tc.in {
				t.Fatalf("uninstall did not restore the original:\n%s\nwant\n%s", back, tc.in)
			}
		})
	}
}

// The inserted entry follows the file's own layout.
func TestInsertEntryFormatting(t *testing.T) {
	out, _, err := InsertEntry([]byte(calico031), testEntry)
	if err != nil {
		t.Fatal(err)
	}
	want := `    },
    {
      "type": "secureoverlay",
      "mode": "enforce",
      "icvBytes": 8,
      "externalMTU": 1500,
      "logFile": "/var/log/secureoverlay/cni.log"
    },
    {
      "type": "portmap",`
	if !strings.Contains(string(out), want) {
		t.Fatalf("entry not laid out like its neighbours:\n%s", out)
	}
	out, _, err = InsertEntry([]byte(calico100Tuning), testEntry)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), "\t\t},\n\t\t{\n\t\t\t\"type\": \"secureoverlay\",\n") {
		t.Fatalf("tab layout not followed:\n%s", out)
	}
	out, _, err = InsertEntry([]byte(compactList), testEntry)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(out), "\n") {
		t.Fatalf("compact file got newlines:\n%s", out)
	}
}

func TestStaleEntries(t *testing.T) {
	withEntry, _, err := InsertEntry([]byte(calico031), testEntry)
	if err != nil {
		t.Fatal(err)
	}
	t.Run("old config in the right place is replaced", func(t *testing.T) {
		e := testEntry
		e.ICVBytes = 16
		out, changed, err := InsertEntry(withEntry, e)
		if err != nil || !changed {
			t.Fatalf("changed=%v err=%v", changed, err)
		}
		if got := pluginTypes(t, out); !reflect.DeepEqual(got, []string{"calico", PluginType, "portmap", "bandwidth"}) {
			t.Fatalf("order %v", got)
		}
		if ok, _ := InEntry(out, e); !ok {
			t.Fatal("new config not in place")
		}
		back, _, _ := RemoveEntries(out)
		if string(back) != calico031 {
			t.Fatalf("not restorable:\n%s", back)
		}
	})
	t.Run("entries in the wrong place, twice", func(t *testing.T) {
		stale := strings.Replace(calico031, `"type": "bandwidth",`, `"type": "bandwidth", "x": 1`+"\n    },\n    {\"type\": \"secureoverlay\", \"icvBytes\": 12},\n    {\"type\": \"bandwidth\",", 1)
		stale = strings.Replace(stale, `"plugins": [`, `"plugins": [{"type":"secureoverlay","mode":"warn"},`, 1)
		if got := pluginTypes(t, []byte(stale)); !reflect.DeepEqual(got, []string{PluginType, "calico", "portmap", "bandwidth", PluginType, "bandwidth"}) {
			t.Fatalf("fixture order %v", got)
		}
		out, changed, err := InsertEntry([]byte(stale), testEntry)
		if err != nil || !changed {
			t.Fatalf("changed=%v err=%v", changed, err)
		}
		if got := pluginTypes(t, out); !reflect.DeepEqual(got, []string{"calico", PluginType, "portmap", "bandwidth", "bandwidth"}) {
			t.Fatalf("order %v\n%s", got, out)
		}
	})
}

func TestNoCalico(t *testing.T) {
	_, _, err := InsertEntry([]byte(`{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"bridge"}]}`), testEntry)
	if !errors.Is(err, ErrNoCalico) {
		t.Fatalf("err = %v, want ErrNoCalico", err)
	}
	for _, bad := range []string{``, `{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"calico"}`, `{"name":"x","plugins":[]}`, `{"plugins":[{"type":"calico"}]}`} {
		if _, _, err := InsertEntry([]byte(bad), testEntry); err == nil {
			t.Fatalf("InsertEntry(%q) succeeded", bad)
		}
	}
}

const calicoConf = `{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "type": "calico",
  "log_level": "info",
  "datastore_type": "kubernetes",
  "mtu": 1440,
  "ipam": {"type": "calico-ipam"},
  "policy": {"type": "k8s"}
}
`

func TestConvertAndRestoreConf(t *testing.T) {
	out, err := ConvertConf([]byte(calicoConf), "10-calico.conf", testEntry)
	if err != nil {
		t.Fatal(err)
	}
	l, err := libcni.ConfListFromBytes(out)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if l.Name != "k8s-pod-network" || l.CNIVersion != "0.3.1" {
		t.Fatalf("name/version %q %q", l.Name, l.CNIVersion)
	}
	if got := pluginTypes(t, out); !reflect.DeepEqual(got, []string{"calico", PluginType}) {
		t.Fatalf("order %v", got)
	}
	orig, _ := libcni.ConfFromBytes([]byte(calicoConf))
	if !reflect.DeepEqual(decode(t, l.Plugins[0].Bytes), decode(t, orig.Bytes)) {
		t.Fatal("calico config changed by conversion")
	}
	if ok, _ := InEntry(out, testEntry); !ok {
		t.Fatal("entry not in place")
	}
	stripped, _, err := RemoveEntries(out)
	if err != nil {
		t.Fatal(err)
	}
	name, conf, ok := RestoreConf(stripped)
	if !ok || name != "10-calico.conf" || string(conf) != calicoConf {
		t.Fatalf("restore: ok=%v name=%q\n%s", ok, name, conf)
	}
	if _, _, ok := RestoreConf([]byte(calico100Alone)); ok {
		t.Fatal("a list we did not convert was taken for a converted one")
	}
	if _, err := ConvertConf([]byte(`{"name":"x","type":"bridge"}`), "x.conf", testEntry); err == nil {
		t.Fatal("converted a non-calico conf")
	}
}

func TestEntryValidate(t *testing.T) {
	good := []Entry{testEntry, {Mode: "clamp", ICVBytes: 16}, {Mode: "warn", ICVBytes: 12, InterfacePattern: "^eth0$"}}
	for _, e := range good {
		if err := e.Validate(); err != nil {
			t.Errorf("%+v: %v", e, err)
		}
	}
	bad := []Entry{
		{Mode: "validate", ICVBytes: 8},
		{Mode: "enforce", ICVBytes: 10},
		{Mode: "enforce", ICVBytes: 8, ExternalMTU: 100},
		{Mode: "enforce", ICVBytes: 8, InterfacePattern: "("},
		{Mode: "enforce", ICVBytes: 8, LogFile: "relative.log"},
	}
	for _, e := range bad {
		if err := e.Validate(); err == nil {
			t.Errorf("%+v accepted", e)
		}
	}
}

func TestScannerSpans(t *testing.T) {
	doc := []byte(` { "a" : [1, "x\"]", {"b":[]} ] , "c":null, "d\u0041":true } `)
	m, err := objectMembers(doc, 1)
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, x := range m {
		keys = append(keys, x.key+"="+string(doc[x.val.start:x.val.end]))
	}
	want := []string{`a=[1, "x\"]", {"b":[]} ]`, "c=null", "dA=true"}
	if !reflect.DeepEqual(keys, want) {
		t.Fatalf("members %q, want %q", keys, want)
	}
	el, err := arrayElems(doc, m[0].val.start)
	if err != nil || len(el) != 3 || string(doc[el[1].start:el[1].end]) != `"x\"]"` {
		t.Fatalf("elems %v %v", el, err)
	}
	for _, bad := range []string{`{"a" 1}`, `{"a":1,}`, `{"a":"x`, `[1 2]`} {
		if _, err := objectMembers([]byte(bad), 0); err == nil {
			if _, err := arrayElems([]byte(bad), 0); err == nil {
				t.Errorf("%q scanned without error", bad)
			}
		}
	}
}

// FuzzSplice: for any conflist libcni accepts, inserting our entry yields a conflist libcni
// accepts with the entry right after calico and everything else unchanged, and removing
// it gives back exactly the input without our old entries.
func FuzzSplice(f *testing.F) {
	for _, s := range []string{calico031, calico100Alone, calico100Tuning, compactList,
		`{"name":"n","plugins":[{"type":"calico"},{"type":"secureoverlay"}]}`,
		`{"name":"n","plugins":[ {"type":"secureoverlay"} , {"type":"calico","a":"]}\"["} ]}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		if _, err := libcni.ConfListFromBytes(in); err != nil {
			return
		}
		out, _, err := InsertEntry(in, testEntry)
		if err != nil {
			return // no calico, or only our entries: refused, fine
		}
		if ok, err := InEntry(out, testEntry); !ok || err != nil {
			t.Fatalf("entry not in place after insert: %v\n%s", err, out)
		}
		base, _, err := RemoveEntries(in)
		if err != nil {
			t.Fatalf("input could be inserted into but not stripped: %v", err)
		}
		back, n, err := RemoveEntries(out)
		if err != nil || n != 1 {
			t.Fatalf("remove after insert: n=%d err=%v", n, err)
		}
		if string(back) != string(base) {
			t.Fatalf("remove(insert(x)) != remove(x):\n%s\n---\n%s", back, base)
		}
		a, _ := libcni.ConfListFromBytes(out)
		b, _ := libcni.ConfListFromBytes(in)
		if a.Name != b.Name || a.CNIVersion != b.CNIVersion {
			t.Fatalf("name/version changed")
		}
	})
}

// TestDefaultPluginModeIsClamp: the installer writes the plugin's own default mode,
// clamp, when --mode is not given (enforce refused every new pod of a default Calico
// cluster: docs/mtu.md).
func TestDefaultPluginModeIsClamp(t *testing.T) {
	if PluginModes[0] != "clamp" || plugin.DefaultMode != plugin.ModeClamp {
		t.Fatalf("default plugin mode %q (plugin.DefaultMode %q), want clamp", PluginModes[0], plugin.DefaultMode)
	}
	for _, m := range []plugin.Mode{plugin.ModeClamp, plugin.ModeEnforce, plugin.ModeWarn} {
		found := false
		for _, p := range PluginModes {
			found = found || p == string(m)
		}
		if !found {
			t.Errorf("PluginModes %v lacks %q", PluginModes, m)
		}
	}
}
