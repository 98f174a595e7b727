package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"path"
	"strings"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/secureoverlay/secureoverlay/conformance/lab"
	"github.com/secureoverlay/secureoverlay/conformance/lab/wire"
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

// cniPath is the plugin search path in the guest: the host's CNI plugins
// (ptp, host-local) and our binaries (secureoverlay).
var cniPath = []string{lab.GuestCNIDir, lab.GuestBinDir}

func (g guestExec) ExecPlugin(ctx context.Context, pluginPath string, stdin []byte, environ []string) ([]byte, error) {
	var env []string
	for _, e := range environ {
		if strings.HasPrefix(e, "CNI_") {
			env = append(env, e)
		}
	}
	req := wire.Request{
		Argv:          []string{"ip", "netns", "exec", g.ns, pluginPath},
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
	// The guest's directories are fixed: our binary lives in GuestBinDir, every
	// other plugin in GuestCNIDir.
	if plugin == "secureoverlay" {
		return path.Join(lab.GuestBinDir, plugin), nil
	}
	return path.Join(lab.GuestCNIDir, plugin), nil
}

func (g guestExec) Decode(b []byte) (version.PluginInfo, error) {
	var d version.PluginDecoder
	return d.Decode(b)
}

// PodConfig says how a pod is attached through the CNI chain.
type PodConfig struct {
	// MTU is the pod interface MTU the primary plugin (ptp, standing in for
	// calico) sets; 0 means the lab's tunnel MTU.
	MTU int
	// PluginMode is the secureoverlay entry's "mode" (enforce, clamp, warn).
	PluginMode string
}

// Conflist is the network configuration list of node i: ptp + host-local with
// the node's IPAM block as the range (the stand-in for calico + calico-ipam,
// giving Calico's layout: a /32 pod address, a host route to it over the
// veth, a default route in the pod), then our plugin, as the installer
// inserts it right after the primary plugin.
func Conflist(i int, pc PodConfig) []byte {
	base := fmt.Sprintf("10.244.%d", i)
	conf := map[string]any{
		"cniVersion": "1.0.0",
		"name":       "k8s-pod-network",
		"plugins": []any{
			map[string]any{
				"type":   "ptp",
				"mtu":    pc.MTU,
				"ipMasq": false,
				"ipam": map[string]any{
					"type":    "host-local",
					"dataDir": fmt.Sprintf("/run/cni/ipam-node%d", i),
					"ranges": []any{[]any{map[string]any{
						"subnet":     lab.Block(i),
						"rangeStart": base + ".5",
						"rangeEnd":   base + ".60",
						"gateway":    base + ".2",
					}}},
					"routes": []any{map[string]any{"dst": "0.0.0.0/0"}},
				},
			},
			map[string]any{
				"type":    "secureoverlay",
				"mode":    pc.PluginMode,
				"logFile": fmt.Sprintf("/tmp/e2e/secureoverlay-cni-node%d.log", i),
			},
		},
	}
	b, _ := json.Marshal(conf)
	return b
}

// Pod is a pod attached through the CNI chain.
type Pod struct {
	Name string // its network namespace in the guest
	Node int
	IP   string
	MTU  int // the pod interface's MTU as the kernel reports it after ADD
	list *libcni.NetworkConfigList
	rt   *libcni.RuntimeConf
}

// AddPod creates network namespace name in the guest and runs the CNI ADD of
// node's conflist for it. On a failed ADD it runs DEL (as a runtime does) and
// removes the namespace, returning the plugin's error (a *types.Error when the
// plugin reported one).
func (l *Lab) AddPod(ctx context.Context, node int, name string, pc PodConfig) (*Pod, error) {
	if pc.MTU == 0 {
		pc.MTU = l.cfg.TunnelMTU
	}
	if pc.PluginMode == "" {
		pc.PluginMode = "enforce"
	}
	list, err := libcni.ConfListFromBytes(Conflist(node, pc))
	if err != nil {
		return nil, fmt.Errorf("pod %s: conflist: %w", name, err)
	}
	if _, _, err := l.VM.Run(ctx, "mkdir -p /tmp/e2e && ip netns add "+lab.ShellQuote(name)+" && ip -n "+lab.ShellQuote(name)+" link set lo up"); err != nil {
		return nil, fmt.Errorf("pod %s: netns: %w", name, err)
	}
	cni := libcni.NewCNIConfigWithCacheDir(cniPath, l.cniCache, guestExec{vm: l.VM, ns: lab.NodeNS(node)})
	rt := &libcni.RuntimeConf{ContainerID: "e2e-" + name, NetNS: "/run/netns/" + name, IfName: "eth0"}
	res, err := cni.AddNetworkList(ctx, list, rt)
	if err != nil {
		_ = cni.DelNetworkList(ctx, list, rt)
		_, _, _ = l.VM.Run(ctx, "ip netns del "+lab.ShellQuote(name))
		return nil, err
	}
	r, err := current.NewResultFromResult(res)
	if err != nil || len(r.IPs) == 0 {
		return nil, fmt.Errorf("pod %s: result without an address: %v", name, err)
	}
	p := &Pod{Name: name, Node: node, IP: r.IPs[0].Address.IP.String(), list: list, rt: rt}
	mtu, _, err := l.VM.Run(ctx, "ip netns exec "+lab.ShellQuote(name)+" cat /sys/class/net/eth0/mtu")
	if err != nil {
		return nil, fmt.Errorf("pod %s: read mtu: %w", name, err)
	}
	if _, err := fmt.Sscan(mtu, &p.MTU); err != nil {
		return nil, fmt.Errorf("pod %s: read mtu: %w", name, err)
	}
	l.pods = append(l.pods, p)
	return p, nil
}

// DeletePod runs CNI DEL for p and removes its namespace.
func (l *Lab) DeletePod(ctx context.Context, p *Pod) error {
	cni := libcni.NewCNIConfigWithCacheDir(cniPath, l.cniCache, guestExec{vm: l.VM, ns: lab.NodeNS(p.Node)})
	err := cni.DelNetworkList(ctx, p.list, p.rt)
	_, _, _ = l.VM.Run(ctx, "ip netns del "+lab.ShellQuote(p.Name))
	for i, q := range l.pods {
		if q == p {
			l.pods = append(l.pods[:i], l.pods[i+1:]...)
			break
		}
	}
	return err
}
