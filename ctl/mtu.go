package ctl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"text/tabwriter"

	"github.com/spf13/cobra"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

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
	Budget      int    `json:"budget"`
	// CalicoMTU / IPIPMTU are what calico_mtu / ipip_mtu (and FelixConfiguration
	// ipipMTU) should be: the budget.
	CalicoMTU int `json:"calicoMTU"`
	IPIPMTU   int `json:"ipipMTU"`
	// Cluster is nil offline. Nodes without a reported budget are listed but not
	// counted as wrong (status and doctor say why they do not report).
	Cluster *MTUCluster `json:"cluster,omitempty"`
}

// MTUCluster compares Calico's configuration and the agents' budgets.
type MTUCluster struct {
	// FelixIPIPMTU is FelixConfiguration default's spec.ipipMTU (0: unset; Calico then
	// derives the tunnel MTU from the host MTU, which exceeds the budget).
	FelixIPIPMTU int `json:"felixIPIPMTU"`
	// FelixSource names the object read, or why none was.
	FelixSource string    `json:"felixSource"`
	Nodes       []MTUNode `json:"nodes"`
	WrongNodes  []string  `json:"wrongNodes,omitempty"`
	// SmallestBudget is the smallest budget any node reports (0: none reports one):
	// the cluster-wide ipipMTU must not exceed it.
	SmallestBudget int    `json:"smallestBudget,omitempty"`
	SmallestNode   string `json:"smallestNode,omitempty"`
}

// MTUNode is one node's reported budget and verdict.
type MTUNode struct {
	Name        string `json:"name"`
	ExternalMTU int    `json:"externalMTU,omitempty"`
	BudgetMTU   int    `json:"budgetMTU,omitempty"`
	OK          bool   `json:"ok"`
	Verdict     string `json:"verdict"`
}

// felixIPIPMTU reads FelixConfiguration default's spec.ipipMTU from the API group Calico
// uses (clients.calico).
func (c *clients) felixIPIPMTU(ctx context.Context) (int, string, error) {
	capi, err := c.calico(ctx)
	if err != nil {
		return 0, "", err
	}
	gvr := capi.FelixConfigurations
	if gvr.Resource == "" {
		return 0, "no felixconfigurations in " + capi.GroupVersion, nil
	}
	u, err := c.dyn.Resource(gvr).Get(ctx, "default", metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return 0, "no felixconfiguration default", nil
	}
	if err != nil {
		return 0, "", c.apiError("get felixconfiguration default ("+gvr.GroupVersion().String()+")", err)
	}
	mtu, _, _ := unstructured.NestedFieldNoCopy(u.Object, "spec", "ipipMTU")
	src := "felixconfiguration default (" + gvr.GroupVersion().String() + ")"
	switch x := mtu.(type) {
	case int64:
		return int(x), src, nil
	case float64:
		return int(x), src, nil
	case nil:
		return 0, src, nil
	default:
		return 0, src, withCode(ExitNotOK, fmt.Errorf("%s: spec.ipipMTU is %T, not a number", src, mtu))
	}
}

// mtuVerdict judges one node: its reported budget must match the rule for its reported
// external MTU, and Calico's tunnel MTU must fit it.
func mtuVerdict(n MTUNode, felix, icv int) MTUNode {
	switch {
	case n.BudgetMTU == 0:
		n.Verdict = "no budget reported"
		return n
	case n.ExternalMTU != 0:
		if want, err := budget.Budget(n.ExternalMTU, icv); err == nil && want != n.BudgetMTU {
			n.Verdict = fmt.Sprintf("reports budget %d, the rule gives %d for external MTU %d and ICV %d", n.BudgetMTU, want, n.ExternalMTU, icv)
			return n
		}
	}
	switch {
	case felix == 0:
		n.Verdict = fmt.Sprintf("ipipMTU unset: Calico derives the tunnel MTU from the host MTU, set ipipMTU <= %d", n.BudgetMTU)
	case felix > n.BudgetMTU:
		n.Verdict = fmt.Sprintf("ipipMTU %d exceeds this node's budget %d", felix, n.BudgetMTU)
	default:
		n.OK, n.Verdict = true, "ok"
	}
	return n
}

func (c *CLI) mtuCmd(g *globals) *cobra.Command {
	var ext, icv int
	var pattern string
	var offline bool
	cmd := &cobra.Command{
		Use:   "mtu",
		Short: "Compute the MTU budget and check Calico's tunnel MTU against it",
		Long: `mtu computes, for an external MTU (--external-mtu, or the smallest MTU of this host's
up links matching --interface-pattern, as Calico detects them) and an AES-GCM ICV
length:

  documented rule      EXTMTU - 46 - ((EXTMTU - 46) mod 4)
  kernel-exact limit   ((EXTMTU - 36 - ICV) & ~3) - 2
  enforced budget      the smaller of the two

and what calico_mtu / ipip_mtu (FelixConfiguration ipipMTU) should be. With cluster
access (not --offline, and a kubeconfig is found) it also reads Calico's
FelixConfiguration "default" ipipMTU and the budget every agent reports, and names
the nodes that are wrong (exit 1).

` + exitCodesHelp,
		Example: `  secureoverlayctl mtu --offline                      # detect on this host
  secureoverlayctl mtu --external-mtu 1450 --offline
  secureoverlayctl mtu --external-mtu 9001 --icv-bytes 16
  secureoverlayctl mtu -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(g, "table", "json", "yaml"); err != nil {
				return err
			}
			if !budget.ValidICV(icv) {
				return withCode(ExitUsage, fmt.Errorf("invalid --icv-bytes %d (want 8, 12 or 16)", icv))
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
				if errors.Is(clusterErr, errNoKubeconfig) && g.kubeconfig == "" && g.context == "" {
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
			out.CalicoMTU, out.IPIPMTU = out.Budget, out.Budget
			if cd != nil {
				out.Cluster = cd.verdicts(icv)
			}
			if err := printMTU(cmd.OutOrStdout(), g.output, out); err != nil {
				return err
			}
			if clusterErr != nil {
				return clusterErr
			}
			if out.Cluster != nil && len(out.Cluster.WrongNodes) > 0 {
				return silentExit{ExitNotOK}
			}
			return nil
		},
	}
	outputFlag(cmd, g, "table", "json", "yaml")
	cmd.Flags().IntVar(&ext, "external-mtu", 0, "external MTU (0: detect the smallest MTU of this host's up external links)")
	cmd.Flags().IntVar(&icv, "icv-bytes", budget.DefaultICV, "AES-GCM ICV length in bytes: 8, 12 or 16 (with cluster access, default: the ConfigMap's icv-bytes)")
	cmd.Flags().StringVar(&pattern, "interface-pattern", budget.DefaultInterfacePattern, "regexp of external interfaces for detection (Calico's default)")
	cmd.Flags().BoolVar(&offline, "offline", false, "do not contact the cluster")
	return cmd
}

// mtuClusterData is what mtu reads from the cluster.
type mtuClusterData struct {
	felix int
	src   string
	v     *view
}

func (c *CLI) mtuClusterRead(ctx context.Context, g *globals) (*mtuClusterData, error) {
	cl, err := g.clients()
	if err != nil {
		return nil, err
	}
	felix, src, err := cl.felixIPIPMTU(ctx)
	if err != nil {
		return nil, err
	}
	v, err := cl.read(ctx, g.namespace, c.Now())
	if err != nil {
		return nil, err
	}
	return &mtuClusterData{felix: felix, src: src, v: v}, nil
}

func (cd *mtuClusterData) verdicts(icv int) *MTUCluster {
	mc := &MTUCluster{FelixIPIPMTU: cd.felix, FelixSource: cd.src, Nodes: []MTUNode{}}
	for _, n := range cd.v.nodes {
		mn := MTUNode{Name: n.Name}
		if n.Report != nil {
			mn.ExternalMTU, mn.BudgetMTU = n.Report.ExternalMTU, n.Report.BudgetMTU
		}
		if mn.BudgetMTU != 0 && (mc.SmallestBudget == 0 || mn.BudgetMTU < mc.SmallestBudget) {
			mc.SmallestBudget, mc.SmallestNode = mn.BudgetMTU, n.Name
		}
		mn = mtuVerdict(mn, cd.felix, icv)
		if !mn.OK && mn.BudgetMTU != 0 {
			mc.WrongNodes = append(mc.WrongNodes, n.Name)
		}
		mc.Nodes = append(mc.Nodes, mn)
	}
	return mc
}

func printMTU(w io.Writer, format string, o MTUOutput) error {
	if format == "json" || format == "yaml" {
		return printData(w, format, o)
	}
	fmt.Fprintf(w, "external MTU        %d (%s)\n", o.ExternalMTU, o.Source)
	fmt.Fprintf(w, "ICV                 %d bytes (%s)\n", o.ICVBytes, o.ICVSource)
	fmt.Fprintf(w, "documented rule     %d   EXTMTU - 46 - ((EXTMTU - 46) mod 4)\n", o.Documented)
	fmt.Fprintf(w, "kernel-exact limit  %d   ((EXTMTU - 36 - ICV) & ~3) - 2\n", o.KernelExact)
	fmt.Fprintf(w, "enforced budget     %d   the smaller of the two\n", o.Budget)
	fmt.Fprintf(w, "set                 calico_mtu = \"%d\", ipip_mtu = \"%d\" (FelixConfiguration default: spec.ipipMTU: %d)\n", o.CalicoMTU, o.IPIPMTU, o.IPIPMTU)
	mc := o.Cluster
	if mc == nil {
		return nil
	}
	felix := "unset"
	if mc.FelixIPIPMTU != 0 {
		felix = fmt.Sprint(mc.FelixIPIPMTU)
	}
	fmt.Fprintf(w, "\ncluster             ipipMTU %s (%s)\n\n", felix, mc.FelixSource)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tEXT MTU\tBUDGET\tVERDICT")
	for _, n := range mc.Nodes {
		e, b := "-", "-"
		if n.ExternalMTU != 0 {
			e = fmt.Sprint(n.ExternalMTU)
		}
		if n.BudgetMTU != 0 {
			b = fmt.Sprint(n.BudgetMTU)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", n.Name, e, b, n.Verdict)
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
		fmt.Fprintf(w, "cluster-wide ipipMTU must be <= %d (smallest node budget, %s)\n", mc.SmallestBudget, mc.SmallestNode)
	}
	return nil
}
