package watch

import (
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/nodereport"
)

// TestAnnotationReportKeptUntilNodeReport: the hand-over from a 0.1 agent's report
// annotation to the NodeReport of the agent that replaced it. The new agent creates its
// NodeReport and then removes the annotation, but the two changes reach a peer through
// two watches (NodeReports, Nodes) in no guaranteed order. A peer that sees the
// annotation go first must not see the node without a report in between: a peer with no
// current report gets no SAs (docs/dataplane.md §5), so the reader would drop the pair's
// SAs and re-key (the upgrade scenario's failure: 547 requests lost, 58 plaintext). The
// annotation's last report is kept, as a deleted NodeReport's is, until a NodeReport at
// least as recent arrives; it does not make the node a 0.1 one (Legacy), and it goes with
// the Node.
func TestAnnotationReportKeptUntilNodeReport(t *testing.T) {
	rep := func(lastSync string) string {
		return `{"mode":"enforce","incarnation":"boot-b","uid":"u-b","epoch":"e-b","lastSync":"` + lastSync + `"}`
	}
	const t1, t2 = "2026-12-01T00:00:00Z", "2026-12-01T00:00:05Z"
	b := node("b", "198.18.0.2/24", "boot-b", map[string]string{api.ReportAnnotation: rep(t1)})
	b.UID = "u-b"
	ctx, w, cs, dc := watcherOfA(t, api.ModeEnforce, node("a", "198.18.0.1/24", "boot-a", nil), b)
	waitFor(t, "caches to sync", w.HasSynced)

	get := func() NodeInfo {
		s := w.Snapshot()
		if n := s.Node("b"); n != nil {
			return *n
		}
		return NodeInfo{}
	}
	// Peer reports are cached trimmed (re-encoded): compare their lastSync.
	synced := func(n NodeInfo) string {
		if n.Report == nil {
			return ""
		}
		return n.Report.LastSync.UTC().Format(time.RFC3339)
	}
	waitFor(t, "b's annotation report", func() bool { n := get(); return n.Report != nil && n.AnnotationReport })
	if n := get(); !n.Legacy() || n.CurrentReport() == nil {
		t.Fatalf("b with only an annotation: legacy %v, current report %v; want a 0.1 node with a current report", n.Legacy(), n.CurrentReport() != nil)
	}

	// The Node update (annotation removed) arrives before the NodeReport's ADD.
	b, err := cs.CoreV1().Nodes().Get(ctx, "b", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	delete(b.Annotations, api.ReportAnnotation)
	if _, err := cs.CoreV1().Nodes().Update(ctx, b, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the annotation's removal seen", func() bool { return !get().AnnotationReport })
	n := get()
	if n.CurrentReport() == nil || synced(n) != t1 {
		t.Fatalf("b between its annotation's removal and its NodeReport: current report %v (of %q); want the annotation's last (of %s)",
			n.CurrentReport() != nil, synced(n), t1)
	}
	if n.Legacy() {
		t.Errorf("b's kept annotation report makes it a 0.1 node (Legacy): its agent removed the annotation, so it reads NodeReports")
	}

	// An older NodeReport (left before a downgrade) does not replace the kept report.
	if err := nodereport.Write(ctx, dc, api.Namespace, "b", "u-b", "enforce", []byte(rep("2026-11-30T00:00:00Z"))); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the older NodeReport seen", func() bool { return get().ObjectReport })
	if n := get(); synced(n) != t1 || n.CurrentReport() == nil {
		t.Errorf("b with a NodeReport older than its kept annotation report: report of %q; want the kept one of %s", synced(n), t1)
	}
	if err := nodereport.Write(ctx, dc, api.Namespace, "b", "u-b", "enforce", []byte(rep(t2))); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b's NodeReport taken", func() bool { return synced(get()) == t2 })
	if n := get(); n.FromAnnotation || n.Legacy() {
		t.Errorf("b with its NodeReport: from annotation %v, legacy %v", n.FromAnnotation, n.Legacy())
	}

	// Gone with the Node: a Node of that name that returns starts without it.
	if err := cs.CoreV1().Nodes().Delete(ctx, "b", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b gone", func() bool { s := w.Snapshot(); return s.Node("b") == nil })
	w.view.mu.Lock()
	_, kept := w.view.held["b"]
	w.view.mu.Unlock()
	if kept {
		t.Errorf("b's kept annotation report outlived its Node")
	}
}
