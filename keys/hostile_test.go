package keys

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/secureoverlay/secureoverlay/api"
)

// hostileRoot is root-like key material that a careless edit could paste into any field
// of the ring (as a field name or as a value). No parse or validation error may contain
// any of it.
var hostileRoot = secretRoot(0x5c)

// hostileForms are the forms the material is pasted in: standard base64 (the Secret's own
// encoding of a root) and lowercase hex (what `ip xfrm state` shows).
func hostileForms() map[string]string {
	return map[string]string{
		"base64": base64.StdEncoding.EncodeToString(hostileRoot),
		"hex":    hex.EncodeToString(hostileRoot),
	}
}

// revealsHostile reports the first 12-character run of any hostile form (or of its
// base64 decoding's encodings) found in out, naming the form and position but never
// returning the material itself.
func revealsHostile(out string) (string, bool) {
	const window = 12
	forms := hostileForms()
	for _, e := range encodings(hostileRoot) {
		forms["encoding "+fmt.Sprint(len(e))] = e
	}
	for name, f := range forms {
		for i := 0; i+window <= len(f); i++ {
			if strings.Contains(out, f[i:i+window]) {
				return fmt.Sprintf("%s form, characters %d..%d", name, i, i+window), true
			}
		}
	}
	return "", false
}

// hostileCase is one ring with the material in one place.
type hostileCase struct {
	name string
	data []byte
	want []string // every one must appear in the error
}

// hostileCases puts each form of the material into every field name position and every
// string value of the schema, each case invalid (a value that is valid on its own is
// combined with an unrelated error, so that an error is produced while the ring holds it).
func hostileCases(t *testing.T) []hostileCase {
	t.Helper()
	good, err := Marshal(sampleRing())
	if err != nil {
		t.Fatal(err)
	}
	mut := func(f func(m map[string]any)) []byte {
		var m map[string]any
		if err := json.Unmarshal(good, &m); err != nil {
			t.Fatal(err)
		}
		f(m)
		b, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	gen := func(m map[string]any, i int) map[string]any { return m["generations"].([]any)[i].(map[string]any) }
	node := func(m map[string]any, i int) map[string]any { return m["nodes"].([]any)[i].(map[string]any) }
	offset := func(data []byte, s string) string {
		i := bytes.Index(data, []byte(`"`+s+`"`))
		if i < 0 {
			t.Fatal("test bug: field name not in the data")
		}
		return fmt.Sprintf("byte offset %d", i)
	}
	const modes = "is not one of off, accept, encrypt, enforce"
	var cases []hostileCase
	for form, s := range hostileForms() {
		add := func(name string, data []byte, want ...string) {
			cases = append(cases, hostileCase{name: form + ": " + name, data: data, want: want})
		}
		d := mut(func(m map[string]any) { m[s] = 1 })
		add("unknown field name at the top level", d, "unknown field at "+offset(d, s), "top level")
		d = mut(func(m map[string]any) { gen(m, 1)[s] = "x" })
		add("unknown field name in generations[1]", d, "unknown field at "+offset(d, s), "inside generations[1]")
		d = mut(func(m map[string]any) { node(m, 0)[s] = true })
		add("unknown field name in nodes[0]", d, "unknown field at "+offset(d, s), "inside nodes[0]")
		d = mut(func(m map[string]any) { m["extra"] = s })
		add("value of an unknown field", d, "unknown field at "+offset(d, "extra"))
		d = mut(func(m map[string]any) { m["extra"] = map[string]any{s: s} })
		add("object value of an unknown field", d, "unknown field at "+offset(d, "extra"))

		add("mode", mut(func(m map[string]any) { m["mode"] = s }), "mode "+modes)
		add("target", mut(func(m map[string]any) { m["target"] = s }), "target "+modes)
		add("modeChanged", mut(func(m map[string]any) { m["modeChanged"] = s }), "modeChanged is not an RFC 3339 time")
		add("lastRotateRequest (with an unsupported schemaVersion)",
			mut(func(m map[string]any) { m["lastRotateRequest"] = s; m["schemaVersion"] = 2 }), "schemaVersion", "this build reads 1")
		add("lastRotateRequest (with a bad cipher)",
			mut(func(m map[string]any) { m["lastRotateRequest"] = s; gen(m, 0)["cipher"] = "aes" }), "generations[0].cipher is not one of aes128gcm, aes256gcm")
		add("generations[0].state", mut(func(m map[string]any) { gen(m, 0)["state"] = s }), "generations[0].state is not one of pending, active, retiring")
		add("generations[1].cipher", mut(func(m map[string]any) { gen(m, 1)["cipher"] = s }), "generations[1].cipher is not one of aes128gcm, aes256gcm")
		add("generations[0].reason", mut(func(m map[string]any) { gen(m, 0)["reason"] = s }), "generations[0].reason is not one of initial, interval, request, sequence")
		for _, f := range []string{"created", "activated", "retiring"} {
			add("generations[0]."+f, mut(func(m map[string]any) { gen(m, 0)[f] = s }), "generations[0]."+f+" is not an RFC 3339 time")
		}
		add("generations[1].number as a string", mut(func(m map[string]any) { gen(m, 1)["number"] = s }), "generations[1].number", "string where")
		add("lastGeneration as a string", mut(func(m map[string]any) { m["lastGeneration"] = s }), "lastGeneration", "string where")
		add("schemaVersion as a string", mut(func(m map[string]any) { m["schemaVersion"] = s }), "schemaVersion", "string where")
		add("generations as a string", mut(func(m map[string]any) { m["generations"] = s }), "generations", "string where an array")
		add("nodes[1] as a string", mut(func(m map[string]any) { m["nodes"].([]any)[1] = s }), "nodes[1]", "string where an object")
		add("nodes[0].released as a string", mut(func(m map[string]any) { node(m, 0)["released"] = s }), "nodes[0].released", "string where")

		// Node names: the base64 form is not a node name; the hex form is (a lowercase RFC
		// 1123 subdomain), so it must stay out of every validation error about nodes.
		if form == "base64" {
			add("nodes[1].name", mut(func(m map[string]any) { node(m, 1)["name"] = s }), "nodes[1].name is not a valid node name")
			add("nodes[0].name", mut(func(m map[string]any) { node(m, 0)["name"] = s; node(m, 1)["name"] = s }), "nodes[0].name is not a valid node name")
		} else {
			add("nodes[1].name, repeated", mut(func(m map[string]any) { node(m, 0)["name"] = s; node(m, 1)["name"] = s }), "nodes[1].name repeats nodes[0].name")
			add("nodes[1].name with id 0", mut(func(m map[string]any) { node(m, 1)["name"] = s; node(m, 1)["id"] = 0 }), "nodes[1].id is outside 1..4194303")
			add("nodes[1].name with a shared id", mut(func(m map[string]any) { node(m, 1)["name"] = s; node(m, 1)["id"] = 1 }), "nodes[0] and nodes[1] share an id")
		}
		add("nodes[0].name with a bad generation", mut(func(m map[string]any) { node(m, 0)["name"] = s; gen(m, 1)["icvBytes"] = 4 }), "generations[1].icvBytes is not one of 8, 12, 16")

		// Roots.
		add("root with a character outside base64", mut(func(m map[string]any) { gen(m, 1)["root"] = s + "!" }), "generations[1].root is not valid standard base64")
		long := base64.StdEncoding.EncodeToString(append(append([]byte{}, hostileRoot...), 1, 2, 3, 4, 5, 6, 7, 8))
		if form == "base64" {
			add("root of the wrong length", mut(func(m map[string]any) { gen(m, 1)["root"] = long }), "generations[1].root is 40 bytes, want 32")
		} else {
			add("root of the wrong length", mut(func(m map[string]any) { gen(m, 1)["root"] = s }), "generations[1].root is 48 bytes, want 32")
		}
		add("root as a number", bytes.Replace(good, []byte(`"`+base64.StdEncoding.EncodeToString(sampleRing().Generations[1].Root)+`"`), []byte(`["`+s+`"]`), 1),
			"generations[1].root: found an array where a standard base64 string was expected")

		// Malformed, truncated and trailing data around the material.
		add("malformed: unquoted value", []byte(`{"schemaVersion": 1, "mode": `+s+`}`), "byte offset 29")
		add("malformed: no colon after the field name", []byte(`{"mode" "`+s+`"}`), "malformed JSON at byte offset 8 (reading mode)")
		add("malformed: unknown field name without a colon", []byte(`{"`+s+`" 1}`), "unknown field at byte offset 1 (at the top level)")
		add("malformed: bad escape", []byte(`{"mode": "\q`+s+`"}`), "malformed JSON at byte offset")
		add("truncated inside the material", mut(func(m map[string]any) { gen(m, 1)["root"] = s })[:bytes.Index(mut(func(m map[string]any) { gen(m, 1)["root"] = s }), []byte(s))+20], "truncated")
		add("trailing data", append(append([]byte{}, good...), []byte(`"`+s+`"`)...), "trailing data after the JSON object at byte offset")
		add("top level is a string", []byte(`"`+s+`"`), "string where an object")
	}
	return cases
}

// TestParseErrorsNeverQuoteValues: key material placed as a field name or as any string
// value of the schema never appears in the error (in any fmt verb); the error still names
// the field, the position and what is allowed.
func TestParseErrorsNeverQuoteValues(t *testing.T) {
	for _, c := range hostileCases(t) {
		r, err := Parse(c.data)
		if err == nil {
			t.Errorf("%s: accepted (mode %s)", c.name, r.Mode)
			continue
		}
		if !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: error does not wrap ErrInvalid", c.name)
		}
		leaked := false
		for _, v := range []string{"%v", "%+v", "%#v", "%s", "%q"} {
			if where, ok := revealsHostile(fmt.Sprintf(v, err)); ok {
				t.Errorf("%s: %s of the error reveals the material (%s)", c.name, v, where)
				leaked = true
				break
			}
		}
		for _, w := range c.want {
			if !strings.Contains(err.Error(), w) {
				if leaked {
					t.Errorf("%s: error does not mention %q (not shown: it leaks)", c.name, w)
				} else {
					t.Errorf("%s: error %q does not mention %q", c.name, err, w)
				}
			}
		}
	}
}

// TestValidateNeverQuotesValues: the same for rings built in Go (Step validates its input
// and output with Validate).
func TestValidateNeverQuotesValues(t *testing.T) {
	for form, s := range hostileForms() {
		cases := map[string]struct {
			mut  func(r *Ring)
			want string
		}{
			"mode":               {func(r *Ring) { r.Mode = api.Mode(s) }, "mode is not one of"},
			"target":             {func(r *Ring) { r.Target = api.Mode(s) }, "target is not one of"},
			"state":              {func(r *Ring) { r.Generations[1].State = State(s) }, "generations[1].state is not one of"},
			"cipher":             {func(r *Ring) { r.Generations[0].Cipher = Cipher(s) }, "generations[0].cipher is not one of"},
			"reason":             {func(r *Ring) { r.Generations[0].Reason = s }, "generations[0].reason is not one of"},
			"node name":          {func(r *Ring) { r.Nodes[2].Name = s; r.Nodes[2].ID = 0 }, "nodes[2]."},
			"node name twice":    {func(r *Ring) { r.Nodes[0].Name = s; r.Nodes[1].Name = s }, "nodes[0].name"},
			"node ids":           {func(r *Ring) { r.Nodes[0].Name = s; r.Nodes[1].ID = 1 }, "nodes[0]"},
			"rotate request":     {func(r *Ring) { r.LastRotateRequest = s; r.SchemaVersion = 7 }, "schemaVersion"},
			"root of the text":   {func(r *Ring) { r.Generations[1].Root = Key(s) }, fmt.Sprintf("generations[1].root is %d bytes, want 32", len(s))},
			"derive from cipher": {func(r *Ring) { r.Generations[0].Cipher = Cipher(s) }, "cipher"},
		}
		for name, c := range cases {
			r := sampleRing()
			c.mut(r)
			err := r.Validate()
			if name == "derive from cipher" {
				_, err = NewDeriver(&r.Generations[0])
			}
			if err == nil {
				t.Errorf("%s %s: accepted", form, name)
				continue
			}
			if where, ok := revealsHostile(fmt.Sprintf("%v %+v %#v %q", err, err, err, err)); ok {
				t.Errorf("%s %s: error reveals the material (%s)", form, name, where)
				continue
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("%s %s: error %q does not mention %q", form, name, err, c.want)
			}
		}
	}
}
