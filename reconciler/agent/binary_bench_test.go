//go:build linux

package agent_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/secureoverlay/secureoverlay/bench"
	"github.com/secureoverlay/secureoverlay/bench/cluster"
	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/conformance/spawn"
	"github.com/secureoverlay/secureoverlay/internal/testutil"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/xfrm"
)

// buildAgent builds ./cmd/secureoverlay-agent into a temporary directory.
func buildAgent(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "secureoverlay-agent")
	gobin := filepath.Join(runtime.GOROOT(), "bin", "go")
	if out, err := exec.Command(gobin, "build", "-o", bin, "github.com/secureoverlay/secureoverlay/cmd/secureoverlay-agent").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// procStatusKiB reads the kB fields of /proc/PID/status (VmRSS, VmHWM, ...).
func procStatusKiB(pid int) (map[string]float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return nil, err
	}
	out := map[string]float64{}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) == 3 && f[2] == "kB" {
			v, _ := strconv.ParseFloat(f[1], 64)
			out[strings.TrimSuffix(f[0], ":")] = v
		}
	}
	return out, nil
}

// parseMetrics maps "name{labels}" of a Prometheus text exposition to its value.
func parseMetrics(r io.Reader) map[string]float64 {
	out := map[string]float64{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		if l == "" || l[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(l, ' ')
		if i < 0 {
			continue
		}
		if v, err := strconv.ParseFloat(l[i+1:], 64); err == nil {
			out[l[:i]] = v
		}
	}
	return out
}

// sumMetric adds up every series of name whose labels contain all of labels.
func sumMetric(m map[string]float64, name string, labels ...string) float64 {
	var s float64
	for k, v := range m {
		if k != name && !strings.HasPrefix(k, name+"{") {
			continue
		}
		ok := true
		for _, l := range labels {
			ok = ok && strings.Contains(k, l)
		}
		if ok {
			s += v
		}
	}
	return s
}

// binaryMemory runs the real secureoverlay-agent binary for node 0 as its own process in
// a fresh network namespace against the populated API server (admin token, through a
// proxy on the namespace's loopback), with the shipped defaults except --external-mtu
// (the namespace has no uplink to detect it from). It measures the time from the start
// of the process to its first full sync (every peer's inbound policy written to the
// namespace's kernel and the sync finished), then samples its Go heap from its own
// /metrics and its RSS from /proc/PID/status once a second for 10 s, and stops it with
// SIGTERM.
//
// This host's kernel has no esp4/GCM: every xfrm state write fails. The agent still
// computes the whole desired state (Compute for all peers, every SA derived), writes
// every inbound policy (they need no SA), fails the sync with one error per SA, and
// retries with backoff, each retry re-listing the kernel and trying the SAs again. So the
// process holds the full informer caches and desired state, but not the applier's cache
// of SAs (nothing was added), and it carries the failure's error strings.
func binaryMemory(t *testing.T, bin string, c *kube.Cluster, nodes int) {
	binaryMemoryAs(t, bin, c, nodes, "memory.binary")
}

// binaryFigures are binaryMemoryAs's medians (MiB) and first-sync time.
type binaryFigures struct {
	RSS, RSSPeak, HeapAlloc, HeapAllocMin, HeapInuse, NextGC float64
	FirstSync                                                time.Duration
	Policies                                                 int
}

// binaryMemoryAs is binaryMemory with its BENCH lines named prefix+".rss" etc.; it
// returns the figures it printed.
func binaryMemoryAs(t *testing.T, bin string, c *kube.Cluster, nodes int, prefix string) binaryFigures {
	netns, err := testutil.LoopbackNS(t)
	if err != nil {
		t.Fatal(err)
	}
	addr := testutil.NSProxy(t, netns, strings.TrimPrefix(c.Host(), "https://"))
	kc := clientcmdapi.NewConfig()
	kc.Clusters["c"] = &clientcmdapi.Cluster{Server: "https://" + addr, CertificateAuthorityData: c.CAData()}
	kc.AuthInfos["u"] = &clientcmdapi.AuthInfo{Token: c.AdminConfig().BearerToken}
	kc.Contexts["x"] = &clientcmdapi.Context{Cluster: "c", AuthInfo: "u"}
	kc.CurrentContext = "x"
	dir := t.TempDir()
	kcPath := filepath.Join(dir, "kubeconfig")
	if err := clientcmd.WriteToFile(*kc, kcPath); err != nil {
		t.Fatal(err)
	}
	// A free port on the namespace's loopback for --metrics-addr.
	ml, err := testutil.InNS(netns, func() (net.Listener, error) { return net.Listen("tcp", "127.0.0.1:0") })
	if err != nil {
		t.Fatal(err)
	}
	metricsAddr := ml.Addr().String()
	ml.Close()

	logPath := filepath.Join(dir, "agent.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	// nsenter (no --fork) enters the namespace and execs the agent: the child's PID is
	// the agent's. spawn: own process group, SIGKILLed if the test binary dies.
	cmd := exec.Command("nsenter", "--net="+netns.Path(), "--", bin,
		"--kubeconfig", kcPath, "--node-name", cluster.Name(0), "--metrics-addr", metricsAddr, "--external-mtu", "1500", "--ledger-dir", t.TempDir(),
		"--state-file", filepath.Join(t.TempDir(), "dataplane.json"))
	cmd.Stdout, cmd.Stderr = logf, logf
	t0 := time.Now()
	if err := spawn.Start(cmd); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			_ = syscall.Kill(-pid, syscall.SIGKILL)
			<-exited
		}
		// SECUREOVERLAY_BENCH_AGENTLOG=1 prints the whole log (where the first sync's time
		// goes), a failure its tail.
		if whole := os.Getenv("SECUREOVERLAY_BENCH_AGENTLOG") == "1"; t.Failed() || whole {
			if b, err := os.ReadFile(logPath); err == nil {
				if len(b) > 8000 && !whole {
					b = b[len(b)-8000:]
				}
				t.Logf("agent log (tail):\n%s", b)
			}
		}
	})

	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: func(ctx context.Context, network, a string) (net.Conn, error) {
		return testutil.InNS(netns, func() (net.Conn, error) { return (&net.Dialer{}).DialContext(ctx, network, a) })
	}}}
	scrape := func() (map[string]float64, error) {
		resp, err := hc.Get("http://" + metricsAddr + "/metrics")
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		return parseMetrics(resp.Body), nil
	}

	// First full sync: every inbound policy written and a full sync counted (the sync
	// counter is bumped when the sync returns, after its kernel writes).
	var synced time.Duration
	var m map[string]float64
	for deadline := time.Now().Add(5 * time.Minute); ; time.Sleep(100 * time.Millisecond) {
		select {
		case err := <-exited:
			stopped = true
			t.Fatalf("agent exited before its first full sync: %v", err)
		default:
		}
		if m, err = scrape(); err == nil &&
			sumMetric(m, "secureoverlay_agent_kernel_writes_total", `object="policy"`, `op="add"`) >= float64(nodes-1) &&
			sumMetric(m, "secureoverlay_agent_syncs_total", `kind="full"`) >= 1 {
			synced = time.Since(t0)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no full sync within 5 minutes (last scrape error: %v)", err)
		}
	}
	st, err := procStatusKiB(pid)
	if err != nil {
		t.Fatal(err)
	}
	if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); !strings.HasPrefix(string(comm), "secureoverlay") {
		t.Fatalf("PID %d is %q, not the agent", pid, comm)
	}
	t.Logf("first full sync after %s: RSS %.0f MiB, %v syncs", synced.Round(time.Millisecond), st["VmRSS"]/1024, m["secureoverlay_agent_syncs_total{kind=\"full\",result=\"error\"}"])

	// 10 samples, 1 s apart.
	var rss, heapAlloc, heapInuse, nextGC []float64
	for range 10 {
		time.Sleep(time.Second)
		m, err = scrape()
		if err != nil {
			t.Fatal(err)
		}
		if st, err = procStatusKiB(pid); err != nil {
			t.Fatal(err)
		}
		rss = append(rss, st["VmRSS"]/1024)
		heapAlloc = append(heapAlloc, m["go_memstats_heap_alloc_bytes"]/(1<<20))
		heapInuse = append(heapInuse, m["go_memstats_heap_inuse_bytes"]/(1<<20))
		nextGC = append(nextGC, m["go_memstats_next_gc_bytes"]/(1<<20))
	}
	if heapInuse[0] == 0 {
		t.Fatal("the agent's /metrics has no go_memstats_heap_inuse_bytes")
	}
	policies, err := testutil.InNS(netns, xfrm.Netlink{}.ListPolicies)
	if err != nil {
		t.Fatal(err)
	}
	dp, ours := desired.Config{}.WithDefaults(), 0
	for _, p := range policies {
		if !p.Foreign && dp.OwnsPolicy(p.Policy) {
			ours++
		}
	}
	med := func(v []float64) float64 { s := slices.Clone(v); slices.Sort(s); return s[len(s)/2] }
	bench.Report(prefix+".first_sync", float64(synced.Milliseconds())/1000, "s")
	bench.Report(prefix+".rss", med(rss), "MiB")
	bench.Report(prefix+".rss_peak", st["VmHWM"]/1024, "MiB")
	t.Logf("at the end: RSS %.0f MiB = anonymous %.0f + file %.0f (the binary's pages) + shmem %.0f", st["VmRSS"]/1024, st["RssAnon"]/1024, st["RssFile"]/1024, st["RssShmem"]/1024)
	bench.Report(prefix+".heap_alloc", med(heapAlloc), "MiB")
	bench.Report(prefix+".heap_alloc_min", slices.Min(heapAlloc), "MiB")
	bench.Report(prefix+".heap_inuse", med(heapInuse), "MiB")
	bench.Report(prefix+".next_gc", med(nextGC), "MiB")
	bench.Report(prefix+".policies", float64(ours), "count")
	bench.Report(prefix+".state_writes_ok", sumMetric(m, "secureoverlay_agent_kernel_writes_total", `object="state"`), "count")
	bench.Report(prefix+".failed_syncs", sumMetric(m, "secureoverlay_agent_syncs_total", `result="error"`), "count")
	bench.Report(prefix+".ok_syncs", sumMetric(m, "secureoverlay_agent_syncs_total", `result="ok"`), "count")

	// What one SA add costs this host when it fails (no esp4/GCM: every add of the first
	// sync fails), measured in the same namespace: the part of the first sync a kernel
	// with ESP would spend on successful adds instead.
	perAdd := failedSAAdd(t, netns)
	bench.Report(prefix+".failed_sa_add", float64(perAdd.Nanoseconds())/1000, "µs")

	fig := binaryFigures{RSS: med(rss), RSSPeak: st["VmHWM"] / 1024, HeapAlloc: med(heapAlloc), HeapAllocMin: slices.Min(heapAlloc),
		HeapInuse: med(heapInuse), NextGC: med(nextGC), FirstSync: synced, Policies: ours}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		stopped = true
		if err != nil {
			t.Errorf("exit after SIGTERM: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Error("no exit within 30 s of SIGTERM")
	}
	// What the failed syncs did (the log holds no key material: SAs print redacted).
	if b, err := os.ReadFile(logPath); err == nil {
		var failed, unpublished int
		var why string
		msgs := map[string][2]int{} // msg → lines, bytes
		for _, l := range strings.Split(string(b), "\n") {
			if i := strings.Index(l, " msg="); i >= 0 {
				m := l[i+5:]
				if strings.HasPrefix(m, `"`) {
					m, _, _ = strings.Cut(m[1:], `"`)
				} else {
					m, _, _ = strings.Cut(m, " ")
				}
				x := msgs[m]
				msgs[m] = [2]int{x[0] + 1, x[1] + len(l)}
			}
			if strings.Contains(l, "sync failed") {
				failed++
			}
			if strings.Contains(l, "cannot publish the sync error") {
				unpublished++
				if i := strings.LastIndex(l, "error="); i >= 0 && why == "" {
					why = l[i:min(len(l), i+300)]
				}
			}
		}
		t.Logf("agent log: %d bytes, %d \"sync failed\" lines, %d unpublished sync errors (%s)", len(b), failed, unpublished, why)
		t.Logf("agent log by message (lines, bytes): %v", msgs)
	}
	return fig
}

// failedSAAdd times SA adds of the agent's kind (transport ESP, rfc4106(gcm(aes)), 8-byte
// ICV) in netns, where this host's kernel refuses them, and returns the median time of
// one over 5 rounds of 500 (fresh SPIs; a zero key: nothing is installed).
func failedSAAdd(t *testing.T, n ns.NetNS) time.Duration {
	t.Helper()
	rounds, err := testutil.InNS(n, func() ([]time.Duration, error) {
		h, err := netlink.NewHandle(unix.NETLINK_XFRM)
		if err != nil {
			return nil, err
		}
		defer h.Close()
		var out []time.Duration
		spi := 0x7f000000
		for range 5 {
			t0 := time.Now()
			for range 500 {
				spi++
				st := &netlink.XfrmState{Src: net.IPv4(198, 18, 0, 2), Dst: net.IPv4(198, 18, 0, 1), Proto: netlink.XFRM_PROTO_ESP,
					Mode: netlink.XFRM_MODE_TRANSPORT, Spi: spi, Reqid: 1, Aead: &netlink.XfrmStateAlgo{Name: "rfc4106(gcm(aes))", Key: make([]byte, 20), ICVLen: 64}}
				if err := h.XfrmStateAdd(st); err == nil {
					return nil, errors.New("an SA add succeeded: this kernel has ESP (the figure would not be a failed add's)")
				}
			}
			out = append(out, time.Since(t0)/500)
		}
		return out, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(rounds)
	return rounds[len(rounds)/2]
}
