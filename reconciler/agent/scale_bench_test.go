//go:build linux

package agent_test

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/bench/cluster"
	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/reconciler/agent"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/rules"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
	"github.com/secureoverlay/secureoverlay/reconciler/xfrm"
)

// The measurements here run only with SECUREOVERLAY_BENCH=1 (hack/bench.sh): they start a
// real kube-apiserver and etcd (conformance/kube) and take minutes. Each prints "BENCH
// name value unit" lines that bench/cmd/benchreport collects into bench/RESULTS.md. The
// agent runs in accept mode (inbound SAs and the inbound policy per peer), so a peer needs
// only its Node and its own report, not a report naming this node.

func benchGate(t *testing.T) {
	t.Helper()
	if os.Getenv("SECUREOVERLAY_BENCH") != "1" {
		t.Skip("benchmark measurement; set SECUREOVERLAY_BENCH=1 (hack/bench.sh)")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
}

func benchReport(name string, value float64, unit string) {
	fmt.Printf("BENCH %s %g %s\n", name, value, unit)
}

// benchRing is an accept-mode ring with one active generation and node IDs for names.
func benchRing(t *testing.T, names []string) []byte {
	t.Helper()
	r := keys.NewRing()
	r.Mode, r.Target, r.LastGeneration = api.ModeAccept, api.ModeAccept, 1
	root := make([]byte, keys.RootKeyBytes)
	if _, err := rand.Read(root); err != nil {
		t.Fatal(err)
	}
	now := time.Now().UTC()
	r.Generations = []keys.Generation{{Number: 1, State: keys.StateActive, Cipher: keys.AES128GCM, ICVBytes: 8,
		Root: root, Reason: "bench", Created: now, Activated: now}}
	for i, n := range names {
		r.Nodes = append(r.Nodes, keys.NodeID{Name: n, ID: uint32(i + 1)})
	}
	data, err := keys.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// benchCluster starts the API server with the Calico CRDs, the key Secret for names, a
// 10.0.0.0/8 Always pool, and returns the admin config (high client-side rate limits).
func benchCluster(t *testing.T, names []string) (*kube.Cluster, *rest.Config) {
	t.Helper()
	c := kube.Start(t)
	cfg := rest.CopyConfig(c.AdminConfig())
	cfg.QPS, cfg.Burst = 5000, 10000
	kube.InstallCalicoCRDs(t, cfg)
	ctx := context.Background()
	cs := kubernetes.NewForConfigOrDie(cfg)
	if _, err := cs.CoreV1().Secrets(api.Namespace).Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: api.Namespace, Name: api.SecretName},
		Data: map[string][]byte{api.SecretDataKey: benchRing(t, names)}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	pool := &unstructured.Unstructured{Object: map[string]any{"apiVersion": "crd.projectcalico.org/v1", "kind": "IPPool",
		"metadata": map[string]any{"name": "default-ipv4-ippool"}, "spec": map[string]any{"cidr": "10.0.0.0/8", "ipipMode": "Always"}}}
	if _, err := dynamic.NewForConfigOrDie(cfg).Resource(kube.IPPools).Create(ctx, pool, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	return c, cfg
}

// createNode creates node i (no report yet) and returns its UID.
func createNode(ctx context.Context, cs kubernetes.Interface, i int) (string, error) {
	n, err := kube.CreateNodeContext(ctx, cs, kube.Node{Name: cluster.Name(i), IPv4: cluster.IP(i).String(), BootID: "boot-" + cluster.Name(i)})
	if err != nil {
		return "", err
	}
	return string(n.UID), nil
}

// publishReport sets node i's own (empty, accept-mode) report, made for its Node object.
func publishReport(ctx context.Context, cs kubernetes.Interface, i int, uid string) error {
	name := cluster.Name(i)
	rep, _ := json.Marshal(watch.Report{NodeReport: api.NodeReport{Mode: api.ModeAccept, Incarnation: "boot-" + name, UID: uid, Epoch: "e-" + name}})
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]string{api.ReportAnnotation: string(rep)}}})
	_, err := cs.CoreV1().Nodes().Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{})
	return err
}

// parallel runs f(0..n-1) on w workers and returns the first error.
func parallel(n, w int, f func(i int) error) error {
	var mu sync.Mutex
	var first error
	var wg sync.WaitGroup
	next := make(chan int)
	for range w {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				if err := f(i); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
				}
			}
		}()
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
	return first
}

// startAgent runs the agent for node 0 with the given xfrm kernel until the test ends.
func startAgent(t *testing.T, cfg *rest.Config, k xfrm.Kernel, qps float32) *agent.Agent {
	t.Helper()
	ac := rest.CopyConfig(cfg)
	ac.QPS, ac.Burst = 0, 0 // client-go defaults (5 QPS, burst 10), as the real agent
	if qps > 0 {
		ac.QPS, ac.Burst = qps, 2*int(qps) // to show what the rate limit costs
	}
	client := kubernetes.NewForConfigOrDie(ac)
	src := watch.New(watch.Config{Client: client, Dynamic: dynamic.NewForConfigOrDie(ac), Self: cluster.Name(0), DiscoveryRetry: 200 * time.Millisecond})
	dp := desired.Config{}.WithDefaults()
	a, err := agent.New(agent.Config{NodeName: cluster.Name(0), Dataplane: dp, ResyncInterval: time.Hour, ExternalMTU: 1500},
		agent.Deps{Client: client, Source: src, Xfrm: xfrm.NewApplier(k, dp), Rules: rules.NewApplier(rules.NewFake()),
			Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { a.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return a
}

// watchedKernel keeps policies in the real kernel of a network namespace (states in a
// fake: this host has no esp4) and announces every added inbound policy's peer.
type watchedKernel struct {
	ns     ns.NetNS
	states *xfrm.Fake
	added  chan string
}

func (k watchedKernel) in(f func() error) error {
	return k.ns.Do(func(ns.NetNS) error { return f() })
}
func (k watchedKernel) ListStates() ([]xfrm.KernelSA, error) { return k.states.ListStates() }
func (k watchedKernel) AddState(sa desired.SA) error         { return k.states.AddState(sa) }
func (k watchedKernel) DeleteState(sa desired.SA) error      { return k.states.DeleteState(sa) }
func (k watchedKernel) ListPolicies() (ps []xfrm.KernelPolicy, err error) {
	err = k.in(func() error { ps, err = xfrm.Netlink{}.ListPolicies(); return err })
	return ps, err
}
func (k watchedKernel) AddPolicy(p desired.Policy) error {
	err := k.in(func() error { return xfrm.Netlink{}.AddPolicy(p) })
	if err == nil && p.Dir == desired.In {
		select {
		case k.added <- p.Peer:
		default:
		}
	}
	return err
}
func (k watchedKernel) UpdatePolicy(p desired.Policy) error {
	return k.in(func() error { return xfrm.Netlink{}.UpdatePolicy(p) })
}
func (k watchedKernel) DeletePolicy(p desired.Policy) error {
	return k.in(func() error { return xfrm.Netlink{}.DeletePolicy(p) })
}

// TestBenchEventToKernel: 200 peers join one at a time; for each, the time from the API
// write that makes it usable (its report on its Node) to its inbound policy being added
// to the kernel of the agent's network namespace. p50 and p99 over the 200. Twice: with
// client-go's default rate limit on the agent's client (5 QPS, burst 10: what the real
// agent uses) and with 1,000 QPS, to show that the limiter, not the sync, sets the figure
// (every sync ends with a patch of the agent's own report, and the next sync waits for it).
func TestBenchEventToKernel(t *testing.T) {
	benchGate(t)
	t.Run("qps=default", func(t *testing.T) { eventToKernel(t, 0, "latency.default") })
	t.Run("qps=1000", func(t *testing.T) { eventToKernel(t, 1000, "latency.qps1000") })
}

func eventToKernel(t *testing.T, qps float32, prefix string) {
	const changes = 200
	names := make([]string, changes+1)
	for i := range names {
		names[i] = cluster.Name(i)
	}
	_, cfg := benchCluster(t, names)
	ctx := context.Background()
	cs := kubernetes.NewForConfigOrDie(cfg)
	if _, err := createNode(ctx, cs, 0); err != nil {
		t.Fatal(err)
	}
	n, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = n.Close(); _ = testutils.UnmountNS(n) })
	k := watchedKernel{ns: n, states: xfrm.NewFake(), added: make(chan string, 16)}
	a := startAgent(t, cfg, k, qps)
	for deadline := time.Now().Add(30 * time.Second); !a.Status().Ready; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("agent not ready: %+v", a.Status())
		}
	}
	var lat []time.Duration
	for i := 1; i <= changes; i++ {
		uid, err := createNode(ctx, cs, i)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond) // let the Node's own event settle
		t0 := time.Now()
		if err := publishReport(ctx, cs, i, uid); err != nil {
			t.Fatal(err)
		}
		timeout := time.After(30 * time.Second)
	wait:
		for {
			select {
			case p := <-k.added:
				if p == cluster.Name(i) {
					lat = append(lat, time.Since(t0))
					break wait
				}
			case <-timeout:
				t.Fatalf("inbound policy for %s never added", cluster.Name(i))
			}
		}
	}
	slices.Sort(lat)
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	benchReport(prefix+".changes", changes, "count")
	benchReport(prefix+".p50", ms(lat[len(lat)/2]), "ms")
	benchReport(prefix+".p99", ms(lat[len(lat)*99/100]), "ms")
	benchReport(prefix+".max", ms(lat[len(lat)-1]), "ms")
}

func rssKiB(t *testing.T) float64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			v, _ := strconv.ParseFloat(f[1], 64)
			return v
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

func heapMiB() (inuse, alloc float64) {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return float64(m.HeapInuse) / (1 << 20), float64(m.HeapAlloc) / (1 << 20)
}

// TestBenchAgentMemory: 5,000 Nodes (each with its report) and 20,000 IPAMBlocks in the
// real API server; the agent (in this process, xfrm in the fake) syncs all of them. The
// figures are the process's heap (after GC) and RSS after the sync minus before the agent
// started, i.e. what the agent's caches, desired state and applier hold.
func TestBenchAgentMemory(t *testing.T) {
	benchGate(t)
	nodes := 5000
	if v, err := strconv.Atoi(os.Getenv("SECUREOVERLAY_BENCH_NODES")); err == nil && v > 0 {
		nodes = v
	}
	names := make([]string, nodes)
	for i := range names {
		names[i] = cluster.Name(i)
	}
	_, cfg := benchCluster(t, names)
	ctx := context.Background()
	cs := kubernetes.NewForConfigOrDie(cfg)
	dyn := dynamic.NewForConfigOrDie(cfg)
	t0 := time.Now()
	if err := parallel(nodes, 16, func(i int) error {
		uid, err := createNode(ctx, cs, i)
		if err != nil {
			return err
		}
		return publishReport(ctx, cs, i, uid)
	}); err != nil {
		t.Fatal(err)
	}
	if err := parallel(nodes*cluster.BlocksPerNode, 16, func(b int) error {
		i, j := b/cluster.BlocksPerNode, b%cluster.BlocksPerNode
		cidr := cluster.Block(i, j)
		u := &unstructured.Unstructured{Object: map[string]any{"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock",
			"metadata": map[string]any{"name": strings.NewReplacer(".", "-", "/", "-").Replace(cidr.String())},
			"spec":     map[string]any{"cidr": cidr.String(), "affinity": "host:" + cluster.Name(i)}}}
		_, err := dyn.Resource(kube.IPAMBlocks).Create(ctx, u, metav1.CreateOptions{})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Logf("created %d Nodes and %d IPAMBlocks in %s", nodes, nodes*cluster.BlocksPerNode, time.Since(t0).Round(time.Second))
	runtime.GC()
	time.Sleep(time.Second)
	inuse0, alloc0 := heapMiB()
	rss0 := rssKiB(t)

	fk := xfrm.NewFake()
	t0 = time.Now()
	a := startAgent(t, cfg, fk, 0)
	for deadline := time.Now().Add(5 * time.Minute); ; time.Sleep(100 * time.Millisecond) {
		_, ps := fk.Snapshot()
		if a.Status().Ready && len(ps) == nodes-1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent not synced: %+v, %d policies", a.Status(), len(ps))
		}
	}
	synced := time.Since(t0)
	time.Sleep(2 * time.Second)
	inuse1, alloc1 := heapMiB()
	rss1 := rssKiB(t)
	benchReport("memory.nodes", float64(nodes), "count")
	benchReport("memory.blocks", float64(nodes*cluster.BlocksPerNode), "count")
	benchReport("memory.heap_alloc", alloc1-alloc0, "MiB")
	benchReport("memory.heap_inuse", inuse1-inuse0, "MiB")
	benchReport("memory.rss", (rss1-rss0)/1024, "MiB")
	benchReport("memory.rss_process", rss1/1024, "MiB")
	benchReport("memory.first_sync", float64(synced.Milliseconds())/1000, "s")
}
