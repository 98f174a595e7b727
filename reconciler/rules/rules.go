// Package rules applies the plaintext-IPIP iptables rules of the desired state.
//
// Where and why. Calico's felix inserts its own jumps at the top of filter INPUT/OUTPUT/
// FORWARD and ACCEPTs IPIP from cluster hosts in cali-INPUT, so a DROP placed after it in
// the filter table would never be reached. We therefore work in the raw table, which runs
// before conntrack and before every filter-table chain, where nobody accepts ahead of us:
//
//	raw PREROUTING → -j SECUREOVERLAY-IN   (position 1)
//	raw OUTPUT     → -j SECUREOVERLAY-OUT  (position 1)
//
// SECUREOVERLAY-IN holds, per peer that sends ESP to us (enforce):
//
//	-s PEER/32 -p 4 -m policy --dir in --pol none -m comment --comment "..." -j DROP
//
// An ESP packet is not proto 4 on the wire; after transport-mode decryption the inner IPIP
// packet re-enters PREROUTING carrying a sec_path, so `--pol none` matches only IPIP that
// arrived in plaintext. SECUREOVERLAY-OUT holds, per peer we encrypt to (enforce):
//
//	-d PEER/32 -p 4 -m policy --dir out --pol none -m comment --comment "..." -j DROP
//
// For locally generated packets (the IPIP encapsulation is local output) the route and
// xfrm lookup happen before the OUTPUT hook, so a packet our outbound policy transformed
// is ESP by then (or carries the policy), and only IPIP that escaped the policy (someone
// flushed it) matches: fail closed. In encrypt mode the same matches without -j only count
// (what enforce would drop), so operators see plaintext before they enforce.
//
// No packet marks are used: the policy match decides per packet in one rule, and a mark
// would add a cross-table contract with Calico (0xffff0000), kube-proxy (0x4000, 0x8000)
// and Cilium (0x0f00) for nothing (see docs/dataplane.md).
//
// Invariants of the applier: it touches only its two chains and the two jump rules; the
// chain contents are computed in memory and written in one atomic iptables-restore
// --noflush transaction (never a window with half a ruleset); the jump is re-inserted at
// position 1 whenever something moved or removed it; after any failure, or QueueResync,
// the next Apply re-reads the kernel instead of trusting its cache; rules are rewritten
// only when they differ, so their counters (the plaintext-drop metrics) survive syncs.
package rules

import (
	"fmt"
	"strings"

	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// Table and chains we own.
const (
	Table    = "raw"
	ChainIn  = "SECUREOVERLAY-IN"
	ChainOut = "SECUREOVERLAY-OUT"
	HookIn   = "PREROUTING"
	HookOut  = "OUTPUT"
)

// chains lists (our chain, the built-in chain that jumps to it).
var chains = [][2]string{{ChainIn, HookIn}, {ChainOut, HookOut}}

func chainOf(h desired.Hook) string {
	if h == desired.HookOut {
		return ChainOut
	}
	return ChainIn
}

// Comment is the rule comment naming the peer, so counters map to peers.
func Comment(r desired.Rule) string {
	dir := "from"
	if r.Hook == desired.HookOut {
		dir = "to"
	}
	verb := "drop"
	if r.Action == desired.Count {
		verb = "count"
	}
	return fmt.Sprintf("secureoverlay %s plaintext IPIP %s %s", verb, dir, sanitize(r.Peer))
}

// sanitize keeps a node name safe inside a quoted iptables comment.
func sanitize(s string) string {
	s = strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '.' || r == '_' {
			return r
		}
		return '_'
	}, s)
	if len(s) > 200 {
		s = s[:200]
	}
	return s
}

// Spec is the rule as iptables -S prints it (after normalization), without "-A CHAIN".
func Spec(r desired.Rule) string {
	addr := "-s"
	dir := "in"
	if r.Hook == desired.HookOut {
		addr, dir = "-d", "out"
	}
	s := fmt.Sprintf("%s %s/32 -p 4 -m policy --dir %s --pol none -m comment --comment \"%s\"", addr, r.PeerIP, dir, Comment(r))
	if r.Action == desired.Drop {
		s += " -j DROP"
	}
	return s
}

// Render returns the full contents of our chains for rules: chain → "-A CHAIN spec" lines
// in order (the order of the sorted desired rules).
func Render(rules []desired.Rule) map[string][]string {
	out := map[string][]string{ChainIn: {}, ChainOut: {}}
	for _, r := range rules {
		c := chainOf(r.Hook)
		out[c] = append(out[c], "-A "+c+" "+Spec(r))
	}
	return out
}

// normalize maps the protocol spellings iptables may print (depending on /etc/protocols)
// to ours and drops counters ("-c P B"), so listings compare with Render's lines.
func normalize(line string) (string, uint64, uint64) {
	f := strings.Fields(line)
	var out []string
	var pk, by uint64
	for i := 0; i < len(f); i++ {
		switch {
		case f[i] == "-p" && i+1 < len(f) && (f[i+1] == "ipencap" || f[i+1] == "ipip" || f[i+1] == "4"):
			out = append(out, "-p", "4")
			i++
		case f[i] == "-c" && i+2 < len(f):
			_, _ = fmt.Sscan(f[i+1], &pk)
			_, _ = fmt.Sscan(f[i+2], &by)
			i += 2
		default:
			out = append(out, f[i])
		}
	}
	return strings.Join(out, " "), pk, by
}

// restoreInput is the iptables-restore --noflush transaction replacing our chains.
func restoreInput(want map[string][]string, chainsToWrite []string) []byte {
	var b strings.Builder
	b.WriteString("*" + Table + "\n")
	for _, c := range chainsToWrite {
		fmt.Fprintf(&b, ":%s - [0:0]\n", c)
	}
	for _, c := range chainsToWrite {
		fmt.Fprintf(&b, "-F %s\n", c)
		for _, l := range want[c] {
			b.WriteString(l + "\n")
		}
	}
	b.WriteString("COMMIT\n")
	return []byte(b.String())
}
