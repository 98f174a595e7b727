package master

import (
	"fmt"
	"maps"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
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

// publicForm reads the public ring ConfigMap: the digest it names ("" : none) and the
// number of entries its ring's table has.
func publicForm(cm *corev1.ConfigMap) (digest string, entries int, err error) {
	r, err := keys.Parse([]byte(cm.Data[api.RingDataKey]))
	if err != nil {
		return "", 0, err
	}
	return cm.Data[api.RingNodesDataKey], len(r.Nodes), nil
}

// strippedAndFilled waits until the public ring leaves its table out, names the digest of
// the Secret's table, and the NodeIDs fill it to that table (what an agent acts on).
func (e *env) strippedAndFilled(what string) {
	e.t.Helper()
	e.eventually(what, wait, func() (bool, string) {
		cm, err := e.cs.CoreV1().ConfigMaps(api.Namespace).Get(e.ctx, api.RingConfigMapName, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		digest, n, err := publicForm(cm)
		if err != nil || digest == "" || n != 0 {
			return false, fmt.Sprintf("digest %q, %d entries, %v", digest, n, err)
		}
		pub, _ := keys.Parse([]byte(cm.Data[api.RingDataKey]))
		var entries []nodeid.Entry
		l, err := e.dyn().Resource(nodeid.GVR).Namespace(api.Namespace).List(e.ctx, metav1.ListOptions{})
		if err != nil {
			return false, err.Error()
		}
		for i := range l.Items {
			en, err := nodeid.Parse(&l.Items[i])
			if err != nil {
				return false, err.Error()
			}
			entries = append(entries, en)
		}
		filled, ok := nodeid.Fill(pub, entries, digest)
		if !ok {
			return false, fmt.Sprintf("the NodeIDs %v do not fill the ring", entries)
		}
		got, _ := nodeid.IDs(filled, nil, "")
		want, _ := nodeid.IDs(e.ring(), nil, "")
		return maps.Equal(got, want) && digest == nodeid.TableDigest(e.ring()), fmt.Sprintf("filled %v, the Secret's %v", got, want)
	})
}

// carriesTable waits until the public ring carries the Secret's table and names no digest.
func (e *env) carriesTable(what string) {
	e.t.Helper()
	e.eventually(what, wait, func() (bool, string) {
		cm, err := e.cs.CoreV1().ConfigMaps(api.Namespace).Get(e.ctx, api.RingConfigMapName, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		digest, n, err := publicForm(cm)
		return err == nil && digest == "" && n == len(e.ring().Nodes), fmt.Sprintf("digest %q, %d entries, %v", digest, n, err)
	})
}

// watchPublic records every version of the public ring ConfigMap from now on; stop
// returns them as (digest, entries) pairs.
func (e *env) watchPublic() (stop func() []string) {
	e.t.Helper()
	cms := e.cs.CoreV1().ConfigMaps(api.Namespace)
	l, err := cms.List(e.ctx, metav1.ListOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	w, err := cms.Watch(e.ctx, metav1.ListOptions{ResourceVersion: l.ResourceVersion, FieldSelector: "metadata.name=" + api.RingConfigMapName})
	if err != nil {
		e.t.Fatal(err)
	}
	var mu sync.Mutex
	var seen []string
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ev := range w.ResultChan() {
			cm, ok := ev.Object.(*corev1.ConfigMap)
			if !ok {
				continue
			}
			digest, n, err := publicForm(cm)
			mu.Lock()
			seen = append(seen, fmt.Sprintf("%s digest=%q entries=%d err=%v", ev.Type, digest, n, err))
			mu.Unlock()
		}
	}()
	return func() []string {
		time.Sleep(500 * time.Millisecond) // the last writes' events
		w.Stop()
		<-done
		mu.Lock()
		defer mu.Unlock()
		return seen
	}
}

// noTable fails unless every recorded version of the public ring left its table out.
func noTable(t *testing.T, what string, seen []string) {
	t.Helper()
	for _, s := range seen {
		if strings.Contains(s, `digest=""`) || !strings.Contains(s, "entries=0") {
			t.Errorf("%s: the public ring carried its table: %s (all: %v)", what, s, seen)
			return
		}
	}
}

// TestPublicRingLeavesItsTable: a real master on a real API server writes the public ring
// without its node table, naming its digest, once every reporting agent declares that it
// reads the NodeIDs (docs/keys.md §13); the NodeIDs then fill it to the Secret's table. A
// rotation, a master's restart and a join (whose NodeKeys may come after its report)
// never put the table back; an agent that stops declaring (a rollback) does, until it
// declares again.
func TestPublicRingLeavesItsTable(t *testing.T) {
	e := newEnv(t)
	m := e.startMaster("master-a", testPolicy())
	agents := enableCluster(e, "n1", "n2", "n3")
	e.carriesTable("the table while no agent declares node-ids")
	for _, a := range agents {
		a.readsRing.Store(true)
		a.readsIDs.Store(true)
	}
	e.strippedAndFilled("the ring without its table once every agent reads the NodeIDs")
	e.eventually("the status says where the table is", wait, func() (bool, string) {
		st := e.status()
		return st.NodeTable == api.NodeTableIDs && st.NodeTableWhy == "", st.NodeTable + ": " + st.NodeTableWhy
	})

	stop := e.watchPublic()
	e.requestRotation("r1")
	e.ringIs(api.ModeEnforce, wait, "2:active")
	e.strippedAndFilled("after a rotation")
	seen := stop()
	if len(seen) == 0 {
		t.Fatal("a rotation wrote no public ring")
	}
	noTable(t, "a rotation", seen)

	// A rollback of n2's agent: the table comes back, and leaves once it declares again.
	agents["n2"].readsIDs.Store(false)
	e.carriesTable("the table while n2's agent does not declare node-ids")
	e.eventually("the status names n2", wait, func() (bool, string) {
		st := e.status()
		return st.NodeTable == api.NodeTableRing && strings.Contains(st.NodeTableWhy, "node n2"), st.NodeTable + ": " + st.NodeTableWhy
	})
	agents["n2"].readsIDs.Store(true)
	e.strippedAndFilled("without the table once n2 declares again")

	// A master's restart keeps the form (its caches are on their first list meanwhile).
	stop = e.watchPublic()
	m.stop()
	e.startMaster("master-b", testPolicy())
	e.requestRotation("r2")
	e.ringIs(api.ModeEnforce, wait, "3:active")
	e.strippedAndFilled("after the new master's rotation")
	noTable(t, "a master's restart and a rotation", stop())

	// A join: the new node gets its NodeID and the digest changes; the table stays out.
	stop = e.watchPublic()
	e.addNodeSetup("n4", 4, kindReport, "", func(a *agent) { a.readsRing.Store(true); a.readsIDs.Store(true) })
	e.eventually("n4's ID", wait, func() (bool, string) { return e.ring().NodeID("n4") != 0, "" })
	e.strippedAndFilled("with n4")
	noTable(t, "a join", stop())
}
