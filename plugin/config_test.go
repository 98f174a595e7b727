package plugin

import (
	"errors"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/secureoverlay/secureoverlay/budget"
	"github.com/secureoverlay/secureoverlay/gate"
)

func TestParseConfigDefaults(t *testing.T) {
	conf, err := ParseConfig([]byte(`{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"secureoverlay"}`))
	if err != nil {
		t.Fatal(err)
	}
	if conf.Mode != ModeClamp || conf.ICVBytes != 8 || conf.ExternalMTU != 0 || conf.LogFile != "" ||
		conf.StateFile != gate.DefaultStateFile || conf.ReadyFile != gate.DefaultReadyFile {
		t.Fatalf("defaults: %+v", conf)
	}
	if conf.Pattern().String() != budget.DefaultInterfacePattern {
		t.Fatalf("default pattern %q", conf.Pattern())
	}
	if conf.PrevResult != nil {
		t.Fatal("prevResult appeared from nowhere")
	}
}

func TestParseConfigAll(t *testing.T) {
	in := `{
	  "cniVersion": "0.4.0", "name": "k8s-pod-network", "type": "secureoverlay",
	  "externalMTU": 9001, "icvBytes": 16, "mode": "clamp", "interfacePattern": "^bond",
	  "logFile": "/var/log/secureoverlay.log", "stateFile": "/var/lib/so/dp.json", "readyFile": "/run/so/ready.json",
	  "capabilities": {"portMappings": true}, "runtimeConfig": {"portMappings": []},
	  "args": {"cni": {"x": 1}}, "ipam": {}, "dns": {}, "cniVersions": ["0.4.0"],
	  "cni.dev/valid-attachments": [], "cni.dev/attachments": [],
	  "prevResult": {"cniVersion": "0.4.0", "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
	                 "ips": [{"version": "4", "address": "198.18.1.2/24", "interface": 0}]}
	}`
	conf, err := ParseConfig([]byte(in))
	if err != nil {
		t.Fatal(err)
	}
	if conf.ExternalMTU != 9001 || conf.ICVBytes != 16 || conf.Mode != ModeClamp ||
		conf.Pattern().String() != "^bond" || conf.LogFile != "/var/log/secureoverlay.log" ||
		conf.StateFile != "/var/lib/so/dp.json" || conf.ReadyFile != "/run/so/ready.json" {
		t.Fatalf("parsed: %+v", conf)
	}
	if conf.PrevResult == nil || conf.PrevResult.Version() != "0.4.0" {
		t.Fatalf("prevResult %v", conf.PrevResult)
	}
}

func TestParseConfigErrors(t *testing.T) {
	const base = `"cniVersion":"1.0.0","name":"n","type":"secureoverlay"`
	cases := []struct {
		in   string
		code uint
		want []string
	}{
		{`{` + base + `,"mtu":1400}`, types.ErrUnsupportedField, []string{`"mtu"`, "1400"}},
		{`{` + base + `,"Mode":"clamp"}`, types.ErrUnsupportedField, []string{`"Mode"`, `"clamp"`}},
		{`{` + base + `,"externalMtu":1500}`, types.ErrUnsupportedField, []string{`"externalMtu"`, "1500"}},
		{`{` + base + `,"icvBytes":10}`, types.ErrInvalidNetworkConfig, []string{"icvBytes", "10"}},
		{`{` + base + `,"icvBytes":0}`, types.ErrInvalidNetworkConfig, []string{"icvBytes", "0"}},
		{`{` + base + `,"icvBytes":"8"}`, types.ErrInvalidNetworkConfig, []string{"icvBytes", `"8"`, "integer"}},
		{`{` + base + `,"icvBytes":8.5}`, types.ErrInvalidNetworkConfig, []string{"icvBytes", "8.5"}},
		{`{` + base + `,"mode":"block"}`, types.ErrInvalidNetworkConfig, []string{"mode", `"block"`, "enforce, clamp or warn"}},
		{`{` + base + `,"mode":1}`, types.ErrInvalidNetworkConfig, []string{"mode", "1", "string"}},
		{`{` + base + `,"externalMTU":575}`, types.ErrInvalidNetworkConfig, []string{"externalMTU", "575"}},
		{`{` + base + `,"externalMTU":65536}`, types.ErrInvalidNetworkConfig, []string{"externalMTU", "65536"}},
		{`{` + base + `,"externalMTU":-1}`, types.ErrInvalidNetworkConfig, []string{"externalMTU", "-1"}},
		{`{` + base + `,"externalMTU":"1500"}`, types.ErrInvalidNetworkConfig, []string{"externalMTU", `"1500"`}},
		{`{` + base + `,"interfacePattern":"^(eth"}`, types.ErrInvalidNetworkConfig, []string{"interfacePattern", `"^(eth"`}},
		{`{` + base + `,"logFile":"relative.log"}`, types.ErrInvalidNetworkConfig, []string{"logFile", "absolute"}},
		{`{` + base + `,"logFile":7}`, types.ErrInvalidNetworkConfig, []string{"logFile", "7"}},
		{`{` + base + `,"stateFile":"dataplane.json"}`, types.ErrInvalidNetworkConfig, []string{"stateFile", "absolute"}},
		{`{` + base + `,"readyFile":"run/ready.json"}`, types.ErrInvalidNetworkConfig, []string{"readyFile", "absolute"}},
		{`{` + base + `,"capabilities":"yes"}`, types.ErrInvalidNetworkConfig, []string{"standard fields"}},
		{`{` + base + `,"prevResult":{"cniVersion":"1.0.0","ips":[{"address":"nonsense"}]}}`, types.ErrDecodingFailure, []string{"prevResult"}},
		{`{`, types.ErrDecodingFailure, []string{"decode"}},
		{`[]`, types.ErrDecodingFailure, []string{"decode"}},
		{`null`, types.ErrDecodingFailure, []string{"not a JSON object"}},
	}
	for _, c := range cases {
		conf, err := ParseConfig([]byte(c.in))
		if err == nil {
			t.Errorf("ParseConfig(%s) = %+v; want error %d", c.in, conf, c.code)
			continue
		}
		var e *types.Error
		if !errors.As(err, &e) || e.Code != c.code {
			t.Errorf("ParseConfig(%s) error %v; want code %d", c.in, err, c.code)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(e.Msg, w) {
				t.Errorf("ParseConfig(%s) message %q lacks %q", c.in, e.Msg, w)
			}
		}
	}
}

func TestParseConfigLongValueShortened(t *testing.T) {
	long := strings.Repeat("x", 500)
	_, err := ParseConfig([]byte(`{"name":"n","cniVersion":"1.0.0","bogus":"` + long + `"}`))
	if err == nil || len(err.Error()) > 200 || !strings.Contains(err.Error(), `"bogus"`) {
		t.Fatalf("error %v", err)
	}
}

// FuzzParseConfig checks that the parser never panics, that every error is a CNI error
// with a config code, and that every accepted config satisfies the package invariants.
func FuzzParseConfig(f *testing.F) {
	seeds := []string{
		`{"cniVersion":"1.0.0","name":"n","type":"secureoverlay"}`,
		`{"cniVersion":"1.1.0","name":"n","type":"secureoverlay","externalMTU":1500,"icvBytes":16,"mode":"clamp"}`,
		`{"cniVersion":"0.3.1","name":"n","type":"secureoverlay","mode":"warn","logFile":"/tmp/x","interfacePattern":"^eth"}`,
		`{"cniVersion":"1.0.0","name":"n","prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/x"}],"ips":[{"address":"198.18.0.2/24","interface":0}]}}`,
		`{"cniVersion":"0.4.0","name":"n","prevResult":{"interfaces":[{"name":"eth0"}],"ips":[{"version":"4","address":"198.18.0.2/24"}]}}`,
		`{"name":"n","externalMTU":1e3}`,
		`{"name":"n","icvBytes":null}`,
		`{"name":"n","externalMTU":null,"mode":""}`,
		`{"name":"n","unknown":{"a":[1,2,3]}}`,
		`{"name":"n","interfacePattern":"(?i)ETH\\d+"}`,
		`{}`, `[]`, `null`, `"x"`, `{"name":1}`,
	}
	for _, s := range seeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		conf, err := ParseConfig(in)
		if err != nil {
			var e *types.Error
			if !errors.As(err, &e) {
				t.Fatalf("error %v is not a *types.Error", err)
			}
			switch e.Code {
			case types.ErrDecodingFailure, types.ErrUnsupportedField, types.ErrInvalidNetworkConfig:
			default:
				t.Fatalf("error code %d for %q", e.Code, in)
			}
			if conf != nil {
				t.Fatal("config returned with an error")
			}
			return
		}
		switch conf.Mode {
		case ModeEnforce, ModeClamp, ModeWarn:
		default:
			t.Fatalf("accepted mode %q", conf.Mode)
		}
		if !budget.ValidICV(conf.ICVBytes) {
			t.Fatalf("accepted icv %d", conf.ICVBytes)
		}
		if conf.ExternalMTU != 0 {
			if _, err := budget.Budget(conf.ExternalMTU, conf.ICVBytes); err != nil {
				t.Fatalf("accepted external mtu %d: %v", conf.ExternalMTU, err)
			}
		}
		if conf.Pattern() == nil {
			t.Fatal("accepted config without a pattern")
		}
	})
}
