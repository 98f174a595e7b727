//go:build linux

package dataplane

import (
	"bufio"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"hash/fnv"
	"math"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/crypto/chacha20poly1305"
	"golang.org/x/sys/unix"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/bench"
	"github.com/secureoverlay/secureoverlay/conformance/lab"
	"github.com/secureoverlay/secureoverlay/conformance/lab/wire"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/rules"
	"github.com/secureoverlay/secureoverlay/reconciler/xfrm"
)

// The lab's shape for the benchmark: two nodes on a 1500-byte underlay, a pod each.
const (
	underlayMTU = 1500
	iperfPort   = 5201
	rrPort      = 7101
	udpPort     = 7102
	guestBin    = "/tmp/dataplane.test" // the test binary, copied into the guest's memory
	clkTck      = 100                   // USER_HZ: /proc/stat and /proc/PID/stat count in 1/100 s
)

// tcpCounters are the sender's TCP counters read around each TCP test.
var tcpCounters = []string{"TcpRetransSegs", "TcpExtTCPDSACKRecv", "TcpExtTCPSACKReorder", "TcpExtTCPTSReorder", "TcpExtTCPLostRetransmit",
	"TcpExtTCPFastRetrans", "TcpExtTCPTimeouts", "TcpExtTCPLossProbes", "TcpExtTCPSpuriousRTOs"}

// modeMTU is the pod (and tunnel) MTU each system gives pods on a 1500-byte network: Calico's
// IPIP 1480; our budget with ICV 8 (docs/dataplane.md, DESIGN §2) 1452 for both ESP modes, so
// they differ only in the algorithm; Calico's WireGuard default 1440 (60 bytes of overhead).
var modeMTU = map[string]int{"ipip": 1480, "esp": 1452, "espnull": 1452, "espnoesn": 1452, "esppcpu": 1452, "wireguard": 1440}

func envInt(t *testing.T, name string, def int) int {
	if v := os.Getenv(name); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("%s=%q: want a positive integer", name, v)
		}
		return n
	}
	return def
}

// TestBenchDataplane measures the data plane in the VM lab (docs/performance.md "Data plane"):
// between two node namespaces, plaintext IPIP vs ESP as the agent programs it vs ESP with the
// null cipher vs WireGuard; TCP 1 and N streams (iperf3), TCP_RR and UDP packet rates
// (labperf), guest and emulator CPU-seconds per GB. Rounds rotate the modes' order; every
// figure is reported as a per-round ratio against plaintext IPIP (median, min–max).
//
// It fails on correctness only, in every round: an ESP mode whose SAs did not count packets
// both ways, any /proc/net/xfrm_stat counter that grew, plaintext IPIP on the underlay in an
// encrypting mode (the lab's kernel wire counters), or ESP where there should be none.
// SECUREOVERLAY_BENCH=1 only; SECUREOVERLAY_BENCH_DP_ROUNDS (5), _DURATION (seconds per
// test, 3) and _STREAMS (4) size it; _BREAK=plaintext breaks the ESP mode on purpose, to see
// the checks fail.
func TestBenchDataplane(t *testing.T) {
	if os.Getenv("SECUREOVERLAY_IN_LAB") == "1" {
		t.Skip("runs on the host; its guest half is TestDataplaneGuestAction")
	}
	bench.Gate(t, false)
	rounds := envInt(t, "SECUREOVERLAY_BENCH_DP_ROUNDS", 5)
	secs := envInt(t, "SECUREOVERLAY_BENCH_DP_DURATION", 3)
	streams := envInt(t, "SECUREOVERLAY_BENCH_DP_STREAMS", 4)
	// SECUREOVERLAY_BENCH_DP_BREAK=plaintext breaks the ESP mode on purpose (node1 sends
	// plaintext): every correctness check must then fail the test.
	breakESP := os.Getenv("SECUREOVERLAY_BENCH_DP_BREAK") == "plaintext"
	// SECUREOVERLAY_BENCH_DP_MODES chooses the modes (default Modes), e.g.
	// ipip,esp,esp-offload,espnull,espnull-offload for the esp4_offload experiment.
	modes, err := ParseModes(os.Getenv("SECUREOVERLAY_BENCH_DP_MODES"))
	if err != nil {
		t.Fatalf("SECUREOVERLAY_BENCH_DP_MODES: %v", err)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	vm := lab.BootForTest(t, lab.Options{MemoryMiB: 1024, CPUs: 2,
		Shares: []lab.Share{{Tag: "testbin", HostPath: filepath.Dir(exe), GuestPath: "/mnt/testbin"}}})
	ctx, cancel := context.WithTimeout(context.Background(), 35*time.Minute)
	defer cancel()
	sh := func(script string) string {
		t.Helper()
		out, stderr, err := vm.RunInput(ctx, "sh -s", []byte(script))
		if err != nil {
			t.Fatalf("guest: %v\n%s%s", err, out, stderr)
		}
		return out
	}
	kernel := strings.TrimSpace(sh("uname -r"))
	fmt.Printf("BENCHTEXT dp.accel %s\nBENCHTEXT dp.kernel %s\n", vm.Accel, kernel)
	fmt.Printf("BENCHTEXT dp.cpu %s\n", strings.TrimSpace(sh(`echo "$(grep -c ^processor /proc/cpuinfo) × $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"`)))
	bench.Report("dp.rounds", float64(rounds), "count")
	bench.Report("dp.duration", float64(secs), "s")
	bench.Report("dp.streams", float64(streams), "count")
	for _, m := range modes {
		b, _ := BaseMode(m)
		bench.Report("dp."+m+".mtu", float64(modeMTU[b]), "count")
	}
	sh("cp /mnt/testbin/" + filepath.Base(exe) + " " + guestBin)

	// The guest's own AEAD rates, by the same code as the host's (TestBenchAEAD).
	resp, err := vm.Exec(ctx, wire.Request{Argv: []string{guestBin, "-test.run", "^TestBenchAEAD$", "-test.v"},
		Env: []string{"SECUREOVERLAY_IN_LAB=1", "SECUREOVERLAY_BENCH=1"}, TimeoutMillis: (5 * time.Minute).Milliseconds()})
	if err != nil || resp.Exit != 0 {
		t.Fatalf("AEAD rates in the guest: %v exit %d %s", err, resp.Exit, resp.Stderr)
	}
	sc := bufio.NewScanner(strings.NewReader(string(resp.Stdout)))
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), "BENCH ") {
			fmt.Println(sc.Text())
		}
	}

	c := lab.Cluster{Nodes: 2, UnderlayMTU: underlayMTU, TunnelMTU: modeMTU["ipip"], Pods: true}
	if err := c.Setup(ctx, vm); err != nil {
		t.Fatal(err)
	}
	dst := lab.PodIP(2)
	for _, s := range []string{
		fmt.Sprintf("ip netns exec %s iperf3 -s -p %d", lab.PodNS(2), iperfPort),
		fmt.Sprintf("ip netns exec %s labperf rr-server %s:%d", lab.PodNS(2), dst, rrPort),
	} {
		if _, err := vm.Background(ctx, s, "/tmp/dp-server.log"); err != nil {
			t.Fatal(err)
		}
	}
	sh(fmt.Sprintf(`for i in $(seq 200); do
	[ "$(ip netns exec %s ss -Hltn | grep -cE ':(%d|%d) ')" -ge 2 ] && exit 0; sleep 0.1
done; echo "servers did not start" >&2; cat /tmp/dp-server.log >&2; exit 1`, lab.PodNS(2), iperfPort, rrPort))

	ports := `$(ip -n ` + lab.UnderlayNS + ` -o link show master ` + lab.UnderlayBridge + ` | awk -F': ' '{print $2}' | cut -d@ -f1)`
	// tcStats reads every counting filter on the underlay's ports (the lab's IPIP and ESP
	// filters, and the UDP one added below for WireGuard).
	tcStats := func() map[int]Wire {
		return ParseTCFilters(sh(`for p in ` + ports + `; do tc -n ` + lab.UnderlayNS + ` -s filter show dev "$p" ingress; done`))
	}
	qemuTicks := func() float64 {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", vm.PID()))
		if err != nil {
			t.Fatal(err)
		}
		v, err := ProcessTicks(string(b))
		if err != nil {
			t.Fatal(err)
		}
		return float64(v)
	}
	// measure runs one test's script: it prints the guest's /proc/stat cpu line before and
	// after the measured command, then the command's JSON output.
	measure := func(test, mode string) (Sample, error) {
		mode, _ = BaseMode(mode)
		mtu := modeMTU[mode]
		dur := strconv.Itoa(secs)
		var body string
		switch test {
		case "tcp1", "tcpn":
			p := 1
			if test == "tcpn" {
				p = streams
			}
			// TCP's own account of the retransmissions (DSACKs received: the receiver had the
			// segment already, so the retransmission was spurious, i.e. reordering or delay,
			// not loss), the receiver's out-of-order queue, and the guest's backlog drops.
			counters := fmt.Sprintf(`{ ip netns exec %s nstat -asz %s; ip netns exec %s nstat -asz TcpExtTCPOFOQueue | sed 's/^/Rx/'
d=0; while read -r _ b _; do d=$((d + 0x$b)); done </proc/net/softnet_stat; echo "SoftnetDrops $d"; }`,
				lab.PodNS(1), strings.Join(tcpCounters, " "), lab.PodNS(2))
			body = fmt.Sprintf(`%[6]s >/tmp/dp-c0
s0=$(head -1 /proc/stat)
ip netns exec %[1]s iperf3 -c %[2]s -p %[3]d -t %[4]s -P %[5]d -J --connect-timeout 10000 >/tmp/dp-out.json 2>&1 || { cat /tmp/dp-out.json >&2; exit 1; }
s1=$(head -1 /proc/stat)
%[6]s >/tmp/dp-c1
sed 's/^/C0 /' /tmp/dp-c0; sed 's/^/C1 /' /tmp/dp-c1`, lab.PodNS(1), dst, iperfPort, dur, p, counters)
		case "rr":
			body = fmt.Sprintf(`s0=$(head -1 /proc/stat)
ip netns exec %s labperf rr -t %ss %s:%d >/tmp/dp-out.json
s1=$(head -1 /proc/stat)`, lab.PodNS(1), dur, dst, rrPort)
		case "udp64", "udpmtu":
			size := 64 - 28 // IP packet of 64 bytes: 20 (IP) + 8 (UDP) + payload
			if test == "udpmtu" {
				size = mtu - 28
			}
			body = fmt.Sprintf(`rm -f /tmp/dp-sink.err
ip netns exec %[1]s labperf udp-sink -idle 1s %[2]s:%[3]d >/tmp/dp-sink.json 2>/tmp/dp-sink.err &
sink=$!
i=0; until grep -q ready /tmp/dp-sink.err 2>/dev/null; do i=$((i+1)); [ $i -lt 300 ] || { echo "sink did not start" >&2; exit 1; }; sleep 0.05; done
s0=$(head -1 /proc/stat)
ip netns exec %[4]s labperf udp -t %[5]ss -s %[6]d %[2]s:%[3]d >/tmp/dp-send.json
s1=$(head -1 /proc/stat)
wait $sink
cat /tmp/dp-send.json /tmp/dp-sink.json >/tmp/dp-out.json`, lab.PodNS(2), dst, udpPort, lab.PodNS(1), dur, size)
		}
		w0 := tcStats()
		h0 := qemuTicks()
		out, stderr, err := vm.RunInput(ctx, "sh -s", []byte("set -e\n"+body+"\necho \"S0 $s0\"; echo \"S1 $s1\"; cat /tmp/dp-out.json\n"))
		h1 := qemuTicks()
		w1 := tcStats()
		if err != nil {
			return Sample{}, fmt.Errorf("%s: %v: %s", test, err, stderr)
		}
		o, err := ParseOutput(out)
		if err != nil {
			return Sample{}, fmt.Errorf("%s: %w", test, err)
		}
		s := Sample{GuestCPU: o.GuestBusy / clkTck, HostCPU: (h1 - h0) / clkTck, Counters: o.Counters}
		p := OuterProto[mode]
		s.WireBytes, s.WirePackets = float64(w1[p].Bytes-w0[p].Bytes), float64(w1[p].Packets-w0[p].Packets)
		switch test {
		case "tcp1", "tcpn":
			r, err := ParseIperf3([]byte(o.JSON))
			if err != nil {
				return Sample{}, fmt.Errorf("%s: %w", test, err)
			}
			s.Rate, s.Bytes, s.Retransmits = r.Bytes/r.Seconds, r.Bytes, r.Retransmits
		case "rr":
			p, err := ParsePerf([]byte(o.JSON))
			if err != nil || p.Secs <= 0 {
				return Sample{}, fmt.Errorf("%s: %v %q", test, err, o.JSON)
			}
			s.Rate, s.Bytes = p.Ops/p.Secs, p.Bytes
		default:
			js := strings.SplitN(strings.TrimSpace(o.JSON), "\n", 2)
			if len(js) != 2 {
				return Sample{}, fmt.Errorf("%s: want two JSON lines, got %q", test, o.JSON)
			}
			snd, err1 := ParsePerf([]byte(js[0]))
			rcv, err2 := ParsePerf([]byte(js[1]))
			if err1 != nil || err2 != nil || snd.Secs <= 0 {
				return Sample{}, fmt.Errorf("%s: %v %v %q", test, err1, err2, o.JSON)
			}
			// Received datagrams over the sender's duration: what got through per second.
			s.Rate, s.Bytes, s.Sent = rcv.Ops/snd.Secs, rcv.Bytes, snd.Ops
		}
		return s, nil
	}

	up := func(m string) {
		m, offload := BaseMode(m)
		mtu := modeMTU[m]
		var b strings.Builder
		fmt.Fprintf(&b, "set -e\n")
		if offload {
			// Before the SAs: a state takes the offload type when it is created.
			b.WriteString("modprobe esp4_offload\n")
		}
		for i := 1; i <= 2; i++ {
			fmt.Fprintf(&b, "ip -n %s link set eth0 mtu %d\nip -n %s link set cali%d mtu %d\nip -n %s link set tunl0 mtu %d\n",
				lab.PodNS(i), mtu, lab.NodeNS(i), i, mtu, lab.NodeNS(i), mtu)
		}
		switch m {
		case "esp", "espnull", "espnoesn", "esppcpu":
			fmt.Fprintf(&b, "DP_ACTION=%s-up SECUREOVERLAY_IN_LAB=1 %s -test.run '^TestDataplaneGuestAction$' >/tmp/dp-action.log 2>&1 || { cat /tmp/dp-action.log >&2; exit 1; }\n", m, guestBin)
			if breakESP && m == "esp" {
				// The checks' own test: node1 loses its policies and rules, so it sends
				// plaintext IPIP that node2's required inbound policy refuses.
				fmt.Fprintf(&b, "ip -n %[1]s xfrm policy flush\nip netns exec %[1]s iptables -t raw -F %[2]s\n", lab.NodeNS(1), rules.ChainOut)
			}
		case "wireguard":
			// Keys are made and kept in the guest's /tmp; no key is printed.
			b.WriteString("umask 077\n")
			for i := 1; i <= 2; i++ {
				fmt.Fprintf(&b, "wg genkey >/tmp/wg%[1]d.key\nwg pubkey </tmp/wg%[1]d.key >/tmp/wg%[1]d.pub\n", i)
			}
			for i := 1; i <= 2; i++ {
				j := 3 - i
				n := lab.NodeNS(i)
				fmt.Fprintf(&b, `ip -n %[1]s link add wg0 type wireguard
ip netns exec %[1]s wg set wg0 listen-port 51820 private-key /tmp/wg%[2]d.key peer "$(cat /tmp/wg%[3]d.pub)" endpoint %[4]s:51820 allowed-ips %[5]s
ip -n %[1]s link set wg0 mtu %[6]d up
ip -n %[1]s route replace %[5]s dev wg0
`, n, i, j, lab.NodeIP(j), lab.Block(j), mtu)
			}
			b.WriteString("rm -f /tmp/wg1.key /tmp/wg2.key\n")
		}
		sh(b.String())
	}
	down := func(m string) {
		m, offload := BaseMode(m)
		switch m {
		case "esp", "espnull", "espnoesn", "esppcpu":
			sh(fmt.Sprintf("DP_ACTION=down SECUREOVERLAY_IN_LAB=1 %s -test.run '^TestDataplaneGuestAction$' >/tmp/dp-action.log 2>&1 || { cat /tmp/dp-action.log >&2; exit 1; }\n", guestBin))
			if offload {
				// The SAs are gone, so nothing holds the module any more.
				sh("modprobe -r esp4_offload && ! grep -q '^esp4_offload ' /proc/modules")
			}
		case "wireguard":
			var b strings.Builder
			for i := 1; i <= 2; i++ {
				j := 3 - i
				fmt.Fprintf(&b, "ip -n %[1]s link del wg0\nip -n %[1]s route replace %[2]s via %[3]s dev tunl0 onlink\n", lab.NodeNS(i), lab.Block(j), lab.NodeIP(j))
			}
			sh(b.String())
		}
	}
	xfrmStat := func() map[string]map[string]uint64 {
		out := map[string]map[string]uint64{}
		for i := 1; i <= 2; i++ {
			m, err := XfrmStat(sh("ip netns exec " + lab.NodeNS(i) + " cat /proc/net/xfrm_stat"))
			if err != nil {
				t.Fatal(err)
			}
			out[lab.NodeNS(i)] = m
		}
		return out
	}

	// samples[mode][test][round]
	samples := map[string]map[string][]Sample{}
	for _, m := range modes {
		samples[m] = map[string][]Sample{}
	}
	start := time.Now()
	for r := range rounds {
		for _, m := range Order(modes, r) {
			up(m)
			x0 := xfrmStat()
			w, err := lab.StartWireCount(ctx, vm, lab.UnderlayNS, lab.UnderlayBridge)
			if err != nil {
				t.Fatal(err)
			}
			sh(`for p in ` + ports + `; do [ -n "$(tc -n ` + lab.UnderlayNS + ` filter show dev "$p" ingress pref 17)" ] ||
	tc -n ` + lab.UnderlayNS + ` filter add dev "$p" ingress pref 17 protocol ip u32 match ip protocol 17 0xff action pass; done`)
			u0 := tcStats()[17]
			for _, test := range Tests {
				s, err := measure(test, m)
				if err != nil {
					t.Errorf("round %d, %s: %v", r+1, m, err)
					s = Sample{Rate: math.NaN()}
				}
				samples[m][test] = append(samples[m][test], s)
			}
			// Correctness, every round.
			wc, err := w.Read(ctx)
			if err != nil {
				t.Fatal(err)
			}
			tot := lab.Total(wc)
			x1 := xfrmStat()
			for n := range x1 {
				g := Grown(x0[n], x1[n])
				if slices.Contains(ExperimentModes, m) {
					// What the experiment modes look for: reported, not a failure.
					for name, v := range x1[n] {
						if d := v - x0[n][name]; d > 0 {
							bench.Report(fmt.Sprintf("dp.%s.xfrm.%s.%s.round%d", m, n, name, r+1), float64(d), "count")
						}
					}
					if len(g) > 0 {
						t.Logf("round %d, %s: %s xfrm_stat grew: %s", r+1, m, n, strings.Join(g, ", "))
					}
					continue
				}
				if len(g) > 0 {
					t.Errorf("round %d, %s: %s xfrm_stat grew: %s", r+1, m, n, strings.Join(g, ", "))
				}
			}
			var espOut []string
			switch m {
			case "ipip":
				if tot.IPIP == 0 || tot.ESP != 0 {
					t.Errorf("round %d, ipip: wire %s: want IPIP and no ESP", r+1, lab.FormatWireCounts(wc))
				}
			case "wireguard":
				if u := tcStats()[17].Packets - u0.Packets; tot.IPIP != 0 || tot.ESP != 0 || u == 0 {
					t.Errorf("round %d, wireguard: wire %s, %d UDP: want neither IPIP nor ESP, and UDP", r+1, lab.FormatWireCounts(wc), u)
				}
				tr := sh(fmt.Sprintf("ip netns exec %s wg show wg0 transfer", lab.NodeNS(1)))
				if f := strings.Fields(tr); len(f) != 3 || f[1] == "0" || f[2] == "0" {
					t.Errorf("round %d, wireguard: node1's peer transfer %q: want bytes both ways", r+1, strings.TrimSpace(tr))
				}
			default:
				if tot.IPIP != 0 || tot.ESP == 0 {
					t.Errorf("round %d, %s: wire %s: want ESP and no plaintext IPIP", r+1, m, lab.FormatWireCounts(wc))
				}
				for i := 1; i <= 2; i++ {
					sas, err := lab.XfrmStates(ctx, vm, lab.NodeNS(i))
					if err != nil {
						t.Fatal(err)
					}
					var in, out uint64
					var perCPU []string // esppcpu: the outbound SAs' packets by lane
					cpuLanes, notCPU := 0, uint64(0)
					for _, sa := range sas {
						if sa.Src == lab.NodeIP(i) {
							out += sa.Packets
							_, lane, _, _, _ := keys.ParseLaneSPI(sa.SPI)
							if lane > keys.FallbackLane && sa.Packets > 0 {
								cpuLanes++
							} else if lane <= keys.FallbackLane {
								notCPU += sa.Packets
							}
							perCPU = append(perCPU, fmt.Sprintf("lane %d: %d", lane, sa.Packets))
						} else {
							in += sa.Packets
						}
					}
					if in == 0 || out == 0 {
						t.Errorf("round %d, %s: %s's SAs counted %d packets in, %d out: want both > 0", r+1, m, lab.NodeNS(i), in, out)
					}
					espOut = append(espOut, fmt.Sprintf("%s %d out/%d in", lab.NodeNS(i), out, in))
					if m == "esppcpu" {
						// Every CPU has a lane: traffic leaves through the CPUs' own SAs
						// (more than one of them), lane 0 and the fallback carry none.
						slices.Sort(perCPU)
						if cpuLanes < 2 || notCPU != 0 {
							t.Errorf("round %d, esppcpu: %s's outbound SAs: %s: want traffic on 2 or more CPUs' lanes and none elsewhere", r+1, lab.NodeNS(i), strings.Join(perCPU, ", "))
						}
						espOut = append(espOut, "("+strings.Join(perCPU, ", ")+")")
					}
				}
			}
			t.Logf("round %d %-9s wire: %d IPIP, %d ESP; SAs: %s; tcp1 %.1f Mbit/s (%.0f retrans, %.0f DSACKs, %.0f backlog drops), tcpn %.1f Mbit/s, rr %.0f/s, udp64 %.0f/s, udpmtu %.0f/s",
				r+1, m, tot.IPIP, tot.ESP, strings.Join(espOut, ", "), samples[m]["tcp1"][r].Rate*8/1e6, samples[m]["tcp1"][r].Retransmits,
				samples[m]["tcp1"][r].Counters["TcpExtTCPDSACKRecv"], samples[m]["tcp1"][r].Counters["SoftnetDrops"],
				samples[m]["tcpn"][r].Rate*8/1e6, samples[m]["rr"][r].Rate, samples[m]["udp64"][r].Rate, samples[m]["udpmtu"][r].Rate)
			down(m)
		}
	}
	bench.Report("dp.wall", time.Since(start).Seconds(), "s")

	// Per-round ratios against plaintext IPIP in the same round.
	metric := func(s Sample, what string) float64 {
		if math.IsNaN(s.Rate) { // the measurement failed (already an error)
			return math.NaN()
		}
		switch what {
		case "rate":
			return s.Rate
		case "guest_per_gb":
			return PerGB(s.GuestCPU, s.Bytes)
		case "host_per_gb":
			return PerGB(s.HostCPU, s.Bytes)
		case "retrans":
			return s.Retransmits
		case "dsack", "ofo", "softnet_drops", "sack_reorder", "fast_retrans", "timeouts", "loss_probes":
			if s.Counters == nil {
				return math.NaN()
			}
			return s.Counters[map[string]string{"dsack": "TcpExtTCPDSACKRecv", "ofo": "RxTcpExtTCPOFOQueue", "softnet_drops": "SoftnetDrops",
				"sack_reorder": "TcpExtTCPSACKReorder", "fast_retrans": "TcpExtTCPFastRetrans", "timeouts": "TcpExtTCPTimeouts", "loss_probes": "TcpExtTCPLossProbes"}[what]]
		case "wire_size":
			if s.WirePackets == 0 {
				return math.NaN()
			}
			return s.WireBytes / s.WirePackets
		}
		panic(what)
	}
	for _, m := range modes {
		for _, test := range Tests {
			for _, what := range []string{"rate", "guest_per_gb", "host_per_gb", "retrans", "wire_size", "dsack", "ofo", "softnet_drops", "sack_reorder", "fast_retrans", "timeouts", "loss_probes"} {
				var vs, base, clean []float64
				for r := range rounds {
					v, b := metric(samples[m][test][r], what), metric(samples["ipip"][test][r], what)
					if !math.IsNaN(v) {
						clean = append(clean, v)
					}
					if math.IsNaN(v) || math.IsNaN(b) {
						v, b = -1, 0 // no ratio for this round
					}
					vs, base = append(vs, v), append(base, b)
				}
				if len(clean) == 0 {
					continue
				}
				p := fmt.Sprintf("dp.%s.%s.%s", m, test, what)
				bench.Report(p+".median", Summarize(clean).Median, "value")
				if m == "ipip" || !slices.Contains([]string{"rate", "guest_per_gb", "host_per_gb"}, what) {
					continue
				}
				rs := Summarize(Ratios(vs, base))
				bench.Report(p+".ratio", rs.Median, "x")
				bench.Report(p+".ratio_min", rs.Min, "x")
				bench.Report(p+".ratio_max", rs.Max, "x")
			}
		}
	}
}

// benchKeys is the KeyFunc of the benchmark's two agents: SPIs as the agent lays them out
// (generation, sender's node ID, kind), keys from one random secret of this process (both
// nodes are programmed by one process, so each direction's two ends agree). Nothing prints them.
func benchKeys() desired.KeyFunc {
	secret := make([]byte, 32)
	if _, err := rand.Read(secret); err != nil {
		panic(err)
	}
	return func(gen uint32, kind desired.Kind, lane uint16, src, dst desired.Endpoint) (uint32, desired.Key, error) {
		spi, err := keys.LaneSPI(kind, lane, gen, src.NodeID)
		if err != nil {
			return 0, desired.Key{}, err
		}
		h := hmac.New(sha256.New, secret)
		fmt.Fprintf(h, "%d|%d|%d|%s|%s|%s|%s", gen, kind, lane, src.IP, src.Incarnation, dst.IP, dst.Incarnation)
		return spi, desired.NewKey(h.Sum(nil)[:20]), nil
	}
}

// benchInputs is node self's view of the two-node cluster in enforce, the peer ready both
// ways; with lanes > 0 both nodes send on that many per-CPU lanes and take the other's.
func benchInputs(self int, keys desired.KeyFunc, lanes uint16) desired.Inputs {
	in := desired.Inputs{Self: lab.NodeNS(self), Ring: desired.Ring{Mode: api.ModeEnforce, Generations: []desired.Generation{{ID: 1, State: desired.GenActive}}},
		Keys: keys, Pools: []desired.Pool{{Name: "default", CIDR: netip.MustParsePrefix("10.244.0.0/16"), IPIPMode: desired.IPIPAlways}}}
	for i := 1; i <= 2; i++ {
		nd := desired.Node{Name: lab.NodeNS(i), IPv4Address: lab.NodeIP(i) + "/24", Incarnation: fmt.Sprintf("bench-%d", i), NodeID: uint32(i),
			Lanes: lanes, TakesLanes: lanes > 0}
		if i != self {
			nd.Report = &desired.Report{Incarnation: nd.Incarnation, Mode: api.ModeEnforce, Generations: []uint32{1}, InboundFromSelf: true, EncryptsToSelf: true}
		}
		in.Nodes = append(in.Nodes, nd)
	}
	return in
}

// nullStates is the agent's netlink kernel with one change: states are written with the null
// cipher and null digest instead of rfc4106(gcm(aes)), everything else (SPI, selectors,
// replay window, ESN, limits) as the agent writes them.
type nullStates struct {
	xfrm.Netlink
	h *netlink.Handle
}

func (n nullStates) AddState(sa desired.SA) error {
	s := &netlink.XfrmState{Src: sa.Src.AsSlice(), Dst: sa.Dst.AsSlice(), Proto: netlink.XFRM_PROTO_ESP,
		Mode: netlink.XFRM_MODE_TRANSPORT, Spi: int(sa.SPI), Reqid: int(sa.ReqID), ReplayWindow: int(sa.ReplayWindow), ESN: sa.ESN,
		Limits: netlink.XfrmStateLimits{PacketSoft: sa.SoftPackets, PacketHard: sa.HardPackets},
		Crypt:  &netlink.XfrmStateAlgo{Name: "ecb(cipher_null)", Key: []byte{}},
		Auth:   &netlink.XfrmStateAlgo{Name: "digest_null", Key: []byte{}}}
	if sa.SelSrc.IsValid() && sa.SelDst.IsValid() {
		s.Selector = &netlink.XfrmPolicy{Src: &net.IPNet{IP: sa.SelSrc.Addr().AsSlice(), Mask: net.CIDRMask(sa.SelSrc.Bits(), 32)},
			Dst: &net.IPNet{IP: sa.SelDst.Addr().AsSlice(), Mask: net.CIDRMask(sa.SelDst.Bits(), 32)}, Proto: netlink.Proto(sa.SelProto)}
	}
	return n.h.XfrmStateAdd(s)
}

// TestDataplaneGuestAction is TestBenchDataplane's hand inside the guest: DP_ACTION=esp-up
// programs both node namespaces exactly as the agent does in enforce (desired.Compute, the
// xfrm applier on netlink, the iptables rules); espnull-up the same with null-cipher states;
// down removes it all.
func TestDataplaneGuestAction(t *testing.T) {
	act := os.Getenv("DP_ACTION")
	if os.Getenv("SECUREOVERLAY_IN_LAB") != "1" || act == "" {
		t.Skip("run by TestBenchDataplane inside the lab guest")
	}
	kf := benchKeys()
	for i := 1; i <= 2; i++ {
		netns, err := ns.GetNS("/run/netns/" + lab.NodeNS(i))
		if err != nil {
			t.Fatal(err)
		}
		err = netns.Do(func(ns.NetNS) error {
			sys, err := rules.NewSystem()
			if err != nil {
				return err
			}
			ra := rules.NewApplier(sys)
			if act == "down" {
				if err := ra.Cleanup(); err != nil {
					return err
				}
				if err := netlink.XfrmPolicyFlush(); err != nil {
					return err
				}
				return netlink.XfrmStateFlush(0)
			}
			lanes := uint16(0)
			if act == "esppcpu-up" {
				lanes = uint16(runtime.NumCPU()) // every CPU its own lane: the fallback carries none
			}
			st, err := desired.Compute(benchInputs(i, kf, lanes))
			if err != nil {
				return err
			}
			up := act
			if act == "esppcpu-up" {
				up = "esp-up"
			}
			if act == "espnoesn-up" {
				// The experiment's one change: 32-bit sequence numbers (the legacy replay
				// window is at most 32 packets).
				for j := range st.SAs {
					st.SAs[j].ESN, st.SAs[j].ReplayWindow = false, 32
				}
				up = "esp-up"
			}
			k, err := xfrm.OpenNetlink()
			if err != nil {
				return err
			}
			defer k.Close()
			var kernel xfrm.Kernel = k
			if up == "espnull-up" {
				h, err := netlink.NewHandle(unix.NETLINK_XFRM)
				if err != nil {
					return err
				}
				defer h.Close()
				kernel = nullStates{Netlink: k, h: h}
			} else if up != "esp-up" {
				return fmt.Errorf("DP_ACTION=%q", act)
			}
			if _, err := xfrm.NewApplier(kernel, desired.Config{}).Apply(st); err != nil {
				return err
			}
			_, err = ra.Apply(st.Rules)
			return err
		})
		_ = netns.Close()
		if err != nil {
			t.Fatalf("%s %s: %v", act, lab.NodeNS(i), err)
		}
	}
}

// TestBenchAEAD measures this machine's AEAD rates on one core (one goroutine), the physical
// limit per core of each cipher: AES-128-GCM and AES-256-GCM (crypto/cipher, AES-NI on amd64)
// and ChaCha20-Poly1305 (golang.org/x/crypto), sealing 64-byte and 1,400-byte messages, best of three 1-second periods.
// Inside the lab guest (TestBenchDataplane runs it there) the figures are the emulator's.
// FNV-1a over the same messages is the baseline of plain integer code.
func TestBenchAEAD(t *testing.T) {
	bench.Gate(t, false)
	where := "host"
	if os.Getenv("SECUREOVERLAY_IN_LAB") == "1" {
		where = "guest"
	}
	per := time.Second
	mk := map[string]func() cipher.AEAD{
		"aes128gcm": func() cipher.AEAD { return gcm(t, 16) },
		"aes256gcm": func() cipher.AEAD { return gcm(t, 32) },
		"chacha20poly1305": func() cipher.AEAD {
			a, err := chacha20poly1305.New(make([]byte, chacha20poly1305.KeySize))
			if err != nil {
				t.Fatal(err)
			}
			return a
		},
	}
	for _, name := range []string{"aes128gcm", "aes256gcm", "chacha20poly1305"} {
		a := mk[name]()
		for _, size := range []int{64, 1400} {
			msg := make([]byte, size, size+a.Overhead())
			nonce := make([]byte, a.NonceSize())
			bench.Report(fmt.Sprintf("aead.%s.%s.%d", where, name, size), bestRate(per, size, func() { a.Seal(msg[:0], nonce, msg, nil) }), "MB/s")
		}
	}
	// A baseline of plain integer code (FNV-1a: multiplies and xors, no special
	// instructions), so host/guest of the AEADs can be set against host/guest of code the
	// emulator translates without emulating an instruction-set extension.
	msg := make([]byte, 1400)
	bench.Report(fmt.Sprintf("aead.%s.fnv1a.1400", where), bestRate(per, len(msg), func() {
		h := fnv.New64a()
		_, _ = h.Write(msg)
		msg[0] = byte(h.Sum64())
	}), "MB/s")
}

// bestRate runs op over size-byte messages for three periods of per and returns the best
// period's rate in MB/s: the limit the core reaches when the shared machine lets it.
func bestRate(per time.Duration, size int, op func()) float64 {
	best := 0.0
	for range 3 {
		var n int
		t0 := time.Now()
		for time.Since(t0) < per {
			for range 64 {
				op()
				n++
			}
		}
		best = max(best, float64(n*size)/time.Since(t0).Seconds()/1e6)
	}
	return best
}

func gcm(t *testing.T, keyLen int) cipher.AEAD {
	b, err := aes.NewCipher(make([]byte, keyLen))
	if err != nil {
		t.Fatal(err)
	}
	a, err := cipher.NewGCM(b)
	if err != nil {
		t.Fatal(err)
	}
	return a
}
