package master

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
)

// TestRestoredSecretRefused: the key Secret restored from a copy older than the ring the
// cluster uses (Velero, GitOps, `kubectl apply` of an old copy) is refused, never used:
// by the running master (its last good ring), by a master that starts afterwards (the
// watermarks its predecessor published), and even when the status ConfigMap was restored
// with it (what more than half of the nodes report). A reset then continues the numbering
// after every generation already used.
func TestRestoredSecretRefused(t *testing.T) {
	e := newEnv(t)
	a := e.startMaster("master-a", testPolicy())
	agents := enableCluster(e, "n1", "n2", "n3")
	old := e.secret().Data[api.SecretDataKey]
	oldRing, err := keys.Parse(old)
	if err != nil {
		t.Fatal(err)
	}
	oldStatus := e.status()

	e.requestRotation("2026-01-01T00:00:00Z")
	e.ringIs(api.ModeEnforce, wait, "2:active")
	e.eventually("agents report generation 2 only", wait, func() (bool, string) {
		for _, n := range []string{"n1", "n2", "n3"} {
			if !strings.Contains(e.report(n), `"generations":[2]`) {
				return false, n
			}
		}
		return true, ""
	})
	e.eventually("status watermarks", wait, func() (bool, string) {
		st := e.status()
		return st.LastGeneration == 2 && st.GenerationFloor == 2, ""
	})
	// Real agents refuse a ring older than one they accepted: they keep reporting 2.
	for _, ag := range agents {
		ag.paused.Store(true)
	}

	restore := func(what string) {
		t.Helper()
		s := e.secret()
		s.Data[api.SecretDataKey] = old
		restored, err := e.cs.CoreV1().Secrets(api.Namespace).Update(e.ctx, s, metav1.UpdateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		e.eventually(what+": refusal in the status", wait, func() (bool, string) {
			st := e.status()
			return strings.Contains(st.LastError, "went backwards") && strings.Contains(st.LastError, api.ResetRingAnnotation), st.LastError
		})
		e.requestRotation("while-restored-" + what)
		time.Sleep(1500 * time.Millisecond)
		if now := e.secret(); now.ResourceVersion != restored.ResourceVersion || !bytes.Equal(now.Data[api.SecretDataKey], old) {
			t.Fatalf("%s: the master wrote over (or stepped) the restored Secret", what)
		}
		e.eventually(what+": warning event", wait, func() (bool, string) {
			evs := strings.Join(e.eventReasons(), "\n")
			return strings.Contains(evs, "KeyRingWentBackwards: "), evs
		})
	}
	restore("running master")
	if value(a.metrics.RingValid) != 0 {
		t.Error("ring_valid is not 0 while the restored ring is refused")
	}

	// A new master (no last good ring in memory) reads its predecessor's watermarks.
	a.stop()
	b := e.startMaster("master-b", testPolicy())
	s := e.secret()
	s.Data[api.SecretDataKey] = []byte(strings.Replace(string(s.Data[api.SecretDataKey]), "\n", "\n ", 1)) // a new version, same ring
	if _, err := e.cs.CoreV1().Secrets(api.Namespace).Update(e.ctx, s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	restore("new master")

	// The status ConfigMap restored from the same backup: the nodes still know.
	raw, _ := json.Marshal(oldStatus)
	cm, err := e.cs.CoreV1().ConfigMaps(api.Namespace).Get(e.ctx, api.StatusConfigMapName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cm.Data[api.StatusDataKey] = string(raw)
	if _, err := e.cs.CoreV1().ConfigMaps(api.Namespace).Update(e.ctx, cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	b.stop()
	e.startMaster("master-c", testPolicy())
	restore("status restored too")

	// The operator consents to a reset: without a last good ring the master starts a new
	// ring after generation 2 (mode off, then enable again): generation 1 never returns.
	s = e.secret()
	if s.Annotations == nil {
		s.Annotations = map[string]string{}
	}
	s.Annotations[api.ResetRingAnnotation] = "true"
	if _, err := e.cs.CoreV1().Secrets(api.Namespace).Update(e.ctx, s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, ag := range agents {
		ag.paused.Store(false)
	}
	r := e.ringIs(api.ModeEnforce, wait, "3:active")
	if r.LastGeneration != 3 || r.Generation(1) != nil || r.Active().Root.Equal(oldRing.Generation(1).Root) {
		t.Fatalf("after the reset: %s last=%d", keys.Summary(r), r.LastGeneration)
	}
	e.eventually("error cleared", wait, func() (bool, string) { st := e.status(); return st.LastError == "", st.LastError })
}
