package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/conformance/lab"
	"github.com/secureoverlay/secureoverlay/conformance/lab/wire"
	"github.com/secureoverlay/secureoverlay/install"
)

// guestExec is libcni's invoke.Exec for plugins that live in the guest: the
// container runtime's side of CNI (libcni: conflist parsing, prevResult
// chaining, the CNI_* environment, result caching) runs here on the host, and
// every plugin is exec'd by labd inside node namespace ns, as a runtime on that
// node would exec it. Only the CNI_* variables cross into the guest.
type guestExec struct {
	vm *lab.VM
	ns string
}

// cniPath is the plugin search path in the guest: Calico's plugins, the host's CNI
// plugins (portmap, in Calico's conflist) and our binaries (secureoverlay).
var cniPath = []string{GuestCalicoDir, lab.GuestCNIDir, lab.GuestBinDir}

// GuestCalicoDir is where the guest runs Calico's calico and calico-ipam from: a copy in
// the guest's memory of the binary kube.CalicoCNI unpacks, which the guest sees over 9p at
// guestCalicoShare. Run straight from the share, every exec of the 67 MB binary faulted
// its pages in over 9p: 7 s per exec under TCG (5.5 s of it in the kernel), two per pod
// ADD, past the 60 s exec timeout on a loaded machine; from memory an exec takes 0.7 s.
const GuestCalicoDir = "/opt/calico/bin"

// guestCalicoShare is where the share with Calico's plugin is mounted in the guest.
const guestCalicoShare = "/opt/calico/share"

// calicoPlugin reports whether name is one of Calico's plugins.
func calicoPlugin(name string) bool { return name == "calico" || name == "calico-ipam" }

func (g guestExec) ExecPlugin(ctx context.Context, pluginPath string, stdin []byte, environ []string) ([]byte, error) {
	var env []string
	for _, e := range environ {
		if strings.HasPrefix(e, "CNI_") {
			env = append(env, e)
		}
	}
	argv := []string{"ip", "netns", "exec", g.ns, pluginPath}
	if calicoPlugin(path.Base(pluginPath)) {
		// Calico's plugins refuse to run unless /var/lib/calico/nodename exists, which
		// calico-node writes on a real node (the conflist's nodename still decides). The
		// guest's node namespaces share one file system, so each run gets a private
		// /var/lib/calico holding its own node's name.
		argv = append([]string{"unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
			`mkdir -p /var/lib/calico && mount -t tmpfs -o size=64k tmpfs /var/lib/calico && printf %s "$0" >/var/lib/calico/nodename && exec "$@"`,
			g.ns}, argv...)
	}
	req := wire.Request{
		Argv:          argv,
		Stdin:         stdin,
		Env:           env,
		TimeoutMillis: (60 * time.Second).Milliseconds(),
	}
	resp, err := g.vm.Exec(ctx, req)
	if err != nil {
		return nil, fmt.Errorf("exec cni plugin %s in %s: %w", path.Base(pluginPath), g.ns, err)
	}
	if resp.Exit == 0 && resp.Error == "" {
		return resp.Stdout, nil
	}
	// A failing plugin prints a CNI error object on stdout (SPEC "Error").
	var cniErr types.Error
	if json.Unmarshal(resp.Stdout, &cniErr) == nil && cniErr.Code != 0 {
		return nil, &cniErr
	}
	return nil, fmt.Errorf("cni plugin %s in %s: exit %d %s: %s", path.Base(pluginPath), g.ns, resp.Exit, resp.Error, strings.TrimSpace(string(resp.Stderr)))
}

func (g guestExec) FindInPath(plugin string, paths []string) (string, error) {
	if plugin == "" || strings.Contains(plugin, "/") {
		return "", fmt.Errorf("cni plugin name %q is not a bare name", plugin)
	}
	// The guest's directories are fixed: our binary lives in GuestBinDir, Calico's in
	// GuestCalicoDir, every other plugin in GuestCNIDir.
	switch {
	case plugin == "secureoverlay":
		return path.Join(lab.GuestBinDir, plugin), nil
	case calicoPlugin(plugin):
		return path.Join(GuestCalicoDir, plugin), nil
	}
	return path.Join(lab.GuestCNIDir, plugin), nil
}

func (g guestExec) Decode(b []byte) (version.PluginInfo, error) {
	var d version.PluginDecoder
	return d.Decode(b)
}

// PodConfig says how a pod is attached through the CNI chain.
type PodConfig struct {
	// MTU is the pod interface MTU Calico sets (the rendered conflist's "mtu", as
	// veth_mtu in calico-config gives it); 0 means the lab's tunnel MTU.
	MTU int
	// PluginMode is the secureoverlay entry's "mode" (enforce, clamp, warn).
	PluginMode string
}

// PodNamespace is the Kubernetes namespace of the lab's pods.
const PodNamespace = "lab-pods"

// calicoKubeconfig is the calico plugin's kubeconfig in the guest.
const calicoKubeconfig = "/etc/e2e/calico-cni.kubeconfig"

// Conflist is node i's network configuration list as a Calico node has it with
// secureoverlay installed: Calico's own template (cm's cni_network_config) rendered as
// install-cni renders it (node name, veth_mtu = pc.MTU, the plugin's kubeconfig), then our
// entry spliced in by our installer, right after calico: calico (+ calico-ipam, Kubernetes
// datastore) → secureoverlay → portmap.
func Conflist(cm *corev1.ConfigMap, i int, pc PodConfig) ([]byte, error) {
	rendered := kube.RenderCalicoConflist(cm, lab.NodeNS(i), strconv.Itoa(pc.MTU), calicoKubeconfig)
	spliced, _, err := install.InsertEntry(rendered, install.Entry{Mode: pc.PluginMode, ICVBytes: 8,
		LogFile:   fmt.Sprintf("/tmp/e2e/secureoverlay-cni-node%d.log", i),
		StateFile: StateFile(i), ReadyFile: path.Join(LedgerDir(i), "ready.json")})
	if err != nil {
		return nil, fmt.Errorf("splice secureoverlay into Calico's conflist: %w", err)
	}
	return spliced, nil
}

// Pod is a pod attached through the CNI chain.
type Pod struct {
	Name string // its network namespace in the guest, and its Pod object in PodNamespace
	Node int
	IP   string
	MTU  int // the pod interface's MTU as the kernel reports it after ADD
	list *libcni.NetworkConfigList
	rt   *libcni.RuntimeConf
}

// AddPod creates Pod name (in PodNamespace, bound to node: Calico's plugin reads it) and
// its network namespace in the guest, and runs the CNI ADD of node's conflist for it, as
// the node's container runtime would. On a failed ADD it runs DEL (as a runtime does) and
// removes both, returning the plugin's error (a *types.Error when the plugin reported
// one). Calico's IPAM must give the pod an address in the node's block (the lab's routes
// follow the blocks RegisterNode writes); anything else is an error.
func (l *Lab) AddPod(ctx context.Context, node int, name string, pc PodConfig) (*Pod, error) {
	if pc.MTU == 0 {
		pc.MTU = l.cfg.TunnelMTU
	}
	if pc.PluginMode == "" {
		pc.PluginMode = "enforce"
	}
	b, err := Conflist(l.calicoConfig, node, pc)
	if err != nil {
		return nil, fmt.Errorf("pod %s: %w", name, err)
	}
	list, err := libcni.ConfListFromBytes(b)
	if err != nil {
		return nil, fmt.Errorf("pod %s: conflist: %w", name, err)
	}
	if _, err := l.Client.CoreV1().Pods(PodNamespace).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: PodNamespace},
		Spec:       corev1.PodSpec{NodeName: lab.NodeNS(node), Containers: []corev1.Container{{Name: "app", Image: "lab.invalid/app:1"}}},
	}, metav1.CreateOptions{}); err != nil {
		return nil, fmt.Errorf("pod %s: create the Pod object: %w", name, err)
	}
	removePod := func() {
		_, _, _ = l.VM.Run(ctx, "ip netns del "+lab.ShellQuote(name))
		_ = l.Client.CoreV1().Pods(PodNamespace).Delete(ctx, name, metav1.DeleteOptions{})
	}
	if _, _, err := l.VM.Run(ctx, "mkdir -p /tmp/e2e && ip netns add "+lab.ShellQuote(name)+" && ip -n "+lab.ShellQuote(name)+" link set lo up"); err != nil {
		_ = l.Client.CoreV1().Pods(PodNamespace).Delete(ctx, name, metav1.DeleteOptions{})
		return nil, fmt.Errorf("pod %s: netns: %w", name, err)
	}
	cni := libcni.NewCNIConfigWithCacheDir(cniPath, l.cniCache, guestExec{vm: l.VM, ns: lab.NodeNS(node)})
	id := "e2e-" + name
	rt := &libcni.RuntimeConf{ContainerID: id, NetNS: "/run/netns/" + name, IfName: "eth0",
		Args: [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", PodNamespace}, {"K8S_POD_NAME", name}, {"K8S_POD_INFRA_CONTAINER_ID", id}}}
	res, err := cni.AddNetworkList(ctx, list, rt)
	if err != nil {
		_ = cni.DelNetworkList(ctx, list, rt)
		removePod()
		return nil, err
	}
	p := &Pod{Name: name, Node: node, list: list, rt: rt}
	fail := func(format string, a ...any) (*Pod, error) {
		_ = cni.DelNetworkList(ctx, list, rt)
		removePod()
		return nil, fmt.Errorf("pod %s: "+format, append([]any{name}, a...)...)
	}
	r, err := current.NewResultFromResult(res)
	if err != nil || len(r.IPs) == 0 {
		return fail("result without an address: %v", err)
	}
	p.IP = r.IPs[0].Address.IP.String()
	if _, block, _ := net.ParseCIDR(lab.Block(node)); !block.Contains(r.IPs[0].Address.IP) {
		return fail("calico-ipam gave %s, outside node%d's block %s, which the lab's routes expect", p.IP, node, block)
	}
	mtu, _, err := l.VM.Run(ctx, "ip netns exec "+lab.ShellQuote(name)+" cat /sys/class/net/eth0/mtu")
	if err != nil {
		return fail("read mtu: %w", err)
	}
	if _, err := fmt.Sscan(mtu, &p.MTU); err != nil {
		return fail("read mtu: %w", err)
	}
	l.mu.Lock()
	l.pods = append(l.pods, p)
	l.mu.Unlock()
	return p, nil
}

// DeletePod runs CNI DEL for p (Calico releases its address) and removes its namespace
// and Pod object.
func (l *Lab) DeletePod(ctx context.Context, p *Pod) error {
	cni := libcni.NewCNIConfigWithCacheDir(cniPath, l.cniCache, guestExec{vm: l.VM, ns: lab.NodeNS(p.Node)})
	err := cni.DelNetworkList(ctx, p.list, p.rt)
	_, _, _ = l.VM.Run(ctx, "ip netns del "+lab.ShellQuote(p.Name))
	err = errors.Join(err, l.Client.CoreV1().Pods(PodNamespace).Delete(ctx, p.Name, metav1.DeleteOptions{}))
	l.mu.Lock()
	for i, q := range l.pods {
		if q == p {
			l.pods = append(l.pods[:i], l.pods[i+1:]...)
			break
		}
	}
	l.mu.Unlock()
	return err
}
