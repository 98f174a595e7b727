package ctl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/budget"
)

// MTUOutput is `mtu -o json|yaml`.
type MTUOutput struct {
	ExternalMTU int `json:"externalMTU"`
	// Source says where ExternalMTU came from: "flag" or "detected on IFACE".
	Source   string `json:"source"`
	ICVBytes int    `json:"icvBytes"`
	// ICVSource: "default", "flag" or the ConfigMap it was read from.
	ICVSource   string `json:"icvSource"`
	Documented  int    `json:"documented"`
	KernelExact int    `json:"kernelExact"`
	// Budget is the largest pod MTU (Calico's pod MTU) that leaves room for ESP.
	Budget int `json:"budget"`
	// Knobs (without a cluster): the knob of each kind of Calico installation and how to
	// set it to the budget.
	Knobs []MTUKnob `json:"knobs,omitempty"`
	// Cluster is nil offline. Nodes without a reported budget are listed but not
	// counted as wrong (status and doctor say why they do not report).
	Cluster *MTUCluster `json:"cluster,omitempty"`
}

// MTUCluster compares Calico's pod MTU, read from its installation's own knob, with the
// agents' budgets.
type MTUCluster struct {
	Calico MTUCalico `json:"calico"`
	// PluginMode is the ConfigMap's plugin-mode ("" when unknown).
	PluginMode string    `json:"pluginMode,omitempty"`
	Nodes      []MTUNode `json:"nodes"`
	WrongNodes []string  `json:"wrongNodes,omitempty"`
	// SmallestBudget is the smallest budget any node reports (0: none reports one):
	// Calico's cluster-wide pod MTU must not exceed it.
	SmallestBudget int    `json:"smallestBudget,omitempty"`
	SmallestNode   string `json:"smallestNode,omitempty"`
	// Fits: Calico's pod MTU is known, set (not auto) and within every budget (the
	// smallest reported one, or the one for --external-mtu before any node reports).
	Fits bool `json:"fits"`
	// Fix says how to bring Calico's pod MTU within every budget; nil when it is.
	Fix *MTUFix `json:"fix,omitempty"`
	// Applied is what --apply did (nil without --apply).
	Applied *MTUApplied `json:"applied,omitempty"`
	// Restart lists what still runs with the MTU from before the knob's last change
	// (nil while Calico's MTU does not fit, or when the change time is unknown).
	Restart *MTURestart `json:"restart,omitempty"`
}

// MTUNode is one node's reported budget, Calico's pod MTU there and the verdict.
type MTUNode struct {
	Name        string `json:"name"`
	ExternalMTU int    `json:"externalMTU,omitempty"`
	BudgetMTU   int    `json:"budgetMTU,omitempty"`
	// CalicoMTU is Calico's pod MTU on the node (0: unknown).
	CalicoMTU int    `json:"calicoMTU,omitempty"`
	OK        bool   `json:"ok"`
	Verdict   string `json:"verdict"`
}

// MTUFix is the change that makes Calico's pod MTU fit every node.
type MTUFix struct {
	MTU int `json:"mtu"`
	// Why names where MTU comes from (the smallest node budget, or the flag).
	Why  string `json:"why"`
	Knob string `json:"knob"`
	// Commands set it by hand; Apply says whether mtu --apply can.
	Commands []string `json:"commands"`
	Apply    bool     `json:"apply"`
}

// mtuVerdict judges one node: its reported budget must match the rule for its reported
// external MTU, and Calico's pod MTU there must fit it. unknown is true when Calico's MTU
// cannot be read (the node is then neither ok nor wrong).
func mtuVerdict(n MTUNode, cal *MTUCalico, icv int) (MTUNode, bool) {
	switch {
	case n.BudgetMTU == 0:
		n.Verdict = "no budget reported"
		return n, false
	case n.ExternalMTU != 0:
		if want, err := budget.Budget(n.ExternalMTU, icv); err == nil && want != n.BudgetMTU {
			n.Verdict = fmt.Sprintf("reports budget %d, the rule gives %d for external MTU %d and ICV %d", n.BudgetMTU, want, n.ExternalMTU, icv)
			return n, false
		}
	}
	mtu, how := cal.mtuFor(n.ExternalMTU)
	n.CalicoMTU = mtu
	switch {
	case mtu == 0:
		n.Verdict = fmt.Sprintf("Calico's pod MTU unknown (%s): it must not exceed %d", how, n.BudgetMTU)
		return n, true
	case mtu > n.BudgetMTU:
		if how != "" {
			how = " (" + how + ")"
		}
		n.Verdict = fmt.Sprintf("Calico's pod MTU %d%s exceeds this node's budget %d", mtu, how, n.BudgetMTU)
	default:
		n.OK, n.Verdict = true, "ok"
	}
	return n, false
}

// clusterVerdicts judges every node against Calico's pod MTU and works out the fix:
// Calico's MTU must not exceed target (the smallest reported budget, lowered to flagBudget
// when the external MTU was given as a flag; 0: neither).
func clusterVerdicts(cal *MTUCalico, v *view, icv, flagBudget int) *MTUCluster {
	mc := &MTUCluster{Calico: *cal, PluginMode: v.settings["plugin-mode"], Nodes: []MTUNode{}}
	for _, n := range v.nodes {
		mn := MTUNode{Name: n.Name}
		if n.Report != nil {
			mn.ExternalMTU, mn.BudgetMTU = n.Report.ExternalMTU, n.Report.BudgetMTU
		}
		if mn.BudgetMTU != 0 && (mc.SmallestBudget == 0 || mn.BudgetMTU < mc.SmallestBudget) {
			mc.SmallestBudget, mc.SmallestNode = mn.BudgetMTU, n.Name
		}
		mn, unknown := mtuVerdict(mn, cal, icv)
		if !mn.OK && mn.BudgetMTU != 0 && !unknown {
			mc.WrongNodes = append(mc.WrongNodes, n.Name)
		}
		mc.Nodes = append(mc.Nodes, mn)
	}
	target, why := mc.SmallestBudget, fmt.Sprintf("the smallest node budget, %s", mc.SmallestNode)
	if flagBudget != 0 && (target == 0 || flagBudget < target) {
		target, why = flagBudget, "the budget for --external-mtu"
	}
	if target == 0 {
		return mc
	}
	misfit := len(mc.WrongNodes) > 0
	if cal.Known && !misfit && mc.SmallestBudget == 0 {
		// No node reports yet (checked before installing): judge against the flag.
		if cal.Auto || cal.MTU > target {
			misfit = true
		}
	}
	if cal.Known && !cal.Auto && cal.MTU > target {
		misfit = true
	}
	mc.Fits = cal.Known && !cal.Auto && cal.MTU <= target && !misfit
	if misfit || !cal.Known {
		mc.Fix = &MTUFix{MTU: target, Why: why, Knob: shortKnob(cal.Install), Commands: setCommands(cal.Install, target),
			Apply: cal.Install == InstallOperator || cal.Install == InstallManifest}
		if !cal.Known && cal.Install == InstallUCP {
			mc.Fix.Why += " (UCP's value cannot be read here: check it)"
		}
	}
	return mc
}

func (c *CLI) mtuCmd(g *globals) *cobra.Command {
	var ext, icv int
	var pattern string
	var offline, apply bool
	cmd := &cobra.Command{
		Use:   "mtu",
		Short: "Compute the MTU budget, check Calico's pod MTU against it, and set it (--apply)",
		Long: `mtu computes, for an external MTU (--external-mtu, or the smallest MTU of this host's
up links matching --interface-pattern, as Calico detects them) and an AES-GCM ICV
length:

  documented rule      EXTMTU - 46 - ((EXTMTU - 46) mod 4)
  kernel-exact limit   ((EXTMTU - 36 - ICV) & ~3) - 2
  enforced budget      the smaller of the two

Calico's pod MTU (its veths, tunl0 and the CNI config) must not exceed the budget. With
cluster access (not --offline, and a kubeconfig is found) mtu tells how Calico was
installed and reads its own knob:

  operator install   Installation default spec.calicoNetwork.mtu (operator.tigera.io/v1)
  manifest install   veth_mtu in ConfigMap kube-system/calico-config (read when
                     calico-node starts; FelixConfiguration spec.ipipMTU is inert there)
  Docker UCP/MKE     calico_mtu and ipip_mtu in the UCP configuration file (not
                     readable through the Kubernetes API)
  otherwise          FelixConfiguration default spec.ipipMTU

and compares it with the budget every agent reports, naming the nodes that are wrong
(exit 1). "0" or unset means Calico detects it: the node's MTU - 20 (1480 on a
1500-byte link), which never fits.

--apply sets the knob of an operator or manifest install to the smallest node budget
(merge patch; nothing is written when Calico's MTU already fits: it is idempotent).
Without --apply nothing is written. Once Calico's MTU fits, mtu lists what still runs
with the MTU from before the knob's last change: calico-node pods that have not
restarted since, and the pods on the pod network created before it (grouped by
workload, with a restart command). Pods created in clamp mode after secureoverlay was
installed already run at the budget; restarting them is harmless.

` + exitCodesHelp,
		Example: `  secureoverlayctl mtu --offline                      # detect on this host
  secureoverlayctl mtu --external-mtu 1450 --offline
  secureoverlayctl mtu                                # this cluster's Calico knob and every node
  secureoverlayctl mtu --apply                        # set it to the smallest node budget
  secureoverlayctl mtu -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(g, "table", "json", "yaml"); err != nil {
				return err
			}
			if !budget.ValidICV(icv) {
				return withCode(ExitUsage, fmt.Errorf("invalid --icv-bytes %d (want 8, 12 or 16)", icv))
			}
			if apply && offline {
				return withCode(ExitUsage, errors.New("--apply needs the cluster: drop --offline"))
			}
			// With cluster access, read it first: the ICV defaults to the cluster's
			// setting (ConfigMap key icv-bytes) unless --icv-bytes is given.
			var (
				cd         *mtuClusterData
				clusterErr error
			)
			icvSource := "flag"
			if !cmd.Flags().Changed("icv-bytes") {
				icvSource = "default"
			}
			if !offline {
				cd, clusterErr = c.mtuClusterRead(cmd.Context(), g)
				if errors.Is(clusterErr, errNoKubeconfig) && g.kubeconfig == "" && g.context == "" && !apply {
					clusterErr = nil // no kubeconfig anywhere: offline use
				}
				if cd != nil && !cmd.Flags().Changed("icv-bytes") {
					if x, err := strconv.Atoi(cd.v.settings[settingICV]); err == nil && budget.ValidICV(x) {
						icv, icvSource = x, "configmap "+g.namespace+"/"+api.ConfigMapName
					}
				}
			}
			out := MTUOutput{ICVBytes: icv, ICVSource: icvSource, ExternalMTU: ext, Source: "flag"}
			if ext == 0 {
				re, err := budget.CompilePattern(pattern)
				if err != nil {
					return withCode(ExitUsage, fmt.Errorf("invalid --interface-pattern: %w", err))
				}
				links, err := c.Links()
				if err != nil {
					return withCode(ExitNotOK, fmt.Errorf("list this host's links (use --external-mtu): %w", err))
				}
				mtu, name, err := budget.SmallestMTU(links, re)
				if err != nil {
					return withCode(ExitNotOK, fmt.Errorf("detect the external mtu on this host (use --external-mtu): %w", err))
				}
				out.ExternalMTU, out.Source = mtu, "detected on "+name
			}
			var err error
			if out.Documented, err = budget.Documented(out.ExternalMTU); err != nil {
				return withCode(ExitUsage, err)
			}
			if out.KernelExact, err = budget.KernelExact(out.ExternalMTU, icv); err != nil {
				return withCode(ExitUsage, err)
			}
			if out.Budget, err = budget.Budget(out.ExternalMTU, icv); err != nil {
				return withCode(ExitUsage, err)
			}
			var applyErr error
			if cd != nil {
				flagBudget := 0
				if cmd.Flags().Changed("external-mtu") {
					flagBudget = out.Budget
				}
				out.Cluster, applyErr = cd.judge(cmd.Context(), icv, flagBudget, apply)
			} else if clusterErr == nil {
				out.Knobs = allKnobs(out.Budget)
			}
			if err := printMTU(cmd.OutOrStdout(), g.output, out); err != nil {
				return err
			}
			switch {
			case clusterErr != nil:
				return clusterErr
			case applyErr != nil:
				return applyErr
			case out.Cluster != nil && (len(out.Cluster.WrongNodes) > 0 || out.Cluster.Fix != nil && out.Cluster.Calico.Known):
				// Wrong nodes, or (before any node reports) Calico's MTU over the
				// budget for --external-mtu.
				return silentExit{ExitNotOK}
			}
			return nil
		},
	}
	outputFlag(cmd, g, "table", "json", "yaml")
	cmd.Flags().IntVar(&ext, "external-mtu", 0, "external MTU (0: detect the smallest MTU of this host's up external links); with --apply it lowers the target below the nodes' budgets")
	cmd.Flags().IntVar(&icv, "icv-bytes", budget.DefaultICV, "AES-GCM ICV length in bytes: 8, 12 or 16 (with cluster access, default: the ConfigMap's icv-bytes)")
	cmd.Flags().StringVar(&pattern, "interface-pattern", budget.DefaultInterfacePattern, "regexp of external interfaces for detection (Calico's default)")
	cmd.Flags().BoolVar(&offline, "offline", false, "do not contact the cluster")
	cmd.Flags().BoolVar(&apply, "apply", false, "set Calico's pod MTU knob (operator or manifest install) to the smallest node budget; without it mtu writes nothing")
	return cmd
}

// mtuClusterData is what mtu reads from the cluster.
type mtuClusterData struct {
	cl     *clients
	calico *calicoState
	v      *view
}

func (c *CLI) mtuClusterRead(ctx context.Context, g *globals) (*mtuClusterData, error) {
	cl, err := g.clients()
	if err != nil {
		return nil, err
	}
	v, err := cl.read(ctx, g.namespace, c.Now())
	if err != nil {
		return nil, err
	}
	st, err := cl.detectCalico(ctx, v)
	if err != nil {
		return nil, err
	}
	return &mtuClusterData{cl: cl, calico: st, v: v}, nil
}

// judge compares, applies when asked (and needed), and lists what must restart once
// Calico's MTU fits.
func (cd *mtuClusterData) judge(ctx context.Context, icv, flagBudget int, apply bool) (*MTUCluster, error) {
	mc := clusterVerdicts(&cd.calico.MTUCalico, cd.v, icv, flagBudget)
	var applyErr error
	if apply {
		switch {
		case mc.SmallestBudget == 0 && flagBudget == 0:
			applyErr = withCode(ExitNotOK, errors.New("mtu --apply: no node reports a budget yet (is secureoverlay installed?): pass --external-mtu with the smallest MTU of your nodes' uplinks"))
		case mc.Fix == nil:
			mc.Applied = &MTUApplied{Detail: fmt.Sprintf("Calico's pod MTU already fits every node's budget: nothing changed (%s)", shortKnob(cd.calico.Install))}
		default:
			applied, err := cd.cl.applyCalicoMTU(ctx, cd.calico, mc.Fix.MTU)
			if err != nil {
				applyErr = err
				break
			}
			mc = clusterVerdicts(&cd.calico.MTUCalico, cd.v, icv, flagBudget)
			mc.Applied = &applied
		}
	}
	if mc.Fits && cd.calico.ChangedAt != nil {
		mc.Restart = cd.cl.podsBefore(ctx, *cd.calico.ChangedAt, cd.calico.Install)
	}
	return mc, applyErr
}

// felixLine says what FelixConfiguration's ipipMTU is and whether it counts here.
func felixLine(c *MTUCalico) string {
	val := "unset"
	if c.FelixIPIPMTU != 0 {
		val = strconv.Itoa(c.FelixIPIPMTU)
	}
	s := fmt.Sprintf("default spec.ipipMTU %s (%s)", val, c.FelixSource)
	switch {
	case c.Install == InstallManifest:
		return s + ": inert here, calico-node gets veth_mtu as FELIX_IPINIPMTU, and felix's environment outranks FelixConfiguration"
	case c.Install == InstallOperator && !c.FelixApplies:
		return s + ": inert here, the operator passes spec.calicoNetwork.mtu to felix as FELIX_IPINIPMTU"
	case c.Install == InstallOperator:
		return s + ": applies, the Installation sets no MTU"
	case c.Install == InstallUCP:
		return s + ": UCP sets Calico's MTU from its own configuration"
	}
	return s + ": applies unless calico-node's environment sets FELIX_IPINIPMTU"
}

// pluginModeLine explains the plugin mode.
func pluginModeLine(mode string) string {
	switch mode {
	case "", "clamp":
		if mode == "" {
			mode = "clamp (default)"
		}
		return mode + ": pods over the budget start at the budget"
	case "enforce":
		return "enforce: pods over the budget are refused"
	case "warn":
		return "warn: pods over the budget start at Calico's MTU (only logged)"
	}
	return mode
}

// maxWorkloads bounds the workloads the text output lists (-o json lists every one).
const maxWorkloads = 12

var installNames = map[string]string{
	InstallOperator: "operator install", InstallManifest: "manifest install",
	InstallUCP: "Docker UCP/MKE", InstallUnknown: "installation not recognised",
}

func printMTU(w io.Writer, format string, o MTUOutput) error {
	if format == "json" || format == "yaml" {
		return printData(w, format, o)
	}
	fmt.Fprintf(w, "external MTU        %d (%s)\n", o.ExternalMTU, o.Source)
	fmt.Fprintf(w, "ICV                 %d bytes (%s)\n", o.ICVBytes, o.ICVSource)
	fmt.Fprintf(w, "documented rule     %d   EXTMTU - 46 - ((EXTMTU - 46) mod 4)\n", o.Documented)
	fmt.Fprintf(w, "kernel-exact limit  %d   ((EXTMTU - 36 - ICV) & ~3) - 2\n", o.KernelExact)
	fmt.Fprintf(w, "enforced budget     %d   the smaller of the two: Calico's pod MTU must not exceed it\n", o.Budget)
	if len(o.Knobs) > 0 {
		fmt.Fprintf(w, "\nCalico's pod MTU knob depends on how Calico was installed (with cluster access mtu names\nthis cluster's, and mtu --apply sets it):\n")
		for _, k := range o.Knobs {
			fmt.Fprintf(w, "  %-17s  %s\n", installNames[k.Install], k.Knob)
			for _, s := range k.Set {
				fmt.Fprintf(w, "  %-17s    %s\n", "", s)
			}
		}
	}
	mc := o.Cluster
	if mc == nil {
		return nil
	}
	cal := mc.Calico
	fmt.Fprintf(w, "\nCalico              %s: %s\n", installNames[cal.Install], cal.Evidence)
	knob := shortKnob(cal.Install)
	if cal.Install == InstallOperator && cal.FelixApplies {
		knob = "Installation default spec.calicoNetwork.mtu unset, so " + shortKnob(InstallUnknown)
	}
	switch {
	case cal.Install == InstallUCP:
		knob += ": not readable through the Kubernetes API"
	case !cal.Known:
		knob += ": not read"
	case cal.Auto && cal.Value != "":
		knob += fmt.Sprintf(" = %q: auto, each node's uplink MTU - %d", cal.Value, ipipOverhead)
	case cal.Auto:
		knob += fmt.Sprintf(" unset: auto, each node's uplink MTU - %d", ipipOverhead)
	default:
		knob += " = " + strconv.Itoa(cal.MTU)
	}
	fmt.Fprintf(w, "pod MTU knob        %s\n", knob)
	fmt.Fprintf(w, "FelixConfiguration  %s\n", felixLine(&cal))
	for _, n := range cal.Notes {
		fmt.Fprintf(w, "note                %s\n", n)
	}
	if mc.PluginMode != "" || len(mc.Nodes) > 0 {
		fmt.Fprintf(w, "plugin mode         %s\n", pluginModeLine(mc.PluginMode))
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tEXT MTU\tBUDGET\tCALICO MTU\tVERDICT")
	for _, n := range mc.Nodes {
		e, b, cm := "-", "-", "-"
		if n.ExternalMTU != 0 {
			e = fmt.Sprint(n.ExternalMTU)
		}
		if n.BudgetMTU != 0 {
			b = fmt.Sprint(n.BudgetMTU)
		}
		if n.CalicoMTU != 0 {
			cm = fmt.Sprint(n.CalicoMTU)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", n.Name, e, b, cm, n.Verdict)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	unknown := 0
	for _, n := range mc.Nodes {
		if n.BudgetMTU == 0 {
			unknown++
		}
	}
	fmt.Fprintf(w, "\n%d of %d nodes wrong", len(mc.WrongNodes), len(mc.Nodes))
	if unknown > 0 {
		fmt.Fprintf(w, ", %d without a reported budget", unknown)
	}
	fmt.Fprintln(w)
	if mc.SmallestBudget != 0 {
		fmt.Fprintf(w, "Calico's pod MTU must be <= %d (smallest node budget, %s)\n", mc.SmallestBudget, mc.SmallestNode)
	}
	if a := mc.Applied; a != nil {
		if a.Changed {
			fmt.Fprintf(w, "\napplied             %s %s: %s -> %s\n", a.Object, a.Field, a.From, a.To)
		} else {
			fmt.Fprintf(w, "\napplied             nothing\n")
		}
		fmt.Fprintf(w, "                    %s\n", a.Detail)
	}
	if f := mc.Fix; f != nil {
		fmt.Fprintf(w, "\nfix                 set %s to %d (%s)", f.Knob, f.MTU, f.Why)
		if f.Apply {
			fmt.Fprintf(w, ":\n                      secureoverlayctl mtu --apply\n                    or by hand:\n")
		} else {
			fmt.Fprintf(w, ":\n")
		}
		for _, s := range f.Commands {
			fmt.Fprintf(w, "                      %s\n", s)
		}
		fmt.Fprintf(w, "                    then recreate the pods started before the change (mtu lists them once the MTU fits)\n")
	}
	if r := mc.Restart; r != nil {
		printRestart(w, &cal, r)
	}
	return nil
}

func printRestart(w io.Writer, cal *MTUCalico, r *MTURestart) {
	by := ""
	if cal.ChangedBy != "" {
		by = " by " + cal.ChangedBy
	}
	fmt.Fprintf(w, "\nlast change         %s%s (the knob's managedFields)\n", changedAgo(&r.Since), by)
	if r.Err != "" {
		fmt.Fprintf(w, "pods to recreate    cannot list them: %s\n", r.Err)
		return
	}
	switch {
	case r.CalicoNodes == 0:
		fmt.Fprintf(w, "calico-node         no pods labelled %s\n", calicoNodeSelector)
	case r.CalicoNodesBefore == 0:
		fmt.Fprintf(w, "calico-node         all %d pods started after it\n", r.CalicoNodes)
	default:
		fmt.Fprintf(w, "calico-node         %d of %d pods started before it (new pods on their nodes still get the old MTU): %s\n",
			r.CalicoNodesBefore, r.CalicoNodes, r.CalicoNodeRestart)
	}
	if r.Pods == 0 {
		fmt.Fprintf(w, "pods to recreate    none: every pod on the pod network started after it\n")
		return
	}
	fmt.Fprintf(w, "pods to recreate    %d pods on the pod network (%d workloads) started before it keep the old MTU:\n", r.Pods, len(r.Workloads))
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  NAMESPACE\tWORKLOAD\tPODS\tRESTART")
	for i, wl := range r.Workloads {
		if i == maxWorkloads {
			break
		}
		fmt.Fprintf(tw, "  %s\t%s/%s\t%d\t%s\n", wl.Namespace, wl.Kind, wl.Name, wl.Pods, wl.Restart)
	}
	_ = tw.Flush()
	if n := len(r.Workloads) - maxWorkloads; n > 0 {
		fmt.Fprintf(w, "  … and %d more workloads (-o json lists every one)\n", n)
	}
	fmt.Fprintf(w, "  (in clamp mode, pods created since secureoverlay was installed already run at the budget)\n")
}
