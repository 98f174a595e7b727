package master

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/secureoverlay/secureoverlay/api"
)

// hostileRoot is root-like key material the test pastes into field names and values of
// the Secret (as a careless hand edit could). It is recorded for
// TestNoKeyBytesInTestOutput, which greps the whole test output for it.
var hostileRoot = func() []byte {
	k := make([]byte, 32)
	for i := range k {
		k[i] = byte(i*53+7) ^ 0xc3
	}
	return k
}()

// hostileReveal reports where the first 12-character run of the material (standard or URL
// base64, padded or not, hex in either case) occurs in out — never the material itself.
func hostileReveal(out string) (string, bool) {
	const window = 12
	forms := map[string]string{
		"base64": base64.StdEncoding.EncodeToString(hostileRoot), "base64url": base64.URLEncoding.EncodeToString(hostileRoot),
		"hex": hex.EncodeToString(hostileRoot), "HEX": strings.ToUpper(hex.EncodeToString(hostileRoot)),
	}
	for name, f := range forms {
		for i := 0; i+window <= len(f); i++ {
			if strings.Contains(out, f[i:i+window]) {
				return fmt.Sprintf("as %s, characters %d..%d", name, i, i+window), true
			}
		}
	}
	return "", false
}

// assertNoHostile fails the test if the material appears in any master log line, any
// Event in the namespace (every field), the status ConfigMap or the metrics.
func (e *env) assertNoHostile(what string, m *Metrics) {
	e.t.Helper()
	for _, l := range strings.Split(e.sink.text(), "\n") {
		if where, ok := hostileReveal(l); ok {
			e.t.Fatalf("%s: a master log line reveals the material (%s)", what, where)
		}
	}
	evs, err := e.cs.CoreV1().Events(api.Namespace).List(e.ctx, metav1.ListOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	for _, ev := range evs.Items {
		b, _ := json.Marshal(ev)
		if where, ok := hostileReveal(string(b)); ok {
			e.t.Fatalf("%s: Event %s (reason %s) reveals the material (%s)", what, ev.Name, ev.Reason, where)
		}
	}
	cm, err := e.cs.CoreV1().ConfigMaps(api.Namespace).Get(e.ctx, api.StatusConfigMapName, metav1.GetOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	for k, v := range cm.Data {
		if where, ok := hostileReveal(v); ok {
			e.t.Fatalf("%s: status ConfigMap key %s reveals the material (%s)", what, k, where)
		}
	}
	if where, ok := hostileReveal(metricsText(e.t, m)); ok {
		e.t.Fatalf("%s: metrics reveal the material (%s)", what, where)
	}
}

// TestHostileRingRefusedWithoutEcho: Secrets that carry key material as a field name or
// as the value of a field (mode, target, cipher, state, node name, root) are refused like
// any invalid ring: not used, not overwritten, the last good ring kept and restorable;
// and the material reaches no master log line, no Event, no status field and no metric,
// while the error still names the field.
func TestHostileRingRefusedWithoutEcho(t *testing.T) {
	e := newEnv(t)
	rep := e.startMaster("master-a", testPolicy())
	enableCluster(e, "n1", "n2")
	good := e.ring()
	goodData := e.secret().Data[api.SecretDataKey]
	recordKey(hostileRoot)
	b64, hx := base64.StdEncoding.EncodeToString(hostileRoot), hex.EncodeToString(hostileRoot)

	mut := func(f func(m map[string]any)) []byte {
		var m map[string]any
		if err := json.Unmarshal(goodData, &m); err != nil {
			t.Fatal(err)
		}
		f(m)
		b, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	gen0 := func(m map[string]any) map[string]any { return m["generations"].([]any)[0].(map[string]any) }
	node := func(m map[string]any, i int) map[string]any { return m["nodes"].([]any)[i].(map[string]any) }
	cases := []struct {
		name string
		data []byte
		want string // in the status's lastError and in the Event; distinct per case
	}{
		{"unknown field name at the top level", mut(func(m map[string]any) { m[b64] = 1 }), "unknown field at byte offset"},
		{"unknown field name in generations[0]", mut(func(m map[string]any) { gen0(m)[hx] = "x" }), "inside generations[0]"},
		{"unknown field name in nodes[1]", mut(func(m map[string]any) { node(m, 1)[b64] = true }), "inside nodes[1]"},
		{"mode", mut(func(m map[string]any) { m["mode"] = hx }), "mode is not one of off, accept, encrypt, enforce"},
		{"target", mut(func(m map[string]any) { m["target"] = b64 }), "target is not one of off, accept, encrypt, enforce"},
		{"cipher", mut(func(m map[string]any) { gen0(m)["cipher"] = b64 }), "generations[0].cipher is not one of aes128gcm, aes256gcm"},
		{"state", mut(func(m map[string]any) { gen0(m)["state"] = hx }), "generations[0].state is not one of pending, active, retiring"},
		{"node name", mut(func(m map[string]any) { node(m, 1)["name"] = b64 }), "nodes[1].name is not a valid node name"},
		{"node name in a shared id", mut(func(m map[string]any) { node(m, 0)["name"] = hx; node(m, 1)["id"] = node(m, 0)["id"] }), "nodes[0] and nodes[1] share an id"},
		{"root", mut(func(m map[string]any) { gen0(m)["root"] = b64 + "!" }), "generations[0].root is not valid standard base64"},
	}
	for _, c := range cases {
		refused := value(rep.metrics.RingErrors)
		s := e.secret()
		s.Data[api.SecretDataKey] = c.data
		bad, err := e.cs.CoreV1().Secrets(api.Namespace).Update(e.ctx, s, metav1.UpdateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		e.eventually(c.name+": refusal counted", wait, func() (bool, string) {
			return value(rep.metrics.RingErrors) > refused, ""
		})
		e.eventually(c.name+": refusal in the status", wait, func() (bool, string) {
			st := e.status()
			if where, ok := hostileReveal(st.LastError); ok {
				t.Fatalf("%s: the status's lastError reveals the material (%s)", c.name, where)
			}
			return strings.Contains(st.LastError, "refusing") && strings.Contains(st.LastError, c.want) &&
				strings.Contains(st.LastError, api.ResetRingAnnotation), st.LastError
		})
		e.eventually(c.name+": InvalidKeyRing event", wait, func() (bool, string) {
			e.assertNoHostile(c.name, rep.metrics)
			evs := strings.Join(e.eventReasons(), "\n")
			return strings.Contains(evs, "InvalidKeyRing: ") && strings.Contains(evs, c.want), evs
		})
		// Refused, not used, not overwritten (several resyncs and a rotation request).
		e.requestRotation("while-hostile-" + strings.ReplaceAll(c.name, " ", "-"))
		time.Sleep(time.Second)
		now := e.secret()
		if now.ResourceVersion != bad.ResourceVersion || !bytes.Equal(now.Data[api.SecretDataKey], c.data) {
			t.Fatalf("%s: the master overwrote refused data", c.name)
		}
		if st := e.status(); st.ActiveGeneration != good.Active().Number || st.Mode != good.Mode {
			t.Fatalf("%s: the status lost the last good ring: active %d mode %s", c.name, st.ActiveGeneration, st.Mode)
		}
		if value(rep.metrics.RingValid) != 0 {
			t.Fatalf("%s: ring_valid is not 0", c.name)
		}
		e.assertNoHostile(c.name, rep.metrics)
	}

	// The last good ring is still in the master's memory: a reset restores exactly it.
	s := e.secret()
	if s.Annotations == nil {
		s.Annotations = map[string]string{}
	}
	s.Annotations[api.ResetRingAnnotation] = "true"
	if _, err := e.cs.CoreV1().Secrets(api.Namespace).Update(e.ctx, s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	e.eventually("a valid ring again", wait, func() (bool, string) { return e.ring() != nil, "" })
	restored := e.ring()
	if g := restored.Generation(1); g == nil || !g.Root.Equal(good.Generation(1).Root) {
		t.Fatal("the restored ring is not the last good one")
	}
	e.eventually("error cleared", wait, func() (bool, string) { st := e.status(); return st.LastError == "", st.LastError })
	e.assertNoHostile("after the reset", rep.metrics)
}
