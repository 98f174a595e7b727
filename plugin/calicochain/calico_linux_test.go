package calicochain

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	v3 "github.com/projectcalico/api/pkg/apis/projectcalico/v3"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/install"
	"github.com/secureoverlay/secureoverlay/internal/testutil"
	"github.com/secureoverlay/secureoverlay/plugin"
)

const (
	nodeName  = "node-1"
	nodeIP    = "198.18.0.1" // the node's uplink (198.18.0.0/15: test addresses)
	uplinkMTU = 1500         // budget 1452 with the default 8-byte ICV
	// calicoMTU is what felix writes to /var/lib/calico/mtu on a default install
	// (veth_mtu "0": IPIP on a 1500-byte uplink, 1500 - 20), and the calico CNI plugin
	// uses when the conflist's "mtu" is 0.
	calicoMTU = 1480
	budget    = 1452
	podCIDR   = "10.65.0.0/16"
	nodeBlock = "10.65.7.0/26" // node-1's affine block, written before the first pod
	namespace = "mtu-calico"
)

func skipOrFail(t *testing.T, reason string) {
	t.Helper()
	if os.Getenv("SECUREOVERLAY_REQUIRE_ALL") == "1" {
		t.Fatalf("SECUREOVERLAY_REQUIRE_ALL=1 but %s", reason)
	}
	t.Skip(reason)
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		skipOrFail(t, "needs root to create network and mount namespaces")
	}
	n, err := testutils.NewNS()
	if err != nil {
		skipOrFail(t, "cannot create a network namespace: "+err.Error())
	}
	_ = n.Close()
	_ = testutils.UnmountNS(n)
	for _, tool := range []string{"zstd", "unshare"} {
		if _, err := exec.LookPath(tool); err != nil {
			skipOrFail(t, tool+" not found (Debian packages zstd, util-linux)")
		}
	}
}

func newNS(t *testing.T) ns.NetNS {
	t.Helper()
	n, err := testutils.NewNS()
	if err != nil {
		t.Fatalf("new netns: %v", err)
	}
	t.Cleanup(func() {
		_ = n.Close()
		_ = testutils.UnmountNS(n)
	})
	return n
}

// calicoBinaries decompresses Calico's real CNI plugin (checking its sha256) and returns
// a CNI bin dir with "calico" and "calico-ipam" (the same binary, told apart by its name,
// as Calico's install-cni copies it) behind a wrapper: each runs in a private mount
// namespace with a tmpfs on /var/lib holding what calico-node writes on a default install,
// calico/mtu = 1480 (felix) and calico/nodename (the plugin refuses to run without it,
// "check that the calico/node container is running"), a tmpfs on /var/log (the
// template's log_file_path) and one on /run (calico-ipam's /run/calico/ipam.lock; the
// network namespaces under /run/netns are bound back into it), so the machine's own
// /var/lib, /var/log and /run stay untouched.
func calicoBinaries(t *testing.T, calicoDir string) string {
	t.Helper()
	real := filepath.Join(t.TempDir(), "real")
	if _, err := kube.CalicoCNI(calicoDir, real); err != nil {
		skipOrFail(t, err.Error())
	}
	dir := filepath.Join(t.TempDir(), "bin")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	keep := filepath.Join(t.TempDir(), "netns")
	if err := os.MkdirAll(keep, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"calico", "calico-ipam"} {
		script := fmt.Sprintf(`#!/bin/sh
# Calico's %[1]s as on a node of a default Calico install (see calicoBinaries).
exec unshare --mount --propagation private /bin/sh -c '
set -e
mount --rbind /run/netns %[5]s
mount -t tmpfs -o size=1m tmpfs /run
mkdir -p /run/netns
mount --rbind %[5]s /run/netns
mount -t tmpfs -o size=1m tmpfs /var/lib
mkdir -p /var/lib/calico
printf %%s %[2]d > /var/lib/calico/mtu
printf %%s %[4]s > /var/lib/calico/nodename
mount -t tmpfs -o size=8m tmpfs /var/log
exec "$0" "$@"' %[3]s "$@"
`, name, calicoMTU, filepath.Join(real, name), nodeName, keep)
		if err := os.WriteFile(filepath.Join(dir, name), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// ourPlugin returns a CNI bin dir with the secureoverlay binary:
// $SECUREOVERLAY_BIN_DIR when it has one, else built here.
func ourPlugin(t *testing.T) string {
	t.Helper()
	if dir := os.Getenv("SECUREOVERLAY_BIN_DIR"); dir != "" {
		if st, err := os.Stat(filepath.Join(dir, "secureoverlay")); err == nil && !st.IsDir() {
			return dir
		}
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	dir := t.TempDir()
	cmd := exec.Command(goBin, "build", "-o", filepath.Join(dir, "secureoverlay"), "github.com/secureoverlay/secureoverlay/cmd/secureoverlay")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build the plugin: %v\n%s", err, out)
	}
	return dir
}

// newNode makes the node: a network namespace with lo, an uplink eth0 (a veth whose peer
// is up, so it is oper-up) at 1500 with the node's address, and tunl0 at Calico's MTU
// when the kernel gives each namespace one.
func newNode(t *testing.T) ns.NetNS {
	t.Helper()
	node := newNS(t)
	err := node.Do(func(ns.NetNS) error {
		la := netlink.NewLinkAttrs()
		la.Name, la.MTU = "eth0", uplinkMTU
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: "uplink-peer"}); err != nil {
			return err
		}
		for _, n := range []string{"lo", "eth0", "uplink-peer"} {
			l, err := netlink.LinkByName(n)
			if err != nil {
				return err
			}
			if err := netlink.LinkSetUp(l); err != nil {
				return err
			}
		}
		eth0, _ := netlink.LinkByName("eth0")
		addr, _ := netlink.ParseAddr(nodeIP + "/24")
		if err := netlink.AddrAdd(eth0, addr); err != nil {
			return err
		}
		if tun, err := netlink.LinkByName("tunl0"); err == nil {
			if err := netlink.LinkSetMTU(tun, calicoMTU); err != nil {
				return err
			}
		}
		return testutil.WaitOperUp("eth0", 5*time.Second)
	})
	if err != nil {
		t.Fatalf("set up the node netns: %v", err)
	}
	return node
}

// forwardAPIServer makes the API server (on the host's loopback) reachable from the
// node's loopback at the same address: a listener in the node namespace whose
// connections are relayed to the host's. Sockets keep the namespace they were created
// in, so nothing is added to the host's network.
func forwardAPIServer(t *testing.T, node ns.NetNS, hostURL string) {
	t.Helper()
	addr := strings.TrimPrefix(hostURL, "https://")
	var l net.Listener
	if err := node.Do(func(ns.NetNS) error {
		var err error
		l, err = net.Listen("tcp", addr)
		return err
	}); err != nil {
		t.Fatalf("listen on %s in the node netns: %v", addr, err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { _ = l.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			in, err := l.Accept()
			if err != nil {
				return
			}
			out, err := net.Dial("tcp", addr) // this goroutine is in the host's namespace
			if err != nil {
				_ = in.Close()
				continue
			}
			wg.Add(2)
			relay := func(dst, src net.Conn) {
				defer wg.Done()
				_, _ = io.Copy(dst, src)
				_ = dst.Close()
				_ = src.Close()
			}
			go relay(out, in)
			go relay(in, out)
		}
	}()
}

// conflist renders Calico's own conflist template (calico-config.yaml's
// cni_network_config) the way Calico's install-cni does on a default install
// (veth_mtu "0" → "mtu": 0), and splices our entry in with our installer.
func conflist(t *testing.T, calicoDir, kubeconfig string, e install.Entry) *libcni.NetworkConfigList {
	t.Helper()
	cm, err := kube.CalicoConfig(calicoDir)
	if err != nil {
		t.Fatal(err)
	}
	if cm.Data["veth_mtu"] != "0" {
		t.Fatalf("calico-config.yaml is not Calico's default (veth_mtu %q)", cm.Data["veth_mtu"])
	}
	rendered := kube.RenderCalicoConflist(cm, nodeName, cm.Data["veth_mtu"], kubeconfig)
	spliced, changed, err := install.InsertEntry([]byte(rendered), e)
	if err != nil || !changed {
		t.Fatalf("splice our entry into Calico's conflist: changed=%v %v\n%s", changed, err, rendered)
	}
	list, err := libcni.ConfListFromBytes(spliced)
	if err != nil {
		t.Fatalf("parse the spliced conflist: %v\n%s", err, spliced)
	}
	var types []string
	for _, p := range list.Plugins {
		types = append(types, p.Network.Type)
	}
	if strings.Join(types, ",") != "calico,secureoverlay,portmap" {
		t.Fatalf("chain %v, want calico, secureoverlay, portmap", types)
	}
	return list
}

func linkMTU(t *testing.T, n ns.NetNS, name string) int {
	t.Helper()
	mtu := -1
	_ = n.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(name)
		if err == nil {
			mtu = l.Attrs().MTU
		}
		return nil
	})
	return mtu
}

// TestRealCalicoChain: on a node of a default Calico install (the real calico plugin, in
// Kubernetes-datastore mode against a real API server, pod MTU 1480 from felix's MTU
// file), secureoverlay chained right after it by our installer. In the default mode the
// pod starts, clamped to the budget 1452 (pod side and host side; tunl0 keeps Calico's
// MTU); in enforce mode it is refused, with a message naming Calico's real knobs.
func TestRealCalicoChain(t *testing.T) {
	requireRoot(t)
	calicoDir := kube.RequireCalico(t)
	if _, err := os.Stat("/usr/lib/cni/portmap"); err != nil {
		skipOrFail(t, "CNI plugin portmap (in Calico's conflist) not found in /usr/lib/cni: install containernetworking-plugins")
	}
	calicoBin := calicoBinaries(t, calicoDir)
	ours := ourPlugin(t)

	c := kube.Start(t, kube.WithNamespaces(namespace))
	cfg := c.AdminConfig()
	kube.InstallCalicoCRDs(t, cfg, kube.CalicoV1)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	// What Calico's ADD needs in KDD mode (shared/calico/README.md): the Node, an IPPool,
	// the Pod, the node name (in the conflist), and the ClusterInformation "default" that
	// calico-node marks datastoreReady (the plugin refuses to run before).
	kube.CreateNode(t, cfg, kube.Node{Name: nodeName, IPv4: nodeIP, BootID: "boot-1"})
	ci := &unstructured.Unstructured{Object: map[string]any{"apiVersion": kube.CalicoV1GV.String(), "kind": "ClusterInformation",
		"metadata": map[string]any{"name": "default"},
		"spec":     map[string]any{"datastoreReady": true, "calicoVersion": "v3.32.1", "clusterType": "k8s,bgp"}}}
	if _, err := dyn.Resource(kube.CalicoV1GV.WithResource("clusterinformations")).Create(ctx, ci, kube.StrictCreate); err != nil {
		t.Fatal(err)
	}
	if _, err := kube.CreateCalico(ctx, dyn, kube.CalicoV1GV, kube.NewIPPool("default-ipv4-ippool", podCIDR, v3.IPIPModeAlways)); err != nil {
		t.Fatal(err)
	}
	// The node's block as calico-node leaves it after allocating the node's IPIP tunnel
	// address: the lab (conformance/e2e) writes blocks this way so that pods land in the
	// block its routes expect; calico-ipam uses it only if the affinity carries Calico's
	// labels (kube.NewBlockAffinity), else it claims a block of its own at random.
	block := kube.NewIPAMBlock(nodeBlock, "host:"+nodeName)
	kube.Allocate(block, 0, "ipip-tunnel-addr-"+nodeName, nodeName, map[string]string{"type": "ipipTunnelAddress"})
	if _, err := kube.CreateCalico(ctx, dyn, kube.CalicoV1GV, block); err != nil {
		t.Fatal(err)
	}
	if _, err := kube.CreateCalico(ctx, dyn, kube.CalicoV1GV, kube.NewBlockAffinity(nodeName, nodeBlock)); err != nil {
		t.Fatal(err)
	}
	if _, err := cs.CoreV1().ServiceAccounts(namespace).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	node := newNode(t)
	forwardAPIServer(t, node, c.Host())
	tunl0 := linkMTU(t, node, "tunl0") // -1: this kernel gives the namespace no tunl0
	logDir := t.TempDir()
	cni := libcni.NewCNIConfigWithCacheDir([]string{calicoBin, ours, "/usr/lib/cni"}, filepath.Join(t.TempDir(), "cache"), nil)

	add := func(t *testing.T, mode string) (ns.NetNS, *libcni.RuntimeConf, *libcni.NetworkConfigList, types.Result, error) {
		t.Helper()
		podName := "pod-" + mode
		pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: podName, Namespace: namespace},
			Spec: corev1.PodSpec{NodeName: nodeName, Containers: []corev1.Container{{Name: "c", Image: "registry.example/app:1"}}}}
		if _, err := cs.CoreV1().Pods(namespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		list := conflist(t, calicoDir, c.Kubeconfig(), install.Entry{Mode: mode, ICVBytes: 8, LogFile: filepath.Join(logDir, "secureoverlay.log")})
		podNS := newNS(t)
		id := "c0ffee" + mode
		rt := &libcni.RuntimeConf{ContainerID: id, NetNS: podNS.Path(), IfName: "eth0",
			Args: [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", namespace}, {"K8S_POD_NAME", podName}, {"K8S_POD_INFRA_CONTAINER_ID", id}}}
		var res types.Result
		var addErr error
		if err := node.Do(func(ns.NetNS) error { res, addErr = cni.AddNetworkList(ctx, list, rt); return nil }); err != nil {
			t.Fatal(err)
		}
		return podNS, rt, list, res, addErr
	}
	del := func(t *testing.T, rt *libcni.RuntimeConf, list *libcni.NetworkConfigList) {
		t.Helper()
		var err error
		_ = node.Do(func(ns.NetNS) error { err = cni.DelNetworkList(ctx, list, rt); return nil })
		if err != nil {
			t.Errorf("DEL: %v", err)
		}
	}

	t.Run("default mode: the pod starts, clamped", func(t *testing.T) {
		mode := install.PluginModes[0] // what the installer writes without --mode
		if mode != string(plugin.DefaultMode) {
			t.Fatalf("installer default %q, plugin default %q", mode, plugin.DefaultMode)
		}
		podNS, rt, list, res, err := add(t, mode)
		if err != nil {
			t.Fatalf("ADD through calico → secureoverlay → portmap: %v", err)
		}
		defer del(t, rt, list)
		r, err := current.NewResultFromResult(res)
		if err != nil {
			t.Fatal(err)
		}
		var host string
		for _, i := range r.Interfaces {
			if i.Sandbox == "" && strings.HasPrefix(i.Name, "cali") {
				host = i.Name
			}
		}
		if host == "" || len(r.IPs) != 1 || !strings.HasPrefix(r.IPs[0].Address.IP.String(), "10.65.") {
			t.Fatalf("not Calico's result: %s", res)
		}
		if _, nb, _ := net.ParseCIDR(nodeBlock); !nb.Contains(r.IPs[0].Address.IP) {
			t.Errorf("calico-ipam gave %s, outside node-1's affine block %s (did it ignore the BlockAffinity's labels?)", r.IPs[0].Address.IP, nodeBlock)
		}
		// Calico made the pod: its annotation, its IPAM block.
		p, err := cs.CoreV1().Pods(namespace).Get(ctx, "pod-"+mode, metav1.GetOptions{})
		if err != nil || p.Annotations["cni.projectcalico.org/podIP"] != r.IPs[0].Address.String() {
			t.Errorf("pod annotation cni.projectcalico.org/podIP %q, result %s (%v)", p.Annotations["cni.projectcalico.org/podIP"], r.IPs[0].Address.String(), err)
		}
		if got := linkMTU(t, podNS, "eth0"); got != budget {
			t.Errorf("pod eth0 mtu %d, want the budget %d (Calico gave it %d)", got, budget, calicoMTU)
		}
		if got := linkMTU(t, node, host); got != budget {
			t.Errorf("host side %s mtu %d, want %d", host, got, budget)
		}
		if tunl0 > 0 {
			if got := linkMTU(t, node, "tunl0"); got != calicoMTU {
				t.Errorf("tunl0 mtu %d, want Calico's %d (the plugin never touches it)", got, calicoMTU)
			}
		}
		log, _ := os.ReadFile(filepath.Join(logDir, "secureoverlay.log"))
		for _, want := range []string{"clamp: container c0ffeeclamp: pod interface eth0 has mtu 1480, ipsec budget 1452",
			"Installation default spec.calicoNetwork.mtu", "veth_mtu in ConfigMap kube-system/calico-config", "secureoverlayctl mtu"} {
			if !bytes.Contains(log, []byte(want)) {
				t.Errorf("plugin log lacks %q:\n%s", want, log)
			}
		}
		t.Logf("calico gave %s (host side %s) mtu %d; secureoverlay clamped both to %d; tunl0: %d (-1: none in this namespace)",
			r.IPs[0].Address.String(), host, calicoMTU, budget, tunl0)
		udpTowardClampedPod(t, node, podNS, r.IPs[0].Address.IP)
	})

	t.Run("enforce: the pod is refused, naming Calico's knobs", func(t *testing.T) {
		podNS, rt, list, _, err := add(t, "enforce")
		defer del(t, rt, list) // the runtime cleans up a failed ADD with DEL: Calico releases the IP
		var e *types.Error
		if !errors.As(err, &e) || e.Code != plugin.ErrMTUOverBudget {
			t.Fatalf("ADD in enforce mode: %v, want CNI error %d", err, plugin.ErrMTUOverBudget)
		}
		for _, want := range []string{"pod interface eth0 has mtu 1480, ipsec budget 1452", `plugin mode "enforce" refuses the pod`,
			"Installation default spec.calicoNetwork.mtu", "veth_mtu in ConfigMap kube-system/calico-config, then restart calico-node",
			"Docker UCP/MKE: calico_mtu and ipip_mtu", `"secureoverlayctl mtu --apply" sets it`, `plugin-mode "clamp" (the default)`} {
			if !strings.Contains(e.Msg, want) {
				t.Errorf("refusal lacks %q:\n%s", want, e.Msg)
			}
		}
		if strings.Contains(e.Msg, `set calico_mtu`) {
			t.Errorf("refusal tells plain Calico users to set UCP's calico_mtu:\n%s", e.Msg)
		}
		if got := linkMTU(t, podNS, "eth0"); got != calicoMTU {
			t.Errorf("enforce changed the pod mtu to %d", got)
		}
		t.Logf("refusal: %s", e.Msg)
	})
}

// udpTowardClampedPod: what happens to a UDP datagram sized for Calico's MTU (1480-byte
// packets, 1452 bytes of payload) sent from the node to the clamped pod: with DF the
// sender gets EMSGSIZE at once (the route to the pod goes through the clamped host-side
// veth); without DF the node fragments it and the pod receives it whole.
func udpTowardClampedPod(t *testing.T, node, pod ns.NetNS, podIP net.IP) {
	t.Helper()
	var conn *net.UDPConn
	if err := pod.Do(func(ns.NetNS) error {
		var err error
		conn, err = net.ListenUDP("udp4", &net.UDPAddr{IP: podIP, Port: 9999})
		return err
	}); err != nil {
		t.Fatalf("listen in the pod: %v", err)
	}
	defer conn.Close()
	payload := bytes.Repeat([]byte{0x5a}, calicoMTU-28)
	send := func(pmtudisc int) error {
		var err error
		_ = node.Do(func(ns.NetNS) error {
			fd, e := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
			if e != nil {
				err = e
				return nil
			}
			defer unix.Close(fd)
			if e := unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, pmtudisc); e != nil {
				err = e
				return nil
			}
			sa := &unix.SockaddrInet4{Port: 9999}
			copy(sa.Addr[:], podIP.To4())
			err = unix.Sendto(fd, payload, 0, sa)
			return nil
		})
		return err
	}
	if err := send(unix.IP_PMTUDISC_DO); !errors.Is(err, syscall.EMSGSIZE) {
		t.Errorf("1480-byte UDP packet with DF toward the clamped pod: %v, want EMSGSIZE", err)
	}
	// Without DF: fragmented on the node, reassembled in the pod. The first datagram may
	// trigger neighbour resolution (Calico's proxy ARP): retry a few times.
	buf := make([]byte, 65536)
	for i := 0; ; i++ {
		if err := send(unix.IP_PMTUDISC_DONT); err != nil {
			t.Fatalf("UDP without DF: %v", err)
		}
		_ = conn.SetReadDeadline(time.Now().Add(time.Second))
		n, _, err := conn.ReadFromUDP(buf)
		if err == nil {
			if n != len(payload) {
				t.Errorf("pod received %d bytes, want %d", n, len(payload))
			}
			return
		}
		if i == 5 {
			t.Fatalf("the clamped pod never received the fragmented datagram: %v", err)
		}
	}
}
