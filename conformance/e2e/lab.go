// Package e2e brings up the whole system in the VM lab and measures it: the
// conformance scenarios (`make conformance`) and the demo (`make demo`,
// conformance/demo) share it.
//
// What Up builds, all real parts:
//
//	host   etcd + kube-apiserver (conformance/kube) on 127.0.0.1, serving SAN
//	       10.0.2.100 (the address under which the guest reaches host loopback);
//	       Calico's real CRDs and objects in Calico's own types (Nodes with
//	       IPv4Address, IPv4IPIPTunnelAddr, bootID and Ready; an IPPool with ipipMode
//	       Always; per node the IPAMBlock + BlockAffinity calico-node leaves after
//	       allocating the tunnel address; ClusterInformation datastoreReady; a BGPPeer
//	       outside the cluster); a Pod object per pod (Calico's plugin reads it);
//	       the RBAC objects of manifests/secureoverlay.yaml; one or more
//	       secureoverlay-master processes (bin/) as the master ServiceAccount
//	guest  lab.Cluster with ControlPlane: node namespaces on a shared underlay,
//	       Calico-style IPIP routing (tunl0, remote blocks via NODEIP dev tunl0
//	       onlink, blackhole for the local block); one secureoverlay-agent per
//	       node namespace with its own ServiceAccount token kubeconfig, reaching
//	       the API server over the node's management link; pods attached through
//	       the real CNI chain: Calico's own calico + calico-ipam (Kubernetes
//	       datastore, against the lab's API server) rendered from Calico's conflist
//	       template as install-cni renders it, our plugin spliced in by our
//	       installer, then portmap; exec'd by libcni through the command channel
//
// Enabling, disabling and rotating are what an operator does: the
// secureoverlay-config ConfigMap (`enabled`, `mode`, the rotate-request
// annotation); progress is read from secureoverlay-status and the Node reports.
// Evidence (captures on the underlay bridge, SA counters, ping streams) comes
// from conformance/lab. Key material never leaves the guest: SA listings go
// through lab.XfrmStates, which strips the key lines inside the guest.
package e2e

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/secureoverlay/secureoverlay/budget"
	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/conformance/lab"
	"github.com/secureoverlay/secureoverlay/conformance/spawn"
)

// Config shapes a lab. The zero value is the standard three-node lab.
type Config struct {
	// Nodes are registered in the API and run an agent (default 3).
	Nodes int
	// SpareNodes are node namespaces built in the guest (routing included)
	// but not registered and without an agent, for join scenarios.
	SpareNodes int
	// UnderlayMTU is the underlay bridge's MTU (default 1450).
	UnderlayMTU int
	// TunnelMTU is tunl0's and the pods' MTU (default: the budget of
	// UnderlayMTU with an 8-byte ICV, 1402 at 1450).
	TunnelMTU int
	// Masters is how many secureoverlay-master replicas run (default 1).
	Masters int
	// Grace is the master's --grace (default DefaultGrace): how long a retiring
	// generation stays installed after the next one is activated.
	Grace time.Duration
	// AgentResync is the agents' --resync-interval (default 20s).
	AgentResync time.Duration
	// StateDir keeps logs (API server, masters, agents, console) after Close;
	// default a temporary directory that Close removes.
	StateDir string
	// Progress receives one line per step while the lab comes up; nil: quiet.
	Progress func(string)
	// Release, when set, is a host directory holding an earlier release's
	// secureoverlay-agent and secureoverlay-master (ReleaseBinDir): Up starts every
	// master and agent from it, and StartMaster/StartAgent then replace them one by one
	// with this tree's binaries, as a rolling update does. The CNI plugin is always
	// this tree's.
	Release string
}

func (c *Config) defaults() error {
	if c.Nodes == 0 {
		c.Nodes = 3
	}
	if c.UnderlayMTU == 0 {
		c.UnderlayMTU = 1450
	}
	if c.TunnelMTU == 0 {
		b, err := budget.Budget(c.UnderlayMTU, 8)
		if err != nil {
			return fmt.Errorf("lab config: %w", err)
		}
		c.TunnelMTU = b
	}
	if c.Masters == 0 {
		c.Masters = 1
	}
	if c.Grace == 0 {
		c.Grace = DefaultGrace
	}
	if c.AgentResync == 0 {
		c.AgentResync = 20 * time.Second
	}
	if c.Nodes < 2 || c.Nodes+c.SpareNodes > 20 {
		return fmt.Errorf("lab config: %d nodes + %d spare, want 2..20", c.Nodes, c.SpareNodes)
	}
	return nil
}

// DefaultGrace is the lab master's --grace: the longest a retiring generation stays. The
// master removes it as soon as every agent reports it no longer sends with it (and --drain
// has passed); the grace only bounds a broken agent. Before removal waited for the agents,
// it was the only bound: under TCG on a loaded 2-core host an agent's sync has taken
// 12–25 s and the last agent switched 31 s after activation, so with a 5 s grace the first
// agents removed their old inbound SAs while a slower one still sent with them (388 of
// 9,618 requests lost, each counted by XfrmInNoStates). Scenarios check the order
// (MakeBeforeBreak).
const DefaultGrace = 2 * time.Minute

// APIServerGuestPort is the port under which the guest reaches the API server
// at lab.GuestForwardAddr.
const APIServerGuestPort = 6443

// Lab is a running system: API server, masters, VM, agents, pods.
type Lab struct {
	VM      *lab.VM
	Kube    *kube.Cluster
	Cluster lab.Cluster
	// Client and Dynamic are admin clients of the API server.
	Client  kubernetes.Interface
	Dynamic dynamic.Interface
	// BootDuration and UpDuration measure the VM boot and the whole Up.
	BootDuration, UpDuration time.Duration

	cfg      Config
	binDir   string
	stateDir string
	ownState bool
	cniCache string
	// calicoConfig is Calico's calico-config ConfigMap (its conflist template),
	// calicoVersion the version of its CNI plugin, calicoBin the host directory the
	// guest sees at guestCalicoShare (and copies to GuestCalicoDir).
	calicoConfig  *corev1.ConfigMap
	calicoVersion string
	calicoBin     string
	proxy         *tcpProxy
	masterCfg     string // the master's kubeconfig on the host

	mu      sync.Mutex
	masters map[int]*exec.Cmd
	// masterPorts are the running masters' metrics ports (on the host's loopback).
	masterPorts map[int]int
	agents      map[int]int // node → guest pid
	// released are the masters ("master-<m>") and agents ("node<i>") running
	// Config.Release's binaries.
	released map[string]bool
	bootIDs  map[int]string
	pods     []*Pod
	log      func(string)
}

// BinDir is where the binaries of `make build` are: $SECUREOVERLAY_BIN_DIR,
// else <repo>/bin.
func BinDir() string {
	if d := os.Getenv("SECUREOVERLAY_BIN_DIR"); d != "" {
		return d
	}
	return filepath.Join(filepath.Dir(lab.CacheDir()), "bin")
}

// Binaries the lab runs, from BinDir.
var Binaries = []string{"secureoverlay", "secureoverlay-agent", "secureoverlay-master"}

// Unavailable says why the lab cannot run here ("" when it can): missing
// binaries (`make build`), API server (`make tools`), lab image or QEMU, or
// the host's CNI plugins.
func Unavailable() string {
	if r := lab.Unavailable(lab.Options{GuestForwards: []lab.GuestForward{{GuestPort: 1, HostPort: 1}}}); r != "" {
		return r
	}
	if _, _, err := kube.FindBinaries(); err != nil {
		return err.Error()
	}
	for _, b := range Binaries {
		if _, err := os.Stat(filepath.Join(BinDir(), b)); err != nil {
			return fmt.Sprintf("%s missing in %s (run `make build`)", b, BinDir())
		}
	}
	if _, err := kube.CalicoDir(); err != nil {
		return err.Error()
	}
	if _, err := exec.LookPath("zstd"); err != nil {
		return "zstd not found (apt-get install zstd): Calico's CNI plugin ships compressed"
	}
	cni := os.Getenv("CNI_PLUGIN_DIR")
	if cni == "" {
		cni = "/usr/lib/cni"
	}
	// Calico's conflist template chains portmap after calico.
	if _, err := os.Stat(filepath.Join(cni, "portmap")); err != nil {
		return fmt.Sprintf("CNI plugin portmap (in Calico's conflist) missing in %s (apt-get install containernetworking-plugins)", cni)
	}
	return ""
}

// CalicoVersion is the version of the Calico CNI plugin the lab's pods are attached with.
func (l *Lab) CalicoVersion() string { return l.calicoVersion }

func (l *Lab) progress(format string, a ...any) {
	if l.log != nil {
		l.log(fmt.Sprintf(format, a...))
	}
}

// Up starts everything and returns once every agent reports mode off with a
// successful sync and a pod runs on every registered node. Encryption is not
// enabled yet (Enable). On error everything started is stopped.
func Up(ctx context.Context, cfg Config) (l *Lab, err error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	start := time.Now()
	l = &Lab{cfg: cfg, binDir: BinDir(), masters: map[int]*exec.Cmd{}, masterPorts: map[int]int{}, agents: map[int]int{}, released: map[string]bool{}, bootIDs: map[int]string{}, log: cfg.Progress}
	defer func() {
		if err != nil {
			_ = l.Close()
			l = nil
		}
	}()
	if cfg.StateDir == "" {
		d, err := os.MkdirTemp("", "secureoverlay-e2e-")
		if err != nil {
			return l, err
		}
		l.stateDir, l.ownState = d, true
	} else {
		if err := os.MkdirAll(cfg.StateDir, 0o755); err != nil {
			return l, err
		}
		l.stateDir = cfg.StateDir
	}
	l.cniCache = filepath.Join(l.stateDir, "cni-cache")
	// Calico's real CNI plugin and conflist template, from its release files.
	calicoDir, err := kube.CalicoDir()
	if err != nil {
		return l, err
	}
	if l.calicoConfig, err = kube.CalicoConfig(calicoDir); err != nil {
		return l, err
	}
	l.calicoBin = filepath.Join(l.stateDir, "calico-bin")
	if l.calicoVersion, err = kube.CalicoCNI(calicoDir, l.calicoBin); err != nil {
		return l, err
	}
	// The guest reaches the API server through a loopback relay whose port is
	// known before either side starts, so the VM boots while the API server
	// starts.
	l.proxy, err = newTCPProxy()
	if err != nil {
		return l, err
	}
	l.Cluster = lab.Cluster{Nodes: cfg.Nodes + cfg.SpareNodes, UnderlayMTU: cfg.UnderlayMTU, TunnelMTU: cfg.TunnelMTU, ControlPlane: true}

	var wg sync.WaitGroup
	var kubeErr, vmErr error
	wg.Add(2)
	go func() {
		defer wg.Done()
		t0 := time.Now()
		l.progress("starting etcd + kube-apiserver on 127.0.0.1 …")
		kdir := filepath.Join(l.stateDir, "kube")
		if kubeErr = os.MkdirAll(kdir, 0o755); kubeErr != nil {
			return
		}
		l.Kube, kubeErr = kube.StartProcess(ctx, kdir, kube.WithServingSANs(lab.GuestForwardAddr), kube.WithStartTimeout(3*time.Minute))
		if kubeErr == nil {
			l.progress("API server ready in %s", time.Since(t0).Round(100*time.Millisecond))
		}
	}()
	go func() {
		defer wg.Done()
		t0 := time.Now()
		l.progress("booting the lab VM (Debian kernel under QEMU; waits while another lab VM holds the machine's slot) …")
		vmState := filepath.Join(l.stateDir, "vm")
		if vmErr = os.MkdirAll(vmState, 0o755); vmErr != nil {
			return
		}
		shares := append(lab.StandardShares(), lab.Share{Tag: "calicobin", HostPath: l.calicoBin, GuestPath: guestCalicoShare})
		if cfg.Release != "" {
			shares = append(shares, lab.Share{Tag: "sorelease", HostPath: cfg.Release, GuestPath: guestReleaseDir})
		}
		l.VM, vmErr = lab.Boot(ctx, lab.Options{
			MemoryMiB:     1024,
			CPUs:          2,
			Shares:        shares,
			GuestForwards: []lab.GuestForward{{GuestPort: APIServerGuestPort, HostPort: l.proxy.port}},
			StateDir:      vmState,
		})
		if vmErr != nil {
			return
		}
		l.BootDuration = l.VM.BootDuration
		for _, c := range l.VM.BootCrashes {
			l.progress("lab vm: %s", c)
		}
		l.progress("VM booted in %s (accel %s, kernel %s; %s waiting for the VM slot); building %d node namespaces …", l.VM.BootDuration.Round(100*time.Millisecond), l.VM.Accel, l.VM.KernelRelease, (time.Since(t0) - l.VM.BootDuration).Round(100*time.Millisecond), l.Cluster.Nodes)
		t0 = time.Now()
		if vmErr = l.Cluster.Setup(ctx, l.VM); vmErr != nil {
			return
		}
		_, _, vmErr = l.VM.Run(ctx, "mkdir -p /tmp/e2e /etc/e2e")
		l.progress("node namespaces ready in %s", time.Since(t0).Round(100*time.Millisecond))
		if vmErr != nil {
			return
		}
		t0 = time.Now()
		_, _, vmErr = l.VM.Run(ctx, fmt.Sprintf("mkdir -p %[1]s && cp %[2]s/calico %[1]s/calico && ln -f %[1]s/calico %[1]s/calico-ipam",
			GuestCalicoDir, guestCalicoShare))
		if vmErr == nil {
			l.progress("Calico's CNI plugin copied into the guest's memory in %s", time.Since(t0).Round(100*time.Millisecond))
		}
	}()
	wg.Wait()
	if err := errors.Join(kubeErr, vmErr); err != nil {
		return l, err
	}
	l.proxy.setTarget(l.Kube.Host())
	l.Client, err = kubernetes.NewForConfig(l.Kube.AdminConfig())
	if err != nil {
		return l, err
	}
	l.Dynamic, err = dynamic.NewForConfig(l.Kube.AdminConfig())
	if err != nil {
		return l, err
	}

	l.progress("writing Calico's CRDs and objects, our RBAC …")
	if err := l.installAPIObjects(ctx); err != nil {
		return l, err
	}
	for i := 1; i <= cfg.Nodes; i++ {
		if err := l.RegisterNode(ctx, i); err != nil {
			return l, err
		}
	}
	from := ""
	if cfg.Release != "" {
		from = " from " + cfg.Release
	}
	l.progress("starting %d secureoverlay-master replica(s) on the host%s …", cfg.Masters, from)
	for m := 1; m <= cfg.Masters; m++ {
		if err := l.startMaster(ctx, m, cfg.Release != ""); err != nil {
			return l, err
		}
	}
	l.progress("starting secureoverlay-agent in %d node namespaces%s …", cfg.Nodes, from)
	for i := 1; i <= cfg.Nodes; i++ {
		if err := l.startAgent(ctx, i, cfg.Release != ""); err != nil {
			return l, err
		}
	}
	l.progress("attaching one pod per node through the CNI chain (Calico %s calico + calico-ipam → secureoverlay → portmap) …", l.calicoVersion)
	for i := 1; i <= cfg.Nodes; i++ {
		p, err := l.AddPod(ctx, i, lab.PodNS(i), PodConfig{})
		if err != nil {
			return l, fmt.Errorf("pod on node %d: %w", i, err)
		}
		l.progress("  %s on node%d: %s, mtu %d", p.Name, i, p.IP, p.MTU)
	}
	if _, err := l.WaitMode(ctx, "off", 3*time.Minute); err != nil {
		return l, fmt.Errorf("agents not ready: %w", err)
	}
	l.UpDuration = time.Since(start)
	l.progress("lab up in %s", l.UpDuration.Round(100*time.Millisecond))
	return l, nil
}

// Config returns the lab's effective configuration.
func (l *Lab) Config() Config { return l.cfg }

// StateDir holds the logs of every process.
func (l *Lab) StateDir() string { return l.stateDir }

// Pods are the pods attached so far, in order.
func (l *Lab) Pods() []*Pod {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]*Pod(nil), l.pods...)
}

// Close stops the agents (with the VM), the masters, the API server and the
// relay, and removes the state directory if Up made it.
func (l *Lab) Close() error {
	var errs []error
	if l.VM != nil {
		if !l.ownState && l.VM.Alive() {
			l.saveGuestLogs()
		}
		errs = append(errs, l.VM.Close())
	}
	l.mu.Lock()
	for m, c := range l.masters {
		_ = c.Process.Kill()
		_, _ = c.Process.Wait()
		delete(l.masters, m)
		delete(l.masterPorts, m)
	}
	l.mu.Unlock()
	if l.Kube != nil {
		errs = append(errs, l.Kube.Close())
	}
	if l.proxy != nil {
		l.proxy.close()
	}
	if l.ownState && l.stateDir != "" {
		errs = append(errs, os.RemoveAll(l.stateDir))
	}
	return errors.Join(errs...)
}

// saveGuestLogs copies the agents' and the plugin's logs from the guest into
// the state directory (best effort).
func (l *Lab) saveGuestLogs() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, _, err := l.VM.Run(ctx, "ls /tmp/e2e/ 2>/dev/null | grep -E '^(agent|secureoverlay-cni)-.*[.]log$' || true")
	if err != nil {
		return
	}
	dir := filepath.Join(l.stateDir, "guest")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return
	}
	for _, name := range strings.Fields(out) {
		if b, err := l.VM.ReadFile(ctx, "/tmp/e2e/"+name); err == nil {
			_ = os.WriteFile(filepath.Join(dir, name), b, 0o644)
		}
	}
}

// StartMaster starts master replica m (1-based) on the host, from this tree's binaries.
func (l *Lab) StartMaster(ctx context.Context, m int) error { return l.startMaster(ctx, m, false) }

// startMaster starts master replica m, from Config.Release's binaries if released.
func (l *Lab) startMaster(ctx context.Context, m int, released bool) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, ok := l.masters[m]; ok {
		return fmt.Errorf("master %d already running", m)
	}
	bin := filepath.Join(l.binDir, "secureoverlay-master")
	if released {
		bin = filepath.Join(l.cfg.Release, "secureoverlay-master")
	}
	port, err := freePort()
	if err != nil {
		return err
	}
	logf, err := os.OpenFile(filepath.Join(l.stateDir, fmt.Sprintf("master-%d.log", m)), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(bin,
		"--kubeconfig", l.masterCfg,
		"--id", fmt.Sprintf("master-%d", m),
		"--grace", l.cfg.Grace.String(),
		"--resync", "10s",
		"--rotate-interval", "0",
		"--metrics-addr", "127.0.0.1:"+strconv.Itoa(port),
	)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Dies with this process, never before it (spawn forks from a thread that lives as long as the process).
	if err := spawn.Start(cmd); err != nil {
		return fmt.Errorf("start master %d: %w", m, err)
	}
	l.masters[m] = cmd
	l.masterPorts[m] = port
	l.released[fmt.Sprintf("master-%d", m)] = released
	go func() { _ = cmd.Wait() }()
	return nil
}

// KillMaster sends SIGKILL to master replica m.
func (l *Lab) KillMaster(m int) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	c, ok := l.masters[m]
	if !ok {
		return fmt.Errorf("master %d not running", m)
	}
	delete(l.masters, m)
	delete(l.masterPorts, m)
	return c.Process.Signal(syscall.SIGKILL)
}

// agentLog is node i's agent log in the guest.
func agentLog(i int) string { return fmt.Sprintf("/tmp/e2e/agent-node%d.log", i) }

// LedgerDir is node i's agent ledger directory in the guest (the boot gate's ready file
// is ready.json in it).
func LedgerDir(i int) string { return fmt.Sprintf("/run/secureoverlay-node%d", i) }

// StateFile is node i's boot gate state file in the guest (package gate): node i's
// /var/lib/secureoverlay/dataplane.json.
func StateFile(i int) string { return fmt.Sprintf("/var/lib/secureoverlay-node%d/dataplane.json", i) }

// AgentMetricsPort is node i's agent metrics port (inside its namespace).
func AgentMetricsPort(i int) int { return 9470 + i }

// StartAgent starts the agent of node i in its namespace with a fresh
// ServiceAccount token, from this tree's binaries.
func (l *Lab) StartAgent(ctx context.Context, i int) error { return l.startAgent(ctx, i, false) }

// Released reports whether a master replica (what is "master-<m>") or a node's agent
// ("node<i>") runs Config.Release's binaries.
func (l *Lab) Released(what string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.released[what]
}

// startAgent starts node i's agent, from Config.Release's binaries if released, with the
// extra flags given.
func (l *Lab) startAgent(ctx context.Context, i int, released bool, extra ...string) error {
	binDir := lab.GuestBinDir
	if released {
		binDir = guestReleaseDir
	}
	rc, err := l.Kube.ServiceAccountConfigErr(ctx, "secureoverlay", "secureoverlay-agent")
	if err != nil {
		return err
	}
	kc, err := kubeconfig(rc, fmt.Sprintf("https://%s:%d", lab.GuestForwardAddr, APIServerGuestPort))
	if err != nil {
		return err
	}
	path := fmt.Sprintf("/etc/e2e/node%d.kubeconfig", i)
	if err := l.VM.WriteFile(ctx, path, kc, 0o600); err != nil {
		return err
	}
	// Each node namespace shares the guest's file system: its own ledger directory stands
	// for the node's /run/secureoverlay (kept across agent restarts, gone at a reboot).
	// Debug logging records every sync that wrote to the kernel, with its time: the loss
	// evidence (LossEvidence) sets them beside a lost request.
	cmd := fmt.Sprintf("exec ip netns exec %s %s/secureoverlay-agent --kubeconfig %s --node-name %s --metrics-addr :%d --resync-interval %s --ledger-dir %s --state-file %s --log-level debug",
		lab.NodeNS(i), binDir, path, lab.NodeNS(i), AgentMetricsPort(i), l.cfg.AgentResync, LedgerDir(i), StateFile(i))
	if v := os.Getenv("SECUREOVERLAY_E2E_PCPU_SAS"); v != "" && !released {
		// Per-CPU lanes (docs/dataplane.md §10) where the lab's kernel has them; off by
		// default, as in the manifest.
		cmd += " --pcpu-sas=" + v
	}
	for _, f := range extra {
		cmd += " " + f
	}
	pid, err := l.VM.Background(ctx, cmd, agentLog(i))
	if err != nil {
		return err
	}
	l.mu.Lock()
	l.agents[i] = pid
	l.released[lab.NodeNS(i)] = released
	l.mu.Unlock()
	return nil
}

// KillAgent sends SIGKILL to node i's agent.
func (l *Lab) KillAgent(ctx context.Context, i int) error {
	l.mu.Lock()
	pid, ok := l.agents[i]
	delete(l.agents, i)
	l.mu.Unlock()
	if !ok {
		return fmt.Errorf("agent of node %d not running", i)
	}
	return l.VM.Signal(ctx, pid, "KILL")
}

// StopAgent sends SIGTERM to node i's agent (which leaves the kernel as it is).
func (l *Lab) StopAgent(ctx context.Context, i int) error {
	l.mu.Lock()
	pid, ok := l.agents[i]
	delete(l.agents, i)
	l.mu.Unlock()
	if !ok {
		return fmt.Errorf("agent of node %d not running", i)
	}
	return l.VM.Signal(ctx, pid, "TERM")
}

// UpgradeAgent replaces node i's agent with this tree's, as a DaemonSet rolling update
// does: SIGTERM (the agent leaves the kernel as it is), wait until the process is gone
// (at most 30 s, the pod's default grace), start the new one with the same ledger.
func (l *Lab) UpgradeAgent(ctx context.Context, i int) error { return l.RestartAgent(ctx, i) }

// RestartAgent is UpgradeAgent, starting this tree's agent with the extra flags given
// (a DaemonSet's args changed).
func (l *Lab) RestartAgent(ctx context.Context, i int, extra ...string) error {
	l.mu.Lock()
	pid, ok := l.agents[i]
	l.mu.Unlock()
	if !ok {
		return fmt.Errorf("agent of node %d not running", i)
	}
	if err := l.StopAgent(ctx, i); err != nil {
		return err
	}
	for deadline := time.Now().Add(30 * time.Second); ; {
		running, err := l.VM.Running(ctx, pid)
		if err != nil {
			return err
		}
		if !running {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("agent of node %d (guest pid %d) still running 30 s after SIGTERM", i, pid)
		}
		time.Sleep(200 * time.Millisecond)
	}
	return l.startAgent(ctx, i, false, extra...)
}

// AgentLogTail returns the last n lines of node i's agent log.
func (l *Lab) AgentLogTail(ctx context.Context, i, n int) string {
	out, _, _ := l.VM.Run(ctx, fmt.Sprintf("tail -n %d %s 2>/dev/null", n, agentLog(i)))
	return out
}

// tcpProxy relays host loopback connections to a target set later (the API
// server's address is known only once it runs).
type tcpProxy struct {
	ln     net.Listener
	port   int
	mu     sync.Mutex
	target string
}

func newTCPProxy() (*tcpProxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &tcpProxy{ln: ln, port: ln.Addr().(*net.TCPAddr).Port}
	go p.serve()
	return p, nil
}

func (p *tcpProxy) setTarget(url string) {
	u := url
	if i := len("https://"); len(u) > i && u[:i] == "https://" {
		u = u[i:]
	}
	p.mu.Lock()
	p.target = u
	p.mu.Unlock()
}

func (p *tcpProxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			p.mu.Lock()
			t := p.target
			p.mu.Unlock()
			if t == "" {
				return
			}
			u, err := net.DialTimeout("tcp", t, 5*time.Second)
			if err != nil {
				return
			}
			defer u.Close()
			done := make(chan struct{}, 2)
			go func() { _, _ = io.Copy(u, c); done <- struct{}{} }()
			go func() { _, _ = io.Copy(c, u); done <- struct{}{} }()
			<-done
		}()
	}
}

func (p *tcpProxy) close() { _ = p.ln.Close() }

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}
