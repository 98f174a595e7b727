package master

import (
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/secureoverlay/secureoverlay/api"
)

func TestDesired(t *testing.T) {
	cm := func(data, ann map[string]string) *corev1.ConfigMap {
		return &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: api.ConfigMapName, Annotations: ann}, Data: data}
	}
	cases := []struct {
		name   string
		cm     *corev1.ConfigMap
		cur    api.Mode
		want   api.Mode
		req    string
		errHas string
	}{
		{"no configmap keeps the ring's target", nil, api.ModeEnforce, api.ModeEnforce, "", ""},
		{"no keys keeps the target", cm(nil, nil), api.ModeEncrypt, api.ModeEncrypt, "", ""},
		{"enabled", cm(map[string]string{"enabled": "true"}, nil), api.ModeOff, api.ModeEnforce, "", ""},
		{"disabled", cm(map[string]string{"enabled": "false"}, nil), api.ModeEnforce, api.ModeOff, "", ""},
		{"mode overrides enabled", cm(map[string]string{"enabled": "true", "mode": "accept"}, nil), api.ModeOff, api.ModeAccept, "", ""},
		{"bad enabled", cm(map[string]string{"enabled": "yes please"}, nil), api.ModeAccept, api.ModeAccept, "", "not true or false"},
		{"bad mode", cm(map[string]string{"mode": "on"}, nil), api.ModeOff, api.ModeOff, "", `mode (2 bytes) is not one of`},
		{"rotate request", cm(map[string]string{"enabled": "true"}, map[string]string{api.RotateRequestAnnotation: "r1"}), api.ModeOff, api.ModeEnforce, "r1", ""},
	}
	for _, c := range cases {
		got, req, err := desired(c.cm, c.cur)
		if got != c.want || req != c.req {
			t.Errorf("%s: got %s %q, want %s %q", c.name, got, req, c.want, c.req)
		}
		if (err != nil) != (c.errHas != "") || err != nil && !strings.Contains(err.Error(), c.errHas) {
			t.Errorf("%s: err %v, want %q", c.name, err, c.errHas)
		}
	}
}

func TestNodeState(t *testing.T) {
	since := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	node := func(ready corev1.ConditionStatus, report string) *corev1.Node {
		n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n", Annotations: map[string]string{}}}
		if report != "" {
			n.Annotations[api.ReportAnnotation] = report
		}
		n.Status.NodeInfo.BootID = "b1"
		if ready != "" {
			n.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: ready, LastTransitionTime: metav1.NewTime(since)}}
		}
		return n
	}
	s := NodeState(node(corev1.ConditionTrue, `{"mode":"accept","generations":[1,2],"incarnation":"b1"}`))
	if !s.Ready || s.Report == nil || s.Report.Mode != api.ModeAccept || len(s.Report.Generations) != 2 || s.BootID != "b1" || !s.NotReadySince.IsZero() {
		t.Fatalf("ready node: %+v", s)
	}
	s = NodeState(node(corev1.ConditionUnknown, ""))
	if s.Ready || !s.NotReadySince.Equal(since) || s.Report != nil || s.ReportError != "" {
		t.Fatalf("unknown node: %+v", s)
	}
	s = NodeState(node(corev1.ConditionTrue, `{"mode":`))
	if s.Report != nil || !strings.Contains(s.ReportError, "not a JSON NodeReport") {
		t.Fatalf("bad report: %+v", s)
	}
	s = NodeState(node(corev1.ConditionTrue, `{"mode":"on"}`))
	if s.Report != nil || !strings.Contains(s.ReportError, "report mode (2 bytes) is not one of") || strings.Contains(s.ReportError, `"on"`) {
		t.Fatalf("bad mode: %+v", s)
	}
	if s := NodeState(node("", "")); s.Ready {
		t.Fatalf("node without a Ready condition counted as ready")
	}
}

func TestNodeChanged(t *testing.T) {
	a := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n", Annotations: map[string]string{api.ReportAnnotation: "x"}}}
	a.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue}}
	b := a.DeepCopy()
	b.Status.Conditions[0].LastHeartbeatTime = metav1.Now() // heartbeats alone do not matter
	b.ResourceVersion = "2"
	if nodeChanged(a, b) {
		t.Fatal("heartbeat-only update counted as a change")
	}
	for name, mut := range map[string]func(*corev1.Node){
		"report": func(n *corev1.Node) { n.Annotations[api.ReportAnnotation] = "y" },
		"boot":   func(n *corev1.Node) { n.Status.NodeInfo.BootID = "new" },
		"ready":  func(n *corev1.Node) { n.Status.Conditions[0].Status = corev1.ConditionFalse },
	} {
		c := a.DeepCopy()
		mut(c)
		if !nodeChanged(a, c) {
			t.Errorf("%s change not noticed", name)
		}
	}
}
