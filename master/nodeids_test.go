package master

import (
	"fmt"
	"maps"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/nodeid"
)

// nodeIDs lists the NodeIDs in the API: the table they make and each one's
// resourceVersion, by name.
func (e *env) nodeIDs() (map[string]uint32, map[string]string) {
	e.t.Helper()
	l, err := e.dyn().Resource(nodeid.GVR).Namespace(api.Namespace).List(e.ctx, metav1.ListOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	table, versions := map[string]uint32{}, map[string]string{}
	for i := range l.Items {
		u := &l.Items[i]
		versions[u.GetName()] = u.GetResourceVersion()
		if en, err := nodeid.Parse(u); err == nil {
			table[en.Node] = en.ID
		} else {
			table["unparsed "+u.GetName()] = 0
		}
	}
	return table, versions
}

// nodeIDsAreTheTable waits until the NodeIDs are the Secret's node table.
func (e *env) nodeIDsAreTheTable(what string) map[string]string {
	var versions map[string]string
	e.eventually(what, wait, func() (bool, string) {
		var table map[string]uint32
		table, versions = e.nodeIDs()
		want, _ := nodeid.IDs(e.ring(), nil, "")
		return maps.Equal(table, want) && nodeid.Digest(table) == nodeid.TableDigest(e.ring()), fmt.Sprintf("NodeIDs %v, the ring's table %v", table, want)
	})
	return versions
}

// TestNodeIDsFollowTheTable: a real master on a real API server keeps one NodeID per live
// entry of the Secret's node table (docs/keys.md §13): written after enable; untouched by
// a rotation (no object changes with a step); an edited one put back, a deleted one
// re-created; a departed node's removed once its ID is released.
func TestNodeIDsFollowTheTable(t *testing.T) {
	e := newEnv(t)
	e.startMaster("master-a", testPolicy())
	agents := enableCluster(e, "n1", "n2", "n3")
	before := e.nodeIDsAreTheTable("NodeIDs for n1..n3")
	if len(before) != 3 {
		t.Fatalf("NodeIDs %v, want 3", before)
	}

	e.requestRotation("r1")
	e.ringIs(api.ModeEnforce, wait, "2:active")
	if after := e.nodeIDsAreTheTable("NodeIDs after a rotation"); !maps.Equal(after, before) {
		t.Errorf("a rotation rewrote NodeIDs: resourceVersions %v, before %v", after, before)
	}

	// An operator's edit and deletion are undone.
	id1, id2 := e.ring().NodeID("n1"), e.ring().NodeID("n2")
	res := e.dyn().Resource(nodeid.GVR).Namespace(api.Namespace)
	if _, err := res.Patch(e.ctx, nodeid.Name(id1), "application/merge-patch+json", []byte(`{"node":"intruder"}`), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := res.Delete(e.ctx, nodeid.Name(id2), metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	stray := nodeid.Object(api.Namespace, nodeid.Entry{ID: 4000, Node: "n9"})
	if _, err := res.Create(e.ctx, stray, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	e.nodeIDsAreTheTable("NodeIDs after an edit, a deletion and a stray object")

	// n3 leaves: its ID is released and its NodeID goes.
	agents["n3"].stop()
	if err := e.cs.CoreV1().Nodes().Delete(e.ctx, "n3", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	e.eventually("n3's ID released", wait, func() (bool, string) { return e.ring().NodeID("n3") == 0, "" })
	e.nodeIDsAreTheTable("NodeIDs without n3")
	if table, _ := e.nodeIDs(); len(table) != 2 {
		t.Errorf("NodeIDs after n3 left: %v", table)
	}
}
