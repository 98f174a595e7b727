package master

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/nodekeys"
	"github.com/secureoverlay/secureoverlay/nodereport"
)

func newRegistry(t *testing.T, m *Metrics) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	if err := m.Register(reg); err != nil {
		t.Fatal(err)
	}
	return reg
}

const wait = 30 * time.Second

// value reads a single-series gauge or counter.
func value(c prometheus.Collector) float64 {
	ch := make(chan prometheus.Metric, 16)
	c.Collect(ch)
	close(ch)
	for m := range ch {
		var d dto.Metric
		if err := m.Write(&d); err != nil {
			return -1
		}
		if d.Gauge != nil {
			return d.Gauge.GetValue()
		}
		return d.Counter.GetValue()
	}
	return -1
}

// enableCluster brings n simulated nodes to mode enforce with generation 1.
func enableCluster(e *env, names ...string) map[string]*agent {
	agents := map[string]*agent{}
	for i, n := range names {
		agents[n] = e.addNode(n, i+1)
	}
	e.setConfig(map[string]string{api.ConfigEnabledKey: "true"}, nil)
	e.ringIs(api.ModeEnforce, wait, "1:active")
	return agents
}

// TestRotationWithSimulatedAgents: enable, then an operator-requested rotation and an
// early (sequence-number) rotation run to completion with agents that acknowledge with
// random delays; status and metrics follow.
func TestRotationWithSimulatedAgents(t *testing.T) {
	e := newEnv(t)
	m := e.startMaster("master-a", testPolicy())
	agents := enableCluster(e, "n1", "n2", "n3", "n4", "n5")

	e.requestRotation("2026-01-01T00:00:00Z")
	r := e.ringIs(api.ModeEnforce, wait, "2:active")
	if r.LastGeneration != 2 || r.LastRotateRequest != "2026-01-01T00:00:00Z" || r.Generation(2).Reason != "request" {
		t.Fatalf("after request: %s last=%d req=%q", keys.Summary(r), r.LastGeneration, r.LastRotateRequest)
	}
	// Every node has a distinct ID, so every sender has distinct SPIs.
	ids := map[uint32]bool{}
	for n := range agents {
		ids[r.NodeID(n)] = true
	}
	if len(ids) != len(agents) || ids[0] {
		t.Fatalf("node ids %+v", r.Nodes)
	}
	e.eventually("status to show generation 2", wait, func() (bool, string) {
		st := e.status()
		return st.ActiveGeneration == 2 && !st.RotationInProgress && st.LastRotateRequest == "2026-01-01T00:00:00Z" &&
			st.Mode == api.ModeEnforce && st.Leader == "master-a" && len(st.Lagging) == 0, ""
	})

	e.eventually("events on the secret", wait, func() (bool, string) {
		evs := strings.Join(e.eventReasons(), "\n")
		return strings.Contains(evs, "GenerationCreated: generation 2 created (request)") &&
			strings.Contains(evs, "GenerationActivated: generation 2 active") &&
			strings.Contains(evs, "ModeChanged: cluster mode encrypt -> enforce"), evs
	})

	// Early rotation: one agent's active SA nears the sequence threshold.
	agents["n3"].setSeq(0.75, 2)
	r = e.ringIs(api.ModeEnforce, wait, "3:active")
	if r.Generation(3).Reason != "sequence" || r.LastGeneration != 3 {
		t.Fatalf("early rotation: %s reason %q", keys.Summary(r), r.Generation(3).Reason)
	}
	// The report still says 0.75, but for generation 2: no further rotation.
	time.Sleep(time.Second)
	if r = e.ring(); r.LastGeneration != 3 {
		t.Fatalf("rotated again for a retired generation's sequence numbers: %s", keys.Summary(r))
	}
	if got := value(m.metrics.Rotations.WithLabelValues("request")); got != 1 {
		t.Errorf("rotations_total{reason=request} = %v", got)
	}
	if got := value(m.metrics.Rotations.WithLabelValues("sequence")); got < 1 {
		t.Errorf("rotations_total{reason=sequence} = %v", got)
	}
	e.eventually("metrics", wait, func() (bool, string) {
		return value(m.metrics.Generation) == 3 && value(m.metrics.Leader) == 1 &&
			value(m.metrics.Mode.WithLabelValues("enforce")) == 1, metricsText(t, m.metrics)
	})

	// Disable walks back through the modes and drops every key.
	e.setConfig(map[string]string{api.ConfigEnabledKey: "false"}, nil)
	r = e.ringIs(api.ModeOff, wait)
	if r.LastGeneration < 3 || r.Target != api.ModeOff {
		t.Fatalf("after disable: %s", keys.Summary(r))
	}
}

// TestLaggingAndDeletedNodes: a live node that has not installed the pending generation
// holds the switch (and is published as lagging); once it is deleted — or NotReady longer
// than the node timeout — it no longer does.
func TestLaggingAndDeletedNodes(t *testing.T) {
	e := newEnv(t)
	e.startMaster("master-a", testPolicy())
	agents := enableCluster(e, "n1", "n2", "n3", "n4")

	// n3 stops acknowledging; a rotation starts and must wait for it.
	agents["n3"].paused.Store(true)
	e.requestRotation("r1")
	e.ringIs(api.ModeEnforce, wait, "1:active", "2:pending")
	e.eventually("status to name n3 as lagging", wait, func() (bool, string) {
		st := e.status()
		return len(st.Lagging) == 1 && st.Lagging[0].Node == "n3" && st.PendingGeneration == 2, ""
	})
	time.Sleep(2 * time.Second) // several resyncs and node-timeouts' worth
	if r := e.ring(); r == nil || r.Pending() == nil || r.Active().Number != 1 {
		t.Fatalf("the lagging node did not hold the switch: %s", keys.Summary(r))
	}

	// Deleting n3 releases the switch.
	agents["n3"].stop()
	idN3 := e.ring().NodeID("n3")
	if err := e.cs.CoreV1().Nodes().Delete(e.ctx, "n3", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	r := e.ringIs(api.ModeEnforce, wait, "2:active")
	if r.NodeID("n3") != 0 {
		t.Fatalf("deleted node still holds an id: %+v", r.Nodes)
	}
	for _, n := range r.Nodes {
		if n.ID == idN3 && !n.Released {
			t.Fatalf("id %d of the deleted node reassigned while generation 1 could be live: %+v", idN3, r.Nodes)
		}
	}

	// A node NotReady longer than the node timeout does not block either.
	agents["n2"].paused.Store(true)
	e.requestRotation("r2")
	e.ringIs(api.ModeEnforce, wait, "2:active", "3:pending")
	node, err := e.cs.CoreV1().Nodes().Get(e.ctx, "n2", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range node.Status.Conditions {
		if node.Status.Conditions[i].Type == "Ready" {
			node.Status.Conditions[i].Status = "False"
			node.Status.Conditions[i].LastTransitionTime = metav1.Now()
		}
	}
	if _, err := e.cs.CoreV1().Nodes().UpdateStatus(e.ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	e.ringIs(api.ModeEnforce, wait, "3:active")
	e.eventually("status to list n2 as excluded", wait, func() (bool, string) {
		st := e.status()
		return len(st.Excluded) == 1 && st.Excluded[0].Node == "n2" && strings.Contains(st.Excluded[0].Reason, "NotReady"), ""
	})
}

// TestLeaderFailoverMidRotation: the leader is killed while a rotation waits for an
// agent; the other replica takes over and finishes the same rotation. The generation
// number goes up by exactly one.
func TestLeaderFailoverMidRotation(t *testing.T) {
	e := newEnv(t)
	replicas := map[string]*replica{"master-a": e.startMaster("master-a", testPolicy()), "master-b": e.startMaster("master-b", testPolicy())}
	agents := enableCluster(e, "n1", "n2", "n3")

	agents["n1"].paused.Store(true)
	e.requestRotation("failover")
	e.ringIs(api.ModeEnforce, wait, "1:active", "2:pending")
	leader := e.leaseHolder()
	if replicas[leader] == nil {
		t.Fatalf("lease holder %q is not a replica", leader)
	}
	replicas[leader].stop()
	other := "master-a"
	if leader == other {
		other = "master-b"
	}
	e.eventually("the other replica to take the lease", wait, func() (bool, string) {
		return e.leaseHolder() == other, e.leaseHolder()
	})
	agents["n1"].paused.Store(false)
	r := e.ringIs(api.ModeEnforce, wait, "2:active")
	e.eventually("status from the new leader", wait, func() (bool, string) {
		st := e.status()
		return st.Leader == other && st.ActiveGeneration == 2, st.Leader
	})
	time.Sleep(2 * time.Second) // several resyncs: nothing may rotate again
	r = e.ring()
	if r.LastGeneration != 2 || !slices.Equal(r.Numbers(), []uint32{2}) {
		t.Fatalf("failover rotated %d times: %s", r.LastGeneration-1, keys.Summary(r))
	}
	if got := value(replicas[other].metrics.Rotations.WithLabelValues("request")); got != 0 {
		t.Fatalf("the new leader created %v generations for a request already handled", got)
	}
}

// TestConcurrentControllersNeverDoubleRotate: even without leader election (a deposed
// leader still running), optimistic concurrency on the Secret lets only one write win.
func TestConcurrentControllersNeverDoubleRotate(t *testing.T) {
	e := newEnv(t)
	e.startMaster("master-a", testPolicy())
	enableCluster(e, "n1", "n2")
	// Two more controllers run outside the election, racing the leader.
	for _, id := range []string{"rogue-1", "rogue-2"} {
		cs, err := kubernetes.NewForConfig(e.masterConfig())
		if err != nil {
			t.Fatal(err)
		}
		c := NewController(cs, Options{Identity: id, Resync: 100 * time.Millisecond, Policy: testPolicy(), Logger: e.log.With("replica", id)})
		ctx, cancel := context.WithCancel(e.ctx)
		done := make(chan struct{})
		go func() { defer close(done); _ = c.Run(ctx) }()
		t.Cleanup(func() { cancel(); <-done })
	}
	for i, req := range []string{"c1", "c2", "c3"} {
		e.requestRotation(req)
		r := e.ringIs(api.ModeEnforce, wait, fmt.Sprintf("%d:active", 2+i))
		if r.LastGeneration != uint32(2+i) {
			t.Fatalf("request %s: %s last=%d", req, keys.Summary(r), r.LastGeneration)
		}
	}
}

// TestCorruptedSecretRefused: hand-edited or garbage Secret data is refused with a clear
// error, not overwritten, and the master keeps its last good ring, which the operator can
// restore with the reset annotation (or by deleting the Secret).
func TestCorruptedSecretRefused(t *testing.T) {
	e := newEnv(t)
	m := e.startMaster("master-a", testPolicy())
	enableCluster(e, "n1", "n2")
	good := e.ring()
	goodData := e.secret().Data[api.SecretDataKey]

	for _, c := range []struct {
		name string
		data []byte
		want string
	}{
		{"garbage", []byte("\x00\x01 not a ring"), "malformed JSON"},
		{"hand-edited", bytes.Replace(goodData, []byte(`"state": "active"`), []byte(`"state": "activ"`), 1), "generations[0].state is not one of pending, active, retiring"},
		{"truncated", goodData[:len(goodData)/2], "truncated"},
	} {
		s := e.secret()
		s.Data[api.SecretDataKey] = c.data
		bad, err := e.cs.CoreV1().Secrets(api.Namespace).Update(e.ctx, s, metav1.UpdateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		e.eventually(c.name+": refusal in the status", wait, func() (bool, string) {
			st := e.status()
			return strings.Contains(st.LastError, "refusing") && strings.Contains(st.LastError, c.want) &&
				strings.Contains(st.LastError, api.ResetRingAnnotation), st.LastError
		})
		// A rotation request must not make the master write over the bad data.
		e.requestRotation("while-corrupt-" + c.name)
		time.Sleep(1500 * time.Millisecond)
		now := e.secret()
		if now.ResourceVersion != bad.ResourceVersion || !bytes.Equal(now.Data[api.SecretDataKey], c.data) {
			t.Fatalf("%s: the master overwrote refused data", c.name)
		}
		if value(m.metrics.RingValid) != 0 || value(m.metrics.RingErrors) < 1 {
			t.Fatalf("%s: metrics do not show the refusal", c.name)
		}
		e.eventually(c.name+": warning event on the secret", wait, func() (bool, string) {
			evs := strings.Join(e.eventReasons(), "\n")
			return strings.Contains(evs, "InvalidKeyRing: ") && strings.Contains(evs, c.want), evs
		})
		if st := e.status(); st.ActiveGeneration != good.Active().Number {
			t.Fatalf("%s: status lost the last good ring: %+v", c.name, st)
		}
	}

	// The operator allows a reset: the master writes back its last good ring.
	s := e.secret()
	if s.Annotations == nil {
		s.Annotations = map[string]string{}
	}
	s.Annotations[api.ResetRingAnnotation] = "true"
	if _, err := e.cs.CoreV1().Secrets(api.Namespace).Update(e.ctx, s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	// The restored ring is the last good one; the pending rotation request then proceeds
	// from it (generation 2), never from scratch.
	var restored *keys.Ring
	e.eventually("a valid ring again", wait, func() (bool, string) { restored = e.ring(); return restored != nil, "" })
	if g := restored.Generation(1); g == nil || !g.Root.Equal(good.Generation(1).Root) || restored.Mode != api.ModeEnforce {
		t.Fatalf("the restored ring is not the last good one: %s", keys.Summary(restored))
	}
	r := e.ringIs(api.ModeEnforce, wait, "2:active")
	if r.LastGeneration != good.LastGeneration+1 {
		t.Fatalf("after restore: %s last=%d", keys.Summary(r), r.LastGeneration)
	}
	if _, ok := e.secret().Annotations[api.ResetRingAnnotation]; ok {
		t.Fatal("reset annotation left in place")
	}
	e.eventually("error cleared", wait, func() (bool, string) { st := e.status(); return st.LastError == "", st.LastError })

	// A deleted Secret is recreated from the last good ring, same keys.
	before := e.ring()
	if err := e.cs.CoreV1().Secrets(api.Namespace).Delete(e.ctx, api.SecretName, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	var after *keys.Ring
	e.eventually("secret recreated", wait, func() (bool, string) { after = e.ring(); return after != nil, "" })
	if after.Active().Number != before.Active().Number || !after.Active().Root.Equal(before.Active().Root) {
		t.Fatalf("recreated ring differs: %s vs %s", keys.Summary(after), keys.Summary(before))
	}

	// A Secret without the data key (e.g. pre-created by a manifest) is initialized; a
	// reset annotation on a valid ring is consumed without touching the keys.
	s = e.secret()
	s.Data = nil
	s.Annotations = map[string]string{api.ResetRingAnnotation: "true"}
	if _, err := e.cs.CoreV1().Secrets(api.Namespace).Update(e.ctx, s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	e.eventually("secret initialized", wait, func() (bool, string) { after = e.ring(); return after != nil, "" })
	if !after.Active().Root.Equal(before.Active().Root) {
		t.Fatalf("initialized ring differs: %s vs %s", keys.Summary(after), keys.Summary(before))
	}
	e.eventually("reset annotation consumed", wait, func() (bool, string) {
		_, ok := e.secret().Annotations[api.ResetRingAnnotation]
		return !ok, ""
	})
	if r := e.ring(); !r.Active().Root.Equal(before.Active().Root) {
		t.Fatal("consuming the reset annotation changed the keys")
	}
}

// TestSequenceClaimsRateLimited: one node that keeps reporting a high sequence fraction
// forces at most one early rotation per seq-min-interval. While it waits, the status says
// so and names the node; the rotation it then starts names the node in its Event.
func TestSequenceClaimsRateLimited(t *testing.T) {
	const minInterval = 6 * time.Second
	e := newEnv(t)
	policy := testPolicy()
	policy.SeqMinInterval = minInterval
	e.startMaster("master-a", policy)
	agents := enableCluster(e, "n1", "n2", "n3")
	created1 := e.ring().Generation(1).Created

	agents["n2"].setSeq(0.9, 1)
	e.eventually("status to defer the rotation and name n2", wait, func() (bool, string) {
		st := e.status()
		return strings.Contains(st.Deferred, "reported by n2") && strings.Contains(st.Deferred, "seq-min-interval"), st.Deferred
	})
	if r := e.ring(); r.LastGeneration != 1 {
		t.Fatalf("rotated before generation 1 was %s old: %s", minInterval, keys.Summary(r))
	}
	r := e.ringIs(api.ModeEnforce, wait, "2:active")
	g2 := r.Generation(2)
	if g2.Reason != "sequence" {
		t.Fatalf("generation 2 reason %q", g2.Reason)
	}
	if d := g2.Created.Sub(created1); d < minInterval {
		t.Fatalf("generation 2 created %s after generation 1, want ≥ %s", d, minInterval)
	}
	e.eventually("the GenerationCreated event to name n2", wait, func() (bool, string) {
		evs := strings.Join(e.eventReasons(), "\n")
		return strings.Contains(evs, "GenerationCreated: generation 2 created (sequence, reported by node n2)"), evs
	})

	// It keeps claiming, now for generation 2: the next early rotation waits a full
	// interval from generation 2's creation again.
	agents["n2"].setSeq(0.9, 2)
	r = e.ringIs(api.ModeEnforce, wait, "3:active")
	if d := r.Generation(3).Created.Sub(g2.Created); d < minInterval {
		t.Fatalf("generation 3 created %s after generation 2, want ≥ %s", d, minInterval)
	}
}

// TestSequenceClaimConfirmedByPeers: a node's sequence claim that its peers' inbound
// counters do not confirm starts no rotation (the status says so); once a peer's counters
// reach it, the early rotation runs.
func TestSequenceClaimConfirmedByPeers(t *testing.T) {
	e := newEnv(t)
	e.startMaster("master-a", testPolicy())
	agents := map[string]*agent{}
	for i, n := range []string{"n1", "n2", "n3"} {
		agents[n] = e.addNode(n, i+1)
	}
	// Their reports carry the counters before n2 claims (as every report of a current
	// agent does: until one does, a claim is taken alone, as from agents of 0.1). Set
	// before enabling, so that the reports the master reads to reach enforce carry them:
	// its caches, not only the API, hold them when n2's claim comes.
	agents["n1"].setInSeq(0.1, 1)
	agents["n3"].setInSeq(0.2, 1)
	e.setConfig(map[string]string{api.ConfigEnabledKey: "true"}, nil)
	e.ringIs(api.ModeEnforce, wait, "1:active")
	e.eventually("n1 and n3 to report inbound counters", wait, func() (bool, string) {
		r1, r3 := e.report("n1"), e.report("n3")
		return strings.Contains(r1, `"maxInSeqFraction":0.1`) && strings.Contains(r3, `"maxInSeqFraction":0.2`), r1 + " " + r3
	})
	agents["n2"].setSeq(0.9, 1)
	e.eventually("status to hold n2's claim for confirmation", wait, func() (bool, string) {
		st := e.status()
		return strings.Contains(st.Deferred, "reported by n2: 0.90 of generation 1) waits for a peer's inbound counters to confirm it (highest: 0.20)"), st.Deferred
	})
	time.Sleep(2 * time.Second) // several reconciles (resync 300 ms)
	if r := e.ring(); r.LastGeneration != 1 {
		t.Fatalf("an unconfirmed sequence claim rotated: %s", keys.Summary(r))
	}
	agents["n3"].setInSeq(0.89, 1)
	r := e.ringIs(api.ModeEnforce, wait, "2:active")
	if g2 := r.Generation(2); g2.Reason != "sequence" {
		t.Fatalf("generation 2 reason %q", g2.Reason)
	}
}

// TestAckTimeoutExcludesLaggingReadyNode: a Ready node whose agent stops acknowledging
// holds a rotation for the ack timeout, no longer: then the rotation completes without
// it, and the status, a NodeExcluded Event and the excluded_nodes metric name it. Once it
// catches up it is no longer excluded.
func TestAckTimeoutExcludesLaggingReadyNode(t *testing.T) {
	const ack = 4 * time.Second
	e := newEnv(t)
	policy := testPolicy()
	policy.AckTimeout = ack
	m := e.startMaster("master-a", policy)
	agents := enableCluster(e, "n1", "n2", "n3")

	agents["n3"].paused.Store(true)
	start := time.Now()
	e.requestRotation("r1")
	e.ringIs(api.ModeEnforce, wait, "1:active", "2:pending")
	e.eventually("status to name n3 as lagging", wait, func() (bool, string) {
		st := e.status()
		return len(st.Lagging) == 1 && st.Lagging[0].Node == "n3" && len(st.Excluded) == 0, fmt.Sprintf("%+v", st)
	})
	r := e.ringIs(api.ModeEnforce, wait, "2:active")
	if d := time.Since(start); d < ack {
		t.Fatalf("generation 2 active %s after the request: n3 held it less than the ack timeout %s", d, ack)
	}
	if n3 := e.report("n3"); strings.Contains(n3, `"generations":[1,2]`) || r.Active().Number != 2 {
		t.Fatalf("n3 installed generation 2 although paused (%s): the test proves nothing", n3)
	}
	e.eventually("status, Event and metric to name n3 as excluded", wait, func() (bool, string) {
		st := e.status()
		evs := strings.Join(e.eventReasons(), "\n")
		ok := len(st.Excluded) == 1 && st.Excluded[0].Node == "n3" && strings.Contains(st.Excluded[0].Reason, "ack-timeout 4s") &&
			strings.Contains(evs, "NodeExcluded: node n3 no longer holds rotation or cutover") && value(m.metrics.Excluded) == 1
		return ok, fmt.Sprintf("excluded %+v\nevents:\n%s", st.Excluded, evs)
	})

	// n3 resumes: it installs generation 2 and is no longer excluded.
	agents["n3"].paused.Store(false)
	e.eventually("n3 no longer excluded", wait, func() (bool, string) {
		st := e.status()
		return len(st.Excluded) == 0 && value(m.metrics.Excluded) == 0, fmt.Sprintf("%+v", st.Excluded)
	})
}

// TestProtocolV2Upgrade: with protocol v2 on, the real master keeps creating v1
// generations while any node does not publish its key for the next one (an agent of the
// previous version, during a rolling update), and creates a v2 generation — a public salt,
// no root in the Secret — once every node does; the rotation then completes as any other.
func TestProtocolV2Upgrade(t *testing.T) {
	e := newEnv(t)
	policy := testPolicy()
	policy.ProtocolV2 = true
	r0 := e.startMaster("master-a", policy)
	agents := enableCluster(e, "n1", "n2", "n3")
	if g := e.ring().Generation(1); g.V2() {
		t.Fatal("generation 1 is v2 while no node publishes keys")
	}
	agents["n1"].publish.Store(true)
	agents["n2"].publish.Store(true)
	// Their NodeKeys reach the master's caches (not only the API: the master decides from
	// what its informers hold, and nothing orders the NodeKeys watch before the
	// ConfigMap's).
	publishing(e, r0, 2)
	e.requestRotation("2026-01-01T00:00:00Z")
	r := e.ringIs(api.ModeEnforce, wait, "2:active")
	if g := r.Generation(2); g.V2() || len(g.Root) != keys.RootKeyBytes {
		t.Fatalf("generation 2 with n3 not publishing: %s", keys.Summary(r))
	}
	agents["n3"].publish.Store(true)
	e.eventually("every node publishing generation 3's key", wait, func() (bool, string) {
		for _, n := range []string{"n1", "n2", "n3"} {
			u, err := e.dyn().Resource(nodekeys.GVR).Namespace(api.Namespace).Get(e.ctx, n, metav1.GetOptions{})
			if err != nil {
				return false, err.Error()
			}
			if k, err := nodekeys.Parse(u); err != nil || len(k.Keys) == 0 || k.Keys[len(k.Keys)-1].Generation != 3 {
				return false, fmt.Sprintf("%s: %+v %v", n, k, err)
			}
		}
		return true, ""
	})
	publishing(e, r0, 3)
	e.requestRotation("2026-01-02T00:00:00Z")
	r = e.ringIs(api.ModeEnforce, wait, "3:active")
	g := r.Generation(3)
	if !g.V2() || len(g.Root) != 0 || len(g.Salt) != keys.GenerationSaltBytes {
		t.Fatalf("generation 3 with every node publishing: %s", keys.Summary(r))
	}
	e.eventually("the v2 generation's event", wait, func() (bool, string) {
		evs := strings.Join(e.eventReasons(), "\n")
		return strings.Contains(evs, "GenerationCreated: generation 3 created (request, protocol v2)"), evs
	})
}

// publishing waits until replica r, leading, counts n nodes publishing their keys for the
// next generation in its caches (secureoverlay_master_next_generation_publishing_nodes).
func publishing(e *env, r *replica, n int) {
	e.t.Helper()
	e.eventually(fmt.Sprintf("the master seeing %d nodes publish keys for the next generation", n), wait, func() (bool, string) {
		got := value(r.metrics.NextGenPublishing)
		return got == float64(n), fmt.Sprintf("%v", got)
	})
}

// TestReportsFromNodeStatuses: the master reads a node's report from its NodeStatus as from
// its NodeReport, and takes the later of the two (docs/keys.md §6): n2 writes only a
// NodeStatus; n3 writes a NodeStatus while a NodeReport of its boot that says "off" stays
// behind (as an agent that stopped writing NodeReports leaves it); n4 writes a NodeReport
// while an older NodeStatus stays behind (an agent rolled back to a version that writes
// NodeReports only). Enable and a rotation complete only if every node's current report
// is read.
func TestReportsFromNodeStatuses(t *testing.T) {
	e := newEnv(t)
	e.startMaster("master-a", testPolicy())
	stale := func(node, boot string, write func(context.Context, dynamic.Interface, string, string, string, string, []byte) error) {
		t.Helper()
		rep := api.NodeReport{Mode: api.ModeOff, Incarnation: boot, UID: "uid-" + node, Epoch: "e-" + node,
			LastSync: time.Now().Add(-time.Minute).UTC()}
		b, _ := json.Marshal(rep)
		if err := write(e.ctx, e.dyn(), api.Namespace, node, "", string(rep.Mode), b); err != nil {
			t.Fatal(err)
		}
	}
	stale("n3", "boot-n3", nodereport.Write)
	stale("n4", "boot-n4", nodereport.WriteStatus)
	e.addNodeWith("n1", 1, kindReport, "")
	e.addNodeWith("n2", 2, kindStatus, "")
	e.addNodeWith("n3", 3, kindStatus, "boot-n3")
	e.addNodeWith("n4", 4, kindReport, "boot-n4")
	e.setConfig(map[string]string{api.ConfigEnabledKey: "true"}, nil)
	e.ringIs(api.ModeEnforce, wait, "1:active")
	e.requestRotation("2026-01-01T00:00:00Z")
	e.ringIs(api.ModeEnforce, wait, "2:active")
	e.eventually("no node lagging", wait, func() (bool, string) {
		st := e.status()
		return st.ActiveGeneration == 2 && !st.RotationInProgress && len(st.Lagging) == 0, fmt.Sprintf("%+v", st)
	})
	// What the master read is what nodereport.Read reads: the NodeStatus for n2 and n3,
	// the NodeReport for n4.
	for _, n := range []string{"n2", "n3", "n4"} {
		if r := e.report(n); !strings.Contains(r, `"generations":[2]`) && !strings.Contains(r, `"generations":[1,2]`) {
			t.Errorf("%s: nodereport.Read = %s, want its current report", n, r)
		}
	}
}
