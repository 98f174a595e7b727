// Package plugin is the chained CNI plugin "secureoverlay": run after Calico (or any
// primary plugin), it checks the MTU of the pod's interface against the IPsec encryption
// budget of the node (package budget) and, depending on the configured mode, lowers the
// MTU (clamp, the default), fails the ADD (enforce) or logs (warn). Before that, ADD
// passes the boot gate (package gate): on a node that encrypted pod traffic before it
// booted, no pod's network comes up until the agent has programmed the node again.
//
// Invariants:
//   - ADD refuses with error 11 ("try again later"; the runtime retries the sandbox)
//     while the gate is closed, after waiting up to gateWait for it to open; CHECK and
//     DEL are not gated.
//   - ADD and CHECK need prevResult; the container interface is the prevResult interface
//     with a sandbox (preferring the one named CNI_IFNAME), and its MTU is read from the
//     kernel inside the pod's network namespace, never taken from the result.
//   - ADD and CHECK refuse (error 8, in every mode) when CNI_NETNS is the plugin's own
//     network namespace, before reading or changing anything: there "eth0" is the node's
//     uplink. skel's own check runs only after ADD returned (and CNI_NETNS_OVERRIDE turns
//     it off); ours does not depend on either. CNI_NETNS is opened once, compared by
//     device and inode with the namespace of the thread the plugin runs on (locked for
//     the whole command), and that handle is what the plugin reads and changes.
//   - ADD prints prevResult unchanged in the configuration's cniVersion, except that a
//     clamp reports the new MTU in the interface's "mtu" field of a 1.1.0 result.
//   - DEL always succeeds: the plugin keeps no state, so there is nothing to undo; an
//     unusable configuration is logged, not returned.
//   - STATUS (1.1.0) reports ErrPluginNotAvailable when an ADD would fail because the
//     external MTU cannot be determined; GC has nothing to collect.
//   - The plugin never imports client-go: it runs once per pod, exec'd by the runtime.
package plugin

import (
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"runtime"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/secureoverlay/secureoverlay/budget"
	"github.com/secureoverlay/secureoverlay/gate"
)

// Plugin-specific CNI error codes (the spec reserves 0-99).
const (
	// ErrMTUOverBudget: the pod interface MTU exceeds the encryption budget.
	ErrMTUOverBudget uint = 100
	// ErrExternalMTU: the node's external MTU could not be determined.
	ErrExternalMTU uint = 101
	// ErrPodInterface: the pod interface could not be found or read or changed.
	ErrPodInterface uint = 102
)

// errPluginNotAvailable is the CNI 1.1 STATUS code "the plugin cannot service ADD".
const errPluginNotAvailable uint = 50

// Versions are the CNI spec versions the plugin speaks.
var Versions = version.PluginSupports("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")

// About is the plugin's self-description (printed when run without CNI_COMMAND).
const About = "secureoverlay: checks pod MTUs against the IPsec (ESP over IPIP) encryption budget"

// Funcs returns the plugin's verbs for skel.PluginMainFuncs.
func Funcs() skel.CNIFuncs {
	return skel.CNIFuncs{Add: CmdAdd, Check: CmdCheck, Del: CmdDel, Status: CmdStatus, GC: CmdGC}
}

// verdict is the outcome of comparing one pod interface with the budget.
type verdict struct {
	Iface    string
	MTU      int
	Budget   int
	External int
	Source   string // where External came from: "config" or the detected link's name
	ICV      int
}

func (v verdict) over() bool { return v.MTU > v.Budget }

func (v verdict) String() string {
	return fmt.Sprintf("pod interface %s has mtu %d, ipsec budget %d (external mtu %d from %s, icv %d bytes)",
		v.Iface, v.MTU, v.Budget, v.External, v.Source, v.ICV)
}

// fix is the operator's remedy. The plugin reads nothing from the API (it runs once per
// pod, exec'd by the runtime), so it cannot tell how Calico was installed: it names the
// knob of each kind of installation briefly and points at `secureoverlayctl mtu`, which
// detects the cluster's and sets it (--apply). UCP's calico_mtu/ipip_mtu are named as
// UCP's, never as Calico's (docs/mtu.md, "Calico's MTU knobs").
func (v verdict) fix() string {
	return fmt.Sprintf(`lower Calico's pod MTU to %d (the budget): `+
		`operator install: Installation default spec.calicoNetwork.mtu; `+
		`manifest install: veth_mtu in ConfigMap kube-system/calico-config, then restart calico-node; `+
		`Docker UCP/MKE: calico_mtu and ipip_mtu in the UCP config; `+
		`"secureoverlayctl mtu" names this cluster's knob, "secureoverlayctl mtu --apply" sets it`, v.Budget)
}

// excess is the verdict with how far it is over the budget.
func (v verdict) excess() string {
	return fmt.Sprintf("%s: mtu exceeds the budget by %d bytes", v, v.MTU-v.Budget)
}

// refusal is the ADD error of enforce mode.
func refusal(v verdict) error {
	return types.NewError(ErrMTUOverBudget, fmt.Sprintf(
		`secureoverlay: %s; plugin mode "enforce" refuses the pod; fix: %s; or set plugin-mode "clamp" (the default), which starts pods at the budget`,
		v.excess(), v.fix()), "")
}

// checkFailure is the CHECK error of enforce and clamp mode: a running pod over the
// budget was not started through this plugin (it predates it) or was changed since.
func checkFailure(v verdict) error {
	return types.NewError(ErrMTUOverBudget, fmt.Sprintf(
		"secureoverlay: %s (the pod was started before secureoverlay, or its MTU was raised since); recreate it; fix for new pods: %s",
		v.excess(), v.fix()), "")
}

// warnLine is the log line of warn mode (ADD and CHECK).
func warnLine(what, container string, v verdict) string {
	return fmt.Sprintf("warn: %s %s: %s; the pod keeps mtu %d, so its large packets to other nodes depend on path-MTU discovery; fix: %s",
		what, container, v.excess(), v.MTU, v.fix())
}

// clampLine is the log line of a clamp.
func clampLine(container string, v verdict) string {
	return fmt.Sprintf("clamp: container %s: %s: lowered to %d (pod interface, its routes, the host end of its veth); "+
		"Calico's own MTU is unchanged; to start pods at the budget without a clamp, %s",
		container, v, v.Budget, v.fix())
}

// chained parses the config and the primary plugin's result, which ADD and CHECK both
// need: without a prevResult the plugin is not chained and there is no pod to check.
func chained(args *skel.CmdArgs, verb string) (*Config, *current.Result, error) {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return nil, nil, err
	}
	if conf.PrevResult == nil {
		return nil, nil, types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf(
			"secureoverlay: %s without prevResult: it must be chained after the primary plugin (e.g. calico) in a conflist", verb), "")
	}
	res, err := current.GetResult(conf.PrevResult)
	if err != nil {
		return nil, nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("secureoverlay: convert prevResult: %v", err), "")
	}
	return conf, res, nil
}

// CmdAdd handles ADD.
func CmdAdd(args *skel.CmdArgs) error {
	// The plugin's own network namespace is its thread's: stay on one thread, so that the
	// namespace compared with CNI_NETNS is the one the host-side reads and writes use.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	conf, res, err := chained(args, "ADD")
	if err != nil {
		return err
	}
	lg := newLogger(conf)
	defer lg.close()
	pod, err := openPodNetNS(args.Netns)
	if err != nil {
		lg.printf("refused: container %s: %v", args.ContainerID, err)
		return err
	}
	defer pod.close()
	if err := waitGate(conf, lg, args.ContainerID); err != nil {
		return err
	}
	idx, ifName := containerInterface(res, args.IfName)

	v, err := evaluate(conf, pod, ifName)
	if err != nil {
		if conf.Mode == ModeWarn {
			lg.printf("warn: container %s: cannot check the mtu: %v", args.ContainerID, err)
			return types.PrintResult(conf.PrevResult, conf.CNIVersion)
		}
		return err
	}
	if !v.over() {
		lg.debugf("ok: container %s: %s", args.ContainerID, v)
		return types.PrintResult(conf.PrevResult, conf.CNIVersion)
	}

	switch conf.Mode {
	case ModeWarn:
		lg.printf("%s", warnLine("container", args.ContainerID, v))
		return types.PrintResult(conf.PrevResult, conf.CNIVersion)
	case ModeClamp:
		if err := clamp(pod, ifName, v.Budget, hostInterfaces(res)); err != nil {
			return types.NewError(ErrPodInterface, fmt.Sprintf("secureoverlay: clamp %s to %d: %v", ifName, v.Budget, err), "")
		}
		lg.printf("%s", clampLine(args.ContainerID, v))
		if ge, _ := version.GreaterThanOrEqualTo(conf.CNIVersion, "1.1.0"); ge && idx >= 0 {
			res.Interfaces[idx].Mtu = v.Budget
			return types.PrintResult(res, conf.CNIVersion)
		}
		return types.PrintResult(conf.PrevResult, conf.CNIVersion)
	default:
		err := refusal(v)
		lg.printf("enforce: container %s: %v", args.ContainerID, err)
		return err
	}
}

// gateWait bounds how long one ADD waits for a closed boot gate to open before it
// refuses (the agent usually programs the node within seconds of starting; the runtime
// retries a refused sandbox with backoff), gatePoll how often it looks again. Variables
// for tests.
var (
	gateWait = 5 * time.Second
	gatePoll = 200 * time.Millisecond
	bootID   = gate.BootID
)

// waitGate passes the boot gate (package gate) or returns the ADD's refusal.
func waitGate(conf *Config, lg *logger, container string) error {
	deadline := time.Now().Add(gateWait)
	for {
		state, serr := gate.ReadState(conf.StateFile)
		boot, _ := bootID()
		v := gate.Decide(state, serr, gate.ReadReady(conf.ReadyFile), boot)
		if v.Open {
			lg.debugf("gate open: container %s: %s", container, v.Why)
			return nil
		}
		if !time.Now().Before(deadline) {
			err := types.NewError(types.ErrTryAgainLater, fmt.Sprintf(
				"secureoverlay: pod network held so that it sends no plaintext: %s (waited %s; the runtime retries); "+
					"check the node's secureoverlay-agent pod (kubectl -n secureoverlay get pods -o wide); %s is its mark, %s the record of the mode",
				v.Why, gateWait, conf.ReadyFile, conf.StateFile), "")
			lg.printf("gate closed: container %s: %v", container, err)
			return err
		}
		time.Sleep(gatePoll)
	}
}

// CmdCheck handles CHECK: the pod interface must (still) be within the budget.
func CmdCheck(args *skel.CmdArgs) error {
	runtime.LockOSThread() // see CmdAdd
	defer runtime.UnlockOSThread()
	conf, res, err := chained(args, "CHECK")
	if err != nil {
		return err
	}
	lg := newLogger(conf)
	defer lg.close()
	pod, err := openPodNetNS(args.Netns)
	if err != nil {
		lg.printf("refused: check container %s: %v", args.ContainerID, err)
		return err
	}
	defer pod.close()
	_, ifName := containerInterface(res, args.IfName)
	v, err := evaluate(conf, pod, ifName)
	if err != nil {
		if conf.Mode == ModeWarn {
			lg.printf("warn: check container %s: cannot check the mtu: %v", args.ContainerID, err)
			return nil
		}
		return err
	}
	if v.over() {
		if conf.Mode == ModeWarn {
			lg.printf("%s", warnLine("check container", args.ContainerID, v))
			return nil
		}
		return checkFailure(v)
	}
	return nil
}

// CmdDel handles DEL. There is nothing to undo, so it always succeeds.
func CmdDel(args *skel.CmdArgs) error {
	if _, err := ParseConfig(args.StdinData); err != nil {
		fmt.Fprintf(os.Stderr, "secureoverlay: DEL container %s: ignoring unusable config: %v\n", args.ContainerID, err)
	}
	return nil
}

// CmdStatus handles STATUS (CNI 1.1): ADD can be served when the configuration is valid
// and the external MTU is known or detectable.
func CmdStatus(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	if _, _, err := externalMTU(conf); err != nil && conf.Mode != ModeWarn {
		return types.NewError(errPluginNotAvailable, fmt.Sprintf("secureoverlay: %v", err), "")
	}
	return nil
}

// CmdGC handles GC (CNI 1.1). The plugin keeps no per-attachment state, so there is
// nothing to collect; the configuration is still validated.
func CmdGC(args *skel.CmdArgs) error {
	_, err := ParseConfig(args.StdinData)
	return err
}

// containerInterface picks the pod interface from the result: the interface with a
// sandbox named ifName, else the first interface with a sandbox, else ifName itself
// (index -1) for primary plugins that report no interfaces.
func containerInterface(res *current.Result, ifName string) (int, string) {
	first := -1
	for i, iface := range res.Interfaces {
		if iface == nil || iface.Sandbox == "" {
			continue
		}
		if iface.Name == ifName {
			return i, iface.Name
		}
		if first < 0 {
			first = i
		}
	}
	if first >= 0 {
		return first, res.Interfaces[first].Name
	}
	return -1, ifName
}

// hostInterfaces returns the names of the result's interfaces without a sandbox: the
// host ends of the pod's links, in the plugin's own namespace.
func hostInterfaces(res *current.Result) []string {
	var out []string
	for _, iface := range res.Interfaces {
		if iface != nil && iface.Sandbox == "" && iface.Name != "" {
			out = append(out, iface.Name)
		}
	}
	return out
}

// externalMTU returns the configured external MTU, or detects it in the plugin's own
// network namespace (the host's).
func externalMTU(conf *Config) (int, string, error) {
	if conf.ExternalMTU != 0 {
		return conf.ExternalMTU, "config", nil
	}
	mtu, name, err := budget.DetectExternalMTU(conf.Pattern())
	if err != nil {
		return 0, "", fmt.Errorf("%w; set externalMTU in the plugin config", err)
	}
	return mtu, "link " + name, nil
}

// podNetNS is the pod's network namespace, CNI_NETNS, opened once: the namespace that
// was compared with the plugin's own is the one read and changed.
type podNetNS struct {
	path string
	ns   ns.NetNS // nil when it could not be opened
	err  error    // why not; reported where the namespace is used (error 102)
}

// openPodNetNS opens CNI_NETNS and refuses the plugin's own network namespace with
// ErrInvalidNetNS. That refusal is its only error: a namespace that cannot be opened is
// kept in the result and reported where it is used, as before (102, logged in warn mode).
func openPodNetNS(path string) (*podNetNS, error) {
	p := &podNetNS{path: path}
	if path == "" {
		p.err = errors.New("no network namespace (CNI_NETNS) given")
		return p, nil
	}
	n, err := ns.GetNS(path)
	if err != nil {
		p.err = fmt.Errorf("open netns %s: %w", path, err)
		return p, nil
	}
	own, err := isOwnNetNS(n)
	if err != nil {
		n.Close()
		return nil, types.NewError(types.ErrInvalidNetNS, fmt.Sprintf("secureoverlay: CNI_NETNS %s: cannot compare it with the plugin's own network namespace: %v", path, err), "")
	}
	if own {
		n.Close()
		return nil, types.NewError(types.ErrInvalidNetNS, fmt.Sprintf(
			"secureoverlay: CNI_NETNS %s is the plugin's own network namespace (the host's), not a pod's: refusing to read or change anything in it", path), "")
	}
	p.ns = n
	return p, nil
}

// isOwnNetNS reports whether n is the network namespace of the calling thread (which the
// caller keeps locked): /proc/thread-self/ns/net, compared by device and inode.
// /proc/self/ns/net would be the main thread's, which is not the caller's when the plugin
// runs in-process on a thread moved into another namespace.
func isOwnNetNS(n ns.NetNS) (bool, error) {
	var pod, own unix.Stat_t
	if err := unix.Fstat(int(n.Fd()), &pod); err != nil {
		return false, fmt.Errorf("fstat %s: %w", n.Path(), err)
	}
	self := "/proc/thread-self/ns/net"
	err := unix.Stat(self, &own)
	if errors.Is(err, unix.ENOENT) { // kernels before 3.17
		self = fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
		err = unix.Stat(self, &own)
	}
	if err != nil {
		return false, fmt.Errorf("stat %s: %w", self, err)
	}
	return pod.Dev == own.Dev && pod.Ino == own.Ino, nil
}

// do runs f inside the pod namespace.
func (p *podNetNS) do(f func() error) error {
	if p.ns == nil {
		return p.err
	}
	return p.ns.Do(func(ns.NetNS) error { return f() })
}

func (p *podNetNS) close() {
	if p.ns != nil {
		_ = p.ns.Close()
	}
}

// evaluate computes the budget and reads the pod interface's actual MTU.
func evaluate(conf *Config, pod *podNetNS, ifName string) (verdict, error) {
	ext, src, err := externalMTU(conf)
	if err != nil {
		return verdict{}, types.NewError(ErrExternalMTU, fmt.Sprintf("secureoverlay: %v", err), "")
	}
	b, err := budget.Budget(ext, conf.ICVBytes)
	if err != nil {
		return verdict{}, types.NewError(ErrExternalMTU, fmt.Sprintf("secureoverlay: budget: %v", err), "")
	}
	mtu, err := podMTU(pod, ifName)
	if err != nil {
		return verdict{}, types.NewError(ErrPodInterface, fmt.Sprintf("secureoverlay: %v", err), "")
	}
	return verdict{Iface: ifName, MTU: mtu, Budget: b, External: ext, Source: src, ICV: conf.ICVBytes}, nil
}

func podMTU(pod *podNetNS, ifName string) (int, error) {
	if pod.path == "" {
		return 0, pod.err
	}
	var mtu int
	err := pod.do(func() error {
		l, err := netlink.LinkByName(ifName)
		if err != nil {
			return fmt.Errorf("pod interface %s: %w", ifName, err)
		}
		mtu = l.Attrs().MTU
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("read mtu in netns %s: %w", pod.path, err)
	}
	return mtu, nil
}

// clamp lowers the pod interface's MTU to limit, and every route over it whose MTU is
// set above limit; then the host ends of the pod's links (named in the result, in the
// plugin's own namespace) if they are the interface's veth peer.
func clamp(pod *podNetNS, ifName string, limit int, hostIfaces []string) error {
	peerIndex := 0
	err := pod.do(func() error {
		l, err := netlink.LinkByName(ifName)
		if err != nil {
			return fmt.Errorf("pod interface %s: %w", ifName, err)
		}
		if err := netlink.LinkSetMTU(l, limit); err != nil {
			return fmt.Errorf("set mtu of %s: %w", ifName, err)
		}
		// Every table (policy routing may put the pod's routes elsewhere), both families.
		var routes []netlink.Route
		for range 5 {
			routes, err = netlink.RouteListFiltered(netlink.FAMILY_ALL,
				&netlink.Route{LinkIndex: l.Attrs().Index, Table: unix.RT_TABLE_UNSPEC},
				netlink.RT_FILTER_OIF|netlink.RT_FILTER_TABLE)
			if !errors.Is(err, netlink.ErrDumpInterrupted) {
				break
			}
		}
		if err != nil {
			return fmt.Errorf("list routes of %s: %w", ifName, err)
		}
		for _, r := range routes {
			if r.MTU <= limit {
				continue
			}
			r.MTU = limit
			if err := netlink.RouteReplace(&r); err != nil {
				return fmt.Errorf("set mtu of route %s dev %s: %w", r.Dst, ifName, err)
			}
		}
		if veth, ok := l.(*netlink.Veth); ok {
			if idx, err := netlink.VethPeerIndex(veth); err == nil {
				peerIndex = idx
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("in netns %s: %w", pod.path, err)
	}
	if peerIndex == 0 {
		return nil
	}
	for _, name := range hostIfaces {
		l, err := netlink.LinkByName(name)
		if err != nil || l.Attrs().Index != peerIndex || l.Attrs().MTU <= limit {
			continue
		}
		if err := netlink.LinkSetMTU(l, limit); err != nil {
			return fmt.Errorf("set mtu of host interface %s: %w", name, err)
		}
	}
	return nil
}

// logger writes to the configured log file, or warnings only to stderr.
type logger struct {
	l       *log.Logger
	file    io.Closer
	verbose bool
}

func newLogger(conf *Config) *logger {
	if conf.LogFile != "" {
		f, err := os.OpenFile(conf.LogFile, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
		if err == nil {
			return &logger{l: log.New(f, "secureoverlay: ", log.LstdFlags|log.LUTC), file: f, verbose: true}
		}
		fmt.Fprintf(os.Stderr, "secureoverlay: open log file: %v; logging to stderr\n", err)
	}
	return &logger{l: log.New(os.Stderr, "secureoverlay: ", log.LstdFlags|log.LUTC)}
}

func (lg *logger) printf(format string, a ...any) { lg.l.Printf(format, a...) }

// debugf logs routine outcomes, to the log file only.
func (lg *logger) debugf(format string, a ...any) {
	if lg.verbose {
		lg.l.Printf(format, a...)
	}
}

func (lg *logger) close() {
	if lg.file != nil {
		_ = lg.file.Close()
	}
}
