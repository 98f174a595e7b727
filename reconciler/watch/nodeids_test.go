package watch

import (
	"bytes"
	"context"
	"errors"
	"maps"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/nodeid"
)

// v2Ring is testRing with its generation a protocol v2 one (a public ring that needs no
// Secret).
func v2Ring(t *testing.T, names ...string) *keys.Ring {
	t.Helper()
	r := testRing(t, api.ModeEnforce, 8, names...)
	g := &r.Generations[0]
	g.Root, g.Salt = nil, bytes.Repeat([]byte{0xa2}, keys.GenerationSaltBytes)
	if err := r.Validate(); err != nil {
		t.Fatal(err)
	}
	return r
}

// TestWatcherNodeTableFromNodeIDs: a public ring that leaves its node table to the
// NodeIDs is acted on only with exactly the table its ConfigMap names (docs/keys.md §13):
// until the NodeIDs match, the agent acts on the last ring it had with its table, or, with
// none, is not ready; a ring with its table (an older master) is taken as it is.
func TestWatcherNodeTableFromNodeIDs(t *testing.T) {
	full := v2Ring(t, "a", "b")
	cmOf := func(r *keys.Ring, strip bool, rv string) *corev1.ConfigMap {
		data := map[string]string{}
		if strip {
			var digest string
			r, digest = nodeid.Strip(r)
			data[api.RingNodesDataKey] = digest
		}
		b, err := keys.MarshalPublic(r)
		if err != nil {
			t.Fatal(err)
		}
		data[api.RingDataKey] = string(b)
		return &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: api.Namespace, Name: api.RingConfigMapName, ResourceVersion: rv}, Data: data}
	}
	cs := fake.NewClientset(node("a", "198.18.0.1/24", "boot-a", nil), node("b", "198.18.0.2", "boot-b", nil), node("c", "198.18.0.3", "boot-c", nil),
		cmOf(full, false, "1"))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w, dc := runFakeWatcherDynamic(t, ctx, cs)
	waitFor(t, "the NodeIDs' list", w.ReadsNodeIDs)
	table := func(r *keys.Ring) map[string]uint32 {
		out := map[string]uint32{}
		for _, n := range r.Nodes {
			if !n.Released {
				out[n.Name] = n.ID
			}
		}
		return out
	}
	ringIs := func(what string, want *keys.Ring) *keys.Ring {
		t.Helper()
		var got *keys.Ring
		waitFor(t, what, func() bool {
			r, err := w.currentRing()
			if err != nil || !maps.Equal(table(r), table(want)) || r.LastGeneration != want.LastGeneration {
				return false
			}
			got = r
			return true
		})
		if again, _ := w.currentRing(); again != got {
			t.Fatalf("%s: the same versions gave another ring pointer (Inputs.KeysVersion)", what)
		}
		return got
	}
	update := func(cm *corev1.ConfigMap) {
		t.Helper()
		if _, err := cs.CoreV1().ConfigMaps(api.Namespace).Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the ConfigMap's update", func() bool {
			obj, ok, _ := w.ringCMs.GetStore().GetByKey(api.Namespace + "/" + api.RingConfigMapName)
			return ok && obj.(*corev1.ConfigMap).ResourceVersion == cm.ResourceVersion
		})
	}
	putIDs := func(entries ...nodeid.Entry) {
		t.Helper()
		for _, e := range entries {
			if _, err := dc.Resource(nodeid.GVR).Namespace(api.Namespace).Create(ctx, nodeid.Object(api.Namespace, e), metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
	}
	ringIs("the ring with its table", full)
	if w.ringNamesTable() {
		t.Fatal("a ring with its table names one")
	}

	// The master writes the NodeIDs, then the ring without its table: the ring is filled.
	putIDs(nodeid.Entry{ID: 1, Node: "a"}, nodeid.Entry{ID: 2, Node: "b"})
	update(cmOf(full, true, "2"))
	ringIs("the ring filled from the NodeIDs", full)
	if !w.ringNamesTable() {
		t.Fatal("a ring without its table names none")
	}

	// A step (another generation), same table: filled at once.
	step := full.Clone()
	step.LastGeneration = 2
	step.Generations = append(step.Generations, keys.Generation{Number: 2, State: keys.StatePending, Cipher: keys.AES128GCM, ICVBytes: 8,
		Salt: bytes.Repeat([]byte{0xb2}, keys.GenerationSaltBytes), Created: full.Generations[0].Created.Add(time.Hour)})
	update(cmOf(step, true, "3"))
	stepped := ringIs("a step without a table change", step)

	// A join whose ring arrives before its NodeID: the last ring with its table is acted
	// on (the step's), never the new ring with a table that is not its own.
	join := step.Clone()
	join.Nodes = append(join.Nodes, keys.NodeID{Name: "c", ID: 3})
	join.LastGeneration = 3
	join.Generations[1].Number = 3
	update(cmOf(join, true, "4"))
	if r, err := w.currentRing(); err != nil || r != stepped {
		t.Fatalf("before its NodeID: ring %v, %v; want the last ring with its table", keys.Summary(r), err)
	}
	// A NodeID that is not the named table (a stray c:4) changes nothing either.
	putIDs(nodeid.Entry{ID: 4, Node: "c"})
	time.Sleep(100 * time.Millisecond)
	if r, err := w.currentRing(); err != nil || r != stepped {
		t.Fatalf("with a NodeID of another table: ring %v, %v; want the last ring with its table", keys.Summary(r), err)
	}
	if err := dc.Resource(nodeid.GVR).Namespace(api.Namespace).Delete(ctx, nodeid.Name(4), metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	putIDs(nodeid.Entry{ID: 3, Node: "c"})
	ringIs("the join's ring once its NodeID is in", join)

	// An agent starting while the NodeIDs do not match is not ready (errNoTable) until
	// they do.
	cs3 := fake.NewClientset(node("a", "198.18.0.1/24", "boot-a", nil), cmOf(join, true, "5"))
	w3, dc3 := runFakeWatcherDynamic(t, ctx, cs3)
	if _, err := w3.currentRing(); !errors.Is(err, errNoTable) {
		t.Fatalf("no NodeIDs: %v, want errNoTable", err)
	}
	for _, e := range []nodeid.Entry{{ID: 1, Node: "a"}, {ID: 2, Node: "b"}, {ID: 3, Node: "c"}} {
		if _, err := dc3.Resource(nodeid.GVR).Namespace(api.Namespace).Create(ctx, nodeid.Object(api.Namespace, e), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "the third watcher's ring", func() bool { r, err := w3.currentRing(); return err == nil && maps.Equal(table(r), table(join)) })

	// An agent started with --node-ids=off reads the ring's own table (none: no node has
	// an ID, and its sync fails as an older agent's would) and does not say it reads them.
	w4, dc4 := runFakeWatcherDynamic(t, ctx, cs3, func(c *Config) { c.IgnoreNodeIDs = true })
	for _, e := range []nodeid.Entry{{ID: 1, Node: "a"}, {ID: 2, Node: "b"}, {ID: 3, Node: "c"}} {
		if _, err := dc4.Resource(nodeid.GVR).Namespace(api.Namespace).Create(ctx, nodeid.Object(api.Namespace, e), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(100 * time.Millisecond)
	if r, err := w4.currentRing(); err != nil || len(r.Nodes) != 0 || r.NodeID("a") != 0 || w4.ReadsNodeIDs() || w4.ringNamesTable() {
		t.Fatalf("--node-ids=off: ring %v, %v; reads NodeIDs %v; want the ring without a table, not reading them", keys.Summary(r), err, w4.ReadsNodeIDs())
	}

	// A master rolled back writes the ring with its table (and no digest): taken as it is.
	update(cmOf(join, false, "6"))
	waitFor(t, "the ring with its table again", func() bool { r, err := w.currentRing(); return err == nil && !w.ringNamesTable() && len(r.Nodes) == 3 })
}
