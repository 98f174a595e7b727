package plugin

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/secureoverlay/secureoverlay/budget"
	"github.com/secureoverlay/secureoverlay/gate"
)

// Mode says what the plugin does with a pod whose MTU exceeds the budget.
type Mode string

// The modes.
const (
	// ModeEnforce fails the ADD (and CHECK) with ErrMTUOverBudget. Opt-in: on a default
	// Calico install (pod MTU 1480, budget 1452) it refuses every new pod.
	ModeEnforce Mode = "enforce"
	// ModeClamp lowers the pod interface MTU (and route MTUs above it, and the host end of
	// the pod's veth) to the budget. The default: installing secureoverlay must never stop
	// a working cluster from starting pods.
	ModeClamp Mode = "clamp"
	// ModeWarn only logs.
	ModeWarn Mode = "warn"
)

// DefaultMode is the mode of an entry without "mode" (or with ""): clamp, so that a pod
// whose MTU Calico set above the budget starts at the budget instead of being refused
// (docs/mtu.md, "Installing on a default Calico cluster").
const DefaultMode = ModeClamp

// Config is the plugin's network configuration: the standard CNI keys plus ours.
type Config struct {
	types.PluginConf

	// ExternalMTU is the node's external MTU; 0 means detect it on the host.
	ExternalMTU int `json:"externalMTU,omitempty"`
	// ICVBytes is the AES-GCM ICV length: 8 (default), 12 or 16.
	ICVBytes int `json:"icvBytes,omitempty"`
	// Mode is clamp (default), enforce or warn.
	Mode Mode `json:"mode,omitempty"`
	// InterfacePattern selects the external interfaces for detection; empty means
	// budget.DefaultInterfacePattern (Calico's).
	InterfacePattern string `json:"interfacePattern,omitempty"`
	// LogFile, if set, is an absolute path the plugin appends its log lines to;
	// otherwise warnings go to stderr (which the runtime captures).
	LogFile string `json:"logFile,omitempty"`
	// StateFile and ReadyFile are the boot gate's files (package gate); empty means
	// gate.DefaultStateFile and gate.DefaultReadyFile, where the manifest's agent writes
	// them.
	StateFile string `json:"stateFile,omitempty"`
	ReadyFile string `json:"readyFile,omitempty"`

	pattern *regexp.Regexp
}

// Pattern returns the compiled interface pattern.
func (c *Config) Pattern() *regexp.Regexp { return c.pattern }

// standardKeys are the keys the CNI spec and libcni put into a plugin's configuration.
// They are accepted and parsed by types.PluginConf (or ignored: they belong to the
// runtime). Keys with the runtime-reserved prefix "cni.dev/" are accepted too.
var standardKeys = map[string]bool{
	"cniVersion":    true,
	"cniVersions":   true,
	"name":          true,
	"type":          true,
	"prevResult":    true,
	"runtimeConfig": true,
	"capabilities":  true,
	"args":          true,
	"ipam":          true,
	"dns":           true,
	"disableCheck":  true,
	"disableGC":     true,
}

// maxValueInMessage bounds how much of an offending value an error message repeats.
const maxValueInMessage = 64

// ParseConfig parses and validates the configuration the runtime passes on stdin,
// including prevResult (parsed at the configuration's cniVersion). Errors are
// *types.Error: ErrDecodingFailure (6) for malformed JSON, ErrUnsupportedField (2) for a
// key this plugin does not know (naming key and value), ErrInvalidNetworkConfig (7) for a
// value of the wrong type or outside its range.
func ParseConfig(stdin []byte) (*Config, error) {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(stdin, &raw); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("decode secureoverlay config: %v", err), "")
	}
	if raw == nil {
		return nil, types.NewError(types.ErrDecodingFailure, "decode secureoverlay config: not a JSON object", "")
	}

	conf := &Config{}
	keys := make([]string, 0, len(raw))
	for k := range raw {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		v := raw[k]
		var err error
		switch {
		case k == "externalMTU":
			err = decodeInt(k, v, &conf.ExternalMTU)
		case k == "icvBytes":
			err = decodeInt(k, v, &conf.ICVBytes)
			if err == nil && conf.ICVBytes == 0 {
				err = invalid(k, v, "must be 8, 12 or 16")
			}
		case k == "mode":
			var s string
			err = decodeString(k, v, &s)
			conf.Mode = Mode(s)
		case k == "interfacePattern":
			err = decodeString(k, v, &conf.InterfacePattern)
		case k == "logFile":
			err = decodeString(k, v, &conf.LogFile)
		case k == "stateFile":
			err = decodeString(k, v, &conf.StateFile)
		case k == "readyFile":
			err = decodeString(k, v, &conf.ReadyFile)
		case standardKeys[k] || strings.HasPrefix(k, "cni.dev/"):
		default:
			return nil, types.NewError(types.ErrUnsupportedField,
				fmt.Sprintf("secureoverlay config: unsupported field %q (value %s)", k, shorten(v)), "")
		}
		if err != nil {
			return nil, err
		}
	}

	if err := json.Unmarshal(stdin, &conf.PluginConf); err != nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("secureoverlay config: standard fields: %v", err), "")
	}
	if conf.RawPrevResult != nil {
		if err := version.ParsePrevResult(&conf.PluginConf); err != nil {
			return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("secureoverlay config: prevResult: %v", err), "")
		}
	}

	if conf.Mode == "" {
		conf.Mode = DefaultMode
	}
	switch conf.Mode {
	case ModeEnforce, ModeClamp, ModeWarn:
	default:
		return nil, invalid("mode", raw["mode"], "must be enforce, clamp or warn")
	}
	if _, ok := raw["icvBytes"]; !ok {
		conf.ICVBytes = budget.DefaultICV
	}
	if !budget.ValidICV(conf.ICVBytes) {
		return nil, invalid("icvBytes", raw["icvBytes"], "must be 8, 12 or 16")
	}
	if conf.ExternalMTU != 0 && (conf.ExternalMTU < budget.MinExternalMTU || conf.ExternalMTU > budget.MaxExternalMTU) {
		return nil, invalid("externalMTU", raw["externalMTU"],
			fmt.Sprintf("must be 0 (detect) or in [%d, %d]", budget.MinExternalMTU, budget.MaxExternalMTU))
	}
	re, err := budget.CompilePattern(conf.InterfacePattern)
	if err != nil {
		return nil, invalid("interfacePattern", raw["interfacePattern"], "not a valid regular expression: "+err.Error())
	}
	conf.pattern = re
	for _, f := range []struct {
		key  string
		path *string
		def  string
	}{{"logFile", &conf.LogFile, ""}, {"stateFile", &conf.StateFile, gate.DefaultStateFile}, {"readyFile", &conf.ReadyFile, gate.DefaultReadyFile}} {
		if *f.path == "" {
			*f.path = f.def
			continue
		}
		if !filepath.IsAbs(*f.path) || strings.ContainsRune(*f.path, 0) {
			return nil, invalid(f.key, raw[f.key], "must be an absolute path")
		}
	}
	return conf, nil
}

func decodeInt(key string, v json.RawMessage, dst *int) error {
	if err := json.Unmarshal(v, dst); err != nil {
		return invalid(key, v, "must be an integer")
	}
	return nil
}

func decodeString(key string, v json.RawMessage, dst *string) error {
	if err := json.Unmarshal(v, dst); err != nil {
		return invalid(key, v, "must be a string")
	}
	return nil
}

func invalid(key string, v json.RawMessage, why string) error {
	return types.NewError(types.ErrInvalidNetworkConfig,
		fmt.Sprintf("secureoverlay config: invalid %s %s: %s", key, shorten(v), why), "")
}

// shorten renders a raw JSON value for an error message, bounded in length.
func shorten(v json.RawMessage) string {
	s := strings.Join(strings.Fields(string(v)), " ")
	if len(s) > maxValueInMessage {
		s = strings.ToValidUTF8(s[:maxValueInMessage], "") + "…"
	}
	return s
}
