package agent

import (
	"os"
	"strconv"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/secureoverlay/secureoverlay/reconciler/kernelinfo"
)

// Metrics are the agent's Prometheus metrics, in their own registry. Nothing here ever
// carries key material: labels are counter names, directions and modes.
type Metrics struct {
	Registry *prometheus.Registry

	SyncDuration *prometheus.HistogramVec // kind=full|partial
	Syncs        *prometheus.CounterVec   // kind, result=ok|error
	MemoUpdates  *prometheus.CounterVec   // how=full|same|hint|scan (desired.Change.How)
	Writes       *prometheus.CounterVec   // object=state|policy, op=add|replace|update|delete
	States       prometheus.Gauge
	Policies     prometheus.Gauge
	Rules        prometheus.Gauge
	MaxSeq       prometheus.Gauge
	LastSync     prometheus.Gauge
	SyncError    prometheus.Gauge
	Mode         *prometheus.GaugeVec // mode
	BudgetMTU    prometheus.Gauge
	ExternalMTU  prometheus.Gauge
	Peers        *prometheus.GaugeVec // state=expected|encrypted|inbound|dropping|skipped
	NotCovered   prometheus.Gauge
	Conflicts    prometheus.Gauge       // addresses claimed by more than one Node
	ReportWrites *prometheus.CounterVec // reason=changed|heartbeat, result
	// Epochs counts SA epochs chosen: reason=new (no ledger in this boot), adopted (a
	// restart kept the ledger's epoch), other or damaged (the ledger was made for another
	// boot or Node object, or did not parse), lost (an SA of the epoch was missing: every
	// key changes).
	Epochs *prometheus.CounterVec
	// RingRefused counts syncs that refused a key ring older than one already accepted.
	RingRefused prometheus.Counter
	// GateReady is 1 once this process marked the boot's data plane programmed (the CNI
	// plugin lets pods start), GateErrors counts failed writes of the boot gate's files by
	// file=state|ready (package gate).
	GateReady  prometheus.Gauge
	GateErrors *prometheus.CounterVec
	// Kernel is an info metric (value 1, one series) of what the agent detected of its
	// kernel at start (SetKernel): release, pcpu_sa, esp4_offload.
	Kernel *prometheus.GaugeVec
	// Lanes is the per-CPU lane count this node publishes for its SA epoch.
	Lanes prometheus.Gauge
	// ViewPairs counts the peers by direction (in: may send ESP; out: may drop plaintext)
	// and verdict (agree, ahead, behind; confirmed, unconfirmed for a peer whose report
	// omits the lists) of protocol v2's rule on this node's NodeView and its peers' rows
	// against v1's lists, as of the last sync; ViewConsistent is 1 when that view's key
	// digest matched this node's (docs/protocol-v2.md §9 steps 2–4).
	ViewPairs      *prometheus.GaugeVec
	ViewConsistent prometheus.Gauge
	// RowPairs is ViewPairs from the peers' readiness rows alone; Rows counts the rows
	// taken (docs/keys.md §12).
	RowPairs *prometheus.GaugeVec
	Rows     prometheus.Gauge
	// ReportLists is 1 while the report lists its per-pair claims (lists.go).
	ReportLists prometheus.Gauge
	// NodeReport is 1 while the report goes to the NodeReport as well as the NodeStatus
	// (nodereports.go).
	NodeReport prometheus.Gauge

	mu    sync.Mutex
	drops []PlaintextCount
}

// NewMetrics registers every metric; xfrmStatPath is read on each scrape ("" for
// /proc/net/xfrm_stat).
func NewMetrics(xfrmStatPath string) *Metrics {
	if xfrmStatPath == "" {
		xfrmStatPath = "/proc/net/xfrm_stat"
	}
	const ns = "secureoverlay_agent"
	m := &Metrics{Registry: prometheus.NewRegistry()}
	m.SyncDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: ns, Name: "sync_duration_seconds",
		Help:    "Duration of one sync (snapshot, compute, xfrm and iptables apply); kind=full re-read the kernel, partial trusted the appliers' caches.",
		Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}}, []string{"kind"})
	m.Syncs = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "syncs_total", Help: "Syncs by kind and result."}, []string{"kind", "result"})
	m.MemoUpdates = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "desired_updates_total",
		Help: "Updates of the desired state by how the changed peers were found: full (recomputed whole), same (no node changed), hint (the nodes the watcher's events named), scan (every Node compared)."}, []string{"how"})
	m.Writes = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "kernel_writes_total", Help: "xfrm kernel writes by object and operation."}, []string{"object", "op"})
	m.States = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "xfrm_states", Help: "xfrm states (SAs) owned by the agent after the last successful sync."})
	m.Policies = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "xfrm_policies", Help: "xfrm policies owned by the agent after the last successful sync."})
	m.Rules = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "iptables_rules", Help: "Plaintext-IPIP iptables rules owned by the agent after the last successful sync."})
	m.MaxSeq = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "max_sequence_fraction", Help: "Highest outbound ESP sequence number of any owned SA as a fraction of its soft packet limit (rotation is due well before 1)."})
	m.LastSync = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "last_sync_timestamp_seconds", Help: "Unix time of the last successful sync."})
	m.SyncError = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "sync_error", Help: "1 when the last sync failed."})
	m.Mode = prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "mode", Help: "1 for the cutover mode the kernel implements."}, []string{"mode"})
	m.BudgetMTU = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "budget_mtu_bytes", Help: "Largest pod/tunnel MTU that fits the encryption budget."})
	m.ExternalMTU = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "external_mtu_bytes", Help: "External MTU the budget was computed from."})
	m.Peers = prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "peers", Help: "Peers by state (expected, encrypted, inbound, dropping, skipped)."}, []string{"state"})
	m.NotCovered = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "not_covered", Help: "Traffic classes the desired state leaves in plaintext (Never pools, BGP peers outside the cluster, ...)."})
	m.ReportWrites = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "report_writes_total", Help: "Node report annotation patches."}, []string{"reason", "result"})
	m.Epochs = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "sa_epochs_total", Help: "SA epochs chosen, by reason (new, adopted, other, damaged, lost)."}, []string{"reason"})
	m.Registry.MustRegister(m.Epochs)
	m.RingRefused = prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "ring_refused_total", Help: "Syncs that refused a key ring older than one this node accepted before (a restored or edited Secret)."})
	m.Registry.MustRegister(m.RingRefused)
	m.GateReady = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "boot_gate_ready",
		Help: "1 once this boot's data plane is marked programmed, so the CNI plugin lets new pods start (0: new pods are held if the node encrypted before it booted)."})
	m.GateErrors = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "boot_gate_write_errors_total",
		Help: "Failed writes of the boot gate's files (file=state: the next boot may not hold pods; file=ready: new pods stay held)."}, []string{"file"})
	m.Registry.MustRegister(m.GateReady, m.GateErrors)
	m.Kernel = prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "kernel_info",
		Help: "1, labelled with what the agent detected of its kernel at start: release (/proc/sys/kernel/osrelease), pcpu_sa (true: the kernel keeps a state's CPU number, per-CPU SAs: probed at start; where the probe failed, the release >= 6.13), esp4_offload (loaded, builtin, absent, not-loaded: not a loaded module, built in or not unknown; unknown: /proc/modules unreadable)."},
		[]string{"release", "pcpu_sa", "esp4_offload"})
	m.Registry.MustRegister(m.Kernel)
	m.Lanes = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "pcpu_lanes",
		Help: "Per-CPU outbound lanes this node sends on in its SA epoch, as published in its NodeKeys (0: none; docs/dataplane.md §10). Toward each peer that takes lanes, one outbound SA per lane plus a fallback, each under its own key."})
	m.Registry.MustRegister(m.Lanes)
	m.ViewPairs = prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "readiness_view_pairs",
		Help: "Protocol v2 readiness: peers by direction (in: may this node send ESP; out: may it drop their plaintext) and verdict of the master's NodeView and the peers' rows against the peers' reports (agree; ahead: they say ready, the reports do not; behind: the reverse); ahead and behind are 0 in a steady state. A pair is ready when either says so. For a peer whose report omits the lists (every live agent decides from views and rows), the rule's answer alone: confirmed or unconfirmed (0 in a steady state)."},
		[]string{"direction", "verdict"})
	m.ViewConsistent = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "readiness_view_consistent",
		Help: "1 when this node's NodeView was written for the key view this node has (its key digest matches), else 0."})
	m.RowPairs = prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "readiness_row_pairs",
		Help: "Protocol v2 readiness in shadow, from the peers' readiness rows (NodeRows) alone: peers by direction and verdict against the peers' reports, as readiness_view_pairs. ahead is 0 always; behind is expected for a peer whose row was complete before this node last re-keyed (its NodeView covers those)."},
		[]string{"direction", "verdict"})
	m.Rows = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "readiness_rows",
		Help: "Peers whose readiness row (NodeRow) was taken at the last sync: its node ID is the peer's and it is for the peer's current keys."})
	m.ReportLists = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "report_lists",
		Help: "1 while this node's report lists its per-pair claims (inboundFrom, encryptingTo: a live peer's agent reads them, or --report-lists=always), 0 once every live peer decides from NodeViews and NodeRows."})
	m.ReportLists.Set(1) // the report lists its claims until the first decision (lists.go)
	m.NodeReport = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "report_nodereport",
		Help: "1 while this node's report goes to its NodeReport, which every agent watches, as well as to its NodeStatus (a live peer's agent reads NodeReports, --node-reports=always, or the NodeStatus is refused), 0 once it goes to the NodeStatus only."})
	m.NodeReport.Set(1) // until the first decision (nodereports.go)
	m.Registry.MustRegister(m.ViewPairs, m.ViewConsistent, m.RowPairs, m.Rows, m.ReportLists, m.NodeReport)
	m.Conflicts = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "address_conflicts", Help: "IPv4 addresses claimed by more than one Node (each pair kept as it was, or given nothing)."})
	m.Registry.MustRegister(m.Conflicts)
	m.Registry.MustRegister(m.SyncDuration, m.Syncs, m.MemoUpdates, m.Writes, m.States, m.Policies, m.Rules, m.MaxSeq, m.LastSync,
		m.SyncError, m.Mode, m.BudgetMTU, m.ExternalMTU, m.Peers, m.NotCovered, m.ReportWrites,
		&xfrmStatCollector{path: xfrmStatPath}, &dropCollector{m: m},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// SetKernel sets the kernel info metric (replacing any earlier value).
func (m *Metrics) SetKernel(i kernelinfo.Info) {
	m.Kernel.Reset()
	m.Kernel.WithLabelValues(i.Release, strconv.FormatBool(i.PerCPUSAs), string(i.ESP4Offload())).Set(1)
}

// PlaintextCount is a rule counter from the iptables applier: packets of plaintext IPIP
// matched (Action count: would be dropped in enforce; drop: dropped).
type PlaintextCount struct {
	Direction string // in | out
	Action    string // count | drop
	Packets   uint64
	Bytes     uint64
}

// SetPlaintext records the latest rule counters (summed per direction and action).
func (m *Metrics) SetPlaintext(c []PlaintextCount) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.drops = append(m.drops[:0], c...)
}

var plaintextDesc = prometheus.NewDesc("secureoverlay_agent_plaintext_packets_total",
	"Plaintext IPIP packets matched by the agent's rules (action=drop: dropped in enforce; action=count: would be dropped).",
	[]string{"direction", "action"}, nil)

type dropCollector struct{ m *Metrics }

func (c *dropCollector) Describe(ch chan<- *prometheus.Desc) { ch <- plaintextDesc }
func (c *dropCollector) Collect(ch chan<- prometheus.Metric) {
	c.m.mu.Lock()
	defer c.m.mu.Unlock()
	sum := map[[2]string]uint64{}
	for _, d := range c.m.drops {
		sum[[2]string{d.Direction, d.Action}] += d.Packets
	}
	for k, v := range sum {
		ch <- prometheus.MustNewConstMetric(plaintextDesc, prometheus.CounterValue, float64(v), k[0], k[1])
	}
}

var xfrmStatDesc = prometheus.NewDesc("secureoverlay_xfrm_stat_total",
	"Counters of /proc/net/xfrm_stat (this network namespace); see docs/agent.md for what each one usually means here.",
	[]string{"counter"}, nil)

// xfrmStatCollector reads the file on every scrape; a kernel without CONFIG_XFRM_STATISTICS
// simply exports nothing.
type xfrmStatCollector struct{ path string }

func (c *xfrmStatCollector) Describe(ch chan<- *prometheus.Desc) { ch <- xfrmStatDesc }
func (c *xfrmStatCollector) Collect(ch chan<- prometheus.Metric) {
	f, err := os.Open(c.path)
	if err != nil {
		return
	}
	defer f.Close()
	stats, err := ParseXfrmStat(f)
	if err != nil {
		ch <- prometheus.NewInvalidMetric(xfrmStatDesc, err)
		return
	}
	for _, s := range stats {
		ch <- prometheus.MustNewConstMetric(xfrmStatDesc, prometheus.CounterValue, float64(s.Value), s.Name)
	}
}

// SetViewShadow records one comparison of the view shadow.
func (m *Metrics) SetViewShadow(r ViewShadowResult) {
	for v, name := range VerdictNames {
		m.ViewPairs.WithLabelValues("in", name).Set(float64(r.In[v]))
		m.ViewPairs.WithLabelValues("out", name).Set(float64(r.Out[v]))
		m.RowPairs.WithLabelValues("in", name).Set(float64(r.RowIn[v]))
		m.RowPairs.WithLabelValues("out", name).Set(float64(r.RowOut[v]))
	}
	m.Rows.Set(float64(r.Rows))
	if r.Consistent {
		m.ViewConsistent.Set(1)
	} else {
		m.ViewConsistent.Set(0)
	}
}
