// Command secureoverlay-agent is the node reconciler (DaemonSet, hostNetwork, NET_ADMIN):
// Calico nodes, IPAM blocks, IP pools, BGP peers and the key ring → xfrm states/policies
// and iptables rules on this node, reported on its Node (see package agent and
// docs/agent.md).
//
//	secureoverlay-agent [flags]          run the agent; SIGTERM leaves the data plane as is,
//	                                     unless the DaemonSet is being deleted: then it is
//	                                     walked down in --uninstall-step steps
//	secureoverlay-agent cleanup [flags]  remove every xfrm object and iptables rule we own
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"syscall"
	"time"

	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/budget"
	"github.com/secureoverlay/secureoverlay/gate"
	"github.com/secureoverlay/secureoverlay/internal/kubeconfig"
	"github.com/secureoverlay/secureoverlay/reconciler/agent"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/kernelinfo"
	"github.com/secureoverlay/secureoverlay/reconciler/ledger"
	"github.com/secureoverlay/secureoverlay/reconciler/rules"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
	"github.com/secureoverlay/secureoverlay/reconciler/xfrm"
)

// agentGOGC is the agent's GC target when $GOGC is unset (docs/agent.md, "Flags"): one
// agent runs on every node, and its live heap (≈35 MiB at 5,000 nodes) is small next to
// what Go's default GOGC=100 lets the heap grow to before each collection (twice the live
// heap). Collecting at 1.5× costs a few more collections per full sync and brought the
// binary's RSS there from 106-109 to 86-87 MiB (docs/performance.md §6).
const agentGOGC = 50

// gcDefault sets the GC target to agentGOGC unless the operator set GOGC.
func gcDefault() {
	if _, set := os.LookupEnv("GOGC"); !set {
		debug.SetGCPercent(agentGOGC)
	}
}

func main() {
	args := os.Args[1:]
	cleanup := len(args) > 0 && args[0] == "cleanup"
	if cleanup {
		args = args[1:]
	}
	if err := run(cleanup, args); errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	} else if err != nil {
		fmt.Fprintln(os.Stderr, "secureoverlay-agent:", err)
		os.Exit(1)
	}
}

type options struct {
	kubeconfig, nodeName, namespace, secretName, metricsAddr, ifacePattern, logLevel string
	ledgerDir, calicoAPIGroup, stateFile, reportLists, nodeReports, nodeIDs, pcpuSAs string
	calicoRecheck                                                                    time.Duration
	podName, podNamespace                                                            string
	resync, heartbeat, uninstallStep, decideTimeout                                  time.Duration
	icv, replayWindow, externalMTU, apiBurst                                         int
	apiQPS                                                                           float64
	reqid, mark                                                                      uint
	logJSON                                                                          bool
}

func flags(fs *flag.FlagSet, o *options) {
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig file (default: $KUBECONFIG, else in-cluster config)")
	fs.StringVar(&o.nodeName, "node-name", os.Getenv("NODE_NAME"), "this node's name (default $NODE_NAME)")
	fs.StringVar(&o.namespace, "namespace", api.Namespace, "namespace of the key Secret and of the NodeReports")
	fs.StringVar(&o.secretName, "secret-name", api.SecretName, "name of the key Secret")
	fs.StringVar(&o.metricsAddr, "metrics-addr", ":9467", "listen address for /metrics, /healthz and /readyz (empty disables)")
	fs.DurationVar(&o.resync, "resync-interval", time.Minute, "full resync period (up to 20% jitter is added); repairs drift")
	fs.DurationVar(&o.heartbeat, "heartbeat-interval", 5*time.Minute, "rewrite an unchanged report at least this often")
	fs.IntVar(&o.icv, "icv-bytes", desired.DefaultICVBytes, "AES-GCM ICV length: 8, 12 or 16 (must match the key ring and the MTU budget)")
	fs.IntVar(&o.replayWindow, "replay-window", desired.DefaultReplayWindow, "ESN replay window in packets (1024..32768)")
	fs.UintVar(&o.reqid, "reqid", desired.DefaultReqID, "xfrm reqid of our transport-mode SAs and policies (reqid+1 marks tunnel mode, reqid+2..reqid+9 the per-CPU lanes' outbound states)")
	fs.StringVar(&o.pcpuSAs, "pcpu-sas", "off", "auto: where the kernel keeps a state's CPU number (probed at start), each new SA epoch sends on per-CPU lanes, one outbound SA per CPU and peer for up to 4 CPUs plus a fallback, each under its own key (docs/dataplane.md §10; not yet the default: the kernel matrix has not passed with it); off: send on none, and remove them now (before rolling agents back to a version without lanes, docs/deploy.md). Either way this node installs its peers' lanes")
	fs.UintVar(&o.mark, "mark", 0x10, "packet mark reserved for our rules (validated against Calico, kube-proxy and Cilium bits; the current rules match on the IPsec policy and set no mark)")
	fs.IntVar(&o.externalMTU, "external-mtu", 0, "external MTU for the budget (0: detect the smallest MTU of the up links matching --interface-pattern)")
	fs.StringVar(&o.ifacePattern, "interface-pattern", budget.DefaultInterfacePattern, "regexp of external interfaces (Calico's MTU interface pattern)")
	fs.Float64Var(&o.apiQPS, "kube-api-qps", agent.DefaultAPIQPS, "sustained requests per second to the API server (client-side limit; reports are the only writes)")
	fs.IntVar(&o.apiBurst, "kube-api-burst", agent.DefaultAPIBurst, "requests allowed at once above --kube-api-qps")
	fs.StringVar(&o.calicoAPIGroup, "calico-api-group", os.Getenv(watch.EnvCalicoAPIGroup),
		"Calico's API group, as Calico's own CALICO_API_GROUP (crd.projectcalico.org/v1 or projectcalico.org/v3; default $CALICO_API_GROUP, else the group Calico uses: a converged DatastoreMigration means v3, else discovery)")
	fs.DurationVar(&o.calicoRecheck, "calico-recheck-interval", 2*time.Minute, "how often the Calico API group is re-selected (DatastoreMigration changes trigger it at once)")
	fs.StringVar(&o.ledgerDir, "ledger-dir", ledger.DefaultDir, "directory of this node's SA key ledger and lock (a hostPath on tmpfs: it must outlive the process, not the boot)")
	fs.StringVar(&o.nodeReports, "node-reports", agent.NodeReportsAuto, "auto: the report goes to this node's NodeReport, which every agent watches, only while a live peer's agent reads NodeReports, and always to its NodeStatus, which the master and secureoverlayctl read; always: to both at every write (before rolling agents back to a version that does not declare node-status, docs/deploy.md)")
	fs.StringVar(&o.reportLists, "report-lists", agent.ListsAuto, "auto: the report lists its per-pair claims (inboundFrom, encryptingTo; O(nodes) bytes) only while a live peer's agent reads them; always: keep them (before rolling agents back to a version that does not declare readiness-decide, docs/deploy.md)")
	fs.StringVar(&o.nodeIDs, "node-ids", "auto", "auto: read the node table from the NodeIDs when the public ring leaves it to them, and say so (the master leaves it out once every agent does); off: read it only from the ring, as a version that predates the NodeIDs (before rolling agents back to one, docs/deploy.md)")
	fs.StringVar(&o.stateFile, "state-file", gate.DefaultStateFile, "the boot gate's record of this node's data plane mode (a hostPath on disk: it must outlive the boot; the CNI plugin's \"stateFile\"); empty disables the gate. Its ready file is ready.json in --ledger-dir")
	fs.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.BoolVar(&o.logJSON, "log-json", false, "log as JSON")
	fs.StringVar(&o.podName, "pod-name", os.Getenv("POD_NAME"), "this agent's pod (default $POD_NAME): at SIGTERM, uninstall only if its DaemonSet is being deleted")
	fs.StringVar(&o.podNamespace, "pod-namespace", os.Getenv("POD_NAMESPACE"), "this agent's pod namespace (default $POD_NAMESPACE)")
	fs.DurationVar(&o.uninstallStep, "uninstall-step", agent.DefaultUninstallStep,
		"time between the uninstall walk-down steps (enforce→encrypt→accept→off); must exceed the spread of SIGTERM delivery across nodes, and terminationGracePeriodSeconds must exceed 2 steps + the decision timeout + margin")
	fs.DurationVar(&o.decideTimeout, "uninstall-decision-timeout", agent.DefaultDecisionTimeout,
		"at SIGTERM, how long to ask the API whether the DaemonSet is being deleted; unanswered means keep the data plane")
}

func run(cleanup bool, args []string) error {
	name := "secureoverlay-agent"
	if cleanup {
		name += " cleanup"
	}
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	var o options
	flags(fs, &o)
	if err := fs.Parse(args); err != nil {
		return err
	}
	gcDefault()
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q (the only subcommand is cleanup)", fs.Args())
	}
	if o.nodeIDs != "auto" && o.nodeIDs != "off" {
		return fmt.Errorf("--node-ids %q: want auto or off", o.nodeIDs)
	}
	if o.pcpuSAs != "auto" && o.pcpuSAs != "off" {
		return fmt.Errorf("--pcpu-sas %q: want auto or off", o.pcpuSAs)
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(o.logLevel)); err != nil {
		return fmt.Errorf("--log-level %q: want debug, info, warn or error", o.logLevel)
	}
	hopts := &slog.HandlerOptions{Level: level}
	var h slog.Handler = slog.NewTextHandler(os.Stderr, hopts)
	if o.logJSON {
		h = slog.NewJSONHandler(os.Stderr, hopts)
	}
	log := slog.New(h)

	if maxReqID := uint(1<<32 - 2 - desired.LaneReqIDs); o.reqid == 0 || o.reqid > maxReqID {
		return fmt.Errorf("--reqid %d: want 1..%d", o.reqid, maxReqID)
	}
	dp := desired.Config{ICVBytes: o.icv, ReplayWindow: uint32(o.replayWindow), ReqID: uint32(o.reqid), TunnelReqID: uint32(o.reqid) + 1,
		LaneReqID: uint32(o.reqid) + 2, LanesOff: o.pcpuSAs == "off"}.WithDefaults()
	if err := dp.Validate(); err != nil {
		return err
	}
	if err := agent.CheckMark(uint32(o.mark)); err != nil {
		return fmt.Errorf("--mark: %w", err)
	}
	if o.uninstallStep <= 0 {
		return fmt.Errorf("--uninstall-step %s: want a positive duration", o.uninstallStep)
	}
	if o.apiQPS <= 0 || o.apiBurst < 1 {
		return fmt.Errorf("--kube-api-qps %g / --kube-api-burst %d: want a positive rate and a burst of at least 1", o.apiQPS, o.apiBurst)
	}
	if o.decideTimeout <= 0 {
		return fmt.Errorf("--uninstall-decision-timeout %s: want a positive duration", o.decideTimeout)
	}
	calicoGroup, err := watch.ParseAPIGroup(o.calicoAPIGroup)
	if err != nil {
		return fmt.Errorf("--calico-api-group: %w", err)
	}
	if o.calicoRecheck <= 0 {
		return fmt.Errorf("--calico-recheck-interval %s: want a positive duration", o.calicoRecheck)
	}
	if !cleanup && o.nodeName == "" {
		return errors.New("--node-name is empty and $NODE_NAME is not set")
	}
	var detect func() (int, string, error)
	if o.externalMTU == 0 {
		re, err := budget.CompilePattern(o.ifacePattern)
		if err != nil {
			return fmt.Errorf("--interface-pattern: %w", err)
		}
		detect = func() (int, string, error) { return budget.DetectExternalMTU(re) }
	} else if _, err := budget.Budget(o.externalMTU, o.icv); err != nil {
		return fmt.Errorf("--external-mtu %d: %w", o.externalMTU, err)
	}

	if o.ledgerDir == "" {
		return errors.New("--ledger-dir is empty")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// One agent (or cleanup) per node at a time: an old pod still running while a new one
	// starts must not program the kernel, nor keep its own view of the ledger.
	lock, err := ledger.WaitLock(ctx, o.ledgerDir, 500*time.Millisecond, func() {
		log.Warn("another secureoverlay-agent on this node holds the ledger lock; waiting for it to exit", "dir", o.ledgerDir)
	})
	if err != nil {
		return fmt.Errorf("ledger lock: %w", err)
	}
	defer lock.Unlock()
	if cleanup {
		ipt, err := rules.NewSystem()
		if err != nil {
			return err
		}
		k, err := xfrm.OpenNetlink()
		if err != nil {
			return err
		}
		defer k.Close()
		res, err := agent.Cleanup(k, ipt, dp)
		if err == nil {
			// The kernel holds nothing of ours: the node keeps no ledger either (the
			// next agent starts a new epoch; had we kept it, the next agent would find
			// the recorded keys missing and start one anyway).
			err = ledger.RemoveFile(o.ledgerDir)
		}
		if err == nil && o.stateFile != "" {
			// Nor is there anything for a later boot to wait for (package gate).
			err = gate.RemoveState(o.stateFile)
		}
		log.Info("cleanup", "statesDeleted", res.StatesDeleted, "policiesDeleted", res.PoliciesDeleted, "error", err)
		return err
	}

	cfg, err := kubeconfig.Load(o.kubeconfig)
	if err != nil {
		return err
	}
	cfg.UserAgent = "secureoverlay-agent/" + o.nodeName
	cfg.QPS, cfg.Burst = float32(o.apiQPS), o.apiBurst
	client, err := kubernetes.NewForConfig(kubeconfig.Protobuf(cfg))
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	dc, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("kubernetes dynamic client: %w", err)
	}
	ipt, err := rules.NewSystem()
	if err != nil {
		return err
	}
	// One netlink handle for the agent's life, bound to this (the host's) network namespace.
	xk, err := xfrm.OpenNetlink()
	if err != nil {
		return err
	}
	defer xk.Close()
	// The per-CPU probe writes a state to the node's kernel: once per process, not per
	// resync (the kernel detection repeats; it reads the probe's answer).
	pcpu, pcpuErr := xk.ProbePerCPUStates()
	lanes := uint16(0)
	if pcpu && !dp.LanesOff {
		lanes = uint16(min(runtime.NumCPU(), agent.DefaultLanes))
	}
	log.Info("per-CPU SAs", "setting", o.pcpuSAs, "kernelHasThem", pcpu, "lanesForNewEpochs", lanes, "probeError", pcpuErr)
	kernel := func() kernelinfo.Info {
		i := kernelinfo.Read("/")
		i.SetPerCPUProbe(pcpu, pcpuErr)
		return i
	}
	src := watch.New(watch.Config{Client: client, Dynamic: dc, REST: cfg, Namespace: o.namespace, SecretName: o.secretName,
		Self: o.nodeName, Logger: log, APIGroup: calicoGroup, Recheck: o.calicoRecheck, IgnoreNodeIDs: o.nodeIDs == "off"})
	ag, err := agent.New(agent.Config{NodeName: o.nodeName, Dataplane: dp, ResyncInterval: o.resync,
		HeartbeatInterval: o.heartbeat, ExternalMTU: o.externalMTU, LedgerDir: o.ledgerDir, ReportLists: o.reportLists, NodeReports: o.nodeReports,
		StateFile: o.stateFile, ReadyFile: readyFile(&o), Namespace: o.namespace, Lanes: lanes},
		agent.Deps{Client: client, Dynamic: dc, Source: src, Xfrm: xfrm.NewApplier(xk, dp), Rules: rules.NewApplier(ipt),
			DetectMTU: detect, Logger: log, Kernel: kernel})
	if err != nil {
		return err
	}

	defer ag.Close()
	if o.metricsAddr != "" {
		srv := &http.Server{Addr: o.metricsAddr, Handler: ag.Handler(), ReadHeaderTimeout: 5 * time.Second}
		go func() {
			if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("metrics server", "addr", o.metricsAddr, "error", err)
				stop()
			}
		}()
		defer srv.Close()
	}
	log.Info("starting", "node", o.nodeName, "namespace", o.namespace, "secret", o.secretName, "resync", o.resync,
		"icvBytes", dp.ICVBytes, "replayWindow", dp.ReplayWindow, "reqid", dp.ReqID, "externalMTU", o.externalMTU,
		"metricsAddr", o.metricsAddr)
	d, err := ag.Serve(ctx, agent.Lifecycle{Client: client, PodNamespace: o.podNamespace, PodName: o.podName,
		DecisionTimeout: o.decideTimeout, UninstallStep: o.uninstallStep,
		SignalsHandled: stop}) // a second signal then ends the process (default action)
	if !d.Uninstall {
		return nil // the data plane is left as it is, and Serve said why
	}
	return err
}

// readyFile is the boot gate's ready file: in the ledger directory, which lives as long as
// the boot (gate.DefaultReadyFile with the default --ledger-dir). None without a state file.
func readyFile(o *options) string {
	if o.stateFile == "" {
		return ""
	}
	return filepath.Join(o.ledgerDir, "ready.json")
}
