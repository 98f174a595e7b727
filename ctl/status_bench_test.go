package ctl

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/metadata"
	"k8s.io/client-go/rest"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/bench"
	"github.com/secureoverlay/secureoverlay/bench/cluster"
	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/nodereport"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
)

// eksName is node i's name in the style of EKS (ip-10-0-12-34.eu-west-1.compute.internal:
// ≈40 characters, which is what makes the per-peer claims of a report large).
func eksName(i int) string {
	return fmt.Sprintf("ip-10-0-%d-%d.eu-west-1.compute.internal", i/250, i%250+1)
}

// scaleCluster is what statusScale writes: n Nodes with EKS-style names and, for most
// of them, a NodeReport listing every other node in inboundFrom and encryptingTo (the
// steady state of an enforcing cluster), plus a few problem nodes.
type scaleCluster struct {
	n     int
	names []string
	uids  []string
	tags  []string
	// report bytes of one healthy node's report (the JSON in the NodeReport)
	reportBytes int
}

// Problem nodes of the scale cluster (at 5,000 nodes: 25 with a sync error, 10 without a
// NodeReport, 5 whose last sync is an hour old).
func scaleSyncError(i int) bool { return i%200 == 7 }
func scaleNoReport(i int) bool  { return i%500 == 11 }
func scaleStale(i int) bool     { return i%1000 == 13 }

func scaleProblems(n int) int {
	p := 0
	for i := range n {
		if scaleSyncError(i) || scaleNoReport(i) || scaleStale(i) {
			p++
		}
	}
	return p
}

// scaleNodeImages is a kubelet's image list of a small EKS node (what makes a real Node a
// few KiB).
func scaleNodeImages() []corev1.ContainerImage {
	var imgs []corev1.ContainerImage
	for _, s := range []string{"amazon-k8s-cni", "amazon-k8s-cni-init", "kube-proxy", "coredns", "pause", "aws-ebs-csi-driver",
		"csi-node-driver-registrar", "livenessprobe", "calico-node", "calico-cni", "secureoverlay-agent", "fluent-bit"} {
		imgs = append(imgs, corev1.ContainerImage{
			Names: []string{"602401143452.dkr.ecr.eu-west-1.amazonaws.com/eks/" + s + "@sha256:" + strings.Repeat("ab", 32),
				"602401143452.dkr.ecr.eu-west-1.amazonaws.com/eks/" + s + ":v1.19.2-eksbuild.1"},
			SizeBytes: 48_000_000,
		})
	}
	return imgs
}

// buildScaleCluster creates the cluster's objects with 16 writers.
func buildScaleCluster(t *testing.T, cfg *rest.Config, n int) *scaleCluster {
	ctx := context.Background()
	cs := kubernetes.NewForConfigOrDie(cfg)
	dyn := dynamic.NewForConfigOrDie(cfg)
	sc := &scaleCluster{n: n, names: make([]string, n), uids: make([]string, n), tags: make([]string, n)}
	for i := range n {
		sc.names[i] = eksName(i)
	}
	images := scaleNodeImages()
	t0 := time.Now()
	if err := kube.Parallel(n, 16, func(i int) error {
		name := sc.names[i]
		kn := kube.Node{Name: name, IPv4: cluster.IP(i).String(), BootID: "boot-" + name}
		obj := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name,
			Labels: map[string]string{"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
				"node.kubernetes.io/instance-type": "m6i.large", "topology.kubernetes.io/region": "eu-west-1",
				"topology.kubernetes.io/zone": "eu-west-1" + string(rune('a'+i%3)), "eks.amazonaws.com/nodegroup": "workers",
				"eks.amazonaws.com/capacityType": "ON_DEMAND", "secureoverlay.io/agent": "true"},
			Annotations: map[string]string{api.CalicoIPv4AddressAnnotation: cluster.IP(i).String() + "/24",
				"node.alpha.kubernetes.io/ttl": "0", "volumes.kubernetes.io/controller-managed-attach-detach": "true"}}}
		created, err := cs.CoreV1().Nodes().Create(ctx, obj, metav1.CreateOptions{})
		if err != nil {
			return fmt.Errorf("create node %s: %w", name, err)
		}
		created.Status = kube.NodeStatus(kn)
		created.Status.Images = images
		if _, err := cs.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
			return fmt.Errorf("update status of node %s: %w", name, err)
		}
		sc.uids[i] = string(created.UID)
		sc.tags[i] = watch.IncarnationTag(watch.KeyIncarnation("boot-"+name, sc.uids[i], "e-"+name))
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	t.Logf("created %d Nodes in %s", n, time.Since(t0).Round(time.Second))
	// The per-peer claims are the same text for every reporter but its own entry: build
	// them once, sorted as encoding/json sorts map keys.
	order := make([]int, n)
	for i := range order {
		order[i] = i
	}
	sort.Slice(order, func(a, b int) bool { return sc.names[order[a]] < sc.names[order[b]] })
	t0 = time.Now()
	var mu sync.Mutex
	if err := kube.Parallel(n, 16, func(i int) error {
		if scaleNoReport(i) {
			return nil
		}
		raw := scaleReport(sc, order, i)
		mu.Lock()
		if sc.reportBytes == 0 && !scaleSyncError(i) && !scaleStale(i) {
			sc.reportBytes = len(raw)
		}
		mu.Unlock()
		obj := nodereport.Object(api.Namespace, sc.names[i], sc.uids[i], string(api.ModeEnforce), raw)
		if _, err := dyn.Resource(nodereport.GVR).Namespace(api.Namespace).Create(ctx, obj, metav1.CreateOptions{FieldManager: nodereport.FieldManager}); err != nil {
			return fmt.Errorf("create %s %s: %w", nodereport.Kind, sc.names[i], err)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	t.Logf("created %d NodeReports of %d bytes each in %s", n-n/500, sc.reportBytes, time.Since(t0).Round(time.Second))
	return sc
}

// scaleReport is node i's report: enforce, generation 7 (scaleMaster's), every other
// node in both claim maps with the tag of its key incarnation (none with
// SECUREOVERLAY_BENCH_CTL_LISTS=0: the reports of protocol v2 step 4).
func scaleReport(sc *scaleCluster, order []int, i int) []byte {
	name := sc.names[i]
	r := watch.Report{NodeReport: api.NodeReport{Mode: api.ModeEnforce, Generations: []uint32{7},
		Incarnation: "boot-" + name, UID: sc.uids[i], Epoch: "e-" + name,
		BudgetMTU: 1402, ExternalMTU: 1450, MaxSeqFraction: 0.012, SeqGeneration: 7,
		PeersEncrypted: sc.n - 1, PeersExpected: sc.n - 1, LastSync: time.Now().UTC().Truncate(time.Second).Add(-30 * time.Second)}}
	if scaleSyncError(i) {
		r.Error = "apply xfrm state spi=0x80000300 dst=198.18.0.1: operation not permitted"
	}
	if scaleStale(i) {
		r.LastSync = r.LastSync.Add(-time.Hour)
	}
	if os.Getenv("SECUREOVERLAY_BENCH_CTL_LISTS") == "0" {
		// As agents write once every live agent decides from views and rows
		// (docs/protocol-v2.md §9 step 4): no lists, no summary annotation.
		r.ListsOmitted = true
		b, _ := json.Marshal(r)
		return b
	}
	head, _ := json.Marshal(r)
	var claims bytes.Buffer
	claims.WriteByte('{')
	first := true
	for _, j := range order {
		if j == i {
			continue
		}
		if !first {
			claims.WriteByte(',')
		}
		first = false
		fmt.Fprintf(&claims, "%q:%q", sc.names[j], sc.tags[j])
	}
	claims.WriteByte('}')
	var b bytes.Buffer
	b.Write(head[:len(head)-1])
	b.WriteString(`,"inboundFrom":`)
	b.Write(claims.Bytes())
	b.WriteString(`,"encryptingTo":`)
	b.Write(claims.Bytes())
	b.WriteByte('}')
	return b.Bytes()
}

func scaleMaster(n int) *api.MasterStatus {
	now := time.Now().UTC()
	return &api.MasterStatus{Leader: "secureoverlay-master-0", Mode: api.ModeEnforce, Target: api.ModeEnforce, ActiveGeneration: 7,
		Generations: []api.GenerationStatus{{Number: 7, State: "active", Cipher: "aes128gcm", Reason: "request",
			Created: now.Add(-2 * time.Hour), Activated: now.Add(-2*time.Hour + 3*time.Second)}},
		Nodes: n}
}

// timeIt returns the median of runs durations of f, and f's last result.
func timeIt[T any](runs int, f func() T) (time.Duration, T) {
	var ds []time.Duration
	var last T
	for range runs {
		runtime.GC()
		t0 := time.Now()
		last = f()
		ds = append(ds, time.Since(t0))
	}
	slices.Sort(ds)
	return ds[len(ds)/2], last
}

func secs(d time.Duration) float64 { return d.Seconds() }

// TestBenchStatus: `secureoverlayctl status` at 5,000 nodes (SECUREOVERLAY_BENCH_CTL_NODES:
// comma-separated sizes instead; each gets its own API server) against a real
// kube-apiserver and etcd. The cluster: Nodes with EKS-style names (≈40 characters),
// labels and an image list like a small EKS node's; a NodeReport per node listing every
// other node in inboundFrom and encryptingTo (enforce, the steady state: ≈0.55 MB per
// report at 5,000 nodes, ≈2.6 GiB all together, so etcd's quota is raised), and a few
// problem nodes (scaleSyncError, scaleNoReport, scaleStale).
//
// Figures: the end-to-end time of `status` (text, the default) and `status -o json` as
// the operator runs them — the cobra command through its normal client path, in this
// process (median of 3) — and of this tree's secureoverlayctl binary as its own process
// (median of 3; also another build's, SECUREOVERLAY_BENCH_BASELINE_CTL, up to
// wholeReportsMax nodes, for before/after from one run); and where the time goes: each
// list the CLI makes or made, alone. docs/performance.md §8.
func TestBenchStatus(t *testing.T) {
	bench.Gate(t, false)
	sizes := []int{5000}
	if s := os.Getenv("SECUREOVERLAY_BENCH_CTL_NODES"); s != "" {
		sizes = nil
		for _, f := range strings.Split(s, ",") {
			v, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || v < 2 {
				t.Fatalf("SECUREOVERLAY_BENCH_CTL_NODES=%q: want node counts ≥ 2, comma-separated", s)
			}
			sizes = append(sizes, v)
		}
	}
	bin := filepath.Join(t.TempDir(), "secureoverlayctl")
	if out, err := exec.Command("go", "build", "-o", bin, "../cmd/secureoverlayctl").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	for _, n := range sizes {
		t.Run(fmt.Sprintf("nodes=%d", n), func(t *testing.T) { statusScale(t, n, bin) })
	}
}

// wholeReportsMax is the largest cluster whose whole NodeReports the benchmark lists (and
// the baseline binary reads): above it they hold gigabytes, which the API server, etcd
// and the reader together would not fit in this machine's memory
// (SECUREOVERLAY_BENCH_CTL_WHOLE=1 lists them anyway).
const wholeReportsMax = 2000

func statusScale(t *testing.T, n int, bin string) {
	c := kube.Start(t, kube.WithEtcdArgs("--quota-backend-bytes="+strconv.Itoa(8<<30),
		// etcd keeps the raft log since its last snapshot in memory: 5,000 reports would
		// be ≈3 GiB more of it.
		"--snapshot-count=500", "--snapshot-catchup-entries=100"))
	cfg := c.AdminConfig()
	cfg.QPS, cfg.Burst = 5000, 10000
	cfg.Timeout = 5 * time.Minute
	sc := buildScaleCluster(t, cfg, n)
	e := &env{t: t, cluster: c, cs: kubernetes.NewForConfigOrDie(cfg), ctx: context.Background(), kc: c.Kubeconfig()}
	e.setMasterStatus(scaleMaster(n))
	e.setConfigMap(map[string]string{api.ConfigEnabledKey: "true"})
	p := fmt.Sprintf("ctl.status.%d.", n)
	whole := n <= wholeReportsMax || os.Getenv("SECUREOVERLAY_BENCH_CTL_WHOLE") == "1"
	bench.Report(p+"report_bytes", float64(sc.reportBytes), "count")
	bench.Report(p+"problems", float64(scaleProblems(n)), "count")

	ctx := context.Background()
	listCfg := rest.CopyConfig(cfg)
	listCfg.QPS, listCfg.Burst = 50, 100
	jsonCS := kubernetes.NewForConfigOrDie(listCfg)
	protoCfg := rest.CopyConfig(listCfg)
	protoCfg.ContentType = "application/vnd.kubernetes.protobuf"
	protoCfg.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	protoCS := kubernetes.NewForConfigOrDie(protoCfg)
	dyn := dynamic.NewForConfigOrDie(listCfg)
	md := metadata.NewForConfigOrDie(listCfg)
	plainCfg := rest.CopyConfig(listCfg)
	plainCfg.DisableCompression = true
	plainDyn := dynamic.NewForConfigOrDie(plainCfg)
	plainCS := kubernetes.NewForConfigOrDie(plainCfg)
	type timedList struct {
		name string
		f    func() (int, error)
	}
	reports := func(c dynamic.Interface) func() (int, error) {
		return func() (int, error) {
			l, err := c.Resource(nodereport.GVR).Namespace(api.Namespace).List(ctx, metav1.ListOptions{})
			if err != nil {
				return 0, err
			}
			return len(l.Items), nil
		}
	}
	lists := []timedList{
		{"list_nodes_json", func() (int, error) {
			l, err := jsonCS.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
			return len(l.Items), err
		}},
		{"list_nodes_protobuf", func() (int, error) {
			l, err := protoCS.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
			return len(l.Items), err
		}},
		{"list_reports_metadata", func() (int, error) {
			l, err := md.Resource(nodereport.GVR).Namespace(api.Namespace).List(ctx, metav1.ListOptions{})
			if err != nil {
				return 0, err
			}
			return len(l.Items), nil
		}},
	}
	if whole {
		lists = append(lists,
			timedList{"list_reports_full", reports(dyn)},
			timedList{"list_reports_full_uncompressed", reports(plainDyn)},
			timedList{"list_reports_raw_uncompressed", func() (int, error) {
				// The bytes only: no decoding.
				b, err := plainCS.CoreV1().RESTClient().Get().AbsPath("/apis", nodereport.Group, nodereport.Version, "namespaces", api.Namespace, nodereport.Resource).DoRaw(ctx)
				t.Logf("NodeReport list: %d bytes", len(b))
				return 0, err
			}})
	}
	for _, l := range lists {
		var err error
		d, cnt := timeIt(1, func() int {
			var c int
			c, err = l.f()
			return c
		})
		if err != nil {
			t.Fatalf("%s: %v", l.name, err)
		}
		t.Logf("%s: %d objects in %s", l.name, cnt, d.Round(time.Millisecond))
		bench.Report(p+l.name, secs(d), "s")
	}

	run := func(args ...string) result {
		var out, errb bytes.Buffer
		code := (&CLI{}).Run(ctx, append([]string{"--kubeconfig", e.kc}, args...), &out, &errb)
		return result{stdout: out.String(), stderr: errb.String(), code: code}
	}
	d, r := timeIt(3, func() result { return run("status") })
	if r.code != ExitNotOK || r.stderr != "" {
		t.Fatalf("status on the scale cluster (with %d problem nodes) must exit 1:\n%.3000s", scaleProblems(n), r)
	}
	t.Logf("status: %s, %d lines, %d bytes; first lines:\n%s", d.Round(time.Millisecond), strings.Count(r.stdout, "\n"), len(r.stdout), firstLines(r.stdout, 40))
	bench.Report(p+"inproc.table", secs(d), "s")
	bench.Report(p+"output_lines.table", float64(strings.Count(r.stdout, "\n")), "count")
	d, r = timeIt(1, func() result { return run("status", "-o", "json") })
	var st StatusOutput
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil || len(st.Nodes) != n {
		t.Fatalf("status -o json: %v, %d nodes", err, len(st.Nodes))
	}
	t.Logf("status -o json: %s, %d bytes", d.Round(time.Millisecond), len(r.stdout))
	bench.Report(p+"inproc.json", secs(d), "s")

	// The binaries, as their own processes.
	binaries := [][2]string{{"binary", bin}}
	if b := os.Getenv("SECUREOVERLAY_BENCH_BASELINE_CTL"); b != "" && whole {
		binaries = append([][2]string{{"baseline", b}}, binaries...)
	}
	for _, b := range binaries {
		d, err := timeIt(3, func() error {
			cmd := exec.Command(b[1], "--kubeconfig", e.kc, "status")
			cmd.Stdout, cmd.Stderr = nil, nil
			err := cmd.Run()
			if ee, ok := err.(*exec.ExitError); ok && ee.ExitCode() == ExitNotOK {
				return nil
			}
			return err
		})
		if err != nil {
			t.Fatalf("%s status: %v", b[1], err)
		}
		t.Logf("%s (%s) status: %s", b[0], b[1], d.Round(time.Millisecond))
		bench.Report(p+b[0]+".table", secs(d), "s")
	}
}

func firstLines(s string, n int) string {
	l := strings.SplitN(s, "\n", n+1)
	if len(l) > n {
		l = l[:n]
	}
	return strings.Join(l, "\n")
}
