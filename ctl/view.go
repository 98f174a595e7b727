package ctl

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/nodereport"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
)

// view is one consistent-enough read of what the master and the agents publish.
type view struct {
	now       time.Time
	namespace string
	// master is nil when the status ConfigMap is missing; masterErr says why it is
	// unusable otherwise.
	master    *api.MasterStatus
	masterErr string
	config    DesiredConfig
	nodes     []watch.NodeInfo
	raw       map[string]*corev1.Node
	// settings is the operator ConfigMap's data (the manifest keeps every component
	// setting there); nodeSelector the selector the nodes were read with.
	settings     map[string]string
	nodeSelector string
}

// Setting keys of the operator ConfigMap (manifests/secureoverlay.yaml) the CLI uses as
// defaults for flags that are not given.
const (
	settingNodeSelector = "node-selector"
	settingICV          = "icv-bytes"
	settingMetricsPort  = "agent-metrics-port"
	settingHeartbeat    = "heartbeat-interval"
)

// DesiredConfig is what the operator's ConfigMap asks for.
type DesiredConfig struct {
	// Present is false when the ConfigMap does not exist.
	Present       bool   `json:"present"`
	Enabled       string `json:"enabled,omitempty"`
	Mode          string `json:"mode,omitempty"`
	RotateRequest string `json:"rotateRequest,omitempty"`
}

// read reads the master's status, the operator's ConfigMap and the nodes matching
// --node-selector with their reports, without the reports' per-peer claims (what every
// command but `status --node` needs).
func (c *clients) read(ctx context.Context, ns string, now time.Time) (*view, error) {
	return c.readAbout(ctx, ns, now, "")
}

// readAbout is read keeping, of the per-peer claims, node about's report whole and every
// other report's claims about it ("": no claims at all).
func (c *clients) readAbout(ctx context.Context, ns string, now time.Time, about string) (*view, error) {
	v := &view{now: now, namespace: ns, raw: map[string]*corev1.Node{}}
	st, err := c.cs.CoreV1().ConfigMaps(ns).Get(ctx, api.StatusConfigMapName, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
	case err != nil:
		return nil, c.apiError(fmt.Sprintf("get configmap %s/%s", ns, api.StatusConfigMapName), err)
	default:
		var ms api.MasterStatus
		if err := json.Unmarshal([]byte(st.Data[api.StatusDataKey]), &ms); err != nil {
			v.masterErr = fmt.Sprintf("configmap %s/%s key %q is not a master status: %v", ns, api.StatusConfigMapName, api.StatusDataKey, err)
		} else {
			v.master = &ms
		}
	}
	cfg, err := c.cs.CoreV1().ConfigMaps(ns).Get(ctx, api.ConfigMapName, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
	case err != nil:
		return nil, c.apiError(fmt.Sprintf("get configmap %s/%s", ns, api.ConfigMapName), err)
	default:
		v.config = DesiredConfig{Present: true, Enabled: cfg.Data[api.ConfigEnabledKey], Mode: cfg.Data[api.ConfigModeKey],
			RotateRequest: cfg.Annotations[api.RotateRequestAnnotation]}
		v.settings = cfg.Data
	}
	v.nodeSelector = c.nodeSelector
	if sel, ok := v.settings[settingNodeSelector]; ok && !c.nodeSelectorSet {
		if _, err := labels.Parse(sel); err != nil {
			return nil, withCode(ExitNotOK, fmt.Errorf("configmap %s/%s key %s %q (use --node-selector): %w", ns, api.ConfigMapName, settingNodeSelector, sel, err))
		}
		v.nodeSelector = sel
	}
	// The Nodes and the agents' reports (NodeReports; a cluster installed before them, or
	// an agent of 0.1 during a rolling update, has them as Node annotations only), read at
	// the same time: at 5,000 nodes each list takes a good part of a second.
	var reports map[string]string
	var reportsErr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		reports, reportsErr = c.readReports(ctx, ns, about)
	}()
	nodes, err := c.listNodes(ctx, v.nodeSelector)
	<-done
	if err != nil {
		return nil, err
	}
	if reportsErr != nil {
		return nil, reportsErr
	}
	for i := range nodes {
		n := &nodes[i]
		if raw := n.Annotations[api.ReportAnnotation]; raw != "" {
			n.Annotations[api.ReportAnnotation] = claimsAbout(n.Name, raw, about)
		}
		v.raw[n.Name] = n
		ni := watch.ParseNode(n)
		if raw, ok := reports[n.Name]; ok {
			ni = watch.WithReportObject(ni, raw)
		}
		v.nodes = append(v.nodes, ni)
	}
	sort.Slice(v.nodes, func(i, j int) bool { return v.nodes[i].Name < v.nodes[j].Name })
	return v, nil
}

// listNodes lists the Nodes matching selector, a page at a time.
func (c *clients) listNodes(ctx context.Context, selector string) ([]corev1.Node, error) {
	var nodes []corev1.Node
	opts := metav1.ListOptions{LabelSelector: selector, Limit: nodePage}
	for {
		l, err := c.cs.CoreV1().Nodes().List(ctx, opts)
		if err != nil {
			return nil, c.apiError("list nodes", err)
		}
		nodes = append(nodes, l.Items...)
		if opts.Continue = l.Continue; opts.Continue == "" {
			return nodes, nil
		}
	}
}

// Page sizes of the lists read makes: Nodes are a few KiB each; whole NodeReports list
// every peer (≈0.5 MB each at 5,000 nodes with long names), their metadata is ≈1 KiB.
const (
	nodePage       = 500
	reportMetaPage = 500
	reportPage     = 50
)

// claimsAbout is what the CLI keeps of node's raw report: whole when node is about, else
// only its claims about about (none when about is "").
func claimsAbout(node, raw, about string) string {
	if about != "" && node == about {
		return raw
	}
	return api.TrimReport(raw, about)
}

// readReports returns every node's report in ns by node name, as claimsAbout keeps it:
// the later of its NodeReport's and its NodeStatus's (nodereport.PickObject; a kind whose
// CRD is not installed has none).
func (c *clients) readReports(ctx context.Context, ns, about string) (map[string]string, error) {
	reports, err := c.readReportsOf(ctx, nodereport.GVR, ns, about)
	if err != nil {
		return nil, err
	}
	statuses, err := c.readReportsOf(ctx, nodereport.StatusGVR, ns, about)
	if err != nil {
		return nil, err
	}
	for node, st := range statuses {
		reports[node] = nodereport.PickObject(reports[node], st)
	}
	return reports, nil
}

// readReportsOf returns every report of kind gvr (NodeReports or NodeStatuses) in ns by
// node name (none when the CRD is not installed), as claimsAbout keeps it. Without claims
// (about ""), the reports come from a metadata-only list: each object's summary
// annotation, written by the agent with the report; only the objects without one (agents
// predating it, and reports without lists, which are their own summary) are read whole, and
// superseded NodeReports (nodereport.SupersededAnnotation) not at all.
// With claims, every object is read whole, a page at a time.
func (c *clients) readReportsOf(ctx context.Context, gvr schema.GroupVersionResource, ns, about string) (map[string]string, error) {
	reports := map[string]string{}
	missing := map[string]bool{}
	if about == "" {
		opts := metav1.ListOptions{Limit: reportMetaPage}
		for {
			l, err := c.meta.Resource(gvr).Namespace(ns).List(ctx, opts)
			switch {
			case apierrors.IsNotFound(err):
				return reports, nil
			case err != nil:
				return nil, c.apiError(fmt.Sprintf("list %s in %s", gvr.Resource, ns), err)
			}
			for i := range l.Items {
				m := &l.Items[i]
				if m.Annotations[nodereport.SupersededAnnotation] == "true" {
					continue // left behind by an agent that writes its NodeStatus: none
				}
				if sum, ok := m.Annotations[nodereport.SummaryAnnotation]; ok {
					reports[m.Name] = sum
				} else {
					missing[m.Name] = true
				}
			}
			if opts.Continue = l.Continue; opts.Continue == "" {
				break
			}
		}
		if len(missing) == 0 {
			return reports, nil
		}
	}
	// Whole objects, decoded into the two fields read (the dynamic client's unstructured
	// decoding costs several times the transfer for reports this large).
	q := url.Values{"limit": {strconv.Itoa(reportPage)}}
	for {
		var l struct {
			Metadata struct {
				Continue string `json:"continue"`
			} `json:"metadata"`
			Items []struct {
				Metadata struct {
					Name string `json:"name"`
				} `json:"metadata"`
				Report string `json:"report"`
			} `json:"items"`
		}
		req := c.cs.CoreV1().RESTClient().Get().AbsPath("/apis", gvr.Group, gvr.Version, "namespaces", ns, gvr.Resource)
		for k, vs := range q {
			req = req.Param(k, vs[0])
		}
		b, err := req.DoRaw(ctx)
		switch {
		case apierrors.IsNotFound(err):
			return reports, nil
		case err != nil:
			return nil, c.apiError(fmt.Sprintf("list %s in %s", gvr.Resource, ns), err)
		}
		if err := json.Unmarshal(b, &l); err != nil {
			return nil, withCode(ExitNotOK, fmt.Errorf("list %s in %s: %w", gvr.Resource, ns, err))
		}
		for _, it := range l.Items {
			if about == "" && !missing[it.Metadata.Name] {
				continue
			}
			reports[it.Metadata.Name] = claimsAbout(it.Metadata.Name, it.Report, about)
		}
		if l.Metadata.Continue == "" {
			return reports, nil
		}
		q.Set("continue", l.Metadata.Continue)
	}
}

// staleAfter is the --stale-after flag when given, else three agent heartbeats from the
// ConfigMap's heartbeat-interval, else the flag's default.
func (v *view) staleAfter(cmd *cobra.Command, flag time.Duration) time.Duration {
	if cmd.Flags().Changed("stale-after") {
		return flag
	}
	if d, err := time.ParseDuration(v.settings[settingHeartbeat]); err == nil && d > 0 {
		return 3 * d
	}
	return flag
}

// NodeRow is one node's line of status.
type NodeRow struct {
	Name  string `json:"name"`
	Ready bool   `json:"ready"`
	// Reported is false when the node has no readable report; the fields below are then
	// zero.
	Reported       bool      `json:"reported"`
	Mode           api.Mode  `json:"mode,omitempty"`
	Generations    []uint32  `json:"generations,omitempty"`
	PeersEncrypted int       `json:"peersEncrypted"`
	PeersExpected  int       `json:"peersExpected"`
	BudgetMTU      int       `json:"budgetMTU,omitempty"`
	ExternalMTU    int       `json:"externalMTU,omitempty"`
	MaxSeqFraction float64   `json:"maxSeqFraction,omitempty"`
	Incarnation    string    `json:"incarnation,omitempty"`
	Epoch          string    `json:"epoch,omitempty"`
	LastSync       time.Time `json:"lastSync,omitzero"`
	Error          string    `json:"error,omitempty"`
	// Problems is empty when the node is where the cluster is.
	Problems []string `json:"problems,omitempty"`
	// State is the node's problems in one word (the first that applies of the States
	// order): "ok" without problems.
	State string `json:"state"`
}

// Node states, in the order a node with several problems takes them and the summary
// lists them.
const (
	StateNoReport = "no-report" // no readable report from its agent
	StateNotReady = "not-ready" // the Node's Ready condition is not True
	StateStale    = "stale"     // the report predates the node's reboot or Node object, or its last sync is too old
	StateError    = "error"     // the agent reports a sync error
	StateExcluded = "excluded"  // behind, and the master no longer waits for it (api.MasterStatus.Excluded)
	StateLagging  = "lagging"   // behind the cluster: mode, a generation, or peers it does not encrypt to yet
	StateOK       = "ok"
)

// States is the order of the node states.
var States = []string{StateOK, StateLagging, StateExcluded, StateError, StateStale, StateNotReady, StateNoReport}

// worse returns the state of a node that has problems of states a and b.
func worse(a, b string) string {
	if a == "" || slices.Index(States, b) > slices.Index(States, a) {
		return b
	}
	return a
}

// StatusOutput is `status -o json|yaml`.
type StatusOutput struct {
	Namespace string `json:"namespace"`
	// NodeSelector is the selector of the nodes shown (--node-selector, else the
	// ConfigMap's node-selector).
	NodeSelector string            `json:"nodeSelector,omitempty"`
	Healthy      bool              `json:"healthy"`
	Summary      string            `json:"summary"`
	Problems     []string          `json:"problems,omitempty"`
	Desired      DesiredConfig     `json:"desired"`
	Master       *api.MasterStatus `json:"master"`
	// States counts the nodes by NodeRow.State (every state, zeros too).
	States map[string]int `json:"states"`
	Nodes  []NodeRow      `json:"nodes"`
}

// staleAfter: an agent rewrites an unchanged report every 5 minutes (its heartbeat), so a
// report older than three heartbeats means the agent stopped.
const defaultStaleAfter = 15 * time.Minute

func (v *view) rows(staleAfter time.Duration) []NodeRow {
	excluded := map[string]bool{}
	if v.master != nil {
		for _, l := range v.master.Excluded {
			excluded[l.Node] = true
		}
	}
	var out []NodeRow
	for _, n := range v.nodes {
		r := NodeRow{Name: n.Name, Ready: n.Ready}
		state := ""
		switch {
		case n.Report != nil:
			rep := n.Report.NodeReport
			r.Reported = true
			r.Mode, r.Generations = rep.Mode, rep.Generations
			r.PeersEncrypted, r.PeersExpected = rep.PeersEncrypted, rep.PeersExpected
			r.BudgetMTU, r.ExternalMTU, r.MaxSeqFraction = rep.BudgetMTU, rep.ExternalMTU, rep.MaxSeqFraction
			r.Incarnation, r.LastSync, r.Error = rep.Incarnation, rep.LastSync, rep.Error
			r.Epoch = rep.Epoch
		case n.ReportErr != "":
			r.Problems = append(r.Problems, "report unreadable: "+n.ReportErr)
			state = StateNoReport
		default:
			r.Problems = append(r.Problems, "no agent report")
			state = StateNoReport
		}
		if !n.Ready {
			r.Problems = append(r.Problems, "node NotReady")
			state = worse(state, StateNotReady)
		}
		if r.Reported {
			p, st := v.reportProblems(n, staleAfter)
			r.Problems = append(r.Problems, p...)
			if st == StateLagging && excluded[n.Name] {
				st = StateExcluded
			}
			state = worse(state, st)
		}
		if len(r.Problems) == 0 {
			state = StateOK
		}
		r.State = state
		out = append(out, r)
	}
	return out
}

// reportProblems returns the problems of n's report and the worst of their states ("" for
// none).
func (v *view) reportProblems(n watch.NodeInfo, staleAfter time.Duration) ([]string, string) {
	rep := n.Report.NodeReport
	var p []string
	state := ""
	add := func(st, problem string) {
		p = append(p, problem)
		state = worse(state, st)
	}
	if rep.Incarnation != "" && n.Incarnation != "" && rep.Incarnation != n.Incarnation {
		add(StateStale, "report predates the node's last reboot")
	}
	if rep.UID != "" && rep.UID != n.UID {
		add(StateStale, "report was made for an earlier Node object (uid)")
	}
	if rep.Error != "" {
		add(StateError, "sync error: "+rep.Error)
	}
	if ms := v.master; ms != nil {
		if rep.Mode != ms.Mode {
			add(StateLagging, fmt.Sprintf("at mode %s, cluster at %s", rep.Mode, ms.Mode))
		}
		if ms.ActiveGeneration != 0 && !slices.Contains(rep.Generations, ms.ActiveGeneration) {
			add(StateLagging, fmt.Sprintf("active generation %d not installed", ms.ActiveGeneration))
		}
		if ms.PendingGeneration != 0 && !slices.Contains(rep.Generations, ms.PendingGeneration) {
			add(StateLagging, fmt.Sprintf("pending generation %d not installed yet", ms.PendingGeneration))
		}
	}
	if rep.Mode.Rank() >= api.ModeEncrypt.Rank() && rep.PeersEncrypted < rep.PeersExpected {
		add(StateLagging, fmt.Sprintf("encrypting to %d of %d peers", rep.PeersEncrypted, rep.PeersExpected))
	}
	if staleAfter > 0 && !rep.LastSync.IsZero() && v.now.Sub(rep.LastSync) > staleAfter {
		add(StateStale, "last sync "+age(v.now, rep.LastSync)+" ago")
	}
	return p, state
}

// status computes the whole StatusOutput.
func (v *view) status(staleAfter time.Duration) StatusOutput {
	out := StatusOutput{Namespace: v.namespace, NodeSelector: v.nodeSelector, Desired: v.config, Master: v.master, Nodes: v.rows(staleAfter)}
	if out.Nodes == nil {
		out.Nodes = []NodeRow{}
	}
	ms := v.master
	switch {
	case v.masterErr != "":
		out.Problems = append(out.Problems, v.masterErr)
	case ms == nil:
		out.Problems = append(out.Problems, fmt.Sprintf("no master status (configmap %s/%s not found): is secureoverlay-master running?", v.namespace, api.StatusConfigMapName))
	default:
		if ms.LastError != "" {
			out.Problems = append(out.Problems, "master: "+ms.LastError)
		}
		if ms.Mode != ms.Target {
			w := ""
			if ms.Waiting != "" {
				w = " (waiting for " + ms.Waiting + ")"
			}
			out.Problems = append(out.Problems, fmt.Sprintf("cutover in progress: mode %s, heading to %s%s", ms.Mode, ms.Target, w))
		}
		if ms.Deferred != "" {
			out.Problems = append(out.Problems, "rotation deferred: "+ms.Deferred)
		}
	}
	ok := 0
	out.States = map[string]int{}
	for _, st := range States {
		out.States[st] = 0
	}
	for _, r := range out.Nodes {
		out.States[r.State]++
		if len(r.Problems) == 0 {
			ok++
			continue
		}
		out.Problems = append(out.Problems, r.Name+": "+strings.Join(r.Problems, "; "))
	}
	out.Healthy = len(out.Problems) == 0
	out.Summary = summary(ms, ok, len(out.Nodes), out.Problems)
	return out
}

func modePhrase(m api.Mode) string {
	switch m {
	case api.ModeEnforce:
		return "encrypting and enforcing"
	case api.ModeEncrypt:
		return "encrypting (plaintext still accepted)"
	case api.ModeAccept:
		return "accepting ESP (still sending plaintext)"
	case api.ModeOff:
		return "off (plaintext IPIP)"
	}
	return "in mode " + string(m)
}

func summary(ms *api.MasterStatus, ok, total int, problems []string) string {
	if ms == nil {
		return problems[0]
	}
	var b strings.Builder
	switch {
	case total == 0:
		b.WriteString("no nodes")
	case ok == total:
		fmt.Fprintf(&b, "all %d nodes %s", total, modePhrase(ms.Mode))
	default:
		fmt.Fprintf(&b, "%d of %d nodes %s", ok, total, modePhrase(ms.Mode))
	}
	if ms.ActiveGeneration != 0 {
		fmt.Fprintf(&b, ", generation %d", ms.ActiveGeneration)
	}
	if ms.PendingGeneration != 0 {
		fmt.Fprintf(&b, ", rotating to generation %d", ms.PendingGeneration)
	} else if ms.RotationInProgress {
		b.WriteString(", previous generation retiring")
	}
	if len(problems) > 0 {
		fmt.Fprintf(&b, "; %d problem(s), first: %s", len(problems), problems[0])
	}
	return b.String()
}

// age renders now-t like kubectl's AGE column (s, m, h, d), "-" for a zero time.
func age(now, t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := now.Sub(t)
	if d < 0 {
		d = 0
	}
	switch {
	case d < 2*time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < 2*time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh", int(d.Hours()))
	}
	return fmt.Sprintf("%dd", int(d.Hours()/24))
}

func gens(g []uint32) string {
	if len(g) == 0 {
		return "-"
	}
	s := make([]string, len(g))
	for i, x := range g {
		s[i] = fmt.Sprint(x)
	}
	return strings.Join(s, ",")
}
