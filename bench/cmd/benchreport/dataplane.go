package main

import (
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Section numbers and the -only key that produces each (for -update).
var sectionOf = map[int]string{1: "compute", 2: "xfrm", 3: "xfrm", 4: "agent", 5: "cni", 6: "agent", 7: "lab", 8: "ctl", 9: "keys", 10: "dataplane", 11: "readiness"}

var sectionRE = regexp.MustCompile(`(?m)^## (\d+)\. `)

// splitSections returns the text before the first "## N. " heading and each section by
// its number (heading included, up to the next one).
func splitSections(s string) (string, map[int]string, []int) {
	idx := sectionRE.FindAllStringSubmatchIndex(s, -1)
	if len(idx) == 0 {
		return s, map[int]string{}, nil
	}
	secs := map[int]string{}
	var order []int
	for i, m := range idx {
		n, _ := strconv.Atoi(s[m[2]:m[3]])
		end := len(s)
		if i+1 < len(idx) {
			end = idx[i+1][0]
		}
		secs[n] = s[m[0]:end]
		order = append(order, n)
	}
	return s[:idx[0][0]], secs, order
}

// merge keeps old's header and the sections of old that this run did not produce; sections
// this run produced (by -only) replace or are added to old's, in section order, each saying
// under its heading when it was run (stamp): the header's date and commands are the last
// full run's.
func merge(old, fresh, stamp string) string {
	oh, olds, oorder := splitSections(old)
	_, fs, forder := splitSections(fresh)
	for _, n := range forder {
		if want(sectionOf[n]) {
			if _, ok := olds[n]; !ok {
				oorder = append(oorder, n)
			}
			head, body, _ := strings.Cut(fs[n], "\n")
			olds[n] = head + "\n\n_This section: " + stamp + " (`-only " + sectionOf[n] + " -update`); the header's date and commands are the last full run's._\n" + body
		}
	}
	slices.Sort(oorder)
	var b strings.Builder
	b.WriteString(oh)
	for _, n := range oorder {
		s := olds[n]
		if !strings.HasSuffix(s, "\n\n") && n != oorder[len(oorder)-1] {
			s = strings.TrimRight(s, "\n") + "\n\n"
		}
		b.WriteString(s)
	}
	return strings.TrimRight(b.String(), "\n") + "\n"
}

var dpModes = []string{"esp", "espnull", "wireguard"}
var dpModeName = map[string]string{"ipip": "plaintext IPIP", "esp": "ESP (agent)", "espnull": "ESP, null cipher", "wireguard": "WireGuard"}

// ratioCell renders "median (min–max)" of a per-round ratio.
func ratioCell(p string) string {
	m, ok := results[p+".ratio"]
	if !ok {
		return "—"
	}
	return fmt.Sprintf("**%s×** (%s–%s)", num(m.v), num(results[p+".ratio_min"].v), num(results[p+".ratio_max"].v))
}

func writeDataplane(w func(string, ...any), started time.Time) {
	w("\n## 10. Data plane in the VM lab: plaintext IPIP vs ESP vs WireGuard (two node namespaces, a pod each)\n\n")
	cmd, why := "", ""
	for i, c := range cmds {
		if strings.Contains(c, "./bench/dataplane") {
			cmd, why = c, failed[i]
		}
	}
	if cmd == "" && results["dp.rounds"].v == 0 {
		w("Not run (`make bench-dataplane`).\n")
		return
	}
	w("Run %s: `%s`", started.Format("2006-01-02 15:04 UTC"), cmd)
	if why != "" {
		w(" — **failed (%s)**: a correctness check failed (ESP counters, xfrm errors or plaintext on the wire) or a measurement broke; its log says which", why)
	}
	w(".\n\n")
	w("- Accelerator: **%s**; guest kernel %s; guest CPUs: %s; host: %s.\n", texts["dp.accel"], texts["dp.kernel"], texts["dp.cpu"], machine())
	w("- Rounds: %s, the modes' order rotated each round; %s per test; TCP N streams = %s; pod MTU per mode as each system sets it on a 1500-byte underlay: IPIP %s, ESP %s (our budget, ICV 8), null-cipher ESP %s, WireGuard %s; whole run %s.\n",
		get("dp.rounds"), get("dp.duration"), get("dp.streams"), get("dp.ipip.mtu"), get("dp.esp.mtu"), get("dp.espnull.mtu"), get("dp.wireguard.mtu"), get("dp.wall"))
	w("- Correctness, checked in every round of every mode (the test fails otherwise): ESP modes' SAs counted packets both ways on both nodes, no `/proc/net/xfrm_stat` counter grew on either node, the underlay's kernel wire counters saw **0 plaintext IPIP** in the encrypting modes (and IPIP without ESP in the plaintext mode, so the counters see plaintext when there is any).\n")
	if texts["dp.accel"] == "tcg" {
		w("- **What TCG distorts.** QEMU's TCG translates every guest instruction; the instruction-set extensions the ciphers live on (AES-NI, PCLMULQDQ, SSE/AVX) are emulated by helper functions, instruction by instruction. By the same Go code in this run (table at the end), AES-128-GCM at 1,400 B ran %s slower in the guest than on the host, ChaCha20-Poly1305 %s, while plain integer code (FNV-1a) ran %s slower; the first lab measurement (issue 18, a busier machine) saw the guest's AES-GCM 300–1,000× slower than the host's. The kernel's ciphers (`rfc4106-gcm-aesni`, `chacha20-simd`) use the same extensions. So the cipher weighs far more in every encrypted figure than on a real CPU: **never read the absolute figures as real throughput, and read the ratios as lower bounds of what a real machine keeps** (the cipher's share is inflated). The null-cipher mode takes the cipher out and leaves xfrm's own per-packet work (policy and state lookups, replay and sequence numbers, copying the packet, the ESP header) and our enforce rules, which TCG slows about as much as the rest of the stack. All vCPUs run on one host thread (`-accel tcg,thread=single`), so N streams cannot use more than one host core, and guest CPU-seconds (the guest's own accounting of its vCPUs) can exceed the emulator's.\n",
			ratio("aead.host.aes128gcm.1400", "aead.guest.aes128gcm.1400"), ratio("aead.host.chacha20poly1305.1400", "aead.guest.chacha20poly1305.1400"), ratio("aead.host.fnv1a.1400", "aead.guest.fnv1a.1400"))
	}
	w("\nRatios against plaintext IPIP in the same round, median of the rounds (min–max):\n\n")
	w("| test | figure | %s | %s | %s |\n|---|---|---:|---:|---:|\n", dpModeName["esp"], dpModeName["espnull"], dpModeName["wireguard"])
	rows := []struct{ test, what, label string }{
		{"tcp1", "rate", "throughput"},
		{"tcpn", "rate", "throughput"},
		{"rr", "rate", "transactions/s"},
		{"udp64", "rate", "packets/s received"},
		{"udpmtu", "rate", "packets/s received"},
		{"tcp1", "guest_per_gb", "guest CPU-s per GB"},
		{"tcp1", "host_per_gb", "emulator (host) CPU-s per GB"},
		{"tcpn", "guest_per_gb", "guest CPU-s per GB"},
		{"tcpn", "host_per_gb", "emulator (host) CPU-s per GB"},
		{"udpmtu", "guest_per_gb", "guest CPU-s per GB"},
		{"udpmtu", "host_per_gb", "emulator (host) CPU-s per GB"},
	}
	testName := map[string]string{"tcp1": "TCP 1 stream", "tcpn": "TCP " + get("dp.streams") + " streams", "rr": "TCP_RR", "udp64": "UDP 64 B packets", "udpmtu": "UDP pod-MTU packets"}
	for _, r := range rows {
		w("| %s | %s |", testName[r.test], r.label)
		for _, m := range dpModes {
			w(" %s |", ratioCell(fmt.Sprintf("dp.%s.%s.%s", m, r.test, r.what)))
		}
		w("\n")
	}
	w("\nAbsolute medians, **for context only** (an emulated machine: see above):\n\n")
	w("| test | %s | %s | %s | %s |\n|---|---:|---:|---:|---:|\n", dpModeName["ipip"], dpModeName["esp"], dpModeName["espnull"], dpModeName["wireguard"])
	abs := func(label, test, what string, scale float64, unit string) {
		w("| %s |", label)
		for _, m := range append([]string{"ipip"}, dpModes...) {
			v, ok := results[fmt.Sprintf("dp.%s.%s.%s.median", m, test, what)]
			if !ok {
				w(" — |")
				continue
			}
			w(" %s%s |", num(v.v*scale), unit)
		}
		w("\n")
	}
	abs("TCP 1 stream", "tcp1", "rate", 8e-6, " Mbit/s")
	abs("TCP 1 stream, retransmits per test", "tcp1", "retrans", 1, "")
	abs("TCP 1 stream, fast retransmits", "tcp1", "fast_retrans", 1, "")
	abs("TCP 1 stream, retransmission timeouts", "tcp1", "timeouts", 1, "")
	abs("TCP 1 stream, tail loss probes", "tcp1", "loss_probes", 1, "")
	abs("TCP 1 stream, DSACKs received by the sender (retransmissions the receiver did not need)", "tcp1", "dsack", 1, "")
	abs("TCP 1 stream, sender's SACK reordering events", "tcp1", "sack_reorder", 1, "")
	abs("TCP 1 stream, segments the receiver queued out of order", "tcp1", "ofo", 1, "")
	abs("TCP 1 stream, guest backlog drops (softnet_stat)", "tcp1", "softnet_drops", 1, "")
	abs("TCP "+get("dp.streams")+" streams", "tcpn", "rate", 8e-6, " Mbit/s")
	abs("TCP "+get("dp.streams")+" streams, retransmits per test", "tcpn", "retrans", 1, "")
	abs("TCP "+get("dp.streams")+" streams, DSACKs received by the sender", "tcpn", "dsack", 1, "")
	abs("TCP "+get("dp.streams")+" streams, guest backlog drops (softnet_stat)", "tcpn", "softnet_drops", 1, "")
	abs("TCP_RR", "rr", "rate", 1, " /s")
	abs("UDP 64 B", "udp64", "rate", 1, " pkt/s")
	abs("UDP pod MTU", "udpmtu", "rate", 1, " pkt/s")
	abs("TCP 1 stream, bytes per packet on the underlay (a GSO packet counts once)", "tcp1", "wire_size", 1, "")
	abs("TCP "+get("dp.streams")+" streams, bytes per packet on the underlay", "tcpn", "wire_size", 1, "")
	abs("UDP pod MTU, bytes per packet on the underlay", "udpmtu", "wire_size", 1, "")
	abs("TCP 1 stream, guest CPU-s/GB", "tcp1", "guest_per_gb", 1, "")
	abs("TCP 1 stream, emulator CPU-s/GB", "tcp1", "host_per_gb", 1, "")
	abs("TCP "+get("dp.streams")+" streams, guest CPU-s/GB", "tcpn", "guest_per_gb", 1, "")
	abs("TCP "+get("dp.streams")+" streams, emulator CPU-s/GB", "tcpn", "host_per_gb", 1, "")

	w("\nThe physical limit per core: one goroutine sealing messages (best of three 1-second periods) with Go's AEADs (`TestBenchAEAD`; AES-GCM from crypto/cipher with AES-NI, ChaCha20-Poly1305 from golang.org/x/crypto), on this host and, by the same code, in the lab guest:\n\n")
	w("| cipher | host, 1,400 B | host, 64 B | guest (emulated), 1,400 B | guest, 64 B | host / guest at 1,400 B |\n|---|---:|---:|---:|---:|---:|\n")
	for _, c := range [][2]string{{"aes128gcm", "AES-128-GCM"}, {"aes256gcm", "AES-256-GCM"}, {"chacha20poly1305", "ChaCha20-Poly1305"}} {
		h, g := "aead.host."+c[0], "aead.guest."+c[0]
		w("| %s | %s | %s | %s | %s | %s |\n", c[1], get(h+".1400"), get(h+".64"), get(g+".1400"), get(g+".64"), ratio(h+".1400", g+".1400"))
	}
	w("| integer baseline: FNV-1a (no instruction-set extension) | %s | | %s | | %s |\n", get("aead.host.fnv1a.1400"), get("aead.guest.fnv1a.1400"), ratio("aead.host.fnv1a.1400", "aead.guest.fnv1a.1400"))
	w("\nWhat each figure means and how to read it against real machines: docs/performance.md, \"Data plane\".\n")
}
