package master

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
)

// Metrics are the master's Prometheus metrics. None carries key material.
type Metrics struct {
	Rotations       *prometheus.CounterVec
	Generation      prometheus.Gauge
	PendingGen      prometheus.Gauge
	LiveGenerations prometheus.Gauge
	Lagging         prometheus.Gauge
	Excluded        prometheus.Gauge
	Leader          prometheus.Gauge
	Mode            *prometheus.GaugeVec
	RingValid       prometheus.Gauge
	RingErrors      prometheus.Counter
	ReconcileErrors prometheus.Counter
	// ShadowNodes and ShadowUnconfirmed: protocol v2's readiness run in shadow on the
	// reports' digests (docs/protocol-v2.md §9 step 1).
	ShadowNodes       *prometheus.GaugeVec
	ShadowUnconfirmed *prometheus.GaugeVec
	// ViewWrites counts NodeView writes by result (ok, error; §9 step 2).
	ViewWrites *prometheus.CounterVec
	// ViewsQueued: NodeViews waiting to be written, by priority (gating: the view lets its
	// agent use a pair it cannot yet; deferred: only a new key digest or more exceptions).
	// Gating views go first, the largest gain first.
	ViewsQueued *prometheus.GaugeVec
	// ViewsSkipped counts NodeViews not written because every agent publishes rows and
	// the node is outside its own re-key phase (docs/protocol-v2.md §9 step 3).
	ViewsSkipped prometheus.Counter
	// NextGenPublishing: the nodes whose agent publishes its key for the next generation
	// (a NodeKeys of its report's key incarnation). With --protocol-v2 the next generation
	// is a v2 one only if every node not excluded does (docs/keys.md §10).
	NextGenPublishing prometheus.Gauge
}

// NewMetrics creates the metrics (unregistered).
func NewMetrics() *Metrics {
	const ns, sub = "secureoverlay", "master"
	return &Metrics{
		Rotations: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "rotations_total",
			Help: "Key generations created, by reason (initial, interval, request, sequence)."}, []string{"reason"}),
		Generation: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "active_generation",
			Help: "Number of the active key generation (0: none)."}),
		PendingGen: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "pending_generation",
			Help: "Number of the pending key generation (0: no rotation waiting for agents)."}),
		LiveGenerations: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "live_generations",
			Help: "Key generations in the ring (pending, active and retiring)."}),
		Lagging: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "lagging_nodes",
			Help: "Live nodes holding the step the master waits for."}),
		Excluded: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "excluded_nodes",
			Help: "Nodes no longer holding rotation or cutover: NotReady longer than the node timeout, or Ready but lagging longer than the ack timeout."}),
		Leader: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "leader",
			Help: "1 while this replica holds the leader lease."}),
		Mode: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "mode",
			Help: "1 for the cluster mode the master has set."}, []string{"mode"}),
		RingValid: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "ring_valid",
			Help: "0 while the key ring Secret holds data the master refuses."}),
		RingErrors: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "ring_refused_total",
			Help: "Reconciles that refused an invalid key ring Secret."}),
		ReconcileErrors: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "reconcile_errors_total",
			Help: "Reconciles that failed and were retried (including write conflicts)."}),
		ShadowNodes: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "readiness_shadow_nodes",
			Help: "Protocol v2 readiness in shadow: live nodes with a current key incarnation (with=key), of those with a readiness status (with=status), and with a readiness row (NodeRow) for their current keys (with=row; under --protocol-v2)."}, []string{"with"}),
		ShadowUnconfirmed: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "readiness_shadow_unconfirmed_pairs",
			Help: "Protocol v2 readiness: ordered pairs of live nodes the reports' digests do not confirm, inbound (B holds A's SAs) and outbound (B sends A ESP); 0 in a steady state. The NodeViews made from these confirmations decide beside the reports' lists."}, []string{"direction"}),
		ViewWrites: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "readiness_view_writes_total",
			Help: "Protocol v2 readiness: NodeView writes, by result (ok, error)."}, []string{"result"}),
		ViewsQueued: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "readiness_views_queued",
			Help: "Protocol v2 readiness: NodeViews waiting to be written, by priority (gating: the view lets its node use pairs it cannot use yet, written first, most pairs first; deferred: the rest)."}, []string{"priority"}),
		ViewsSkipped: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "readiness_views_skipped_total",
			Help: "Protocol v2 readiness: NodeView changes not written because every agent publishes its readiness row (NodeRow) and the node's pending pairs are all with peers that re-keyed after its view: their rows confirm them."}),
		NextGenPublishing: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "next_generation_publishing_nodes",
			Help: "Nodes whose agent publishes its public key for the next key generation (NodeKeys of the key incarnation its report shows). With --protocol-v2 the next generation is a v2 one (no shared root) only if every node not excluded does."}),
	}
}

// Register adds every metric to reg.
func (m *Metrics) Register(reg prometheus.Registerer) error {
	for _, c := range []prometheus.Collector{m.Rotations, m.Generation, m.PendingGen, m.LiveGenerations, m.Lagging,
		m.Excluded, m.Leader, m.Mode, m.RingValid, m.RingErrors, m.ReconcileErrors, m.ShadowNodes, m.ShadowUnconfirmed, m.ViewWrites, m.ViewsQueued, m.ViewsSkipped,
		m.NextGenPublishing} {
		if err := reg.Register(c); err != nil {
			return err
		}
	}
	return nil
}

func (m *Metrics) observe(res keys.Result) {
	r := res.Ring
	var active, pending float64
	if g := r.Active(); g != nil {
		active = float64(g.Number)
	}
	if g := r.Pending(); g != nil {
		pending = float64(g.Number)
	}
	m.Generation.Set(active)
	m.PendingGen.Set(pending)
	m.LiveGenerations.Set(float64(len(r.Generations)))
	m.Lagging.Set(float64(len(res.Lagging)))
	m.Excluded.Set(float64(len(res.Excluded)))
	for _, mode := range api.Modes {
		v := 0.0
		if mode == r.Mode {
			v = 1
		}
		m.Mode.WithLabelValues(string(mode)).Set(v)
	}
}

func (m *Metrics) observeShadow(c shadowCounts) {
	m.ShadowNodes.WithLabelValues("key").Set(float64(c.Nodes))
	m.ShadowNodes.WithLabelValues("status").Set(float64(c.Statuses))
	m.ShadowUnconfirmed.WithLabelValues("in").Set(float64(c.Unconfirmed[0]))
	m.ShadowUnconfirmed.WithLabelValues("out").Set(float64(c.Unconfirmed[1]))
}
