//go:build linux

package agent_test

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http/httptest"
	"net/netip"
	"os"
	"runtime"
	"runtime/pprof"
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
	apiwatch "k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/bench"
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
		Root: root, Reason: "initial", Created: now, Activated: now}}
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
	if _, err := kube.CreateCalico(ctx, dynamic.NewForConfigOrDie(cfg), kube.CalicoV1GV, kube.NewIPPool("default-ipv4-ippool", "10.0.0.0/8", "Always")); err != nil {
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

// startAgent runs the agent for node 0 with the given xfrm kernel until the test ends (its
// IPAMBlocks through the lean decoder, as the binary reads them); its
// client is limited to qps/burst (the binary's --kube-api-qps/--kube-api-burst).
func startAgent(t *testing.T, cfg *rest.Config, k xfrm.Kernel, qps float32, burst int) (*agent.Agent, func()) {
	t.Helper()
	ac := rest.CopyConfig(cfg)
	ac.QPS, ac.Burst = qps, burst
	client := kubernetes.NewForConfigOrDie(ac)
	src := watch.New(watch.Config{Client: client, Dynamic: dynamic.NewForConfigOrDie(ac), REST: ac, Self: cluster.Name(0), DiscoveryRetry: 200 * time.Millisecond})
	dp := desired.Config{}.WithDefaults()
	a, err := agent.New(agent.Config{NodeName: cluster.Name(0), Dataplane: dp, ResyncInterval: time.Hour, ExternalMTU: 1500, LedgerDir: t.TempDir()},
		agent.Deps{Client: client, Source: src, Xfrm: xfrm.NewApplier(k, dp), Rules: rules.NewApplier(rules.NewFake()),
			Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { a.Run(ctx); close(done) }()
	var once sync.Once
	stop := func() { once.Do(func() { cancel(); <-done }) }
	t.Cleanup(stop)
	return a, stop
}

// createBlock creates node i's j-th IPAMBlock (cluster.Block), affine to node i, as
// Calico's IPAM does (the real CRD's required fields, strict field validation), with its
// first address allocated to a pod on node i.
func createBlock(ctx context.Context, dyn dynamic.Interface, i, j int) error {
	cidr := cluster.Block(i, j).String()
	b := kube.NewIPAMBlock(cidr, "host:"+cluster.Name(i))
	kube.Allocate(b, 0, fmt.Sprintf("k8s-pod-network.%d-%d", i, j), cluster.Name(i), map[string]string{"namespace": "bench", "pod": fmt.Sprintf("p-%d-%d", i, j)})
	_, err := kube.CreateCalico(ctx, dyn, kube.CalicoV1GV, b)
	return err
}

// policyKey identifies a policy by its selector and direction.
type policyKey struct {
	dir      desired.Dir
	src, dst netip.Prefix
}

// watchedKernel keeps policies in the real kernel of a network namespace through one
// netlink handle opened there (xfrm.OpenNetlink, as the binary holds one; states in a
// fake: this host has no esp4) and records, for every policy, when its latest successful
// AddPolicy or UpdatePolicy call returned.
type watchedKernel struct {
	nl      xfrm.Netlink
	states  *xfrm.Fake
	mu      *sync.Mutex
	written map[policyKey]time.Time
	signal  chan struct{} // one waiter: poked after every recorded write
}

// startReadyAgent starts the agent for node 0 with its policies in the kernel of a fresh
// network namespace and waits until it is ready.
func startReadyAgent(t *testing.T, cfg *rest.Config, qps float32, burst int) (watchedKernel, *agent.Agent, func()) {
	t.Helper()
	n, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = n.Close(); _ = testutils.UnmountNS(n) })
	k := newWatchedKernel(t, n)
	a, stop := startAgent(t, cfg, k, qps, burst)
	for deadline := time.Now().Add(30 * time.Second); !a.Status().Ready; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("agent not ready: %+v", a.Status())
		}
	}
	return k, a, stop
}

func newWatchedKernel(t *testing.T, n ns.NetNS) watchedKernel {
	t.Helper()
	var h xfrm.Netlink
	if err := n.Do(func(ns.NetNS) error {
		var err error
		h, err = xfrm.OpenNetlink()
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close) // registered before the agent's stop, so it runs after it
	return watchedKernel{nl: h, states: xfrm.NewFake(), mu: &sync.Mutex{}, written: map[policyKey]time.Time{}, signal: make(chan struct{}, 1)}
}

func (k watchedKernel) record(p desired.Policy, err error) error {
	if err != nil {
		return err
	}
	now := time.Now()
	k.mu.Lock()
	k.written[policyKey{p.Dir, p.Src, p.Dst}] = now
	k.mu.Unlock()
	select {
	case k.signal <- struct{}{}:
	default:
	}
	return nil
}

// wait returns when the kernel call writing key returned, if that was at or after since.
func (k watchedKernel) wait(key policyKey, since time.Time, timeout time.Duration) (time.Time, bool) {
	deadline := time.After(timeout)
	for {
		k.mu.Lock()
		at, ok := k.written[key]
		k.mu.Unlock()
		if ok && !at.Before(since) {
			return at, true
		}
		select {
		case <-k.signal:
		case <-deadline:
			return time.Time{}, false
		}
	}
}

func (k watchedKernel) ListStates() ([]xfrm.KernelSA, error)       { return k.states.ListStates() }
func (k watchedKernel) AddState(sa desired.SA) error               { return k.states.AddState(sa) }
func (k watchedKernel) DeleteState(sa desired.SA) error            { return k.states.DeleteState(sa) }
func (k watchedKernel) ListPolicies() ([]xfrm.KernelPolicy, error) { return k.nl.ListPolicies() }
func (k watchedKernel) AddPolicy(p desired.Policy) error           { return k.record(p, k.nl.AddPolicy(p)) }
func (k watchedKernel) UpdatePolicy(p desired.Policy) error        { return k.record(p, k.nl.UpdatePolicy(p)) }
func (k watchedKernel) DeletePolicy(p desired.Policy) error        { return k.nl.DeletePolicy(p) }

// TestBenchEventToKernel: with a real API server and policies in the real kernel of the
// agent's network namespace, two kinds of change, 200 each, one at a time:
//
//   - node: a peer joins: its Node is created, then (20 ms later) its report is written
//     (what makes a peer usable); measured until its inbound transport policy is added;
//   - block: the pool is switched to CrossSubnet (all 200 peers share node 0's /24, and
//     node 0 has a block), then each peer gets its first IPAMBlock; measured until the
//     forward tunnel policy from that block to node 0's block is added (accept mode: one
//     fwd policy per pair of same-subnet blocks, see desired.Compute).
//
// Each interval runs from just before the API write is issued (time.Now() before the
// Create/Patch call) to the moment the agent's AddPolicy/UpdatePolicy netlink call for
// that policy returned (stamped inside the kernel wrapper, not when the test noticed).
// p50, p99 and max over the 200. Three client rate limits for the agent: what the binary
// ships (agent.DefaultAPIQPS/DefaultAPIBurst), client-go's default (5 QPS, burst 10), and
// 1,000 QPS (to show what is left when the limiter never waits).
func TestBenchEventToKernel(t *testing.T) {
	bench.Gate(t, true)
	bench.Report("latency.shipped.qps", agent.DefaultAPIQPS, "count")
	bench.Report("latency.shipped.burst", agent.DefaultAPIBurst, "count")
	t.Run("qps=shipped", func(t *testing.T) { eventToKernel(t, agent.DefaultAPIQPS, agent.DefaultAPIBurst, "latency.shipped") })
	t.Run("qps=client-go-default", func(t *testing.T) { eventToKernel(t, 5, 10, "latency.clientgo") })
	t.Run("qps=1000", func(t *testing.T) { eventToKernel(t, 1000, 2000, "latency.qps1000") })
}

func eventToKernel(t *testing.T, qps float32, burst int, prefix string) {
	const changes = 200
	names := make([]string, changes+1)
	for i := range names {
		names[i] = cluster.Name(i)
	}
	_, cfg := benchCluster(t, names)
	ctx := context.Background()
	cs := kubernetes.NewForConfigOrDie(cfg)
	dyn := dynamic.NewForConfigOrDie(cfg)
	if _, err := createNode(ctx, cs, 0); err != nil {
		t.Fatal(err)
	}
	// Node 0's own block: nothing under the Always pool, the local side of every tunnel
	// policy once the pool is CrossSubnet.
	if err := createBlock(ctx, dyn, 0, 0); err != nil {
		t.Fatal(err)
	}
	k, a, _ := startReadyAgent(t, cfg, qps, burst)
	self32 := netip.PrefixFrom(cluster.IP(0), 32)
	var nodeLat []time.Duration
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
		at, ok := k.wait(policyKey{desired.In, netip.PrefixFrom(cluster.IP(i), 32), self32}, t0, 30*time.Second)
		if !ok {
			t.Fatalf("inbound policy for %s never added: %+v", cluster.Name(i), a.Status())
		}
		nodeLat = append(nodeLat, at.Sub(t0))
	}
	logTrend(t, "node", nodeLat)
	latencies(prefix+".node", nodeLat)

	// CrossSubnet: every peer is in node 0's /24, so each gets tunnel SAs now and a fwd
	// policy per block once it has one.
	states0, _ := k.states.Snapshot()
	pool, err := dyn.Resource(kube.IPPools).Get(ctx, "default-ipv4-ippool", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := unstructured.SetNestedField(pool.Object, desired.IPIPCrossSubnet, "spec", "ipipMode"); err != nil {
		t.Fatal(err)
	}
	if _, err := dyn.Resource(kube.IPPools).Update(ctx, pool, kube.StrictUpdate); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		states, _ := k.states.Snapshot()
		if len(states) >= len(states0)+changes && a.Status().Ready {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("tunnel SAs not added after the switch to CrossSubnet: %d states (had %d), %+v", len(states), len(states0), a.Status())
		}
	}
	time.Sleep(time.Second) // the switch's report patch
	selfBlock := cluster.Block(0, 0)
	var blockLat []time.Duration
	for i := 1; i <= changes; i++ {
		time.Sleep(20 * time.Millisecond)
		t0 := time.Now()
		if err := createBlock(ctx, dyn, i, 0); err != nil {
			t.Fatal(err)
		}
		at, ok := k.wait(policyKey{desired.Fwd, cluster.Block(i, 0), selfBlock}, t0, 30*time.Second)
		if !ok {
			t.Fatalf("fwd policy for block %s of %s never added: %+v", cluster.Block(i, 0), cluster.Name(i), a.Status())
		}
		blockLat = append(blockLat, at.Sub(t0))
	}
	logTrend(t, "block", blockLat)
	latencies(prefix+".block", blockLat)
}

// logTrend logs the mean of the first and of the last 20 changes (in the order made):
// a client-side limiter whose burst is being used up shows as a rising trend.
func logTrend(t *testing.T, what string, lat []time.Duration) {
	mean := func(d []time.Duration) time.Duration {
		var s time.Duration
		for _, x := range d {
			s += x
		}
		return s / time.Duration(len(d))
	}
	t.Logf("%s changes: mean of the first 20 %s, of the last 20 %s", what, mean(lat[:20]).Round(10*time.Microsecond), mean(lat[len(lat)-20:]).Round(10*time.Microsecond))
}

// latencies reports count, p50, p99 and max of lat (sorted in place).
func latencies(prefix string, lat []time.Duration) {
	slices.Sort(lat)
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	bench.Report(prefix+".changes", float64(len(lat)), "count")
	bench.Report(prefix+".p50", ms(lat[len(lat)/2]), "ms")
	bench.Report(prefix+".p99", ms(lat[len(lat)*99/100]), "ms")
	bench.Report(prefix+".max", ms(lat[len(lat)-1]), "ms")
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

// writeHeapProfile writes this process's heap profile (pprof format) to path: with
// SECUREOVERLAY_BENCH_HEAPPROFILE set, TestBenchAgentMemory writes one once the in-process
// agent has synced (go tool pprof -sample_index=inuse_space path).
func writeHeapProfile(t *testing.T, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	runtime.GC()
	if err := pprof.WriteHeapProfile(f); err != nil {
		t.Fatal(err)
	}
	t.Logf("heap profile: %s", path)
}

// startCPUProfile starts this process's CPU profile into path (none if path is empty);
// the returned func stops it.
func startCPUProfile(t *testing.T, path string) func() {
	if path == "" {
		return func() {}
	}
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		t.Fatal(err)
	}
	return func() {
		pprof.StopCPUProfile()
		if err := f.Close(); err != nil {
			t.Error(err)
		}
		t.Logf("CPU profile: %s", path)
	}
}

func heapMiB() (inuse, alloc float64) {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return float64(m.HeapInuse) / (1 << 20), float64(m.HeapAlloc) / (1 << 20)
}

// TestBenchAgentMemory: 5,000 Nodes (each with its report) and 20,000 IPAMBlocks in the
// real API server. First the real binary (binaryMemory, binary_bench_test.go) as its own
// process in a fresh network namespace, then the agent in this process with xfrm in the
// fake. For the in-process agent the figures are the process's heap (after GC) and RSS
// after the sync minus before the agent started, i.e. what the agent's caches, desired
// state and applier hold, with every SA held (the binary cannot hold SAs on this host).
func TestBenchAgentMemory(t *testing.T) {
	bench.Gate(t, true)
	nodes := 5000
	if v, err := strconv.Atoi(os.Getenv("SECUREOVERLAY_BENCH_NODES")); err == nil && v > 0 {
		nodes = v
	}
	bin := buildAgent(t) // before the API server is loaded: the build needs both CPUs
	names := make([]string, nodes)
	for i := range names {
		names[i] = cluster.Name(i)
	}
	c, cfg := benchCluster(t, names)
	ctx := context.Background()
	cs := kubernetes.NewForConfigOrDie(cfg)
	dyn := dynamic.NewForConfigOrDie(cfg)
	t0 := time.Now()
	if err := kube.Parallel(nodes, 16, func(i int) error {
		uid, err := createNode(ctx, cs, i)
		if err != nil {
			return err
		}
		return publishReport(ctx, cs, i, uid)
	}); err != nil {
		t.Fatal(err)
	}
	if err := kube.Parallel(nodes*cluster.BlocksPerNode, 16, func(b int) error {
		return createBlock(ctx, dyn, b/cluster.BlocksPerNode, b%cluster.BlocksPerNode)
	}); err != nil {
		t.Fatal(err)
	}
	t.Logf("created %d Nodes and %d IPAMBlocks in %s", nodes, nodes*cluster.BlocksPerNode, time.Since(t0).Round(time.Second))
	bench.Report("memory.nodes", float64(nodes), "count")
	bench.Report("memory.blocks", float64(nodes*cluster.BlocksPerNode), "count")

	// SECUREOVERLAY_BENCH_BASELINE_AGENT: another build of the agent (an earlier commit's),
	// measured first on the same objects, for before/after figures from one run.
	if base := os.Getenv("SECUREOVERLAY_BENCH_BASELINE_AGENT"); base != "" {
		t.Run("baseline", func(t *testing.T) { binaryMemoryAs(t, base, c, nodes, "memory.baseline") })
	}
	t.Run("binary", func(t *testing.T) { binaryMemory(t, bin, c, nodes) })

	runtime.GC()
	time.Sleep(time.Second)
	inuse0, alloc0 := heapMiB()
	rss0 := rssKiB(t)
	fk := xfrm.NewFake()
	// SECUREOVERLAY_BENCH_CPUPROFILE: a CPU profile of this process from the agent's start
	// to its first sync (where the first sync's time goes; go tool pprof path).
	stopProfile := startCPUProfile(t, os.Getenv("SECUREOVERLAY_BENCH_CPUPROFILE"))
	t0 = time.Now()
	a, stop := startAgent(t, cfg, fk, agent.DefaultAPIQPS, agent.DefaultAPIBurst)
	for deadline := time.Now().Add(5 * time.Minute); ; time.Sleep(10 * time.Millisecond) {
		_, ps := fk.Snapshot()
		if a.Status().Ready && len(ps) == nodes-1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent not synced: %+v, %d policies", a.Status(), len(ps))
		}
	}
	synced := time.Since(t0)
	stopProfile()
	time.Sleep(2 * time.Second)
	inuse1, alloc1 := heapMiB()
	if path := os.Getenv("SECUREOVERLAY_BENCH_HEAPPROFILE"); path != "" {
		writeHeapProfile(t, path)
	}
	rss1 := rssKiB(t)
	states, _ := fk.Snapshot()
	stop()
	bench.Report("memory.heap_alloc", alloc1-alloc0, "MiB")
	bench.Report("memory.heap_inuse", inuse1-inuse0, "MiB")
	bench.Report("memory.rss", (rss1-rss0)/1024, "MiB")
	bench.Report("memory.rss_process", rss1/1024, "MiB")
	bench.Report("memory.first_sync", float64(synced.Milliseconds())/1000, "s")
	bench.Report("memory.sas", float64(len(states)), "count")
}

// TestBenchEventStream: Node events arriving faster than one sync plus one report write,
// as at 5,000 nodes (docs/performance.md §4). With a real API server, the agent at the
// shipped client rate limit and its policies in a real kernel, 250 peers already have
// their Node; then one of them gets its report every 20 ms (50 Node events/s), each of
// which adds that peer's inbound transport policy and changes node 0's own report. The
// interval per event runs from just before its Patch is issued to the return of the
// AddPolicy netlink call of that peer's policy; p50, p99 and max over the 250. A watch of
// the test's own splits each interval where the event reaches a client of the API server.
func TestBenchEventStream(t *testing.T) {
	bench.Gate(t, true)
	const changes = 250
	const every = 20 * time.Millisecond
	// SECUREOVERLAY_BENCH_STREAM_PEERS=N runs the same stream in a cluster of N peers (the
	// ones past the first 250 report before the agent starts).
	peers, prefix := changes, "latency.stream.node"
	if v, err := strconv.Atoi(os.Getenv("SECUREOVERLAY_BENCH_STREAM_PEERS")); err == nil && v > changes {
		peers, prefix = v, fmt.Sprintf("latency.stream%d.node", v)
	}
	names := make([]string, peers+1)
	for i := range names {
		names[i] = cluster.Name(i)
	}
	_, cfg := benchCluster(t, names)
	ctx := context.Background()
	cs := kubernetes.NewForConfigOrDie(cfg)
	uids := make([]string, peers+1)
	if err := kube.Parallel(peers+1, 8, func(i int) error {
		var err error
		if uids[i], err = createNode(ctx, cs, i); err != nil || i <= changes {
			return err
		}
		return publishReport(ctx, cs, i, uids[i])
	}); err != nil {
		t.Fatal(err)
	}
	k, a, stop := startReadyAgent(t, cfg, agent.DefaultAPIQPS, agent.DefaultAPIBurst)
	time.Sleep(2 * time.Second) // the first reports' writes and the client's burst refill
	self32 := netip.PrefixFrom(cluster.IP(0), 32)
	// A watch of its own in the test process splits each interval: API server and watch
	// delivery (the event seen here) and the rest (the agent's informer, queue and sync).
	w, err := cs.CoreV1().Nodes().Watch(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	var seenMu sync.Mutex
	seen := map[string]time.Time{}
	go func() {
		for ev := range w.ResultChan() {
			if n, ok := ev.Object.(*corev1.Node); ok && ev.Type == apiwatch.Modified && n.Annotations[api.ReportAnnotation] != "" {
				seenMu.Lock()
				if _, dup := seen[n.Name]; !dup {
					seen[n.Name] = time.Now()
				}
				seenMu.Unlock()
			}
		}
	}()
	sent := make([]time.Time, changes+1)
	tick := time.NewTicker(every)
	for i := 1; i <= changes; i++ {
		<-tick.C
		sent[i] = time.Now()
		if err := publishReport(ctx, cs, i, uids[i]); err != nil {
			t.Fatal(err)
		}
	}
	tick.Stop()
	var lat, apiLat, agentLat []time.Duration
	for i := 1; i <= changes; i++ {
		at, ok := k.wait(policyKey{desired.In, netip.PrefixFrom(cluster.IP(i), 32), self32}, sent[i], 30*time.Second)
		if !ok {
			t.Fatalf("inbound policy for %s never added: %+v", cluster.Name(i), a.Status())
		}
		lat = append(lat, at.Sub(sent[i]))
		seenMu.Lock()
		if s, ok := seen[cluster.Name(i)]; ok {
			apiLat, agentLat = append(apiLat, s.Sub(sent[i])), append(agentLat, at.Sub(s))
		}
		seenMu.Unlock()
	}
	for _, part := range []struct {
		what string
		d    []time.Duration
	}{{"patch to watch event", apiLat}, {"watch event to kernel", agentLat}} {
		if len(part.d) > 0 {
			slices.Sort(part.d)
			t.Logf("%s p50 %s p99 %s max %s (%d events)", part.what, part.d[len(part.d)/2], part.d[len(part.d)*99/100], part.d[len(part.d)-1], len(part.d))
		}
	}
	logTrend(t, "node stream", lat)
	latencies(prefix, lat)
	slices.Sort(lat)
	load, _ := os.ReadFile("/proc/loadavg")
	t.Logf("50 Node events/s, %d peers: p50 %s p99 %s max %s (loadavg %s)", peers, lat[len(lat)/2], lat[len(lat)*99/100], lat[len(lat)-1], strings.TrimSpace(string(load)))
	// Where the time goes: the agent's syncs and report writes over the whole run.
	rec := httptest.NewRecorder()
	a.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	for _, l := range strings.Split(rec.Body.String(), "\n") {
		if strings.HasPrefix(l, "secureoverlay_agent_sync_duration_seconds_sum") || strings.HasPrefix(l, "secureoverlay_agent_sync_duration_seconds_count") ||
			strings.HasPrefix(l, "secureoverlay_agent_report_writes_total") || strings.HasPrefix(l, "secureoverlay_agent_desired_updates_total") {
			t.Log(l)
		}
	}
	// The floor: the same stream once more with the agent stopped (each peer's report
	// changes its epoch), timed to the test's watch only — the API server, etcd and the
	// watch on this machine at this load, with no agent to wait for.
	stop()
	seenMu.Lock()
	clear(seen)
	seenMu.Unlock()
	tick = time.NewTicker(every)
	for i := 1; i <= changes; i++ {
		<-tick.C
		sent[i] = time.Now()
		name := cluster.Name(i)
		rep, _ := json.Marshal(watch.Report{NodeReport: api.NodeReport{Mode: api.ModeAccept, Incarnation: "boot-" + name, UID: uids[i], Epoch: "f-" + name}})
		patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]string{api.ReportAnnotation: string(rep)}}})
		if _, err := cs.CoreV1().Nodes().Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	tick.Stop()
	time.Sleep(time.Second)
	var floor []time.Duration
	seenMu.Lock()
	for i := 1; i <= changes; i++ {
		if s, ok := seen[cluster.Name(i)]; ok {
			floor = append(floor, s.Sub(sent[i]))
		}
	}
	seenMu.Unlock()
	if len(floor) > 0 {
		slices.Sort(floor)
		load, _ = os.ReadFile("/proc/loadavg")
		t.Logf("no agent: patch to watch event p50 %s p99 %s max %s (%d events; loadavg %s)", floor[len(floor)/2], floor[len(floor)*99/100], floor[len(floor)-1], len(floor), strings.TrimSpace(string(load)))
	}
}
