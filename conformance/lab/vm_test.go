package lab

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// VM tier: every test below shares one guest (a boot costs tens of seconds
// under TCG). Tests that build a Cluster tear it down before and after.

var shared struct {
	once     sync.Once
	vm       *VM
	err      error
	roDir    string
	rwDir    string
	fwdPort  int
	fwdLn    net.Listener
	skipNote string
}

func TestMain(m *testing.M) {
	code := m.Run()
	if shared.vm != nil {
		_ = shared.vm.Close()
	}
	if shared.fwdLn != nil {
		shared.fwdLn.Close()
	}
	for _, d := range []string{shared.roDir, shared.rwDir} {
		if d != "" {
			os.RemoveAll(d)
		}
	}
	os.Exit(code)
}

// echoServer answers each line on a loopback port with "echo: LINE".
func echoServer() (net.Listener, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(time.Minute))
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					fmt.Fprintf(c, "echo: %s\n", sc.Text())
				}
			}()
		}
	}()
	return ln, nil
}

func sharedVM(t *testing.T) *VM {
	t.Helper()
	opts := Options{GuestForwards: []GuestForward{{GuestPort: 6443}}}
	SkipUnlessAvailable(t, opts)
	shared.once.Do(func() {
		var err error
		if shared.roDir, err = os.MkdirTemp("", "lab-ro-"); err == nil {
			shared.rwDir, err = os.MkdirTemp("", "lab-rw-")
		}
		if err == nil {
			err = os.WriteFile(filepath.Join(shared.roDir, "hello.txt"), []byte("from the host\n"), 0o644)
		}
		if err == nil {
			shared.fwdLn, err = echoServer()
		}
		if err != nil {
			shared.err = err
			return
		}
		shared.fwdPort = shared.fwdLn.Addr().(*net.TCPAddr).Port
		opts.GuestForwards[0].HostPort = shared.fwdPort
		opts.Shares = append(StandardShares(),
			Share{Tag: "ro", HostPath: shared.roDir, GuestPath: "/mnt/ro"},
			Share{Tag: "rw", HostPath: shared.rwDir, GuestPath: "/mnt/rw", Writable: true},
		)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		shared.vm, shared.err = Boot(ctx, opts)
		if shared.err == nil {
			t.Logf("lab vm booted in %s (accel %s, kernel %s)", shared.vm.BootDuration.Round(time.Millisecond), shared.vm.Accel, shared.vm.KernelRelease)
		}
	})
	if shared.err != nil {
		t.Fatalf("boot shared lab vm: %v", shared.err)
	}
	if !shared.vm.Alive() {
		t.Fatalf("shared lab vm died; console tail:\n%s", shared.vm.ConsoleTail(40))
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("lab console (last 40 lines):\n%s", shared.vm.ConsoleTail(40))
		}
	})
	return shared.vm
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func mustRun(t *testing.T, vm *VM, cmd string) string {
	t.Helper()
	out, _, err := vm.Run(ctxFor(t, 2*time.Minute), cmd)
	if err != nil {
		t.Fatalf("guest: %s: %v", firstWord(cmd), err)
	}
	return out
}

func firstWord(s string) string {
	if f := strings.Fields(s); len(f) > 0 {
		return f[0]
	}
	return s
}

func TestGuestCommandChannel(t *testing.T) {
	vm := sharedVM(t)
	ctx := ctxFor(t, time.Minute)

	out, errOut, err := vm.Run(ctx, "echo out; echo err >&2; exit 0")
	if err != nil || out != "out\n" || errOut != "err\n" {
		t.Fatalf("Run = %q, %q, %v", out, errOut, err)
	}
	_, _, err = vm.Run(ctx, "echo failing >&2; exit 7")
	var ee *ExitError
	if !errors.As(err, &ee) || ee.Code != 7 || !strings.Contains(ee.Error(), "failing") {
		t.Fatalf("exit 7: err = %v", err)
	}
	out, _, err = vm.RunInput(ctx, "tr a-z A-Z", []byte("stdin reaches the guest"))
	if err != nil || out != "STDIN REACHES THE GUEST" {
		t.Fatalf("RunInput = %q, %v", out, err)
	}
	// A background child holding stdout open does not hang the answer.
	start := time.Now()
	if _, _, err := vm.Run(ctx, "sleep 30 & echo started"); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("a backgrounded child held the answer for %s", d)
	}
	// The context deadline becomes the guest-side timeout.
	short, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	start = time.Now()
	if _, _, err := vm.Run(short, "sleep 60"); err == nil {
		t.Fatal("sleep 60 under a 2 s deadline succeeded")
	}
	if d := time.Since(start); d > 20*time.Second {
		t.Errorf("a 2 s deadline took %s to fire", d)
	}
	if out := mustRun(t, vm, "echo alive"); out != "alive\n" {
		t.Fatalf("channel broken after a timeout: %q", out)
	}
}

func TestGuestHasTheDataPlaneTools(t *testing.T) {
	vm := sharedVM(t)
	checks := map[string]string{
		"ip -V":                      "iproute2",
		"ping -V":                    "iputils",
		"iptables -V":                "nf_tables",
		"iptables-legacy -V":         "legacy",
		"tcpdump --version 2>&1":     "libpcap",
		"command -v modprobe":        "/sbin/modprobe",
		"readlink -f /sbin/modprobe": "kmod",
		"uname -r":                   vm.KernelRelease,
	}
	for cmd, want := range checks {
		if out := mustRun(t, vm, cmd); !strings.Contains(out, want) {
			t.Errorf("%s: %q lacks %q", cmd, out, want)
		}
	}
	crypto := mustRun(t, vm, "grep '^name' /proc/crypto")
	for _, alg := range []string{"rfc4106(gcm(aes))", "stdrng", "jitterentropy_rng"} {
		if !strings.Contains(crypto, alg) {
			t.Errorf("/proc/crypto lacks %s", alg)
		}
	}
	// Loaded as a module, or built into the kernel (6.12 builds drbg in).
	mods := mustRun(t, vm, "cut -d' ' -f1 /proc/modules")
	builtin := mustRun(t, vm, "cat /lib/modules/$(uname -r)/modules.builtin")
	for _, m := range []string{"esp4", "ipip", "xfrm_user", "gcm", "seqiv", "drbg", "veth", "xt_policy", "nft_compat"} {
		if !regexp.MustCompile(`(?m)^`+m+`$`).MatchString(mods) && !regexp.MustCompile(`(?m)/`+m+`\.ko$`).MatchString(builtin) {
			t.Errorf("module %s neither loaded nor built in", m)
		}
	}
	if bad := mustRun(t, vm, "dmesg | grep -E 'self-tests .* failed|MODULES FAILED' || true"); bad != "" {
		t.Errorf("boot problems:\n%s", bad)
	}
	// The policy match works through both iptables backends.
	for _, ipt := range []string{"iptables-nft", "iptables-legacy"} {
		mustRun(t, vm, ipt+" -w -t mangle -N lab-probe && "+ipt+" -w -t mangle -A lab-probe -p 4 -m policy --dir out --pol none -m comment --comment lab -j MARK --set-xmark 0x100000/0x100000 && "+
			ipt+" -w -t mangle -F lab-probe && "+ipt+" -w -t mangle -X lab-probe")
	}
}

func TestForwardsAndShares(t *testing.T) {
	vm := sharedVM(t)
	// guestfwd: the guest reaches a host loopback service, twice (one relay per connection).
	for i := 0; i < 2; i++ {
		out := mustRun(t, vm, fmt.Sprintf("echo ping%d | nc -w 5 %s 6443", i, GuestForwardAddr))
		if out != fmt.Sprintf("echo: ping%d\n", i) {
			t.Fatalf("guest forward answer %d = %q", i, out)
		}
	}
	// Nothing else outside is reachable: no default route.
	if out := mustRun(t, vm, "ip route show default"); out != "" {
		t.Errorf("guest has a default route: %q", out)
	}
	if out := mustRun(t, vm, "cat /mnt/ro/hello.txt"); out != "from the host\n" {
		t.Errorf("read-only share: %q", out)
	}
	if _, _, err := vm.Run(ctxFor(t, time.Minute), "echo x > /mnt/ro/new 2>/dev/null"); err == nil {
		t.Error("wrote to a read-only share")
	}
	mustRun(t, vm, "echo from the guest > /mnt/rw/out.txt && sync")
	if b, err := os.ReadFile(filepath.Join(shared.rwDir, "out.txt")); err != nil || string(b) != "from the guest\n" {
		t.Errorf("writable share: %q, %v", b, err)
	}
}

// espScript programs ESP transport mode on IPIP (IP proto 4) between every
// pair of the first n nodes, with a fresh random AES-128-GCM key (+ 4-byte
// salt) per direction, generated in the guest and never echoed.
func espScript(n, icvBits int) string {
	var b strings.Builder
	b.WriteString("set -eu\n")
	for i := 1; i <= n; i++ {
		for j := 1; j <= n; j++ {
			if i == j {
				continue
			}
			src, dst := NodeIP(i), NodeIP(j)
			spi := 0x1000 + i*16 + j
			fmt.Fprintf(&b, "key=0x$(od -An -tx1 -N20 /dev/urandom | tr -d ' \\n')\n")
			fmt.Fprintf(&b, "[ ${#key} -eq 42 ]\n")
			for _, ns := range []string{NodeNS(i), NodeNS(j)} {
				fmt.Fprintf(&b, "ip -n %s xfrm state add src %s dst %s proto esp spi 0x%x reqid 1 mode transport replay-window 1024 flag esn aead 'rfc4106(gcm(aes))' \"$key\" %d\n",
					ns, src, dst, spi, icvBits)
			}
			fmt.Fprintf(&b, "ip -n %s xfrm policy add src %s/32 dst %s/32 proto 4 dir out tmpl src %s dst %s proto esp mode transport reqid 1\n",
				NodeNS(i), src, dst, src, dst)
			fmt.Fprintf(&b, "ip -n %s xfrm policy add src %s/32 dst %s/32 proto 4 dir in tmpl src %s dst %s proto esp mode transport reqid 1\n",
				NodeNS(j), src, dst, src, dst)
		}
	}
	b.WriteString("unset key\n")
	return b.String()
}

func setupCluster(t *testing.T, vm *VM, c Cluster) {
	t.Helper()
	ctx := ctxFor(t, 3*time.Minute)
	if err := c.Teardown(ctx, vm); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := c.Setup(ctx, vm); err != nil {
		t.Fatal(err)
	}
	t.Logf("cluster of %d nodes (underlay MTU %d, tunnel MTU %d) set up in %s", c.Nodes, c.UnderlayMTU, c.TunnelMTU, time.Since(start).Round(time.Millisecond))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := c.Teardown(ctx, vm); err != nil {
			t.Error(err)
		}
	})
}

// pingAll sends count echo requests from every pod to every other pod (labping: it waits
// for every reply, up to 30 s after the last request) and fails unless all are answered.
func pingAll(t *testing.T, vm *VM, nodes, count int) {
	t.Helper()
	for i := 1; i <= nodes; i++ {
		for j := 1; j <= nodes; j++ {
			if i == j {
				continue
			}
			e, err := Echo(ctxFor(t, time.Minute), vm, PodNS(i), PodIP(j), EchoOptions{Count: count, Interval: 200 * time.Millisecond})
			if err != nil {
				t.Fatalf("pod%d -> pod%d: %v", i, j, err)
			}
			if lost := e.Lost(); len(lost) != 0 {
				var why []string
				for _, q := range lost {
					why = append(why, fmt.Sprintf("seq %d %s", q, e.Why(q)))
				}
				t.Fatalf("pod%d -> pod%d: %d of %d requests unanswered: %s", i, j, len(lost), count, strings.Join(why, "; "))
			}
		}
	}
}

// dfEcho sends count DF echo requests of size bytes (IP), 0.3 s apart, from pod namespace
// ns to dst with labping (-M do: never fragmented locally), which waits for every reply.
func dfEcho(t *testing.T, vm *VM, ns, dst string, size, count int) Echoes {
	t.Helper()
	e, err := Echo(ctxFor(t, time.Minute), vm, ns, dst, EchoOptions{Count: count, Interval: 300 * time.Millisecond, Size: size - 28, DF: true})
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// refusedMTU is the path MTU an ICMP "fragmentation needed" named for one of e's
// requests, or 0.
func refusedMTU(e Echoes) int {
	for _, why := range e.ICMPErrors {
		if m := fragNeededRE.FindStringSubmatch(why); m != nil {
			n, _ := strconv.Atoi(m[1])
			return n
		}
	}
	return 0
}

func describe(e Echoes) string {
	var why []string
	for _, q := range e.Lost() {
		why = append(why, fmt.Sprintf("seq %d: %s", q, e.Why(q)))
	}
	sum := fmt.Sprintf("%d of %d answered", e.Answered(), e.Requests())
	if len(why) > 0 {
		sum += " (" + strings.Join(why, "; ") + ")"
	}
	return sum
}

// captureDuring captures on the underlay bridge while f runs and returns the capture and
// the kernel's per-port wire counts over the same time. A capture that dropped packets is
// logged (its counts are then not evidence: callers check complete before using them).
func captureDuring(t *testing.T, vm *VM, f func()) (c *Capture, wire WireCounts, complete bool) {
	t.Helper()
	ctx := ctxFor(t, 2*time.Minute)
	w, err := StartWireCount(ctx, vm, UnderlayNS, UnderlayBridge)
	if err != nil {
		t.Fatal(err)
	}
	c, err = StartCapture(ctx, vm, UnderlayNS, UnderlayBridge)
	if err != nil {
		t.Fatal(err)
	}
	f()
	dropped, err := c.Stop(ctx)
	if err != nil {
		t.Fatal(err)
	}
	per, err := w.Read(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if dropped != 0 {
		t.Logf("the capture dropped %d packets: its counts are not evidence (the kernel's wire counters are)", dropped)
	}
	return c, Total(per), dropped == 0
}

func count(t *testing.T, c *Capture, filter string) int {
	t.Helper()
	n, err := c.Count(ctxFor(t, time.Minute), filter)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestESPTransportOverIPIP is the data plane the agent will program, done by
// hand: pod-to-pod traffic between three Calico-style nodes crosses the
// underlay as ESP only, and the SA counters account for it.
func TestESPTransportOverIPIP(t *testing.T) {
	vm := sharedVM(t)
	const nodes, pings = 3, 3
	c := Cluster{Nodes: nodes, UnderlayMTU: 1450, TunnelMTU: 1402, Pods: true}
	setupCluster(t, vm, c)

	// Baseline: without xfrm the same traffic is plaintext IPIP, so the wire counters
	// (and the capture) below can see plaintext when there is any.
	start := time.Now()
	plain, w, complete := captureDuring(t, vm, func() { pingAll(t, vm, nodes, pings) })
	wantPackets := uint64(nodes * (nodes - 1) * pings * 2) // requests and replies
	t.Logf("without ESP: %d IPIP, %d ESP packets on the underlay (kernel counters; %s)", w.IPIP, w.ESP, time.Since(start).Round(time.Millisecond))
	if w.IPIP != wantPackets || w.ESP != 0 {
		t.Fatalf("baseline: %d IPIP and %d ESP packets, want %d and 0", w.IPIP, w.ESP, wantPackets)
	}
	if complete {
		if ipip, esp := count(t, plain, "ip proto 4"), count(t, plain, "ip proto 50"); uint64(ipip) != w.IPIP || uint64(esp) != w.ESP {
			t.Errorf("baseline: the capture saw %d IPIP and %d ESP, the kernel counted %d and %d", ipip, esp, w.IPIP, w.ESP)
		}
	}

	mustRun(t, vm, espScript(nodes, 64))
	start = time.Now()
	enc, w, complete := captureDuring(t, vm, func() { pingAll(t, vm, nodes, pings) })
	t.Logf("with ESP: %d IPIP, %d ESP packets on the underlay (kernel counters; %s)", w.IPIP, w.ESP, time.Since(start).Round(time.Millisecond))
	if w.IPIP != 0 {
		t.Errorf("%d plaintext IPIP packets crossed the underlay with ESP programmed", w.IPIP)
	}
	if w.ESP != wantPackets {
		t.Errorf("%d ESP packets on the underlay, want %d", w.ESP, wantPackets)
	}
	// Every programmed SPI appears on the wire: only a capture that saw every packet can
	// show it.
	if !complete {
		t.Fatal("the capture dropped packets: it cannot show the SPIs on the wire")
	}
	if ipip, esp := count(t, enc, "ip proto 4"), count(t, enc, "ip proto 50"); uint64(ipip) != w.IPIP || uint64(esp) != w.ESP {
		t.Errorf("with ESP: the capture saw %d IPIP and %d ESP, the kernel counted %d and %d", ipip, esp, w.IPIP, w.ESP)
	}
	lines, err := enc.Packets(ctxFor(t, time.Minute), "ip proto 50")
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]int{}
	for _, l := range lines {
		if m := regexp.MustCompile(`ESP\(spi=(0x[0-9a-f]+),`).FindStringSubmatch(l); m != nil {
			seen[m[1]]++
		}
	}
	if len(seen) != nodes*(nodes-1) {
		t.Errorf("ESP packets carry SPIs %v, want %d distinct", seen, nodes*(nodes-1))
	}

	// The kernel accounts for every packet in both directions of every SA.
	for i := 1; i <= nodes; i++ {
		sas, err := XfrmStates(ctxFor(t, time.Minute), vm, NodeNS(i))
		if err != nil {
			t.Fatal(err)
		}
		if len(sas) != 2*(nodes-1) {
			t.Fatalf("node%d has %d SAs, want %d", i, len(sas), 2*(nodes-1))
		}
		for _, sa := range sas {
			t.Logf("node%d SA %s->%s spi 0x%x: %d packets, %d bytes, seq %d, oseq %d", i, sa.Src, sa.Dst, sa.SPI, sa.Packets, sa.Bytes, sa.Seq, sa.OSeq)
			if sa.Mode != "transport" || !sa.ESN || sa.ReplayWindow != 1024 {
				t.Errorf("node%d SA spi 0x%x: mode %s esn %v window %d", i, sa.SPI, sa.Mode, sa.ESN, sa.ReplayWindow)
			}
			if sa.Packets != 2*pings {
				t.Errorf("node%d SA spi 0x%x counted %d packets, want %d", i, sa.SPI, sa.Packets, 2*pings)
			}
			if sa.IntegrityFailed != 0 || sa.ReplayDrops != 0 {
				t.Errorf("node%d SA spi 0x%x: %d integrity failures, %d replay drops", i, sa.SPI, sa.IntegrityFailed, sa.ReplayDrops)
			}
		}
	}
	if out := mustRun(t, vm, "for n in node1 node2 node3; do ip netns exec $n cat /proc/net/xfrm_stat; done | awk '$2 != 0'"); out != "" {
		t.Errorf("xfrm errors counted:\n%s", out)
	}
}

var fragNeededRE = regexp.MustCompile(`fragmentation needed, mtu (\d+)`)

// TestMTUTruth checks DESIGN §2 against the kernel: with an underlay MTU of
// 1450 and an 8-byte ICV, the documented rule's 1404 is 2 bytes too big, the
// kernel-exact 1402 crosses, and the kernel itself reports 1402.
func TestMTUTruth(t *testing.T) {
	vm := sharedVM(t)
	const documented, exact = 1404, 1402
	c := Cluster{Nodes: 2, UnderlayMTU: 1450, TunnelMTU: documented, Pods: true}
	setupCluster(t, vm, c)
	// Without ESP a 1404-byte DF packet fits IPIP on a 1450 underlay: it is
	// ESP that the rule undercounts.
	if e := dfEcho(t, vm, PodNS(1), PodIP(2), documented, 2); e.Answered() != 2 {
		t.Fatalf("plain IPIP: a %d-byte DF packet did not cross: %s", documented, describe(e))
	}
	mustRun(t, vm, espScript(2, 64))

	var big, fit Echoes
	cross, w, complete := captureDuring(t, vm, func() {
		big = dfEcho(t, vm, PodNS(1), PodIP(2), documented, 2)
		fit = dfEcho(t, vm, PodNS(1), PodIP(2), exact, 2)
	})
	if big.Answered() != 0 {
		t.Errorf("a %d-byte DF packet crossed ESP on a 1450 underlay: %s", documented, describe(big))
	}
	if m := refusedMTU(big); m != exact {
		t.Errorf("kernel did not report path MTU %d for the %d-byte packet: %s", exact, documented, describe(big))
	} else {
		t.Logf("%d-byte DF packet refused, kernel path MTU %d (%s)", documented, m, describe(big))
	}
	if fit.Answered() != 2 {
		t.Errorf("a %d-byte DF packet did not cross: %s", exact, describe(fit))
	}
	if w.IPIP != 0 {
		t.Errorf("%d plaintext IPIP packets on the underlay (kernel counters)", w.IPIP)
	}
	// Wire size of the 1402-byte packets: 20 + 8 + 8 + 1404 + 8 = 1448.
	if !complete {
		t.Fatal("the capture dropped packets: it cannot show the packets' sizes on the wire")
	}
	sized, err := cross.Packets(ctxFor(t, time.Minute), "ip proto 50 and ip[2:2] = 1448")
	if err != nil {
		t.Fatal(err)
	}
	if len(sized) != 4 {
		t.Errorf("want 4 ESP packets of 1448 bytes (2 requests, 2 replies), got %d", len(sized))
	}
	if n := count(t, cross, "ip proto 4 or ip[2:2] > 1450"); n != 0 {
		t.Errorf("%d plaintext or oversized packets on the underlay", n)
	}
}

// TestKernelESPMTU pins DESIGN §2's kernel-exact rule, largest pod/tunnel MTU
// = ((EXTMTU - 36 - ICV) & ~3) - 2, against what the kernel itself reports
// (the path MTU in the ICMP "fragmentation needed" for a too-big DF packet),
// across ICV sizes and every EXTMTU residue mod 4, and checks that a packet of
// exactly that size crosses while one byte more does not.
func TestKernelESPMTU(t *testing.T) {
	vm := sharedVM(t)
	cases := []struct{ ext, icv int }{
		{1450, 8}, {1451, 8}, {1453, 8}, {1500, 8}, {1500, 16}, {1451, 12},
	}
	for _, tc := range cases {
		t.Run(fmt.Sprintf("ext%d_icv%d", tc.ext, tc.icv), func(t *testing.T) {
			exact := ((tc.ext - 36 - tc.icv) &^ 3) - 2
			c := Cluster{Nodes: 2, UnderlayMTU: tc.ext, TunnelMTU: tc.ext - 20, Pods: true}
			setupCluster(t, vm, c)
			mustRun(t, vm, espScript(2, tc.icv*8))
			e := dfEcho(t, vm, PodNS(1), PodIP(2), c.TunnelMTU, 1)
			if e.Answered() != 0 {
				t.Fatalf("a %d-byte DF packet crossed ESP on a %d underlay", c.TunnelMTU, tc.ext)
			}
			if m := refusedMTU(e); m != exact {
				t.Fatalf("kernel path MTU for ICV %d on %d: got %d, rule says %d (%s)", tc.icv, tc.ext, m, exact, describe(e))
			}
			if e := dfEcho(t, vm, PodNS(1), PodIP(2), exact, 1); e.Answered() != 1 {
				t.Errorf("a %d-byte DF packet did not cross: %s", exact, describe(e))
			}
			if e := dfEcho(t, vm, PodNS(1), PodIP(2), exact+1, 1); e.Answered() != 0 {
				t.Errorf("a %d-byte DF packet crossed, one more than the rule allows", exact+1)
			}
			t.Logf("EXTMTU %d, ICV %d: kernel path MTU %d = rule; documented rule %d", tc.ext, tc.icv, exact, tc.ext-46-(tc.ext-46)%4)
		})
	}
}

// TestControlPlaneReachesHostServices: node namespaces reach a host loopback
// service (as agents will reach the test API server) over the management
// link, never over the underlay, and Teardown removes what Setup added.
func TestControlPlaneReachesHostServices(t *testing.T) {
	vm := sharedVM(t)
	c := Cluster{Nodes: 2, UnderlayMTU: 1450, TunnelMTU: 1402, ControlPlane: true}
	setupCluster(t, vm, c)
	ul, _, complete := captureDuring(t, vm, func() {
		for i := 1; i <= c.Nodes; i++ {
			out := mustRun(t, vm, fmt.Sprintf("echo node%d | ip netns exec %s nc -w 5 %s 6443", i, NodeNS(i), GuestForwardAddr))
			if out != fmt.Sprintf("echo: node%d\n", i) {
				t.Errorf("node%d -> host service: %q", i, out)
			}
		}
	})
	if !complete {
		t.Fatal("the capture dropped packets: it cannot show that no control-plane packet crossed the underlay")
	}
	if n := count(t, ul, "host "+GuestForwardAddr); n != 0 {
		t.Errorf("%d control-plane packets crossed the underlay", n)
	}
	ctx := ctxFor(t, time.Minute)
	if err := c.Teardown(ctx, vm); err != nil {
		t.Fatal(err)
	}
	if out := mustRun(t, vm, "ip -br link show type bridge; iptables -w -t nat -S POSTROUTING | grep lab-control-plane || true"); out != "" {
		t.Errorf("teardown left:\n%s", out)
	}
}

// TestStandardShares: the host's CNI plugins are visible and run in the
// guest, and our binaries directory is mounted. (Its listing is not compared:
// a concurrent `make build` may change it.)
func TestStandardShares(t *testing.T) {
	vm := sharedVM(t)
	for _, s := range StandardShares() {
		got := strings.Fields(mustRun(t, vm, "ls -A "+s.GuestPath+" && grep -q ' "+s.GuestPath+" 9p ' /proc/mounts"))
		if s.GuestPath == GuestCNIDir {
			entries, err := os.ReadDir(s.HostPath)
			if err != nil {
				t.Fatal(err)
			}
			var want []string
			for _, e := range entries {
				want = append(want, e.Name())
			}
			if strings.Join(got, " ") != strings.Join(want, " ") {
				t.Errorf("share %s: guest sees %v, host has %v", s.Tag, got, want)
			}
			out := mustRun(t, vm, `echo '{"cniVersion":"1.0.0"}' | CNI_COMMAND=VERSION `+GuestCNIDir+`/ptp`)
			if !strings.Contains(out, `"supportedVersions"`) {
				t.Errorf("ptp VERSION in the guest: %q", out)
			}
		}
	}
	if len(StandardShares()) == 0 {
		t.Skip("neither a bin dir nor CNI plugins on this host")
	}
}

// xfrmStat returns one namespace's /proc/net/xfrm_stat as a map.
func xfrmStat(t *testing.T, vm *VM, ns string) map[string]int {
	t.Helper()
	out := mustRun(t, vm, "ip netns exec "+ns+" cat /proc/net/xfrm_stat")
	m := map[string]int{}
	for _, l := range strings.Split(out, "\n") {
		var k string
		var v int
		if n, _ := fmt.Sscanf(l, "%s %d", &k, &v); n == 2 {
			m[k] = v
		}
	}
	if len(m) == 0 {
		t.Fatalf("%s: empty /proc/net/xfrm_stat", ns)
	}
	return m
}

// TestInboundPolicyLevels records the kernel facts the enable/disable cutover
// (DESIGN §4) builds on. node1 encrypts to node2, node2 still sends plaintext
// IPIP to node1, and node1's inbound policy for proto 4 from node2 is absent,
// `level use`, or required (the default): the first two accept the plaintext
// (while node1's replies leave as ESP, and node2's required policy accepts
// them), the last drops it and counts XfrmInTmplMismatch.
// (A transport template's reqid must equal the states' reqid: a template
// without one matches only reqid-0 states and output fails XfrmOutNoStates.)
func TestInboundPolicyLevels(t *testing.T) {
	vm := sharedVM(t)
	for _, tc := range []struct {
		name, level string // level "" = no inbound policy on node1
		plainPasses bool
	}{
		{"no-inbound-policy", "", true},
		{"level-use", "level use", true},
		{"level-required", "level required", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Cluster{Nodes: 2, UnderlayMTU: 1450, TunnelMTU: 1402, Pods: true}
			setupCluster(t, vm, c)
			// SAs both ways, but only node1 -> node2 has an outbound policy.
			script := espScript(2, 64)
			var kept []string
			for _, l := range strings.Split(script, "\n") {
				if strings.Contains(l, "xfrm policy add") {
					continue
				}
				kept = append(kept, l)
			}
			kept = append(kept,
				fmt.Sprintf("ip -n node1 xfrm policy add src %s/32 dst %s/32 proto 4 dir out tmpl proto esp mode transport reqid 1", NodeIP(1), NodeIP(2)),
				fmt.Sprintf("ip -n node2 xfrm policy add src %s/32 dst %s/32 proto 4 dir in tmpl proto esp mode transport reqid 1", NodeIP(1), NodeIP(2)))
			if tc.level != "" {
				kept = append(kept, fmt.Sprintf("ip -n node1 xfrm policy add src %s/32 dst %s/32 proto 4 dir in tmpl proto esp mode transport reqid 1 %s", NodeIP(2), NodeIP(1), tc.level))
			}
			mustRun(t, vm, strings.Join(kept, "\n"))
			before := xfrmStat(t, vm, NodeNS(1))
			var e Echoes
			var err error
			wire, err := StartWireCount(ctxFor(t, time.Minute), vm, UnderlayNS, UnderlayBridge)
			if err != nil {
				t.Fatal(err)
			}
			// labping waits for every reply (up to 2 s after the last request), so a late
			// reply is neither missed nor counted as a refusal.
			e, err = Echo(ctxFor(t, time.Minute), vm, PodNS(2), PodIP(1), EchoOptions{Count: 3, Interval: 200 * time.Millisecond, Linger: 2 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			w, err := wire.Read(ctxFor(t, time.Minute))
			if err != nil {
				t.Fatal(err)
			}
			after := xfrmStat(t, vm, NodeNS(1))
			plainIn := w["ul2"].IPIP // node2 → node1 (the only other node)
			espOut := w["ul1"].ESP
			mismatch := after["XfrmInTmplMismatch"] - before["XfrmInTmplMismatch"]
			t.Logf("plaintext IPIP node2->node1: %d, ESP node1->node2: %d (kernel wire counters), XfrmInTmplMismatch +%d, %d of 3 answered", plainIn, espOut, mismatch, e.Answered())
			if plainIn != 3 {
				t.Errorf("want 3 plaintext IPIP requests from node2, saw %d", plainIn)
			}
			if tc.plainPasses {
				if e.Answered() != 3 {
					t.Errorf("plaintext was not accepted: %d of 3 answered", e.Answered())
				}
				if espOut != 3 || mismatch != 0 {
					t.Errorf("want 3 ESP replies and no mismatch, got %d and %d", espOut, mismatch)
				}
			} else {
				if e.Answered() != 0 {
					t.Errorf("plaintext crossed a required inbound policy: %d of 3 answered", e.Answered())
				}
				if espOut != 0 || mismatch != 3 {
					t.Errorf("want 0 replies and 3 XfrmInTmplMismatch, got %d and %d", espOut, mismatch)
				}
			}
		})
	}
}

func TestBackgroundProcessesAndFiles(t *testing.T) {
	vm := sharedVM(t)
	ctx := ctxFor(t, time.Minute)
	if err := vm.WriteFile(ctx, "/tmp/lab-bg/script.sh", []byte("echo hello from bg\nexec sleep 300\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := vm.ReadFile(ctx, "/tmp/lab-bg/script.sh")
	if err != nil || !strings.HasPrefix(string(b), "echo hello") {
		t.Fatalf("ReadFile = %q, %v", b, err)
	}
	if out := mustRun(t, vm, "stat -c %a /tmp/lab-bg/script.sh"); out != "755\n" {
		t.Errorf("mode %q", out)
	}
	pid, err := vm.Background(ctx, "/tmp/lab-bg/script.sh", "/tmp/lab-bg/log")
	if err != nil {
		t.Fatal(err)
	}
	// The process survives the Run that started it and writes its log.
	deadline := time.Now().Add(20 * time.Second)
	for {
		log, _ := vm.ReadFile(ctx, "/tmp/lab-bg/log")
		if strings.Contains(string(log), "hello from bg") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("background log: %q", log)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if ok, err := vm.Running(ctx, pid); err != nil || !ok {
		t.Fatalf("pid %d running = %v, %v", pid, ok, err)
	}
	if err := vm.Signal(ctx, pid, "KILL"); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(10 * time.Second)
	for {
		ok, err := vm.Running(ctx, pid)
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d survived SIGKILL", pid)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := vm.ReadFile(ctx, "/nonexistent"); err == nil {
		t.Error("ReadFile of a missing file succeeded")
	}
}

// TestBootForTestCleansUp boots a second, private VM through BootForTest and
// checks that the test's cleanup killed QEMU and removed its state.
func TestBootForTestCleansUp(t *testing.T) {
	SkipUnlessAvailable(t, Options{})
	var vm *VM
	t.Run("boot", func(t *testing.T) {
		vm = BootForTest(t, Options{MemoryMiB: 384})
		if out := mustRun(t, vm, "uname -r"); strings.TrimSpace(out) != vm.KernelRelease {
			t.Errorf("uname -r = %q, image says %q", out, vm.KernelRelease)
		}
		var mib int
		if _, err := fmt.Sscan(mustRun(t, vm, "awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo"), &mib); err != nil || mib > 384 || mib < 256 {
			t.Errorf("guest has %d MiB (%v), asked for 384", mib, err)
		}
	})
	if vm == nil {
		t.Fatal("no vm")
	}
	if vm.Alive() {
		t.Error("QEMU still running after the test's cleanup")
	}
	if _, err := os.Stat(vm.StateDir()); !os.IsNotExist(err) {
		t.Errorf("state dir %s still there: %v", vm.StateDir(), err)
	}
}

// TestEchoStreamCountsLoss: a stream over a stable ESP path loses nothing; one during
// which the route disappears for a while reports the loss, each lost request with the
// unreachable error that refused it; and a stream stopped while its replies are delayed
// (netem, 400 ms on the reply path) still counts every one of them as answered — it
// ends on acknowledged sequence numbers.
func TestEchoStreamCountsLoss(t *testing.T) {
	vm := sharedVM(t)
	c := Cluster{Nodes: 2, UnderlayMTU: 1450, TunnelMTU: 1402, Pods: true}
	setupCluster(t, vm, c)
	mustRun(t, vm, espScript(2, 64))
	ctx := ctxFor(t, 2*time.Minute)

	s, err := StartEchoStream(ctx, vm, PodNS(1), PodIP(2), EchoOptions{Count: 100, Interval: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	e, err := s.Wait(ctx)
	if err != nil || e.Requests() != 100 || len(e.Lost()) != 0 {
		t.Fatalf("stable path: %d sent, lost %v, %v", e.Requests(), e.Lost(), err)
	}
	t.Logf("stable path: %d sent, 0 lost, max rtt %s", e.Requests(), e.MaxRTT().Round(time.Millisecond))

	s, err = StartEchoStream(ctx, vm, PodNS(1), PodIP(2), EchoOptions{Count: 100, Interval: 20 * time.Millisecond, Linger: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	mustRun(t, vm, fmt.Sprintf("sleep 0.5; ip -n %s route del %s; sleep 0.5; ip -n %s route add %s via %s dev tunl0 onlink",
		NodeNS(1), Block(2), NodeNS(1), Block(2), NodeIP(2)))
	e, err = s.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	lost := e.Lost()
	explained := 0
	for _, q := range lost {
		if e.Why(q) != "" {
			explained++
		}
	}
	t.Logf("route removed for 0.5 s: %d sent, %d lost, %d of them with an ICMP error (e.g. %q)", e.Requests(), len(lost), explained, e.Why(firstOr(lost, 0)))
	if len(lost) == 0 || len(lost) == e.Requests() || explained == 0 {
		t.Errorf("want some but not all lost, with unreachable errors: %d of %d lost, %d explained", len(lost), e.Requests(), explained)
	}

	// Replies delayed by 400 ms; the stream is stopped after 10 requests, all of whose
	// replies are then still on their way.
	mustRun(t, vm, fmt.Sprintf("tc -n %s qdisc add dev eth0 root netem delay 400ms", PodNS(2)))
	defer mustRun(t, vm, fmt.Sprintf("tc -n %s qdisc del dev eth0 root", PodNS(2)))
	s, err = StartEchoStream(ctx, vm, PodNS(1), PodIP(2), EchoOptions{Interval: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	// The guest stops the stream itself once pod2 has received 10 requests (Icmp.InEchos),
	// so the stop cannot come after the first delayed reply.
	mustRun(t, vm, fmt.Sprintf(`echos() { ip netns exec %s cat /proc/net/snmp | awk '/^Icmp:/ { if (!c) { for (i = 1; i <= NF; i++) if ($i == "InEchos") c = i } else print $c }'; }
base=$(echos)
until [ $(($(echos) - base)) -ge 10 ]; do sleep 0.01; done
kill -INT %d`, PodNS(2), s.pid))
	e, err = s.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("replies delayed 400 ms, stopped after %d requests: %d answered, %d of them after the stop, lost %v", e.Requests(), e.Answered(), e.AnsweredAfterStop(), e.Lost())
	if len(e.Lost()) != 0 || e.AnsweredAfterStop() == 0 {
		t.Errorf("stopped with replies in flight: lost %v, %d answered after the stop; want none lost and some answered after the stop", e.Lost(), e.AnsweredAfterStop())
	}
}

// TestEchoStreamStoppedAtOnce: a stream stopped the moment StartEchoStream returns ends
// with a report. (Before StartEchoStream waited for labping's started line, a SIGINT that
// came before labping caught it was ignored — a background job starts with SIGINT ignored
// — and the stop waited forever: seen with a 300 ms step on the real-node tier.)
func TestEchoStreamStoppedAtOnce(t *testing.T) {
	vm := sharedVM(t)
	c := Cluster{Nodes: 2, UnderlayMTU: 1450, TunnelMTU: 1402, Pods: true}
	setupCluster(t, vm, c)
	ctx := ctxFor(t, 2*time.Minute)
	for i := 0; i < 5; i++ {
		s, err := StartEchoStream(ctx, vm, PodNS(1), PodIP(2), EchoOptions{Interval: 20 * time.Millisecond, Linger: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Stop(ctx); err != nil {
			t.Fatalf("stop %d: %v", i, err)
		}
	}
}

func firstOr(s []int, d int) int {
	if len(s) == 0 {
		return d
	}
	return s[0]
}
