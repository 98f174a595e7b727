package keys

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/secureoverlay/secureoverlay/api"
)

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

// secretRoot is a recognisable root whose encodings must never show up in output.
func secretRoot(b byte) Key {
	k := make(Key, RootKeyBytes)
	for i := range k {
		k[i] = b ^ byte(i*37+11)
	}
	return k
}

func sampleRing() *Ring {
	r := NewRing()
	r.Mode, r.Target = api.ModeEnforce, api.ModeEnforce
	r.LastGeneration = 5
	r.Generations = []Generation{
		{Number: 4, State: StateRetiring, Cipher: AES128GCM, ICVBytes: 8, Root: secretRoot(0xa1), Reason: "interval", Created: t0, Activated: t0, Retiring: t0.Add(time.Hour)},
		{Number: 5, State: StateActive, Cipher: AES128GCM, ICVBytes: 8, Root: secretRoot(0xb2), Reason: "request", Created: t0.Add(time.Minute), Activated: t0.Add(time.Hour)},
	}
	r.Nodes = []NodeID{{Name: "a", ID: 1}, {Name: "b", ID: 2}, {Name: "gone", ID: 3, Released: true, ReleasedAt: 5}}
	return r
}

// encodings lists every form a key could leak in.
func encodings(k []byte) []string {
	return []string{
		hex.EncodeToString(k), strings.ToUpper(hex.EncodeToString(k)),
		base64.StdEncoding.EncodeToString(k), base64.RawStdEncoding.EncodeToString(k),
		base64.URLEncoding.EncodeToString(k), base64.RawURLEncoding.EncodeToString(k),
		fmt.Sprint([]byte(k)), string(k),
	}
}

func assertNoKey(t *testing.T, what, out string, keys ...Key) {
	t.Helper()
	for _, k := range keys {
		for _, e := range encodings(k) {
			if strings.Contains(out, e) {
				t.Fatalf("%s reveals key material", what)
			}
		}
	}
}

func TestRingRoundTrip(t *testing.T) {
	r := sampleRing()
	b, err := Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	got, err := Parse(b)
	if err != nil {
		t.Fatalf("parse own output: %v", err)
	}
	b2, _ := Marshal(got)
	if !bytes.Equal(b, b2) {
		t.Fatalf("round trip changed the ring:\n%s\n%s", b, b2)
	}
	if !got.Generations[1].Root.Equal(r.Generations[1].Root) || got.Active().Number != 5 || got.NodeID("b") != 2 || got.NodeID("gone") != 0 {
		t.Fatal("round trip lost data")
	}
	// The Secret form holds the root as standard base64 (documented in docs/keys.md).
	if !bytes.Contains(b, []byte(base64.StdEncoding.EncodeToString(r.Generations[0].Root))) {
		t.Fatal("root not stored as standard base64")
	}
}

func TestKeyRedaction(t *testing.T) {
	r := sampleRing()
	roots := []Key{r.Generations[0].Root, r.Generations[1].Root}
	sa, err := r.Generations[1].Derive(Endpoint{IP: mustAddr("198.18.0.1"), NodeID: 1}, Endpoint{IP: mustAddr("198.18.0.2"), NodeID: 2})
	if err != nil {
		t.Fatal(err)
	}
	secrets := append(roots, sa.Key)
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%x", "%X", "%q", "%d"} {
		for name, v := range map[string]any{"ring": r, "*ring": *r, "generation": r.Generations[0], "key": roots[0], "sa": sa, "gens": r.Generations} {
			assertNoKey(t, fmt.Sprintf("fmt %s of %s", verb, name), fmt.Sprintf(verb, v), secrets...)
		}
	}
	var buf bytes.Buffer
	for _, h := range []slog.Handler{slog.NewJSONHandler(&buf, nil), slog.NewTextHandler(&buf, nil)} {
		slog.New(h).Info("x", "ring", r, "gen", r.Generations[1], "key", roots[1], "sa", sa, "saKey", sa.Key)
	}
	assertNoKey(t, "slog", buf.String(), secrets...)
	if !strings.Contains(buf.String(), "redacted") {
		t.Fatal("slog output does not show the redaction marker")
	}
}

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }

func TestParseErrors(t *testing.T) {
	good, err := Marshal(sampleRing())
	if err != nil {
		t.Fatal(err)
	}
	root := base64.StdEncoding.EncodeToString(sampleRing().Generations[1].Root)
	short := base64.StdEncoding.EncodeToString(sampleRing().Generations[1].Root[:20])
	mut := func(f func(m map[string]any)) []byte {
		var m map[string]any
		if err := json.Unmarshal(good, &m); err != nil {
			t.Fatal(err)
		}
		f(m)
		b, _ := json.Marshal(m)
		return b
	}
	gen := func(m map[string]any, i int) map[string]any { return m["generations"].([]any)[i].(map[string]any) }
	cases := []struct {
		name, want string
		data       []byte
	}{
		{"empty", "empty", nil},
		{"garbage", "malformed JSON at byte offset 1 (reading the key ring)", []byte("{not json" + root)},
		{"truncated", "truncated", good[:len(good)/2]},
		{"root not base64", "generations[1].root is not valid standard base64", bytes.Replace(good, []byte(root), []byte("!!"+root[2:]), 1)},
		{"root short", "generations[1].root is 20 bytes, want 32", bytes.Replace(good, []byte(root), []byte(short), 1)},
		{"root is a number", "generations[1].root: found a number where a standard base64 string was expected", bytes.Replace(good, []byte(`"`+root+`"`), []byte("12345"), 1)},
		{"schema", "unsupported schemaVersion (this build reads 1)", mut(func(m map[string]any) { m["schemaVersion"] = 2 })},
		{"mode", "mode is not one of off, accept, encrypt, enforce", mut(func(m map[string]any) { m["mode"] = "on" })},
		{"unknown field", "unknown field at byte offset 1 (at the top level)", mut(func(m map[string]any) { m["extra"] = root })},
		{"type", "lastGeneration: found a string where an integer was expected", mut(func(m map[string]any) { m["lastGeneration"] = root })},
		{"two active", "2 active", mut(func(m map[string]any) { gen(m, 0)["state"] = "active" })},
		{"state", "generations[0].state is not one of pending, active, retiring", mut(func(m map[string]any) { gen(m, 0)["state"] = "done" })},
		{"cipher", "generations[0].cipher is not one of aes128gcm, aes256gcm", mut(func(m map[string]any) { gen(m, 0)["cipher"] = "aes" })},
		{"icv", "generations[0].icvBytes is not one of 8, 12, 16", mut(func(m map[string]any) { gen(m, 0)["icvBytes"] = 4 })},
		{"number above last", "generations[1].number is above lastGeneration", mut(func(m map[string]any) { m["lastGeneration"] = 4 })},
		{"mod 4", "generations[0] and generations[1] share an SPI generation field", mut(func(m map[string]any) { gen(m, 0)["number"] = 1 })},
		{"no active in enforce", "needs exactly one active", mut(func(m map[string]any) { gen(m, 1)["state"] = "pending" })},
		{"node id 0", "nodes[0].id is outside 1..4194303", mut(func(m map[string]any) { m["nodes"].([]any)[0].(map[string]any)["id"] = 0 })},
		{"node ids shared", "nodes[0] and nodes[1] share an id", mut(func(m map[string]any) { m["nodes"].([]any)[0].(map[string]any)["id"] = 2 })},
		{"trailing", fmt.Sprintf("trailing data after the JSON object at byte offset %d", len(good)), append(append([]byte{}, good...), []byte(`{"x":1}`)...)},
		{"trailing comma", fmt.Sprintf("trailing data after the JSON object at byte offset %d", len(good)+1), append(append([]byte{}, good...), []byte("\n,1")...)},
	}
	for _, c := range cases {
		_, err := Parse(c.data)
		if err == nil {
			t.Errorf("%s: accepted", c.name)
			continue
		}
		if !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: error does not wrap ErrInvalid: %v", c.name, err)
		}
		if !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %q does not mention %q", c.name, err, c.want)
		}
		for _, v := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x", "%X"} {
			assertNoKey(t, c.name+" error", fmt.Sprintf(v, err), sampleRing().Generations[0].Root, sampleRing().Generations[1].Root)
		}
		if strings.Contains(err.Error(), root[:12]) || strings.Contains(err.Error(), root[2:14]) {
			t.Errorf("%s: error echoes base64 of the root", c.name)
		}
	}
}
