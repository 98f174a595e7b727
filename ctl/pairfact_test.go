package ctl

import (
	"testing"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
)

// Per-pair facts are tags of the subject's key incarnation (boot ID, Node UID, SA epoch);
// reporters that predate epochs tagged boot IDs; a reporter that omits its lists
// (docs/protocol-v2.md §9 step 4) says nothing either way.
func TestPairFactKeyIncarnation(t *testing.T) {
	cur := &watch.Report{NodeReport: api.NodeReport{Mode: api.ModeEnforce, Incarnation: "boot-b", UID: "uid-b", Epoch: "e2"}}
	subject := &watch.NodeInfo{Name: "b", Incarnation: "boot-b", UID: "uid-b", Report: cur}
	newReporter := &watch.Report{NodeReport: api.NodeReport{Epoch: "ea"}}
	oldReporter := &watch.Report{}
	tag := func(s string) map[string]string { return map[string]string{"b": watch.IncarnationTag(s)} }
	recreated := *subject
	recreated.UID = "uid-b2" // the Node was re-created: b's report is stale
	for _, c := range []struct {
		name     string
		m        map[string]string
		reporter *watch.Report
		subject  *watch.NodeInfo
		want     string
	}{
		{"current epoch", tag("boot-b/uid-b/e2"), newReporter, subject, "yes"},
		{"older epoch", tag("boot-b/uid-b/e1"), newReporter, subject, "stale"},
		{"re-created node", tag("boot-b/uid-b/e2"), newReporter, &recreated, "stale"},
		{"absent", nil, newReporter, subject, "no"},
		{"legacy reporter, boot ID tag", tag("boot-b"), oldReporter, subject, "yes"},
		{"legacy reporter, old boot", tag("boot-old"), oldReporter, subject, "stale"},
		{"reporter omits its lists", nil, &watch.Report{NodeReport: api.NodeReport{Epoch: "ea", ListsOmitted: true}}, subject, "n/a"},
	} {
		if got := pairFact(c.m, "b", c.reporter, c.subject); got != c.want {
			t.Errorf("%s: %s, want %s", c.name, got, c.want)
		}
	}
}
