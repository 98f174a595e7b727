package desired

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"

	"github.com/secureoverlay/secureoverlay/api"
)

func alwaysInputs(mode api.Mode) Inputs {
	return Inputs{Self: "a",
		Nodes: []Node{node("a", "198.18.0.1/24", 1),
			withReport(node("b", "198.18.0.2/24", 2), api.ModeEncrypt, 1),
			withReport(node("c", "198.19.0.3/24", 3), api.ModeAccept, 1)},
		Pools: []Pool{{Name: "default", CIDR: mustPrefix("10.244.0.0/16"), IPIPMode: IPIPAlways}},
		Ring:  ring(mode, active(1)), Keys: testKeys}
}

// Every cutover mode on an Always pool: b reports encrypt (so it is dropped in enforce),
// c reports accept (we encrypt to it but never drop its plaintext).
func TestComputeAlwaysEveryMode(t *testing.T) {
	for _, m := range api.Modes {
		t.Run(string(m), func(t *testing.T) {
			st, err := Compute(alwaysInputs(m))
			if err != nil {
				t.Fatal(err)
			}
			if got, want := render(st), goldenAlways[string(m)]; got != want {
				t.Errorf("state mismatch\n got:\n%s\nwant:\n%s", got, want)
			}
		})
	}
}

func TestComputeCrossSubnetBorrowedBGPNever(t *testing.T) {
	st, err := Compute(crossSubnetInputs(api.ModeEnforce))
	if err != nil {
		t.Fatal(err)
	}
	if got := render(st); got != goldenCrossSubnetEnforce {
		t.Errorf("state mismatch\n got:\n%s\nwant:\n%s", got, goldenCrossSubnetEnforce)
	}
	// In accept there are no outbound policies at all, and fwd templates are optional.
	st, err = Compute(crossSubnetInputs(api.ModeAccept))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range st.Policies {
		if p.Dir == Out {
			t.Errorf("accept programs outbound policy %s", p)
		}
		if !p.Tmpl.IsZero() && !p.Tmpl.Optional {
			t.Errorf("accept programs required template %s", p)
		}
	}
	var tunnelSAs int
	for _, sa := range st.SAs {
		if sa.Kind == Tunnel {
			tunnelSAs++
			if sa.Peer == "c" {
				t.Errorf("tunnel SA toward other-subnet peer c: %s", sa)
			}
		}
	}
	if tunnelSAs != 4 { // b and d, in and out, one generation
		t.Errorf("tunnel SAs = %d, want 4", tunnelSAs)
	}
}

func TestComputeBareAddressNotCovered(t *testing.T) {
	in := crossSubnetInputs(api.ModeEncrypt)
	in.Nodes[0].IPv4Address = "198.18.0.1"
	st, err := Compute(in)
	if err != nil {
		t.Fatal(err)
	}
	for _, sa := range st.SAs {
		if sa.Kind == Tunnel {
			t.Fatalf("tunnel SA without a known subnet: %s", sa)
		}
	}
	if !strings.Contains(strings.Join(st.NotCovered, "\n"), "bare IPv4Address") {
		t.Errorf("not reported: %q", st.NotCovered)
	}
}

func TestComputeSkips(t *testing.T) {
	in := alwaysInputs(api.ModeEncrypt)
	noID := node("noid", "198.18.0.20/24", 0)
	noBoot := node("noboot", "198.18.0.21/24", 21)
	noBoot.Incarnation = ""
	in.Nodes = append(in.Nodes,
		node("noaddr", "", 10),
		node("v6", "2001:db8::1/64", 11),
		node("garbage", "not-an-ip", 12),
		node("dupip", "198.18.0.2", 13),
		noID, noBoot,
		withReport(node("bare", "198.18.0.30", 30), api.ModeAccept, 1),
	)
	in.BGPPeers = []BGPPeer{{Name: "tor", PeerIP: mustAddr("198.18.0.254")}, {Name: "node-b", PeerIP: mustAddr("198.18.0.2")}}
	// b held 198.18.0.2 before dupip claimed it (TestComputeAddressConflicts has the rest).
	prev, err := Compute(alwaysInputs(api.ModeEncrypt))
	if err != nil {
		t.Fatal(err)
	}
	in.Previous = &prev
	st, err := Compute(in)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, s := range st.Skipped {
		got = append(got, s.Object)
	}
	want := []string{"node/dupip", "node/garbage", "node/noaddr", "node/noboot", "node/noid", "node/v6"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("skipped %v, want %v\n%s", got, want, render(st))
	}
	for _, sa := range st.SAs {
		if sa.Src.String() == "198.18.0.254" || sa.Dst.String() == "198.18.0.254" {
			t.Errorf("SA for BGP peer outside the cluster: %s", sa)
		}
	}
	if len(st.NotCovered) != 1 || !strings.Contains(st.NotCovered[0], "bgp peer tor") {
		t.Errorf("not covered = %q", st.NotCovered)
	}
	// The bare-IP node is a normal transport peer.
	if !strings.Contains(render(st), "sa out transport 198.18.0.1->198.18.0.30") {
		t.Errorf("bare-IP peer not programmed:\n%s", render(st))
	}
}

func TestComputeErrors(t *testing.T) {
	cases := []struct {
		name, want string
		mut        func(*Inputs)
	}{
		{"self missing", "not among the cluster nodes", func(in *Inputs) { in.Self = "zz" }},
		{"self no address", "no IPv4 address annotation", func(in *Inputs) { in.Nodes[0].IPv4Address = "" }},
		{"self no id", "no node ID", func(in *Inputs) { in.Nodes[0].NodeID = 0 }},
		{"self no boot", "no incarnation", func(in *Inputs) { in.Nodes[0].Incarnation = "" }},
		{"bad mode", "not a mode", func(in *Inputs) { in.Ring.Mode = "sideways" }},
		{"no generations", "without live generations", func(in *Inputs) { in.Ring.Generations = nil }},
		{"dup generation", "listed twice", func(in *Inputs) { in.Ring.Generations = []Generation{active(1), retiring(1)} }},
		{"bad gen state", "unknown state", func(in *Inputs) { in.Ring.Generations = []Generation{{ID: 1, State: "zombie"}} }},
		{"bad icv", "icv 10 bytes", func(in *Inputs) { in.Config.ICVBytes = 10 }},
		{"small replay", "replay window 64", func(in *Inputs) { in.Config.ReplayWindow = 64 }},
		{"same reqids", "must differ", func(in *Inputs) { in.Config.TunnelReqID = DefaultReqID }},
		{"no keys", "no key function", func(in *Inputs) { in.Keys = nil }},
		{"dup node", "listed twice", func(in *Inputs) { in.Nodes = append(in.Nodes, in.Nodes[1]) }},
		{"spi collision", "spi collision", func(in *Inputs) { in.Nodes[2].NodeID = 2 }},
		{"soft above hard", "soft packet limit", func(in *Inputs) { in.Config.SoftPackets = 10; in.Config.HardPackets = 5 }},
		{"huge priority", "priority", func(in *Inputs) { in.Config.Priority = 3 << 30 }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			in := alwaysInputs(api.ModeEncrypt)
			in.Nodes = append([]Node(nil), in.Nodes...)
			c.mut(&in)
			_, err := Compute(in)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v, want one containing %q", err, c.want)
			}
		})
	}
	// Mode off needs no keys, IDs, generations or even a usable own address.
	for _, mut := range []func(*Inputs){func(in *Inputs) { in.Self = "zz" }, func(in *Inputs) { in.Nodes[0].IPv4Address = "" }} {
		in := alwaysInputs(api.ModeOff)
		in.Nodes = append([]Node(nil), in.Nodes...)
		mut(&in)
		if st, err := Compute(in); err != nil || len(st.SAs)+len(st.Policies)+len(st.Rules) != 0 {
			t.Fatalf("off without self: %v", err)
		}
	}
	in := alwaysInputs(api.ModeOff)
	in.Keys, in.Ring.Generations, in.Nodes[0].NodeID = nil, nil, 0
	st, err := Compute(in)
	if err != nil || len(st.SAs)+len(st.Policies)+len(st.Rules) != 0 {
		t.Fatalf("off: %v\n%s", err, render(st))
	}
}

func TestKeyFuncFailureSkipsOnlyThatPeer(t *testing.T) {
	in := alwaysInputs(api.ModeEncrypt)
	secret := []byte{0xde, 0xad, 0xbe, 0xef}
	in.Keys = func(gen uint32, kind Kind, lane uint16, src, dst Endpoint) (uint32, Key, error) {
		if src.NodeID == 3 || dst.NodeID == 3 {
			return 0, Key{}, errors.New("node 3 unknown to the ring")
		}
		if src.NodeID == 2 && dst.NodeID == 1 {
			return testKeys(gen, kind, lane, src, dst)
		}
		spi, k, err := testKeys(gen, kind, lane, src, dst)
		_ = k
		return spi, NewKey(append(bytes.Repeat(secret, 4), 1, 2, 3, 4)), err
	}
	st, err := Compute(in)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Skipped) != 1 || st.Skipped[0].Object != "node/c" {
		t.Fatalf("skipped = %+v", st.Skipped)
	}
	for _, sa := range st.SAs {
		if sa.Peer == "c" {
			t.Errorf("SA for peer with failed derivation: %s", sa)
		}
	}
	if len(st.Peers) != 1 || st.Peers[0].Name != "b" || st.Peers[0].SendGeneration != 1 {
		t.Errorf("peers = %+v", st.Peers)
	}
	// Wrong key length is rejected per peer too.
	in.Keys = func(gen uint32, kind Kind, lane uint16, src, dst Endpoint) (uint32, Key, error) {
		spi, _, err := testKeys(gen, kind, lane, src, dst)
		return spi, NewKey(secret), err
	}
	st, err = Compute(in)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.SAs) != 0 || len(st.Skipped) != 2 {
		t.Errorf("short keys accepted: %s", render(st))
	}
}

// The redaction test: no fmt verb, slog handler, JSON encoding or error ever shows key
// bytes, whether the Key is printed alone or inside an SA or a State.
func TestKeyNeverPrinted(t *testing.T) {
	raw := []byte("\x11\x22\x33\x44SECRETKEYBYTES\x55\x66")
	k := NewKey(raw)
	sa := SA{SPI: 0x100, Key: k, Peer: "b"}
	st := State{SAs: []SA{sa}}
	var outs []string
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x", "%X", "%d", "%T"} {
		outs = append(outs, fmt.Sprintf(verb, k), fmt.Sprintf(verb, sa), fmt.Sprintf(verb, st), fmt.Sprintf(verb, &sa))
	}
	outs = append(outs, fmt.Errorf("add %v: %w", sa, errors.New("x")).Error())
	j, _ := json.Marshal(st)
	outs = append(outs, string(j))
	var buf bytes.Buffer
	slog.New(slog.NewJSONHandler(&buf, nil)).Info("sa", "key", k, "sa", sa)
	slog.New(slog.NewTextHandler(&buf, nil)).Info("sa", "key", k, "sa", sa)
	outs = append(outs, buf.String())
	for _, o := range outs {
		for _, leak := range []string{"SECRETKEYBYTES", hex.EncodeToString(raw[:6]), strings.ToUpper(hex.EncodeToString(raw[:6])), "\\x11\\x22", "17 34 51"} {
			if strings.Contains(o, leak) {
				t.Fatalf("key bytes leaked (%q) in %q", leak, o)
			}
		}
	}
	if !bytes.Equal(k.Bytes(), raw) || !k.Equal(NewKey(raw)) || k.Equal(NewKey(raw[1:])) {
		t.Fatal("key round trip broken")
	}
	b := k.Bytes()
	b[0] = 0
	if k.Bytes()[0] != 0x11 {
		t.Fatal("Bytes aliases the key")
	}
}

func TestChooseGeneration(t *testing.T) {
	cases := []struct {
		gens   []Generation
		listed []uint32
		want   uint32
	}{
		{[]Generation{active(1)}, []uint32{1}, 1},
		{[]Generation{active(1)}, nil, 0},
		{[]Generation{active(1), pending(2)}, []uint32{1, 2}, 1}, // pending never sends
		{[]Generation{retiring(1), active(2)}, []uint32{1, 2}, 2},
		{[]Generation{retiring(1), active(2)}, []uint32{1}, 1}, // peer not switched yet
		{[]Generation{retiring(1), retiring(2), active(3)}, []uint32{1, 2}, 2},
		{[]Generation{retiring(1), active(2)}, []uint32{7}, 0},
		{[]Generation{pending(5)}, []uint32{5}, 0},
	}
	for i, c := range cases {
		if got := chooseGeneration(c.gens, c.listed); got != c.want {
			t.Errorf("case %d: got %d want %d", i, got, c.want)
		}
	}
}

// Per-pair readiness and stale reports: a peer's report counts only if made with its
// current incarnation, and it must show the peer has our inbound SAs / sends ESP to us.
func TestComputePeerReadiness(t *testing.T) {
	base := alwaysInputs(api.ModeEnforce)
	cases := []struct {
		name     string
		mut      func(r *Report)
		wantSend uint32
		wantDrop bool
	}{
		{"ready", func(r *Report) {}, 1, true},
		{"stale incarnation", func(r *Report) { r.Incarnation = "old-boot" }, 0, false},
		{"no inbound from us", func(r *Report) { r.InboundFromSelf = false }, 0, true},
		{"not encrypting to us", func(r *Report) { r.EncryptsToSelf = false }, 1, false},
		{"peer off", func(r *Report) { r.Mode = api.ModeOff; r.EncryptsToSelf = false }, 0, false},
		{"unknown gen", func(r *Report) { r.Generations = []uint32{9} }, 0, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			in := base
			in.Nodes = append([]Node(nil), base.Nodes...)
			r := *in.Nodes[1].Report
			c.mut(&r)
			in.Nodes[1].Report = &r
			st, err := Compute(in)
			if err != nil {
				t.Fatal(err)
			}
			var ps PeerStatus
			for _, p := range st.Peers {
				if p.Name == "b" {
					ps = p
				}
			}
			if ps.SendGeneration != c.wantSend || ps.DropsPlaintext != c.wantDrop {
				t.Errorf("send=%d drop=%v, want send=%d drop=%v (%s)", ps.SendGeneration, ps.DropsPlaintext, c.wantSend, c.wantDrop, ps.Reason)
			}
			if (ps.SendGeneration == 0) != (ps.Reason != "") {
				t.Errorf("reason %q with send generation %d", ps.Reason, ps.SendGeneration)
			}
			hasDropRule := strings.Contains(render(st), "rule in drop 198.18.0.2")
			hasOutDrop := strings.Contains(render(st), "rule out drop 198.18.0.2")
			if hasDropRule != c.wantDrop || hasOutDrop != (c.wantSend != 0) {
				t.Errorf("rules disagree with status:\n%s", render(st))
			}
		})
	}
}

// Joining and leaving touch only the pair's objects.
func TestComputeJoinLeave(t *testing.T) {
	in := alwaysInputs(api.ModeEncrypt)
	before, err := Compute(in)
	if err != nil {
		t.Fatal(err)
	}
	in.Nodes = append(in.Nodes, withReport(node("e", "198.19.0.9/24", 9), api.ModeEncrypt, 1))
	after, err := Compute(in)
	if err != nil {
		t.Fatal(err)
	}
	added := diffLines(render(before), render(after))
	removed := diffLines(render(after), render(before))
	if len(removed) != 0 {
		t.Errorf("join removed %q", removed)
	}
	// 2 SAs, in+out policy, out count rule, in count rule.
	if len(added) != 6 {
		t.Errorf("join added %d lines, want 6: %q", len(added), added)
	}
	for _, l := range added {
		if !strings.Contains(l, "198.19.0.9") && !strings.Contains(l, "0x40000900") {
			t.Errorf("join added unrelated %q", l)
		}
	}
	// Leave: back to the original state exactly.
	in.Nodes = in.Nodes[:3]
	left, err := Compute(in)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(left, before) {
		t.Errorf("leave did not restore the state:\n%s", strings.Join(diffLines(render(before), render(left)), "\n"))
	}
}

func diffLines(a, b string) []string {
	have := map[string]bool{}
	for _, l := range strings.Split(a, "\n") {
		have[l] = true
	}
	var out []string
	for _, l := range strings.Split(b, "\n") {
		if !have[l] {
			out = append(out, l)
		}
	}
	return out
}

// Input order never matters, and States compare with reflect.DeepEqual.
func TestComputeDeterministic(t *testing.T) {
	in := crossSubnetInputs(api.ModeEnforce)
	want, err := Compute(in)
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 50; i++ {
		r.Shuffle(len(in.Nodes), func(i, j int) { in.Nodes[i], in.Nodes[j] = in.Nodes[j], in.Nodes[i] })
		r.Shuffle(len(in.Blocks), func(i, j int) { in.Blocks[i], in.Blocks[j] = in.Blocks[j], in.Blocks[i] })
		r.Shuffle(len(in.Pools), func(i, j int) { in.Pools[i], in.Pools[j] = in.Pools[j], in.Pools[i] })
		got, err := Compute(in)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("order-dependent result on shuffle %d", i)
		}
	}
}

func TestParseNodeAddress(t *testing.T) {
	cases := map[string]string{
		"10.0.0.5/24":     "10.0.0.5/24",
		"10.0.0.5":        "10.0.0.5/32",
		" 10.0.0.5/16 ":   "10.0.0.5/16",
		"::ffff:10.0.0.5": "10.0.0.5/32",
		"":                "error",
		"2001:db8::1/64":  "error",
		"10.0.0.5/33":     "error",
		"0.0.0.0":         "error",
		"127.0.0.1/8":     "error",
		"x":               "error",
	}
	for in, want := range cases {
		p, err := ParseNodeAddress(in)
		got := p.String()
		if err != nil {
			got = "error"
		}
		if got != want {
			t.Errorf("ParseNodeAddress(%q) = %s (%v), want %s", in, got, err, want)
		}
	}
	if n, ok := ParseAffinity("host:node-1"); !ok || n != "node-1" {
		t.Error("affinity host:node-1")
	}
	for _, bad := range []string{"virtual:x", "host:", ""} {
		if _, ok := ParseAffinity(bad); ok {
			t.Errorf("affinity %q accepted", bad)
		}
	}
}

func TestTransitionRules(t *testing.T) {
	old, err := Compute(alwaysInputs(api.ModeEnforce))
	if err != nil {
		t.Fatal(err)
	}
	in := alwaysInputs(api.ModeEnforce)
	in.Nodes[2].Report = nil // c's report vanished: no more ESP to c
	next, err := Compute(in)
	if err != nil {
		t.Fatal(err)
	}
	got := TransitionRules(old.Rules, next.Rules)
	want := []Rule{
		{Hook: HookIn, PeerIP: mustAddr("198.18.0.2"), Peer: "b", Action: Drop},
		{Hook: HookOut, PeerIP: mustAddr("198.18.0.2"), Peer: "b", Action: Drop},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("transition rules %v, want %v", got, want)
	}
}

// Tunnel SAs do not wait for IPAM blocks (so "inbound installed" covers them before the
// peer has seen a new block); tunnel policies do.
func TestTunnelSAsIndependentOfBlocks(t *testing.T) {
	in := crossSubnetInputs(api.ModeEncrypt)
	var blocks []Block
	for _, b := range in.Blocks {
		if b.Affinity == "host:d" {
			continue
		}
		var kept []Borrowed
		for _, x := range b.Borrowed {
			if x.Node != "d" {
				kept = append(kept, x)
			}
		}
		b.Borrowed = kept
		blocks = append(blocks, b)
	}
	in.Blocks = blocks
	st, err := Compute(in)
	if err != nil {
		t.Fatal(err)
	}
	var saD, polD int
	for _, sa := range st.SAs {
		if sa.Peer == "d" && sa.Kind == Tunnel {
			saD++
		}
	}
	for _, p := range st.Policies {
		if p.Tmpl.Kind == Tunnel && (p.Tmpl.Dst.String() == "198.18.0.4" || p.Tmpl.Src.String() == "198.18.0.4") {
			polD++
		}
	}
	if saD != 2 || polD != 0 {
		t.Fatalf("block-less same-subnet peer d: %d tunnel SAs (want 2), %d tunnel policies (want 0)", saD, polD)
	}
	for _, ps := range st.Peers {
		if ps.Name == "d" && ps.SameSubnet {
			t.Error("d reported as tunnel-covered without blocks")
		}
	}
}

// A KeyFunc without tunnel derivation (the keys package today) degrades only the
// CrossSubnet same-subnet coverage: IPIP to every peer is still encrypted.
func TestTunnelKeyFailureKeepsTransport(t *testing.T) {
	in := crossSubnetInputs(api.ModeEnforce)
	in.Keys = func(gen uint32, kind Kind, lane uint16, src, dst Endpoint) (uint32, Key, error) {
		if kind == Tunnel {
			return 0, Key{}, errors.New("no key derivation for tunnel-mode SAs yet")
		}
		return testKeys(gen, kind, lane, src, dst)
	}
	st, err := Compute(in)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Skipped) != 0 {
		t.Fatalf("peers skipped: %+v", st.Skipped)
	}
	for _, sa := range st.SAs {
		if sa.Kind != Transport {
			t.Fatalf("tunnel SA without tunnel keys: %s", sa)
		}
	}
	for _, p := range st.Policies {
		if p.Proto != 4 {
			t.Fatalf("non-transport policy without tunnel keys: %s", p)
		}
	}
	if len(st.EncryptingPeers()) != 3 || len(st.SAs) != 6 {
		t.Fatalf("transport coverage lost: %s", render(st))
	}
	if notes := strings.Join(st.NotCovered, "\n"); !strings.Contains(notes, "node b (CrossSubnet) is not encrypted") || !strings.Contains(notes, "node d") {
		t.Fatalf("not reported: %s", notes)
	}
}
