package install

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"

	"github.com/containernetworking/cni/libcni"
)

const (
	// PluginType is our conflist entry's "type" and so the name of the plugin binary in
	// the CNI bin dir.
	PluginType = "secureoverlay"
	// CalicoType is the "type" of the entry we insert after.
	CalicoType = "calico"
	// ConvertedFromKey is a top-level key we add to a conflist we created from a plain
	// .conf primary; its value is the .conf file's base name, so that uninstall can
	// restore it. libcni ignores unknown top-level keys and never passes them to plugins.
	ConvertedFromKey = "secureoverlayConvertedFrom"
)

// PluginModes are the plugin's modes (plugin.Mode*); the first is its default.
var PluginModes = []string{"clamp", "enforce", "warn"}

// ErrNoCalico means a conflist has no entry of type calico.
var ErrNoCalico = errors.New("no plugin of type " + CalicoType)

// ErrOnlyOurs means a conflist holds nothing but our entry; removing it would leave a
// list without plugins, so it is left for an operator.
var ErrOnlyOurs = errors.New("conflist has only our entry; refusing to leave it without plugins")

// Entry is the configuration the installer writes into our conflist entry; the plugin
// reads it at ADD time. The JSON field names are the plugin's configuration keys.
type Entry struct {
	// Mode is what the plugin does with a pod over budget: one of PluginModes.
	Mode string `json:"mode,omitempty"`
	// ICVBytes is the AES-GCM ICV length the budget is computed for.
	ICVBytes int `json:"icvBytes"`
	// ExternalMTU is the node's external MTU; 0 makes the plugin detect it at ADD time.
	ExternalMTU int `json:"externalMTU"`
	// InterfacePattern overrides the external-interface regexp used for detection.
	InterfacePattern string `json:"interfacePattern,omitempty"`
	// LogFile, when set, is where the plugin appends its log.
	LogFile string `json:"logFile,omitempty"`
	// StateFile and ReadyFile, when set, move the boot gate's files (package gate) from
	// their defaults: for agents started with other --state-file / --ledger-dir values.
	StateFile string `json:"stateFile,omitempty"`
	ReadyFile string `json:"readyFile,omitempty"`
}

// wire is Entry with the type first, so a written entry reads naturally.
type wire struct {
	Type string `json:"type"`
	Entry
}

// marshal encodes e as one plugin entry. An empty indent yields the compact form.
func (e Entry) marshal(prefix, indent string) ([]byte, error) {
	w := wire{Type: PluginType, Entry: e}
	if indent == "" {
		return json.Marshal(w)
	}
	return json.MarshalIndent(w, prefix, indent)
}

// sameConfig reports whether the raw entry raw has exactly the configuration of e.
func (e Entry) sameConfig(raw []byte) bool {
	want, err := e.marshal("", "")
	if err != nil {
		return false
	}
	var a, b map[string]any
	if json.Unmarshal(raw, &a) != nil || json.Unmarshal(want, &b) != nil {
		return false
	}
	return reflect.DeepEqual(a, b)
}

// listDoc is a parsed conflist: its bytes and the spans the installer edits.
type listDoc struct {
	data    []byte
	top     []member
	plugins span   // the "plugins" array value
	elems   []span // its elements
	types   []string
}

// parseList validates data as a conflist with libcni and locates its plugin entries.
func parseList(data []byte) (*listDoc, error) {
	if _, err := libcni.ConfListFromBytes(data); err != nil {
		return nil, err
	}
	start := skipSpace(data, 0)
	top, err := objectMembers(data, start)
	if err != nil {
		return nil, err
	}
	d := &listDoc{data: data, top: top}
	found := false
	for _, m := range top {
		if m.key == "plugins" { // encoding/json (and so libcni) uses the last duplicate
			d.plugins, found = m.val, true
		}
	}
	if !found {
		return nil, errors.New("conflist has no plugins")
	}
	if d.elems, err = arrayElems(data, d.plugins.start); err != nil {
		return nil, err
	}
	for i, el := range d.elems {
		var t struct {
			Type string `json:"type"`
		}
		if err := json.Unmarshal(data[el.start:el.end], &t); err != nil {
			return nil, fmt.Errorf("plugin %d: %w", i, err)
		}
		d.types = append(d.types, t.Type)
	}
	return d, nil
}

func (d *listDoc) index(typ string) int {
	for i, t := range d.types {
		if t == typ {
			return i
		}
	}
	return -1
}

func (d *listDoc) count(typ string) int {
	n := 0
	for _, t := range d.types {
		if t == typ {
			n++
		}
	}
	return n
}

func (d *listDoc) topString(key string) (string, bool) {
	v, ok := "", false
	for _, m := range d.top {
		if m.key == key {
			ok = json.Unmarshal(d.data[m.val.start:m.val.end], &v) == nil
		}
	}
	return v, ok
}

// ListHasCalico reports whether data is a valid conflist with a calico entry.
func ListHasCalico(data []byte) (bool, error) {
	d, err := parseList(data)
	if err != nil {
		return false, err
	}
	return d.index(CalicoType) >= 0, nil
}

// ConfIsCalico reports whether data is a valid single-plugin .conf of type calico.
func ConfIsCalico(data []byte) (bool, error) {
	c, err := libcni.ConfFromBytes(data)
	if err != nil {
		return false, err
	}
	return c.Network.Type == CalicoType, nil
}

// InEntry reports whether data is a conflist whose only entry of ours sits right after
// the first calico entry and carries exactly e's configuration.
func InEntry(data []byte, e Entry) (bool, error) {
	d, err := parseList(data)
	if err != nil {
		return false, err
	}
	c := d.index(CalicoType)
	if c < 0 {
		return false, ErrNoCalico
	}
	if d.count(PluginType) != 1 || c+1 >= len(d.elems) || d.types[c+1] != PluginType {
		return false, nil
	}
	el := d.elems[c+1]
	return e.sameConfig(data[el.start:el.end]), nil
}

// RemoveEntries deletes every entry of ours from the conflist data, together with the
// separator written before it, and reports how many it removed. Every other byte is kept.
func RemoveEntries(data []byte) ([]byte, int, error) {
	removed := 0
	for {
		d, err := parseList(data)
		if err != nil {
			return nil, removed, err
		}
		i := -1
		for j := len(d.types) - 1; j >= 0; j-- {
			if d.types[j] == PluginType {
				i = j
				break
			}
		}
		if i < 0 {
			return data, removed, nil
		}
		if len(d.elems) == 1 {
			return nil, removed, ErrOnlyOurs
		}
		var from, to int
		if i > 0 {
			from, to = d.elems[i-1].end, d.elems[i].end
		} else {
			from, to = d.elems[0].start, d.elems[1].start
		}
		out := make([]byte, 0, len(data)-(to-from))
		out = append(out, data[:from]...)
		out = append(out, data[to:]...)
		data = out
		removed++
	}
}

// InsertEntry returns data with our entry right after the first calico entry: stale
// entries of ours are removed first, then the entry is spliced in using the separator and
// indentation of the surrounding entries. changed is false (and data returned unchanged)
// when the entry is already in place with e's configuration. The network name and every
// byte outside the entry are preserved, so RemoveEntries undoes InsertEntry exactly.
func InsertEntry(data []byte, e Entry) (out []byte, changed bool, err error) {
	ok, err := InEntry(data, e)
	if err != nil {
		return nil, false, err
	}
	if ok {
		return data, false, nil
	}
	data, _, err = RemoveEntries(data)
	if err != nil {
		return nil, false, err
	}
	d, err := parseList(data)
	if err != nil {
		return nil, false, err
	}
	c := d.index(CalicoType)
	if c < 0 {
		return nil, false, ErrNoCalico
	}
	calico := d.elems[c]
	var sep []byte
	switch {
	case c+1 < len(d.elems):
		sep = data[calico.end:d.elems[c+1].start]
	case c > 0:
		sep = data[d.elems[c-1].end:calico.start]
	default:
		sep = append([]byte{','}, data[d.plugins.start+1:calico.start]...)
	}
	prefix, indent := "", ""
	if nl := bytes.LastIndexByte(sep, '\n'); nl >= 0 {
		prefix = string(sep[nl+1:])
		indent = indentUnit(data[calico.start:calico.end], prefix)
	}
	entry, err := e.marshal(prefix, indent)
	if err != nil {
		return nil, false, err
	}
	out = make([]byte, 0, len(data)+len(sep)+len(entry))
	out = append(out, data[:calico.end]...)
	out = append(out, sep...)
	out = append(out, entry...)
	out = append(out, data[calico.end:]...)
	// Never write what we cannot read back the way we meant it.
	if ok, err := InEntry(out, e); err != nil || !ok {
		return nil, false, fmt.Errorf("spliced conflist does not verify (ok=%v): %w", ok, err)
	}
	return out, true, nil
}

// indentUnit guesses the indentation step used inside an entry whose first line is
// indented by prefix: the leading white space of its second line minus prefix.
func indentUnit(el []byte, prefix string) string {
	nl := bytes.IndexByte(el, '\n')
	if nl < 0 {
		return "  "
	}
	rest := el[nl+1:]
	n := 0
	for n < len(rest) && (rest[n] == ' ' || rest[n] == '\t') {
		n++
	}
	lead := string(rest[:n])
	if unit, ok := strings.CutPrefix(lead, prefix); ok && unit != "" {
		return unit
	}
	return "  "
}

// ConvertConf turns a plain .conf primary (a single calico plugin config) named confName
// into a conflist with the same name and cniVersion whose plugins are the original
// config, byte for byte, followed by our entry. It records confName under
// ConvertedFromKey so that RestoreConf can give the .conf back on uninstall.
func ConvertConf(conf []byte, confName string, e Entry) ([]byte, error) {
	c, err := libcni.ConfFromBytes(conf)
	if err != nil {
		return nil, err
	}
	if c.Network.Type != CalicoType {
		return nil, fmt.Errorf("conf %s has type %q, not %s", confName, c.Network.Type, CalicoType)
	}
	if c.Network.Name == "" {
		return nil, fmt.Errorf("conf %s has no network name", confName)
	}
	var b bytes.Buffer
	b.WriteString("{\n")
	writeKV := func(k, v string) {
		kb, _ := json.Marshal(k)
		vb, _ := json.Marshal(v)
		fmt.Fprintf(&b, "  %s: %s,\n", kb, vb)
	}
	if c.Network.CNIVersion != "" {
		writeKV("cniVersion", c.Network.CNIVersion)
	}
	writeKV("name", c.Network.Name)
	writeKV(ConvertedFromKey, confName)
	b.WriteString("  \"plugins\": [\n    ")
	b.Write(bytes.TrimSpace(conf))
	b.WriteString("\n  ]\n}\n")
	out, _, err := InsertEntry(b.Bytes(), e)
	if err != nil {
		return nil, fmt.Errorf("convert %s: %w", confName, err)
	}
	return out, nil
}

// RestoreConf reports whether list (already stripped of our entries) is a conflist that
// ConvertConf made, and if so returns the original .conf's base name and bytes.
func RestoreConf(list []byte) (confName string, conf []byte, ok bool) {
	d, err := parseList(list)
	if err != nil || len(d.elems) != 1 || d.types[0] != CalicoType {
		return "", nil, false
	}
	name, ok := d.topString(ConvertedFromKey)
	if !ok || name == "" || strings.ContainsAny(name, "/\\") {
		return "", nil, false
	}
	el := d.elems[0]
	conf = append(append([]byte{}, list[el.start:el.end]...), '\n')
	return name, conf, true
}
