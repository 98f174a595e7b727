package ctl

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/budget"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/kernelinfo"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
)

// Check is one doctor verdict.
type Check struct {
	Name string `json:"name"`
	// Verdict is "pass" or "fail".
	Verdict string `json:"verdict"`
	Detail  string `json:"detail"`
}

// DoctorOutput is `doctor -o json|yaml`.
type DoctorOutput struct {
	Passed bool    `json:"passed"`
	Checks []Check `json:"checks"`
}

// MetricsFetcher returns the Prometheus text exposition of an agent pod's metrics port.
type MetricsFetcher func(ctx context.Context, cs *clients, pod *corev1.Pod, port int) ([]byte, error)

// proxyMetrics fetches through the API server's pod proxy
// (GET /api/v1/namespaces/NS/pods/POD:PORT/proxy/metrics; RBAC: pods/proxy get).
func proxyMetrics(ctx context.Context, cl *clients, pod *corev1.Pod, port int) ([]byte, error) {
	res := cl.cs.CoreV1().RESTClient().Get().Namespace(pod.Namespace).Resource("pods").SubResource("proxy").
		Name(fmt.Sprintf("%s:%d", pod.Name, port)).Suffix("metrics").Do(ctx)
	b, err := res.Raw()
	if err == nil || apierrors.IsForbidden(err) || apierrors.IsUnauthorized(err) {
		return b, err
	}
	// The proxy's own answer (e.g. "address not allowed", a refused connection) is a
	// Status in the body that client-go does not decode for proxy requests.
	var st metav1.Status
	var code int
	res.StatusCode(&code)
	if json.Unmarshal(b, &st) == nil && st.Message != "" {
		return nil, fmt.Errorf("pod proxy answered %d: %s", code, st.Message)
	}
	if len(b) > 0 && code != 0 {
		return nil, fmt.Errorf("pod proxy answered %d: %s", code, oneLine(string(b[:min(len(b), 200)])))
	}
	return nil, err
}

type doctorOpts struct {
	agentSelector string
	metricsPort   int
	sample        time.Duration
	seqLimit      float64
	staleAfter    time.Duration
}

func (c *CLI) doctorCmd(g *globals) *cobra.Command {
	o := doctorOpts{}
	cmd := &cobra.Command{
		Use:   "doctor",
		Short: "Run health checks, each with a verdict; exit 1 if any fails",
		Long: `doctor runs these checks and prints a verdict for each:

  calico-crds     Calico's CRDs are served and readable (ippools, ipamblocks,
                  blockaffinities, bgppeers, felixconfigurations) in the API group
                  Calico uses (--calico-api-group, else a converged
                  DatastoreMigration means projectcalico.org/v3, else discovery);
                  says why, and names a frozen crd.projectcalico.org/v1 copy
  calico-ipip     at least one enabled IPPool uses IPIP (Always or CrossSubnet);
                  pools that do not (VXLAN, no encapsulation, IPv6) are named
  calico-modes    Calico WireGuard (wireguardEnabled) and the eBPF data plane
                  (bpfEnabled) are off in every FelixConfiguration; nftables mode
                  (nftablesMode Enabled) is named, it does not stop our rules
  master          the master publishes its status without an error
  agents          every node (matching --node-selector) has a current, readable
                  agent report without a sync error
  node-addresses  no two nodes claim the same Calico IPv4 address (agents keep
                  the node that held it as it was and give the others nothing)
  mtu             FelixConfiguration ipipMTU is set and within every node's
                  reported budget, and each budget matches the rule
  key-secret      the key Secret exists and is a well-formed key ring (its
                  content is never printed); without the right to read it, the
                  master's verdict (it validates the ring) is used
  sequence        no SA's sequence number is near exhaustion (--seq-limit of the
                  rotation threshold)
  xfrm-errors     the agents' /proc/net/xfrm_stat counters did not increase over
                  --sample (read through the API server's pod proxy)
  plaintext-drops the agents dropped no plaintext IPIP over --sample (a peer
                  sending unencrypted traffic that enforce mode drops)
  kernel          no node's kernel has esp4_offload (loaded or built in); names
                  the nodes' kernel releases (and which differ), where per-CPU SAs
                  are available, and agents that do not report their kernel

` + exitCodesHelp,
		Example: `  secureoverlayctl doctor
  secureoverlayctl doctor -o json | jq '.checks[] | select(.verdict=="fail")'
  secureoverlayctl doctor --node-selector kubernetes.io/os=linux --sample 30s`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(g, "table", "json", "yaml"); err != nil {
				return err
			}
			if _, err := labels.Parse(o.agentSelector); err != nil {
				return withCode(ExitUsage, fmt.Errorf("invalid --agent-selector %q: %w", o.agentSelector, err))
			}
			cl, err := g.clients()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			v, err := cl.read(ctx, g.namespace, c.Now())
			if err != nil {
				return err
			}
			o := o
			o.staleAfter = v.staleAfter(cmd, o.staleAfter)
			if !cmd.Flags().Changed("agent-metrics-port") {
				if p, err := strconv.Atoi(v.settings[settingMetricsPort]); err == nil && p > 0 && p < 65536 {
					o.metricsPort = p
				}
			}
			d := &doctor{cli: c, cl: cl, g: g, o: o, v: v, nodes: v.nodes}
			out := d.run(ctx)
			if err := printDoctor(cmd.OutOrStdout(), g.output, out); err != nil {
				return err
			}
			if !out.Passed {
				return silentExit{ExitNotOK}
			}
			return nil
		},
	}
	outputFlag(cmd, g, "table", "json", "yaml")
	f := cmd.Flags()
	f.StringVar(&o.agentSelector, "agent-selector", "app.kubernetes.io/name=secureoverlay-agent", "label selector of the agent pods (xfrm-errors, plaintext-drops, kernel)")
	f.IntVar(&o.metricsPort, "agent-metrics-port", 9467, "the agents' metrics port (default: the ConfigMap's agent-metrics-port, else 9467)")
	f.DurationVar(&o.sample, "sample", 5*time.Second, "xfrm-errors, plaintext-drops: time between the two counter readings")
	f.Float64Var(&o.seqLimit, "seq-limit", 0.75, "sequence: fail when an SA's sequence reaches this fraction of the rotation threshold")
	f.DurationVar(&o.staleAfter, "stale-after", defaultStaleAfter, "agents: a report whose last sync is older than this fails (default: 3 × the ConfigMap's heartbeat-interval, else 15m)")
	return cmd
}

type doctor struct {
	cli   *CLI
	cl    *clients
	g     *globals
	o     doctorOpts
	v     *view
	nodes []watch.NodeInfo
	ring  *keys.Ring
}

func pass(name, detail string) Check { return Check{Name: name, Verdict: "pass", Detail: detail} }
func fail(name, detail string) Check { return Check{Name: name, Verdict: "fail", Detail: detail} }

func (d *doctor) run(ctx context.Context) DoctorOutput {
	crds, pools, felix := d.calicoCRDs(ctx)
	checks := []Check{
		crds,
		d.calicoIPIP(pools, crds),
		d.calicoModes(felix, crds),
		d.master(),
		d.agents(),
		d.addresses(),
	}
	sec := d.keySecret(ctx) // sets d.ring, which mtu uses for the ICV
	xfrm, drops, kernel := d.agentSamples(ctx)
	checks = append(checks, d.mtu(ctx), sec, d.sequence(), xfrm, drops, kernel)
	out := DoctorOutput{Passed: true, Checks: checks}
	for _, c := range checks {
		if c.Verdict != "pass" {
			out.Passed = false
		}
	}
	return out
}

func (d *doctor) errText(what string, err error) string {
	return oneLine(d.cl.apiError(what, err).Error())
}

func (d *doctor) calicoCRDs(ctx context.Context) (Check, []desired.Pool, map[string]watch.FelixConfig) {
	const name = "calico-crds"
	capi, err := d.cl.calico(ctx)
	if err != nil {
		return fail(name, oneLine(err.Error())), nil, nil
	}
	list := []schema.GroupVersionResource{capi.IPPools, capi.IPAMBlocks, capi.BlockAffinities, capi.BGPPeers, capi.FelixConfigurations}
	var pools []desired.Pool
	felix := map[string]watch.FelixConfig{}
	var counts, bad []string
	for _, r := range list {
		if r.Resource == "" {
			continue
		}
		l, err := d.cl.dyn.Resource(r).List(ctx, metav1.ListOptions{})
		if err != nil {
			bad = append(bad, d.errText("list "+r.Resource+"."+r.Group, err))
			continue
		}
		counts = append(counts, fmt.Sprintf("%d %s", len(l.Items), r.Resource))
		for i := range l.Items {
			switch r {
			case capi.IPPools:
				p, err := watch.ParseIPPool(&l.Items[i])
				if err != nil {
					bad = append(bad, err.Error())
					continue
				}
				pools = append(pools, p)
			case capi.FelixConfigurations:
				if f, err := watch.ParseFelixConfiguration(&l.Items[i]); err == nil {
					felix[l.Items[i].GetName()] = f
				}
			}
		}
	}
	for _, r := range []struct {
		gvr  schema.GroupVersionResource
		kind string
	}{{capi.BlockAffinities, "blockaffinities"}, {capi.BGPPeers, "bgppeers"}, {capi.FelixConfigurations, "felixconfigurations"}} {
		if r.gvr.Resource == "" {
			bad = append(bad, r.kind+" not served by "+capi.GroupVersion)
		}
	}
	why := capi.Decision.Reason
	if capi.Decision.FrozenV1 {
		why += "; " + watch.CalicoV1.String() + " is a frozen copy, not read"
	}
	if len(bad) > 0 {
		return fail(name, capi.GroupVersion+" ("+why+"): "+strings.Join(bad, "; ")), pools, felix
	}
	return pass(name, capi.GroupVersion+": "+strings.Join(counts, ", ")+" ("+why+")"), pools, felix
}

// calicoModes names the Calico data-plane modes next to ours (docs/dataplane.md §9):
// WireGuard and eBPF change what is encrypted (fail), nftables mode does not (named).
func (d *doctor) calicoModes(felix map[string]watch.FelixConfig, crds Check) Check {
	const name = "calico-modes"
	if crds.Verdict != "pass" && len(felix) == 0 {
		return fail(name, "cannot read FelixConfigurations (see calico-crds)")
	}
	var bad, notes []string
	for _, n := range slices.Sorted(maps.Keys(felix)) {
		f := felix[n]
		if f.WireguardEnabled != nil && *f.WireguardEnabled {
			bad = append(bad, n+": wireguardEnabled (Calico encrypts pod traffic itself, through wireguard.cali, not IPIP: ours does not apply)")
		}
		if f.BPFEnabled != nil && *f.BPFEnabled {
			bad = append(bad, n+": bpfEnabled (eBPF data plane: same-subnet CrossSubnet pod traffic bypasses our xfrm policies)")
		}
		if f.NFTablesMode == "Enabled" {
			notes = append(notes, n+": nftablesMode Enabled (our raw-table rules still run)")
		}
	}
	if len(bad) > 0 {
		return fail(name, strings.Join(append(bad, notes...), "; "))
	}
	if len(notes) > 0 {
		return pass(name, strings.Join(notes, "; "))
	}
	return pass(name, "no Calico WireGuard, no eBPF data plane")
}

func (d *doctor) calicoIPIP(pools []desired.Pool, crds Check) Check {
	const name = "calico-ipip"
	if crds.Verdict != "pass" && pools == nil {
		return fail(name, "cannot read IPPools (see calico-crds)")
	}
	var ipip, other []string
	for _, p := range pools {
		desc := fmt.Sprintf("%s %s ipipMode %s", p.Name, p.CIDR, dash(p.IPIPMode))
		if p.VXLANMode != "" && p.VXLANMode != "Never" {
			desc = fmt.Sprintf("%s %s vxlanMode %s", p.Name, p.CIDR, p.VXLANMode)
		}
		switch {
		case p.Disabled:
		case !p.CIDR.Addr().Is4():
			other = append(other, desc+" (IPv6: not covered)")
		case p.IPIPMode == desired.IPIPAlways || p.IPIPMode == desired.IPIPCrossSubnet:
			ipip = append(ipip, desc)
		default:
			other = append(other, desc)
		}
	}
	switch {
	case len(ipip) == 0 && len(other) == 0:
		return fail(name, "no enabled IPPool")
	case len(ipip) == 0:
		return fail(name, "no enabled IPPool uses IPIP: "+strings.Join(other, ", "))
	case len(other) > 0:
		return fail(name, "pools without IPIP are not encrypted: "+strings.Join(other, ", ")+" (IPIP: "+strings.Join(ipip, ", ")+")")
	}
	return pass(name, strings.Join(ipip, ", "))
}

func (d *doctor) master() Check {
	const name = "master"
	st := d.v.status(0)
	switch ms := d.v.master; {
	case d.v.masterErr != "":
		return fail(name, d.v.masterErr)
	case ms == nil:
		return fail(name, st.Problems[0])
	case ms.LastError != "":
		return fail(name, "leader "+dash(ms.Leader)+" reports: "+ms.LastError)
	default:
		detail := fmt.Sprintf("leader %s, mode %s, target %s, active generation %d", dash(ms.Leader), ms.Mode, ms.Target, ms.ActiveGeneration)
		if ms.Waiting != "" {
			detail += ", waiting for " + ms.Waiting
		}
		return pass(name, detail)
	}
}

func (d *doctor) agents() Check {
	const name = "agents"
	if len(d.nodes) == 0 {
		return fail(name, "no nodes match --node-selector")
	}
	var bad []string
	for _, n := range d.nodes {
		var p []string
		switch {
		case n.Report != nil:
			rep := n.Report.NodeReport
			if rep.Incarnation != "" && n.Incarnation != "" && rep.Incarnation != n.Incarnation {
				p = append(p, "report predates the node's last reboot")
			}
			if rep.Error != "" {
				p = append(p, "sync error: "+rep.Error)
			}
			if d.o.staleAfter > 0 && !rep.LastSync.IsZero() && d.v.now.Sub(rep.LastSync) > d.o.staleAfter {
				p = append(p, "last sync "+age(d.v.now, rep.LastSync)+" ago")
			}
		case n.ReportErr != "":
			p = append(p, "report unreadable: "+n.ReportErr)
		default:
			p = append(p, "no agent report")
		}
		if len(p) > 0 {
			bad = append(bad, n.Name+": "+strings.Join(p, ", "))
		}
	}
	if len(bad) > 0 {
		return fail(name, fmt.Sprintf("%d of %d nodes: %s", len(bad), len(d.nodes), strings.Join(bad, "; ")))
	}
	return pass(name, fmt.Sprintf("all %d nodes report a current agent", len(d.nodes)))
}

// addresses fails when two nodes claim one IPv4 address (projectcalico.org/IPv4Address):
// a node can write its own annotation, so a duplicate may be an attack on the other
// node's pairs (desired.Compute keeps the holder frozen and gives the others nothing).
func (d *doctor) addresses() Check {
	const name = "node-addresses"
	byIP := map[netip.Addr][]string{}
	for _, n := range d.nodes {
		if p, err := desired.ParseNodeAddress(n.IPv4Address); err == nil {
			byIP[p.Addr()] = append(byIP[p.Addr()], n.Name)
		}
	}
	var bad []string
	for ip, names := range byIP {
		if len(names) > 1 {
			slices.Sort(names)
			bad = append(bad, fmt.Sprintf("%s claimed by nodes %s", ip, strings.Join(names, ", ")))
		}
	}
	if len(bad) > 0 {
		slices.Sort(bad)
		return fail(name, strings.Join(bad, "; ")+" (check their projectcalico.org/IPv4Address annotations; the node that held the address keeps its old keys, the others get no encryption)")
	}
	return pass(name, fmt.Sprintf("%d nodes, %d distinct addresses", len(d.nodes), len(byIP)))
}

func (d *doctor) icv() int {
	if d.ring != nil {
		if a := d.ring.Active(); a != nil {
			return a.ICVBytes
		}
	}
	return budget.DefaultICV
}

func (d *doctor) mtu(ctx context.Context) Check {
	const name = "mtu"
	st, err := d.cl.detectCalico(ctx, d.v)
	if err != nil {
		return fail(name, oneLine(err.Error()))
	}
	if !st.Known && st.Install != InstallUCP {
		return fail(name, fmt.Sprintf("Calico's pod MTU (%s) not read: %s", shortKnob(st.Install), strings.Join(st.Notes, "; ")))
	}
	mc := clusterVerdicts(&st.MTUCalico, d.v, d.icv(), 0)
	var bad, unknown []string
	cannot := false
	for _, n := range mc.Nodes {
		switch {
		case n.BudgetMTU == 0:
			unknown = append(unknown, n.Name) // the agents check names why
		case n.CalicoMTU == 0 && !n.OK && !strings.HasPrefix(n.Verdict, "reports budget"):
			cannot = true
		case !n.OK:
			bad = append(bad, n.Name+": "+n.Verdict)
		}
	}
	if len(bad) > 0 {
		detail := strings.Join(bad, "; ")
		if f := mc.Fix; f != nil && f.Apply {
			detail += fmt.Sprintf("; fix: secureoverlayctl mtu --apply (sets %s to %d)", f.Knob, f.MTU)
		} else if f != nil {
			detail += fmt.Sprintf("; fix: set %s to %d", f.Knob, f.MTU)
		}
		return fail(name, detail)
	}
	if mc.SmallestBudget == 0 {
		return fail(name, "no node reports a budget")
	}
	var detail string
	if cannot {
		// Not readable here (UCP keeps it in its own configuration file): not a failure
		// doctor could ever clear; the plugin checks every pod anyway.
		detail = fmt.Sprintf("Calico's pod MTU cannot be read (%s, %s): it must be <= smallest node budget %d", installNames[st.Install], shortKnob(st.Install), mc.SmallestBudget)
	} else {
		detail = fmt.Sprintf("Calico's pod MTU %d (%s, %s) <= smallest node budget %d", st.MTU, installNames[st.Install], shortKnob(st.Install), mc.SmallestBudget)
	}
	if len(unknown) > 0 {
		detail += "; not reported by " + strings.Join(unknown, ", ")
	}
	return pass(name, detail)
}

func (d *doctor) keySecret(ctx context.Context) Check {
	const name = "key-secret"
	ns := d.g.namespace
	sec, err := d.cl.cs.CoreV1().Secrets(ns).Get(ctx, api.SecretName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return fail(name, fmt.Sprintf("secret %s/%s not found (the master creates it)", ns, api.SecretName))
	}
	if apierrors.IsForbidden(err) {
		// Operators usually may not read the keys (the manifest's secureoverlay-operator
		// Role does not grant it). The master validates the ring on every reconcile and
		// publishes a refusal as lastError, so its status is the indirect verdict.
		if ms := d.v.master; ms != nil && ms.LastError == "" && d.v.masterErr == "" {
			var gs []string
			for _, g := range ms.Generations {
				gs = append(gs, fmt.Sprintf("%d %s %s", g.Number, g.State, g.Cipher))
			}
			return pass(name, fmt.Sprintf("secret %s/%s not readable with these credentials; the master validated it: mode %s, generations [%s]",
				ns, api.SecretName, ms.Mode, strings.Join(gs, ", ")))
		}
		return fail(name, d.errText(fmt.Sprintf("get secret %s/%s", ns, api.SecretName), err)+" (and the master reports no valid ring)")
	}
	if err != nil {
		return fail(name, d.errText(fmt.Sprintf("get secret %s/%s", ns, api.SecretName), err))
	}
	data, ok := sec.Data[api.SecretDataKey]
	if !ok {
		return fail(name, fmt.Sprintf("secret %s/%s has no data key %q", ns, api.SecretName, api.SecretDataKey))
	}
	// keys.Parse errors name the field (JSON path) and byte offset, never any content of
	// the data (no value, no node name, no unknown field's name).
	ring, err := keys.Parse(data)
	if err != nil {
		return fail(name, fmt.Sprintf("secret %s/%s is not a valid key ring: %s", ns, api.SecretName, oneLine(err.Error())))
	}
	d.ring = ring
	var gs []string
	for _, g := range ring.Generations {
		gs = append(gs, fmt.Sprintf("%d %s %s/icv%d", g.Number, g.State, g.Cipher, g.ICVBytes))
	}
	return pass(name, fmt.Sprintf("secret %s/%s valid: mode %s, generations [%s], %d node IDs", ns, api.SecretName, ring.Mode, strings.Join(gs, ", "), len(ring.Nodes)))
}

func (d *doctor) sequence() Check {
	const name = "sequence"
	var bad []string
	maxF, maxN := 0.0, ""
	for _, n := range d.nodes {
		if n.Report == nil {
			continue
		}
		f := n.Report.MaxSeqFraction
		if f > maxF || maxN == "" {
			maxF, maxN = f, n.Name
		}
		if f >= d.o.seqLimit {
			bad = append(bad, fmt.Sprintf("%s at %.0f%% (generation %d)", n.Name, 100*f, n.Report.SeqGeneration))
		}
	}
	if len(bad) > 0 {
		return fail(name, fmt.Sprintf("sequence numbers at or above %.0f%% of the rotation threshold: %s (rotate: secureoverlayctl rotate)", 100*d.o.seqLimit, strings.Join(bad, ", ")))
	}
	if maxN == "" {
		return fail(name, "no agent reports a sequence number")
	}
	return pass(name, fmt.Sprintf("highest %.0f%% of the rotation threshold (%s), limit %.0f%%", 100*maxF, maxN, 100*d.o.seqLimit))
}

// agentKernel is what an agent's secureoverlay_agent_kernel_info says of its kernel
// (detected once at the agent's start; package kernelinfo).
type agentKernel struct {
	Release     string // /proc/sys/kernel/osrelease ("" unreadable)
	PerCPUSAs   bool   // the agent found per-CPU SAs (its probe)
	ESP4Offload string // kernelinfo.ModuleState
}

// agentCounters reads, from an agent's metrics text, secureoverlay_xfrm_stat_total
// (key "xfrm/COUNTER") and the dropped plaintext IPIP packets
// secureoverlay_agent_plaintext_packets_total{action="drop"} (key "drop/DIRECTION"), and
// the kernel info (nil: the agent does not export it, an agent before the kernel check).
func agentCounters(text []byte) (map[string]float64, *agentKernel, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(bytes.NewReader(text))
	if err != nil {
		return nil, nil, fmt.Errorf("parse metrics: %w", err)
	}
	out := map[string]float64{}
	label := func(m *dto.Metric, name string) string {
		for _, l := range m.GetLabel() {
			if l.GetName() == name {
				return l.GetValue()
			}
		}
		return ""
	}
	if mf := mfs["secureoverlay_xfrm_stat_total"]; mf != nil {
		for _, m := range mf.GetMetric() {
			if c := label(m, "counter"); c != "" && m.GetCounter() != nil {
				out["xfrm/"+c] = m.GetCounter().GetValue()
			}
		}
	}
	if mf := mfs["secureoverlay_agent_plaintext_packets_total"]; mf != nil {
		for _, m := range mf.GetMetric() {
			if label(m, "action") == "drop" && m.GetCounter() != nil {
				out["drop/"+label(m, "direction")] += m.GetCounter().GetValue()
			}
		}
	}
	var k *agentKernel
	if mf := mfs["secureoverlay_agent_kernel_info"]; mf != nil {
		for _, m := range mf.GetMetric() {
			if m.GetGauge() != nil && m.GetGauge().GetValue() == 1 {
				k = &agentKernel{Release: label(m, "release"), PerCPUSAs: label(m, "pcpu_sa") == "true", ESP4Offload: label(m, "esp4_offload")}
			}
		}
	}
	return out, k, nil
}

// podKernel is one agent pod's kernel info (Kernel nil: not exported).
type podKernel struct {
	Pod, Node string
	Kernel    *agentKernel
}

// esp4OffloadAdvice is the kernel check's advice when esp4_offload is in a node's kernel
// (docs/dataplane.md §11; docs/performance.md §10 for the measurement).
const esp4OffloadAdvice = "observed in our lab (QEMU, software-emulated CPU): with esp4_offload loaded, receivers counted XfrmInStateProtoError on 10-20% of ESP packets " +
	"and throughput fell about 15x; the cause is not known and it is not yet confirmed or ruled out on real hardware. " +
	"Unload it (modprobe -r esp4_offload), keep it out (a file in /etc/modprobe.d/ with: blacklist esp4_offload), " +
	"the agent reports it gone at its next full resync (within a minute by default); a kernel with it built in cannot unload it"

// kernelCheck is doctor's kernel verdict from every agent pod's kernel info (pods sorted
// by node): fail when esp4_offload is in any node's kernel; otherwise pass with the
// releases (naming the nodes when they differ), where per-CPU SAs are available and which
// agents do not report their kernel.
func kernelCheck(pods []podKernel) Check {
	const name = "kernel"
	byRelease := map[string][]string{}
	var pcpu, offload, unknown, silent []string
	n := 0
	for _, p := range pods {
		node := p.Node
		if node == "" {
			node = p.Pod
		}
		k := p.Kernel
		if k == nil {
			silent = append(silent, fmt.Sprintf("%s (node %s)", p.Pod, dash(p.Node)))
			continue
		}
		n++
		rel := k.Release
		if rel == "" {
			rel = "unknown release"
		}
		byRelease[rel] = append(byRelease[rel], node)
		if k.PerCPUSAs {
			pcpu = append(pcpu, node)
		}
		switch kernelinfo.ModuleState(k.ESP4Offload) {
		case kernelinfo.Loaded:
			offload = append(offload, fmt.Sprintf("loaded on %s (%s)", node, rel))
		case kernelinfo.Builtin:
			offload = append(offload, fmt.Sprintf("built into %s's kernel (%s)", node, rel))
		case kernelinfo.Absent, kernelinfo.NotLoaded:
		default:
			unknown = append(unknown, node)
		}
	}
	if n == 0 {
		if len(silent) == 0 {
			return fail(name, "no agent pods")
		}
		return pass(name, "no agent reports its kernel (secureoverlay_agent_kernel_info: agents older than this secureoverlayctl): "+strings.Join(silent, ", "))
	}
	rels := slices.Sorted(maps.Keys(byRelease))
	var parts []string
	for _, r := range rels {
		if len(rels) == 1 {
			parts = append(parts, fmt.Sprintf("%s ×%d", r, len(byRelease[r])))
		} else {
			parts = append(parts, fmt.Sprintf("%s ×%d (%s)", r, len(byRelease[r]), strings.Join(byRelease[r], ", ")))
		}
	}
	nodes := fmt.Sprintf("%d nodes", n)
	if n == 1 {
		nodes = "1 node"
	}
	summary := nodes + ": " + strings.Join(parts, ", ")
	if len(rels) > 1 {
		summary = nodes + ", kernels differ: " + strings.Join(parts, ", ")
	}
	switch {
	case len(pcpu) == 0:
		summary += "; per-CPU SAs: none"
	case len(pcpu) == n:
		summary += "; per-CPU SAs: available on all (the agents send on per-CPU lanes there with pcpu-sas: auto)"
	default:
		summary += "; per-CPU SAs: available on " + strings.Join(pcpu, ", ") + " (the agents send on per-CPU lanes there with pcpu-sas: auto)"
	}
	if len(unknown) > 0 {
		summary += "; esp4_offload unknown on " + strings.Join(unknown, ", ") + " (/proc/modules unreadable)"
	}
	if len(silent) > 0 {
		summary += "; not reported by " + strings.Join(silent, ", ") + " (agents older than this secureoverlayctl)"
	}
	if len(offload) > 0 {
		return fail(name, "esp4_offload "+strings.Join(offload, ", ")+": "+esp4OffloadAdvice+" ("+summary+")")
	}
	return pass(name, summary)
}

// agentSamples reads every agent pod's counters twice, --sample apart, and returns the
// xfrm-errors and plaintext-drops checks, and the kernel check from the first reading.
func (d *doctor) agentSamples(ctx context.Context) (xfrmCheck, dropCheck, kernel Check) {
	const xname, dname, kname = "xfrm-errors", "plaintext-drops", "kernel"
	both := func(detail string) (Check, Check, Check) {
		return fail(xname, detail), fail(dname, detail), fail(kname, detail)
	}
	ns := d.g.namespace
	pods, err := d.cl.cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: d.o.agentSelector})
	if err != nil {
		return both(d.errText("list agent pods in "+ns, err))
	}
	if len(pods.Items) == 0 {
		return both(fmt.Sprintf("no agent pods match %q in namespace %s", d.o.agentSelector, ns))
	}
	fetch := d.cli.FetchMetrics
	if fetch == nil {
		fetch = proxyMetrics
	}
	sort.Slice(pods.Items, func(i, j int) bool { return pods.Items[i].Spec.NodeName < pods.Items[j].Spec.NodeName })
	var kernels []podKernel
	read := func() (map[string]map[string]float64, []string) {
		all := map[string]map[string]float64{}
		var bad []string
		kernels = kernels[:0]
		for i := range pods.Items {
			p := &pods.Items[i]
			b, err := fetch(ctx, d.cl, p, d.o.metricsPort)
			if err != nil {
				bad = append(bad, d.errText("metrics of pod "+p.Name, err))
				continue
			}
			c, k, err := agentCounters(b)
			if err != nil {
				bad = append(bad, "pod "+p.Name+": "+err.Error())
				continue
			}
			all[p.Name] = c
			kernels = append(kernels, podKernel{Pod: p.Name, Node: p.Spec.NodeName, Kernel: k})
		}
		return all, bad
	}
	first, bad := read()
	if len(bad) > 0 {
		return both(strings.Join(bad, "; "))
	}
	kernel = kernelCheck(slices.Clone(kernels))
	select {
	case <-ctx.Done():
		x, dr, _ := both("interrupted")
		return x, dr, kernel
	case <-time.After(d.o.sample):
	}
	second, bad := read()
	if len(bad) > 0 {
		x, dr, _ := both(strings.Join(bad, "; "))
		return x, dr, kernel
	}
	var rising, drops []string
	for _, p := range pods.Items {
		var names []string
		for k := range second[p.Name] {
			names = append(names, k)
		}
		sort.Strings(names)
		for _, k := range names {
			delta := second[p.Name][k] - first[p.Name][k]
			if delta <= 0 {
				continue
			}
			kind, what, _ := strings.Cut(k, "/")
			item := fmt.Sprintf("%s (node %s): %s +%.0f", p.Name, dash(p.Spec.NodeName), what, delta)
			if kind == "xfrm" {
				rising = append(rising, item)
			} else {
				drops = append(drops, item)
			}
		}
	}
	xfrmCheck = pass(xname, fmt.Sprintf("%d agent pods quiet over %s", len(pods.Items), d.o.sample))
	if len(rising) > 0 {
		xfrmCheck = fail(xname, fmt.Sprintf("rising over %s: %s", d.o.sample, strings.Join(rising, ", ")))
	}
	dropCheck = pass(dname, fmt.Sprintf("no plaintext IPIP dropped over %s", d.o.sample))
	if len(drops) > 0 {
		dropCheck = fail(dname, fmt.Sprintf("plaintext IPIP dropped over %s (a peer sends unencrypted): %s", d.o.sample, strings.Join(drops, ", ")))
	}
	return xfrmCheck, dropCheck, kernel
}

func printDoctor(w io.Writer, format string, o DoctorOutput) error {
	if format == "json" || format == "yaml" {
		return printData(w, format, o)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "CHECK\tVERDICT\tDETAIL")
	failed := 0
	for _, c := range o.Checks {
		v := "ok"
		if c.Verdict != "pass" {
			v = "FAIL"
			failed++
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", c.Name, v, c.Detail)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if failed > 0 {
		fmt.Fprintf(w, "\n%d of %d checks failed\n", failed, len(o.Checks))
	} else {
		fmt.Fprintf(w, "\nall %d checks passed\n", len(o.Checks))
	}
	return nil
}
