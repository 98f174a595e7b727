package ctl

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"sigs.k8s.io/yaml"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
)

// tableMaxNodes is the largest cluster whose per-node table status prints unasked;
// problemLines bounds the problem (and the master's lagging and excluded) lists of the
// text output. -o json and yaml are always complete.
const (
	tableMaxNodes = 50
	problemLines  = 20
)

func (c *CLI) statusCmd(g *globals) *cobra.Command {
	var node string
	var allNodes bool
	staleAfter := defaultStaleAfter
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the cluster mode, key generations, node states and problems",
		Long: `status shows what the master published (mode, target, key generations, rotation,
lagging nodes), how many nodes are in each state (ok, lagging, excluded, error,
stale, not-ready, no-report) and the problems, at most 20 of them. The first line
is a summary meant to be read first.

Then one row per node from its agent's report (mode reached, generations
installed, peers encrypted/expected, MTU budget, last sync and any problem): up
to 50 nodes unasked, in larger clusters with --nodes or -o wide. -o json and -o
yaml always hold every node and every problem.

--node NAME shows the per-peer detail of one node: for every other node, whether
NAME holds its inbound SAs, whether NAME sends it ESP, and what that peer reports
about NAME (both directions of each pair), checked against the peer's current boot.

Exit code 0 when healthy, 1 when anything is wrong (the problems are listed).

` + exitCodesHelp,
		Example: `  secureoverlayctl status
  secureoverlayctl status --nodes
  secureoverlayctl status -o wide
  secureoverlayctl status -o json | jq .summary
  secureoverlayctl status --node node-a`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(g, "table", "wide", "json", "yaml"); err != nil {
				return err
			}
			cl, err := g.clients()
			if err != nil {
				return err
			}
			v, err := cl.readAbout(cmd.Context(), g.namespace, c.Now(), node)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if node != "" {
				d, err := v.detail(node)
				if err != nil {
					return err
				}
				if err := printDetail(out, g.output, v, d); err != nil {
					return err
				}
				if len(d.Problems) > 0 {
					return silentExit{ExitNotOK}
				}
				return nil
			}
			st := v.status(v.staleAfter(cmd, staleAfter))
			if err := printStatus(out, g.output, v.now, st, allNodes); err != nil {
				return err
			}
			if !st.Healthy {
				return silentExit{ExitNotOK}
			}
			return nil
		},
	}
	outputFlag(cmd, g, "table", "wide", "json", "yaml")
	cmd.Flags().StringVar(&node, "node", "", "show the per-peer detail of this node")
	cmd.Flags().BoolVar(&allNodes, "nodes", false, fmt.Sprintf("print the per-node table also for more than %d nodes", tableMaxNodes))
	cmd.Flags().DurationVar(&staleAfter, "stale-after", defaultStaleAfter, "a report whose last sync is older than this is a problem (0: never; default: 3 × the ConfigMap's heartbeat-interval, else 15m)")
	return cmd
}

func printData(w io.Writer, format string, v any) error {
	switch format {
	case "json":
		b, err := json.MarshalIndent(v, "", "  ")
		if err != nil {
			return fmt.Errorf("encode json: %w", err)
		}
		_, err = fmt.Fprintf(w, "%s\n", b)
		return err
	case "yaml":
		b, err := yaml.Marshal(v)
		if err != nil {
			return fmt.Errorf("encode yaml: %w", err)
		}
		_, err = w.Write(b)
		return err
	}
	return fmt.Errorf("unknown data format %q", format)
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// printStatus prints st: the summary, the master's view, the node states and the
// problems first, then the per-node table when the cluster is small, when allNodes, or
// in wide.
func printStatus(w io.Writer, format string, now time.Time, st StatusOutput, allNodes bool) error {
	if format == "json" || format == "yaml" {
		return printData(w, format, st)
	}
	wide := format == "wide"
	fmt.Fprintf(w, "Summary:  %s\n", st.Summary)
	if ms := st.Master; ms != nil {
		fmt.Fprintf(w, "Mode:     %s (target %s)", ms.Mode, ms.Target)
		if ms.Waiting != "" {
			fmt.Fprintf(w, ", waiting for %s", ms.Waiting)
		}
		fmt.Fprintln(w)
		fmt.Fprintf(w, "Keys:     %s\n", keysLine(now, ms))
		fmt.Fprintf(w, "Master:   leader %s, %d node IDs assigned, last error: %s\n", dash(ms.Leader), ms.Nodes, dash(ms.LastError))
		if ms.AgentSecretAccess != "" {
			fmt.Fprintf(w, "Agents:   read access to the key Secret %s (%s)\n", ms.AgentSecretAccess, dash(ms.AgentSecretAccessWhy))
		}
		switch ms.NodeTable {
		case api.NodeTableIDs:
			fmt.Fprintln(w, "Node IDs: in NodeID objects; the public ring leaves them out (every reporting agent reads them)")
		case api.NodeTableRing:
			fmt.Fprintf(w, "Node IDs: in the public ring (%s)\n", dash(ms.NodeTableWhy))
		}
		printBounded(w, "Lagging:  ", ms.Lagging)
		printBounded(w, "Excluded: ", ms.Excluded)
	}
	desired := "not set (configmap " + api.ConfigMapName + " missing)"
	if st.Desired.Present {
		desired = "enabled=" + dash(st.Desired.Enabled)
		if st.Desired.Mode != "" {
			desired += ", mode=" + st.Desired.Mode
		}
	}
	fmt.Fprintf(w, "Desired:  %s\n", desired)
	if st.NodeSelector != "" {
		fmt.Fprintf(w, "Nodes:    %s (nodes that run an agent)\n", st.NodeSelector)
	}
	fmt.Fprintf(w, "States:   %s\n", statesLine(st))
	if len(st.Problems) > 0 {
		fmt.Fprintln(w)
		fmt.Fprintln(w, "Problems:")
		for i, p := range st.Problems {
			if i == problemLines {
				fmt.Fprintf(w, "  … and %d more (-o json lists every one)\n", len(st.Problems)-i)
				break
			}
			fmt.Fprintf(w, "  - %s\n", p)
		}
	}
	if len(st.Nodes) > tableMaxNodes && !allNodes && !wide {
		fmt.Fprintf(w, "\nThe table of the %d nodes is left out above %d nodes: --nodes or -o wide prints it, --node NAME shows one node.\n", len(st.Nodes), tableMaxNodes)
		return nil
	}
	if len(st.Nodes) == 0 {
		return nil
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	hdr := "NODE\tREADY\tMODE\tGENERATIONS\tPEERS\tBUDGET\tLAST SYNC"
	if wide {
		hdr += "\tEXT MTU\tMAX SEQ\tINCARNATION"
	}
	fmt.Fprintln(tw, hdr+"\tSTATUS")
	for _, r := range st.Nodes {
		ready := "yes"
		if !r.Ready {
			ready = "no"
		}
		status := "ok"
		if len(r.Problems) > 0 {
			status = strings.Join(r.Problems, "; ")
		}
		peers, bud, sync := "-", "-", "-"
		if r.Reported {
			peers = fmt.Sprintf("%d/%d", r.PeersEncrypted, r.PeersExpected)
			if r.BudgetMTU > 0 {
				bud = fmt.Sprint(r.BudgetMTU)
			}
			if !r.LastSync.IsZero() {
				sync = age(now, r.LastSync) + " ago"
			}
		}
		line := fmt.Sprintf("%s\t%s\t%s\t%s\t%s\t%s\t%s", r.Name, ready, dash(string(r.Mode)), gens(r.Generations), peers, bud, sync)
		if wide {
			ext, seq := "-", "-"
			if r.ExternalMTU > 0 {
				ext = fmt.Sprint(r.ExternalMTU)
			}
			if r.Reported {
				seq = fmt.Sprintf("%.0f%%", 100*r.MaxSeqFraction)
			}
			line += fmt.Sprintf("\t%s\t%s\t%s", ext, seq, dash(r.Incarnation))
		}
		fmt.Fprintln(tw, line+"\t"+status)
	}
	return tw.Flush()
}

// printBounded prints the master's lagging or excluded nodes, one line each, at most
// problemLines of them.
func printBounded(w io.Writer, label string, l []api.NodeLagging) {
	for i, x := range l {
		if i == problemLines {
			fmt.Fprintf(w, "%s… and %d more (-o json lists every one)\n", label, len(l)-i)
			return
		}
		fmt.Fprintf(w, "%s%s: %s\n", label, x.Node, x.Reason)
	}
}

// statesLine is "N nodes: A ok, B lagging, …": ok always, the other states when a node
// is in them.
func statesLine(st StatusOutput) string {
	var parts []string
	for _, s := range States {
		if n := st.States[s]; n > 0 || s == StateOK {
			parts = append(parts, fmt.Sprintf("%d %s", n, s))
		}
	}
	noun := "nodes"
	if len(st.Nodes) == 1 {
		noun = "node"
	}
	return fmt.Sprintf("%d %s: %s", len(st.Nodes), noun, strings.Join(parts, ", "))
}

func keysLine(now time.Time, ms *api.MasterStatus) string {
	if len(ms.Generations) == 0 {
		return "no key generation (encryption off)"
	}
	var parts []string
	for _, gs := range ms.Generations {
		p := fmt.Sprintf("generation %d %s (%s, %s, created %s ago)", gs.Number, gs.State, gs.Cipher, dash(gs.Reason), age(now, gs.Created))
		parts = append(parts, p)
	}
	s := strings.Join(parts, "; ")
	if ms.RotationInProgress {
		s += "; rotation in progress"
	}
	if ms.Deferred != "" {
		s += "; deferred: " + ms.Deferred
	}
	return s
}

// PeerRow is one pair in `status --node`.
type PeerRow struct {
	Peer string `json:"peer"`
	// Address is the peer's projectcalico.org/IPv4Address.
	Address string `json:"address,omitempty"`
	// InboundFromPeer: the node holds inbound SAs from the peer (every live generation)
	// for the peer's current boot. EncryptingToPeer: the node sends the peer ESP.
	InboundFromPeer  string `json:"inboundFromPeer"`
	EncryptingToPeer string `json:"encryptingToPeer"`
	// PeerInbound / PeerEncrypting are the same facts from the peer's report about the
	// node (the other direction of the pair).
	PeerInbound    string   `json:"peerInbound"`
	PeerEncrypting string   `json:"peerEncrypting"`
	PeerMode       api.Mode `json:"peerMode,omitempty"`
}

// NodeDetail is `status --node NAME -o json|yaml`.
type NodeDetail struct {
	Node     NodeRow   `json:"node"`
	Peers    []PeerRow `json:"peers"`
	Problems []string  `json:"problems,omitempty"`
	// Note says what the reports cannot tell.
	Note string `json:"note,omitempty"`
}

const detailNote = "per-peer facts come from the agents' reports (inboundFrom/encryptingTo); SA byte and packet counters are not reported"

// detailNoteOmitted is the note when a report omits its per-pair lists.
const detailNoteOmitted = "per-peer facts come from the agents' reports (inboundFrom/encryptingTo); \"n/a\": the agent omits them (every live agent decides from NodeViews and NodeRows, docs/protocol-v2.md §9 step 4; its counts of peers are in the report); SA byte and packet counters are not reported"

// pairFact checks reporter's fact m about peer against subject (the peer's Node): the tag
// must be of the subject's current key incarnation (boot ID, Node UID and SA epoch of its
// current report). A reporter that publishes no epoch (an agent predating epochs) tagged
// boot IDs; its facts are checked against the subject's boot ID.
func pairFact(m map[string]string, peer string, reporter *watch.Report, subject *watch.NodeInfo) string {
	if reporter.ListsOmitted {
		return "n/a"
	}
	tag, ok := m[peer]
	if !ok {
		return "no"
	}
	if reporter.Epoch == "" {
		if subject.Incarnation != "" && tag != watch.IncarnationTag(subject.Incarnation) {
			return "stale"
		}
		return "yes"
	}
	if inc := subject.KeyIncarnation(); inc == "" || tag != watch.IncarnationTag(inc) {
		return "stale"
	}
	return "yes"
}

func (v *view) detail(name string) (*NodeDetail, error) {
	var self *watch.NodeInfo
	for i := range v.nodes {
		if v.nodes[i].Name == name {
			self = &v.nodes[i]
		}
	}
	if self == nil {
		return nil, withCode(ExitNotOK, fmt.Errorf("node %q not found", name))
	}
	d := &NodeDetail{Peers: []PeerRow{}, Note: detailNote}
	for _, r := range v.rows(defaultStaleAfter) {
		if r.Name == name {
			d.Node = r
			d.Problems = append(d.Problems, r.Problems...)
		}
	}
	for _, p := range v.nodes {
		if p.Name == name {
			continue
		}
		row := PeerRow{Peer: p.Name, Address: p.IPv4Address, InboundFromPeer: "-", EncryptingToPeer: "-", PeerInbound: "-", PeerEncrypting: "-"}
		if self.Report != nil {
			row.InboundFromPeer = pairFact(self.Report.InboundFrom, p.Name, self.Report, &p)
			row.EncryptingToPeer = pairFact(self.Report.EncryptingTo, p.Name, self.Report, &p)
		}
		if p.Report != nil {
			row.PeerMode = p.Report.Mode
			row.PeerInbound = pairFact(p.Report.InboundFrom, name, p.Report, self)
			row.PeerEncrypting = pairFact(p.Report.EncryptingTo, name, p.Report, self)
		}
		if self.Report != nil && self.Report.Mode.Rank() >= api.ModeEncrypt.Rank() && p.Report != nil && p.Report.Mode.Rank() >= api.ModeAccept.Rank() {
			if row.EncryptingToPeer != "yes" && row.EncryptingToPeer != "n/a" {
				d.Problems = append(d.Problems, fmt.Sprintf("not encrypting to %s (%s)", p.Name, row.EncryptingToPeer))
			}
		}
		if self.Report != nil && self.Report.Mode.Rank() >= api.ModeAccept.Rank() && p.IPv4Address != "" && row.InboundFromPeer != "yes" && row.InboundFromPeer != "n/a" {
			d.Problems = append(d.Problems, fmt.Sprintf("no inbound SAs from %s (%s)", p.Name, row.InboundFromPeer))
		}
		if row.InboundFromPeer == "n/a" || row.PeerInbound == "n/a" {
			d.Note = detailNoteOmitted
		}
		d.Peers = append(d.Peers, row)
	}
	return d, nil
}

func printDetail(w io.Writer, format string, v *view, d *NodeDetail) error {
	if format == "json" || format == "yaml" {
		return printData(w, format, d)
	}
	r := d.Node
	fmt.Fprintf(w, "Node:        %s (ready: %t)\n", r.Name, r.Ready)
	if r.Reported {
		fmt.Fprintf(w, "Mode:        %s, generations %s, peers encrypted %d/%d\n", r.Mode, gens(r.Generations), r.PeersEncrypted, r.PeersExpected)
		fmt.Fprintf(w, "Budget:      %d (external MTU %d), max sequence %.0f%% of the rotation threshold\n", r.BudgetMTU, r.ExternalMTU, 100*r.MaxSeqFraction)
		fmt.Fprintf(w, "Last sync:   %s ago, error: %s\n", age(v.now, r.LastSync), dash(r.Error))
	} else {
		fmt.Fprintln(w, "Mode:        - (no readable agent report)")
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "PEER\tADDRESS\tINBOUND FROM PEER\tENCRYPTING TO PEER\tPEER INBOUND\tPEER ENCRYPTING\tPEER MODE")
	for _, p := range d.Peers {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", p.Peer, dash(p.Address), p.InboundFromPeer, p.EncryptingToPeer, p.PeerInbound, p.PeerEncrypting, dash(string(p.PeerMode)))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintf(w, "\nNote: %s.\n", d.Note)
	if len(d.Problems) > 0 {
		fmt.Fprintln(w, "Problems:")
		for _, p := range d.Problems {
			fmt.Fprintf(w, "  - %s\n", p)
		}
	}
	return nil
}
