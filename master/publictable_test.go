package master

import (
	"context"
	"log/slog"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/nodeid"
	"github.com/secureoverlay/secureoverlay/nodekeys"
)

// TestNodeIDsLacking: which reporting agents hold the table in the public ring.
func TestNodeIDsLacking(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	rep := &api.NodeReport{}
	declares := nodekeys.Keys{Incarnation: nodekeys.Incarnation{BootID: "b1"}, Capabilities: []string{api.CapabilityNodeIDs}}
	lacks := nodekeys.Keys{Incarnation: nodekeys.Incarnation{BootID: "b1"}, Capabilities: []string{api.CapabilityRingConfigMap}}
	oldBoot := nodekeys.Keys{Incarnation: nodekeys.Incarnation{BootID: "b0"}, Capabilities: []string{api.CapabilityNodeIDs}}
	for _, tc := range []struct {
		name    string
		keys    *nodekeys.Keys
		report  *api.NodeReport
		grace   time.Duration
		after   time.Duration // since the node was first seen without keys of its boot
		lacking bool
		wait    time.Duration
	}{
		{"declares for its boot", &declares, rep, 0, 0, false, 0},
		{"its keys of its boot lack it (a rollback)", &lacks, rep, nodeIDsGrace, 0, true, 0},
		{"no report: not counted", &lacks, nil, 0, 0, false, 0},
		{"keys of another boot, no grace (the table is in)", &oldBoot, rep, 0, 0, true, 0},
		{"keys of another boot, within the grace (the table is out)", &oldBoot, rep, nodeIDsGrace, 10 * time.Second, false, 20 * time.Second},
		{"no keys, within the grace", nil, rep, nodeIDsGrace, 29 * time.Second, false, time.Second},
		{"no keys, past the grace (an agent that writes none)", nil, rep, nodeIDsGrace, 30 * time.Second, true, 0},
	} {
		unknown := map[string]time.Time{"gone/b9": t0}
		keysOf := func(string) (nodekeys.Keys, bool) {
			if tc.keys == nil {
				return nodekeys.Keys{}, false
			}
			return *tc.keys, true
		}
		nodes := []keys.NodeState{{Name: "n", BootID: "b1", Report: tc.report}}
		nodeIDsLacking(nodes, keysOf, unknown, t0, tc.grace) // first seen
		lacking, wait := nodeIDsLacking(nodes, keysOf, unknown, t0.Add(tc.after), tc.grace)
		if got := slices.Contains(lacking, "n"); got != tc.lacking || wait != tc.wait {
			t.Errorf("%s: lacking %v, wait %v; want %v, %v", tc.name, got, wait, tc.lacking, tc.wait)
		}
		if _, ok := unknown["gone/b9"]; ok {
			t.Errorf("%s: a node no longer seen is remembered", tc.name)
		}
	}
}

// TestWritePublicKeeps: while a restarted master's caches are on their first list
// (keep), the public ring keeps leaving its table out if its ConfigMap names this table,
// and carries it otherwise; without keep, the digest given decides.
func TestWritePublicKeeps(t *testing.T) {
	ring := keys.NewRing()
	ring.Mode, ring.Target, ring.LastGeneration = api.ModeOff, api.ModeOff, 0
	ring.Nodes = []keys.NodeID{{Name: "a", ID: 1}, {Name: "b", ID: 2}}
	digest := nodeid.TableDigest(ring)
	other := nodeid.Digest(map[string]uint32{"a": 1})
	stripped, _ := nodeid.Strip(ring)
	enc := func(r *keys.Ring) string {
		b, err := keys.MarshalPublic(r)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	withTable := map[string]string{api.RingDataKey: enc(ring)}
	without := func(d string) map[string]string {
		return map[string]string{api.RingDataKey: enc(stripped), api.RingNodesDataKey: d}
	}
	for _, tc := range []struct {
		name   string
		have   map[string]string // nil: no ConfigMap
		digest string
		keep   bool
		want   map[string]string
	}{
		{"keep: it names this table", without(digest), "", true, without(digest)},
		{"keep: it names another table", without(other), "", true, withTable},
		{"keep: it carries the table", withTable, "", true, withTable},
		{"keep: none yet", nil, "", true, withTable},
		{"the table out", withTable, digest, false, without(digest)},
		{"the table in", without(digest), "", false, withTable},
	} {
		cs := fake.NewClientset()
		if tc.have != nil {
			if _, err := cs.CoreV1().ConfigMaps(api.Namespace).Create(context.Background(), &corev1.ConfigMap{
				ObjectMeta: metav1.ObjectMeta{Namespace: api.Namespace, Name: api.RingConfigMapName}, Data: tc.have}, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		c := NewController(cs, Options{Identity: "m", Logger: slog.New(slog.DiscardHandler), Now: time.Now})
		if err := c.writePublic(context.Background(), ring, tc.digest, tc.keep); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		cm, err := cs.CoreV1().ConfigMaps(api.Namespace).Get(context.Background(), api.RingConfigMapName, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(cm.Data) != len(tc.want) || cm.Data[api.RingDataKey] != tc.want[api.RingDataKey] || cm.Data[api.RingNodesDataKey] != tc.want[api.RingNodesDataKey] {
			t.Errorf("%s: data %v, want %v", tc.name, cm.Data, tc.want)
		}
	}
}
