package realnode

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	v3 "github.com/projectcalico/api/pkg/apis/projectcalico/v3"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/conformance/lab"
)

// The real-node cluster: the control plane (etcd, kube-apiserver, kube-controller-manager,
// kube-scheduler) on the host; in one lab VM, each lab node namespace (lab.Cluster: its own
// underlay address, tunl0, Calico's block routes) runs its own containerd and kubelet in a
// mount namespace of its own, so each node has its own /etc/cni/net.d, /opt/cni/bin,
// /var/lib/{kubelet,containerd,calico}, /run/containerd and /run/secureoverlay, as
// separate machines would, and its own cgroup subtree (the kubelet's cgroupRoot).
const (
	clusterNodes = 2
	// serviceIP is the "kubernetes" Service's ClusterIP (the first address of kube.Start's
	// service range). No kube-proxy runs: each node namespace DNATs it to the guest forward
	// of the host's API server, as kube-proxy would to the endpoint.
	serviceIP = "198.19.255.1"
	// vethMTU is the pod MTU a default Calico install renders on a 1500-byte network with
	// IPIP (calico-node's auto-detection: 1500 - 20).
	vethMTU      = 1480
	underlayMTU  = 1500
	calicoPool   = "10.244.0.0/16"
	workloadNS   = "default"
	soNamespace  = api.Namespace
	kubectlWait  = 10 * time.Minute
	calicoShare  = "/opt/calico"
	nodeStateDir = "/nodes" // in the guest: one tmpfs per node below it
)

// nodeKubeletConfig is kubeletConfig with the node's own cgroup subtree: two kubelets in
// one kernel must not both manage /kubepods.
func nodeKubeletConfig(node string) string {
	return kubeletConfig + "cgroupRoot: /" + node + "\n"
}

// nodeStart is the guest command that starts node's containerd and kubelet (the node's
// "boot"): in the node's network namespace and a private mount namespace with the node's
// directories bound over the paths a node has, in the node's cgroup subtree, importing
// the images first. It is the kubelet's process; containerd runs beside it.
func nodeStart(i int) string {
	n := lab.NodeNS(i)
	d := nodeStateDir + "/" + n
	binds := [][2]string{
		{d + "/kubelet", "/var/lib/kubelet"},
		{d + "/containerd", "/var/lib/containerd"},
		{d + "/calico", "/var/lib/calico"},
		{d + "/cni-net", "/etc/cni/net.d"},
		{d + "/cni-bin", "/opt/cni/bin"},
		{d + "/pods", "/var/log/pods"},
		{d + "/containers", "/var/log/containers"},
		{d + "/run-containerd", "/run/containerd"},
		{d + "/run-secureoverlay", "/run/secureoverlay"},
		{d + "/etc-kubernetes", "/etc/kubernetes"},
		{d + "/etc-containerd", "/etc/containerd"},
	}
	var b strings.Builder
	b.WriteString("set -e\n")
	// ip netns exec mounted a sysfs of the node's namespace over /sys: cgroup2 again.
	b.WriteString("mount -t cgroup2 none /sys/fs/cgroup\n")
	fmt.Fprintf(&b, "echo $$ >/sys/fs/cgroup/%s/system/cgroup.procs\n", n)
	for _, bd := range binds {
		fmt.Fprintf(&b, "mkdir -p %[1]s %[2]s && mount --bind %[1]s %[2]s\n", bd[0], bd[1])
	}
	b.WriteString("export PATH=" + share + "/bin:$PATH\n")
	fmt.Fprintf(&b, "containerd --config /etc/containerd/config.toml >%s/containerd.log 2>&1 &\n", d)
	b.WriteString("for k in $(seq 1 600); do ctr version >/dev/null 2>&1 && break; sleep 0.2; done\n")
	b.WriteString("ctr -n k8s.io images import --all-platforms " + share + "/images/pause.tar\n")
	b.WriteString("ctr -n k8s.io images import --all-platforms " + share + "/images/secureoverlay.tar\n")
	fmt.Fprintf(&b, "echo images imported\n")
	fmt.Fprintf(&b, "exec kubelet --config /etc/kubernetes/kubelet.yaml --kubeconfig /etc/kubernetes/kubelet.kubeconfig --hostname-override %s --node-ip %s --v=1\n", n, lab.NodeIP(i))
	return fmt.Sprintf("ip netns exec %s unshare --mount --propagation private /bin/sh -c %s", n, lab.ShellQuote(b.String()))
}

// nodePrepare is the guest script that lays out node i's directories (as a node's disk
// has them before the kubelet first starts: Calico's CNI plugins and conflist as
// calico-node's install-cni leaves them, the runtime's and kubelet's configs), its cgroup
// subtree, and the route and DNAT for the kubernetes Service.
func nodePrepare(i int) string {
	n := lab.NodeNS(i)
	d := nodeStateDir + "/" + n
	return fmt.Sprintf(`set -e
mkdir -p %[2]s
grep -q " %[2]s tmpfs " /proc/mounts || mount -t tmpfs -o mode=0755,size=45%% tmpfs %[2]s
mkdir -p %[2]s/cni-bin %[2]s/cni-net %[2]s/calico %[2]s/etc-kubernetes %[2]s/etc-containerd
cp %[3]s/calico %[2]s/cni-bin/calico && ln -f %[2]s/cni-bin/calico %[2]s/cni-bin/calico-ipam
cp %[4]s/portmap %[4]s/loopback %[2]s/cni-bin/
cp %[5]s/etc/%[1]s/10-calico.conflist %[5]s/etc/%[1]s/calico-kubeconfig %[2]s/cni-net/
printf %%s %[1]s >%[2]s/calico/nodename
cp %[5]s/etc/containerd.toml %[2]s/etc-containerd/config.toml
cp %[5]s/etc/%[1]s/kubelet.yaml %[5]s/etc/kubelet.kubeconfig %[2]s/etc-kubernetes/
mkdir -p /sys/fs/cgroup/%[1]s/system
for c in cpuset cpu io memory pids hugetlb; do echo "+$c" >/sys/fs/cgroup/%[1]s/cgroup.subtree_control 2>/dev/null || true; done
ip -n %[1]s route add %[6]s/32 via %[7]s dev mgmt0
ip netns exec %[1]s iptables -w -t nat -A OUTPUT -d %[6]s/32 -p tcp --dport 443 -j DNAT --to-destination %[8]s:%[9]d
ip netns exec %[1]s iptables -w -t nat -A PREROUTING -d %[6]s/32 -p tcp --dport 443 -j DNAT --to-destination %[8]s:%[9]d
`, n, d, calicoShare, lab.GuestCNIDir, share, serviceIP, lab.ControlGateway, lab.GuestForwardAddr, apiPort)
}

// realCluster is the running real-node cluster.
type realCluster struct {
	t       *testing.T
	kube    *kube.Cluster
	cs      kubernetes.Interface
	dyn     dynamic.Interface
	vm      *lab.VM
	env     map[string]string
	kubectl string
	stage   string
}

func TestRealClusterEncrypts(t *testing.T) {
	if testing.Short() {
		t.Skip("boots the lab VM")
	}
	lab.SkipUnlessAvailable(t, lab.Options{})
	rc := startRealCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()

	// The operator's install: the one file, through the kind of overlay a user writes to
	// pin the image (here the content tag `make image` gave the same image).
	t0 := time.Now()
	overlay := rc.writeOverlay()
	if out, err := rc.kubectlRun(ctx, "apply", "-k", overlay); err != nil {
		t.Fatalf("kubectl apply -k: %v\n%s", err, out)
	}
	for _, obj := range []string{"daemonset/secureoverlay-agent", "deployment/secureoverlay-master"} {
		if out, err := rc.kubectlRun(ctx, "-n", soNamespace, "rollout", "status", obj, "--timeout="+kubectlWait.String()); err != nil {
			rc.dumpPods(ctx)
			t.Fatalf("kubectl rollout status %s: %v\n%s", obj, err, out)
		}
	}
	t.Logf("kubectl apply → every pod Ready in %s", time.Since(t0).Round(100*time.Millisecond))
	rc.dumpPods(ctx)

	t0 = time.Now()
	out, err := rc.ctl(ctx, "enable", "--wait", "--timeout", "10m")
	if err != nil {
		t.Fatalf("secureoverlayctl enable --wait: %v\n%s", err, out)
	}
	t.Logf("secureoverlayctl enable --wait (%s):\n%s", time.Since(t0).Round(100*time.Millisecond), out)
	out, _ = rc.ctl(ctx, "status")
	t.Logf("secureoverlayctl status:\n%s", out)

	// Real pods, one per node, through Calico's chain with our plugin in it.
	t0 = time.Now()
	var pods []workload
	for i := 1; i <= clusterNodes; i++ {
		pods = append(pods, rc.startWorkload(ctx, i))
	}
	t.Logf("workload pods Running in %s: %v", time.Since(t0).Round(100*time.Millisecond), pods)

	// Encrypted: every packet between the pods is ESP on the underlay, none is IPIP.
	wc, err := lab.StartWireCount(ctx, rc.vm, lab.UnderlayNS, lab.UnderlayBridge)
	if err != nil {
		t.Fatal(err)
	}
	streams := rc.startStreams(ctx, pods)
	time.Sleep(10 * time.Second)
	rc.stopStreams(ctx, streams, "enforce")
	per, err := wc.Read(ctx)
	if err != nil {
		t.Fatal(err)
	}
	tot := lab.Total(per)
	t.Logf("underlay in enforce: %s", lab.FormatWireCounts(per))
	if tot.IPIP != 0 || tot.ESP == 0 {
		t.Errorf("pod traffic between real nodes in enforce: %d plaintext IPIP, %d ESP packets on the wire; want 0 and > 0", tot.IPIP, tot.ESP)
	}
}

// workload is a pod of the test's own: its name, node, address, and the name its network
// namespace is attached under in the guest.
type workload struct {
	Name, IP, NetNS string
	Node            int
}

func (w workload) String() string { return fmt.Sprintf("%s@node%d %s", w.Name, w.Node, w.IP) }

// startWorkload runs a pod of our image (sleep, as its default user) on node i through
// the node's CNI chain and attaches its network namespace in the guest by its PID.
func (rc *realCluster) startWorkload(ctx context.Context, i int) workload {
	rc.t.Helper()
	name := fmt.Sprintf("w%d", i)
	marker := strconv.Itoa(86400 + i) // the sleep's argument finds its PID
	zero := int64(0)
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: workloadNS},
		Spec: corev1.PodSpec{
			NodeName: lab.NodeNS(i), TerminationGracePeriodSeconds: &zero,
			Containers: []corev1.Container{{Name: "app", Image: rc.env["IMAGE"] + ":" + rc.env["CONTENT_TAG"],
				ImagePullPolicy: corev1.PullNever, Command: []string{"sleep", marker}}},
		},
	}
	if _, err := rc.cs.CoreV1().Pods(workloadNS).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		rc.t.Fatal(err)
	}
	var ip string
	if err := waitFor(ctx, 6*time.Minute, func() (bool, error) {
		p, err := rc.cs.CoreV1().Pods(workloadNS).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		ip = p.Status.PodIP
		for _, st := range p.Status.ContainerStatuses {
			if st.State.Running != nil && ip != "" {
				return true, nil
			}
		}
		return false, nil
	}); err != nil {
		rc.dumpPods(ctx)
		rc.t.Fatalf("pod %s never Running: %v", name, err)
	}
	ns := "pod-" + name
	rc.run("attach "+name, fmt.Sprintf(`set -e
pid=$(for p in /proc/[0-9]*; do [ "$(tr '\0' ' ' <$p/cmdline 2>/dev/null)" = "sleep %s " ] && echo ${p#/proc/}; done; true)
[ -n "$pid" ] || { echo "no process 'sleep %[1]s'" >&2; exit 1; }
ip netns attach %[2]s $pid
ip -n %[2]s -br addr show eth0`, marker, ns))
	return workload{Name: name, IP: ip, NetNS: ns, Node: i}
}

// startStreams starts an echo stream from every pod to every other one.
func (rc *realCluster) startStreams(ctx context.Context, pods []workload) []*lab.EchoStream {
	rc.t.Helper()
	var ss []*lab.EchoStream
	for _, a := range pods {
		for _, b := range pods {
			if a == b {
				continue
			}
			s, err := lab.StartEchoStream(ctx, rc.vm, a.NetNS, b.IP, lab.EchoOptions{Interval: 50 * time.Millisecond})
			if err != nil {
				rc.t.Fatal(err)
			}
			ss = append(ss, s)
		}
	}
	return ss
}

// stopStreams stops the streams and fails the test for every request never answered.
func (rc *realCluster) stopStreams(ctx context.Context, ss []*lab.EchoStream, what string) {
	rc.t.Helper()
	es, err := lab.StopEchoStreams(ctx, ss)
	if err != nil {
		rc.t.Fatal(err)
	}
	sent, lost := 0, 0
	for _, e := range es {
		sent += e.Requests()
		for _, seq := range e.Lost() {
			lost++
			rc.t.Errorf("%s: request %d lost: %s", what, seq, e.Why(seq))
		}
	}
	rc.t.Logf("%s: %d echo requests between real pods, %d lost", what, sent, lost)
	if sent == 0 {
		rc.t.Errorf("%s: no echo request sent", what)
	}
}

// writeOverlay writes a user's kustomize overlay of manifests/base that pins the image.
func (rc *realCluster) writeOverlay() string {
	rc.t.Helper()
	base, err := filepath.Abs(filepath.Join("..", "..", "manifests", "base"))
	if err != nil {
		rc.t.Fatal(err)
	}
	dir := rc.t.TempDir()
	rel, err := filepath.Rel(dir, base)
	if err != nil {
		rc.t.Fatal(err)
	}
	k := fmt.Sprintf(`apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
- %s
sortOptions:
  order: fifo
images:
- name: %s
  newTag: %s
`, rel, rc.env["IMAGE"], rc.env["CONTENT_TAG"])
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(k), 0o644); err != nil {
		rc.t.Fatal(err)
	}
	return dir
}

// ctl runs secureoverlayctl as the operator would, with the admin kubeconfig.
func (rc *realCluster) ctl(ctx context.Context, args ...string) (string, error) {
	bin := os.Getenv("SECUREOVERLAY_BIN_DIR")
	if bin == "" {
		bin = filepath.Join("..", "..", "bin")
	}
	cmd := exec.CommandContext(ctx, filepath.Join(bin, "secureoverlayctl"), append([]string{"--kubeconfig", rc.kube.Kubeconfig()}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (rc *realCluster) dumpPods(ctx context.Context) {
	out, _ := rc.kubectlRun(ctx, "get", "pods", "-A", "-o", "wide")
	rc.t.Logf("pods:\n%s", out)
}

func startRealCluster(t *testing.T) *realCluster {
	cache := cacheDir()
	img := filepath.Join(cache, "image")
	kubebin := filepath.Join(cache, "kube", "bin")
	nodebin := filepath.Join(cache, "node", "bin")
	var need []string
	for _, b := range []string{"containerd", "containerd-shim-runc-v2", "ctr", "runc"} {
		need = append(need, filepath.Join(nodebin, b))
	}
	need = append(need, filepath.Join(img, "secureoverlay.tar"), filepath.Join(img, "pause.tar"),
		filepath.Join(kubebin, "kubelet"), filepath.Join(kubebin, "kubectl"))
	for _, f := range need {
		if _, err := os.Stat(f); err != nil {
			if lab.RequireAll() {
				t.Fatalf("SECUREOVERLAY_REQUIRE_ALL=1 but %s is missing: run make tools", f)
			}
			t.Skipf("%s missing: run make tools", f)
		}
	}
	calicoDir, err := kube.CalicoDir()
	if err != nil {
		if lab.RequireAll() {
			t.Fatal(err)
		}
		t.Skip(err)
	}
	rc := &realCluster{t: t, kubectl: filepath.Join(kubebin, "kubectl"), env: readEnv(t, filepath.Join(img, "image.env"))}

	t0 := time.Now()
	rc.kube = kube.Start(t, kube.WithServingSANs(lab.GuestForwardAddr, serviceIP), kube.WithControllers())
	u, err := url.Parse(rc.kube.Host())
	if err != nil {
		t.Fatal(err)
	}
	hostPort, _ := strconv.Atoi(u.Port())
	admin := rc.kube.AdminConfig()
	rc.cs = kubernetes.NewForConfigOrDie(admin)
	rc.dyn = dynamic.NewForConfigOrDie(admin)
	ctx := context.Background()
	// Calico as calico-node leaves a cluster: its CRDs, the default IPIP pool, and the
	// ClusterInformation it marks ready (Calico's CNI plugin refuses to run before).
	if err := kube.InstallCalicoCRDsContext(ctx, admin); err != nil {
		t.Fatal(err)
	}
	stage := t.TempDir()
	rc.stage = stage
	calicoVersion, err := kube.CalicoCNI(calicoDir, filepath.Join(stage, "calico"))
	if err != nil {
		t.Fatal(err)
	}
	for _, obj := range []runtime.Object{
		kube.NewIPPool("default-ipv4-ippool", calicoPool, v3.IPIPModeAlways),
		kube.NewClusterInformation(calicoVersion),
	} {
		if _, err := kube.CreateCalico(ctx, rc.dyn, kube.CalicoV1GV, obj); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("control plane up (Calico %s objects) in %s", calicoVersion, time.Since(t0).Round(100*time.Millisecond))

	for _, p := range need[:4] {
		stageFile(t, p, filepath.Join(stage, "bin", filepath.Base(p)), 0o755)
	}
	stageFile(t, filepath.Join(kubebin, "kubelet"), filepath.Join(stage, "bin", "kubelet"), 0o755)
	stageFile(t, "/lib/x86_64-linux-gnu/libseccomp.so.2", filepath.Join(stage, "lib", "libseccomp.so.2"), 0o644)
	stageFile(t, filepath.Join(img, "secureoverlay.tar"), filepath.Join(stage, "images", "secureoverlay.tar"), 0o644)
	stageFile(t, filepath.Join(img, "pause.tar"), filepath.Join(stage, "images", "pause.tar"), 0o644)
	write := func(name, content string) {
		p := filepath.Join(stage, "etc", name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	server := fmt.Sprintf("https://%s:%d", lab.GuestForwardAddr, apiPort)
	// The kubelets and Calico's plugin use the admin token: node authorization is not
	// what this tier tests, and Calico's own RBAC is not among its release files here.
	kubeconfig := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: lab, cluster: {server: %q, certificate-authority-data: %q}}]
users: [{name: node, user: {token: %q}}]
contexts: [{name: lab, context: {cluster: lab, user: node}}]
current-context: lab
`, server, b64(rc.kube.CAData()), admin.BearerToken)
	write("containerd.toml", fmt.Sprintf(containerdConfig, rc.env["PAUSE_IMAGE"]))
	write("kubelet.kubeconfig", kubeconfig)
	cm, err := kube.CalicoConfig(calicoDir)
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= clusterNodes; i++ {
		n := lab.NodeNS(i)
		write(n+"/kubelet.yaml", nodeKubeletConfig(n))
		write(n+"/calico-kubeconfig", kubeconfig)
		write(n+"/10-calico.conflist", string(kube.RenderCalicoConflist(cm, n, strconv.Itoa(vethMTU), "/etc/cni/net.d/calico-kubeconfig")))
	}

	t0 = time.Now()
	rc.vm = lab.BootForTest(t, lab.Options{MemoryMiB: 3584, CPUs: 2,
		Shares: append(lab.StandardShares(),
			lab.Share{Tag: "node", HostPath: stage, GuestPath: share},
			lab.Share{Tag: "calico", HostPath: filepath.Join(stage, "calico"), GuestPath: calicoShare}),
		GuestForwards: []lab.GuestForward{{GuestPort: apiPort, HostPort: hostPort}},
	})
	t.Logf("vm boot (incl. slot wait) %s", time.Since(t0).Round(100*time.Millisecond))
	t.Cleanup(func() {
		if t.Failed() {
			for i := 1; i <= clusterNodes; i++ {
				d := nodeStateDir + "/" + lab.NodeNS(i)
				for _, f := range []string{d + "/node.log", d + "/containerd.log"} {
					out, _, _ := rc.vm.Run(context.Background(), "tail -n 40 "+f)
					t.Logf("%s:\n%s", f, out)
				}
			}
			out, _, _ := rc.vm.Run(context.Background(), "for f in "+nodeStateDir+"/node*/pods/*/*/*.log; do echo \"== $f\"; tail -n 25 \"$f\"; done")
			t.Logf("container logs:\n%s", out)
			hold(t, rc.vm)
		}
	})
	cl := lab.Cluster{Nodes: clusterNodes, UnderlayMTU: underlayMTU, TunnelMTU: underlayMTU - 20, ControlPlane: true}
	if err := cl.Setup(ctx, rc.vm); err != nil {
		t.Fatal(err)
	}
	rc.run("guest setup", guestCommon)
	for i := 1; i <= clusterNodes; i++ {
		rc.run("prepare "+lab.NodeNS(i), nodePrepare(i))
	}
	t0 = time.Now()
	for i := 1; i <= clusterNodes; i++ {
		rc.boot(i)
	}
	for i := 1; i <= clusterNodes; i++ {
		rc.registerCalico(ctx, i)
	}
	for i := 1; i <= clusterNodes; i++ {
		rc.waitNodeReady(ctx, i)
	}
	t.Logf("%d nodes Ready %s after their kubelets started", clusterNodes, time.Since(t0).Round(100*time.Millisecond))
	return rc
}

// guestCommon is what every node shares: cgroup v2 with the controllers delegated, the
// runtime's library, the guest's identity files.
const guestCommon = `set -e
mkdir -p /sys/fs/cgroup
grep -q ' /sys/fs/cgroup cgroup2 ' /proc/mounts || mount -t cgroup2 none /sys/fs/cgroup
for c in cpuset cpu io memory pids hugetlb; do echo "+$c" >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || true; done
cp ` + share + `/lib/* /usr/lib/x86_64-linux-gnu/
echo "127.0.0.1 localhost" >/etc/hosts
touch /etc/resolv.conf
[ -s /etc/machine-id ] || tr -d - </proc/sys/kernel/random/uuid >/etc/machine-id
mkdir -p /var/log/calico/cni
`

func (rc *realCluster) run(what, script string) string {
	rc.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	out, serr, err := rc.vm.RunInput(ctx, "sh -s", []byte(script))
	if err != nil {
		rc.t.Fatalf("%s: %v\n%s\n%s", what, err, out, serr)
	}
	return out
}

// boot starts node i's containerd and kubelet.
func (rc *realCluster) boot(i int) {
	rc.t.Helper()
	if _, err := rc.vm.Background(context.Background(), nodeStart(i), nodeStateDir+"/"+lab.NodeNS(i)+"/node.log"); err != nil {
		rc.t.Fatal(err)
	}
}

// registerCalico does for node i what calico-node does when it starts: the Node's Calico
// annotations (its address, its IPIP tunnel address) and its block, affine and confirmed,
// with the tunnel address allocated, so calico-ipam gives the node's pods addresses the
// lab's routes (lab.Cluster) expect.
func (rc *realCluster) registerCalico(ctx context.Context, i int) {
	rc.t.Helper()
	n := lab.NodeNS(i)
	if err := waitFor(ctx, 6*time.Minute, func() (bool, error) {
		_, err := rc.cs.CoreV1().Nodes().Get(ctx, n, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return false, nil
		}
		return err == nil, err
	}); err != nil {
		rc.t.Fatalf("node %s never registered: %v", n, err)
	}
	patch := fmt.Sprintf(`{"metadata":{"annotations":{%q:%q,%q:%q}}}`,
		api.CalicoIPv4AddressAnnotation, lab.NodeIP(i)+"/24", api.CalicoIPIPTunnelAnnotation, lab.TunnelIP(i))
	if _, err := rc.cs.CoreV1().Nodes().Patch(ctx, n, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		rc.t.Fatal(err)
	}
	b := kube.NewIPAMBlock(lab.Block(i), "host:"+n)
	kube.Allocate(b, 1, "ipip-tunnel-addr-"+n, n, map[string]string{"type": "ipipTunnelAddress"})
	for _, obj := range []runtime.Object{b, kube.NewBlockAffinity(n, lab.Block(i))} {
		if _, err := kube.CreateCalico(ctx, rc.dyn, kube.CalicoV1GV, obj); err != nil {
			rc.t.Fatal(err)
		}
	}
}

func (rc *realCluster) waitNodeReady(ctx context.Context, i int) {
	rc.t.Helper()
	n := lab.NodeNS(i)
	if err := waitFor(ctx, 6*time.Minute, func() (bool, error) {
		node, err := rc.cs.CoreV1().Nodes().Get(ctx, n, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		for _, c := range node.Status.Conditions {
			if c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue {
				return true, nil
			}
		}
		return false, nil
	}); err != nil {
		rc.t.Fatalf("node %s never Ready: %v", n, err)
	}
}

// kubectlRun runs the real kubectl against the cluster as its administrator.
func (rc *realCluster) kubectlRun(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, rc.kubectl, append([]string{"--kubeconfig", rc.kube.Kubeconfig()}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}
