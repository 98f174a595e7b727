package desired

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/secureoverlay/secureoverlay/api"
)

// policiesBetween lists the tunnel-mode policies of st as "dir src dst" lines.
func tunnelPolicies(st State) []string {
	var out []string
	for _, p := range st.Policies {
		if p.Proto == 4 {
			continue
		}
		kind := "bypass"
		if !p.Tmpl.IsZero() {
			kind = p.Tmpl.Kind.String()
		}
		out = append(out, p.Dir.String()+" "+p.Src.String()+" "+p.Dst.String()+" "+kind)
	}
	return out
}

// TestComputeCalicoBlocksAsTheyReallyAre: a and b share a subnet under a CrossSubnet pool.
// Each case adds blocks as Calico's IPAM leaves them and checks which addresses keep
// their node's coverage, which are reported (with a reason and a neighbour code) and that
// nothing of another address family ever reaches a policy.
func TestComputeCalicoBlocksAsTheyReallyAre(t *testing.T) {
	base := func(blocks []Block, pools ...Pool) Inputs {
		return Inputs{Self: "a",
			Nodes: []Node{node("a", "198.18.0.1/24", 1), withReport(node("b", "198.18.0.2/24", 2), api.ModeEnforce, 1),
				withReport(node("c", "198.19.0.3/24", 3), api.ModeEnforce, 1)},
			Blocks: blocks,
			Pools:  append([]Pool{{Name: "cross", CIDR: mustPrefix("10.244.0.0/16"), IPIPMode: IPIPCrossSubnet}}, pools...),
			Ring:   ring(api.ModeEnforce, active(1)), Keys: testKeys}
	}
	aBlock := Block{CIDR: mustPrefix("10.244.1.0/26"), Affinity: "host:a"}
	for _, tc := range []struct {
		name       string
		in         Inputs
		want       []string // tunnel-mode policies (dir src dst kind)
		skipped    []string // "object: reason substring"
		neighbours []string
	}{{
		name: "released affinity: the block's allocations keep their nodes",
		// Calico released b's affinity on 10.244.2.0/26 but two pods of b and one of c
		// still hold addresses in it.
		in: base([]Block{aBlock, {CIDR: mustPrefix("10.244.2.0/26"), Affinity: "", Borrowed: []Borrowed{
			{IP: mustAddr("10.244.2.3"), Node: "b"}, {IP: mustAddr("10.244.2.7"), Node: "b"}, {IP: mustAddr("10.244.2.9"), Node: "c"}}}}),
		want: []string{
			"out 10.244.1.0/26 10.244.2.3/32 tunnel", "out 10.244.1.0/26 10.244.2.7/32 tunnel",
			"fwd 10.244.2.3/32 10.244.1.0/26 tunnel", "fwd 10.244.2.7/32 10.244.1.0/26 tunnel",
		},
	}, {
		name: "released affinity on our own addresses: they stay ours",
		in: base([]Block{{CIDR: mustPrefix("10.244.9.0/26"), Borrowed: []Borrowed{{IP: mustAddr("10.244.9.1"), Node: "a"}}},
			{CIDR: mustPrefix("10.244.2.0/26"), Affinity: "host:b"}}),
		want: []string{"out 10.244.9.1/32 10.244.2.0/26 tunnel", "fwd 10.244.2.0/26 10.244.9.1/32 tunnel"},
	}, {
		name: "borrowed /32 in a peer's block keeps its node's coverage",
		in: base([]Block{aBlock, {CIDR: mustPrefix("10.244.2.0/26"), Affinity: "host:b", Borrowed: []Borrowed{
			{IP: mustAddr("10.244.2.5"), Node: "c"}}}}),
		want: []string{
			"out 10.244.1.0/26 10.244.2.0/26 tunnel", "fwd 10.244.2.0/26 10.244.1.0/26 tunnel",
			// c is in another subnet (IPIP): its /32 bypasses b's block policy.
			"out 10.244.1.0/26 10.244.2.5/32 bypass", "fwd 10.244.2.5/32 10.244.1.0/26 bypass",
		},
	}, {
		name: "virtual (load-balancer) affinity is reported, never covered",
		in: base([]Block{aBlock, {CIDR: mustPrefix("10.244.7.0/26"), Affinity: "virtual:lb", Borrowed: []Borrowed{
			{IP: mustAddr("10.244.7.1"), Node: "b"}}}}),
		skipped:    []string{"block/10.244.7.0/26: load-balancer (virtual) block"},
		neighbours: []string{NeighbourVirtual},
	}, {
		name: "IPv6 block in an IPv6 CrossSubnet pool is reported, never mixed into IPv4 policies",
		in: base([]Block{aBlock, {CIDR: mustPrefix("10.244.2.0/26"), Affinity: "host:b"},
			{CIDR: mustPrefix("fd00:10:244:2::/122"), Affinity: "host:b"}},
			Pool{Name: "v6", CIDR: mustPrefix("fd00:10:244::/48"), IPIPMode: IPIPCrossSubnet}),
		want:       []string{"out 10.244.1.0/26 10.244.2.0/26 tunnel", "fwd 10.244.2.0/26 10.244.1.0/26 tunnel"},
		skipped:    []string{"block/fd00:10:244:2::/122: IPv6 block"},
		neighbours: []string{NeighbourIPv6},
	}, {
		name:       "VXLAN pool is reported as not covered",
		in:         base([]Block{aBlock}, Pool{Name: "vx", CIDR: mustPrefix("10.96.0.0/16"), VXLANMode: VXLANAlways}),
		neighbours: []string{NeighbourVXLAN},
	}, {
		name: "unknown affinity form is skipped with its reason",
		in: base([]Block{aBlock, {CIDR: mustPrefix("10.244.2.0/26"), Affinity: "rack:7", Borrowed: []Borrowed{
			{IP: mustAddr("10.244.2.3"), Node: "b"}}}}),
		skipped: []string{`block/10.244.2.0/26: affinity "rack:7"`},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			st, err := Compute(tc.in)
			if err != nil {
				t.Fatal(err)
			}
			got := tunnelPolicies(st)
			slices.Sort(got)
			want := slices.Clone(tc.want)
			slices.Sort(want)
			if !slices.Equal(got, want) {
				t.Errorf("tunnel policies\n got %q\nwant %q\nstate:\n%s", got, want, render(st))
			}
			for _, p := range st.Policies {
				if p.Src.Addr().Is4() != p.Dst.Addr().Is4() || !p.Src.Addr().Is4() {
					t.Errorf("policy mixes or leaves IPv4: %s", p)
				}
			}
			for _, s := range tc.skipped {
				obj, reason, _ := strings.Cut(s, ": ")
				if !slices.ContainsFunc(st.Skipped, func(k Skip) bool { return k.Object == obj && strings.Contains(k.Reason, reason) }) {
					t.Errorf("skipped %v does not hold %q", st.Skipped, s)
				}
			}
			if len(tc.skipped) == 0 && len(st.Skipped) != 0 {
				t.Errorf("skipped %v, want none", st.Skipped)
			}
			if !slices.Equal(st.Neighbours, tc.neighbours) {
				t.Errorf("neighbours %q, want %q", st.Neighbours, tc.neighbours)
			}
		})
	}
}

// TestComputeIPv6PoolAndFelixNeighbours: IPv6 pools, Calico WireGuard, the eBPF data plane
// and nftables mode are reported (NotCovered text and short codes) and change no policy.
func TestComputeIPv6PoolAndFelixNeighbours(t *testing.T) {
	in := alwaysInputs(api.ModeEnforce)
	plain, err := Compute(in)
	if err != nil {
		t.Fatal(err)
	}
	in.Pools = append(in.Pools, Pool{Name: "v6", CIDR: mustPrefix("fd00:10:244::/48"), IPIPMode: IPIPAlways})
	in.Felix = Felix{WireGuard: true, BPF: true, NFTablesMode: "Enabled"}
	st, err := Compute(in)
	if err != nil {
		t.Fatal(err)
	}
	if render(plain) == render(st) {
		t.Fatal("neighbours not reported")
	}
	if !slices.Equal(st.Policies, plain.Policies) || len(st.SAs) != len(plain.SAs) || !slices.Equal(st.Rules, plain.Rules) {
		t.Error("neighbour modes changed the kernel state; they are only reported")
	}
	want := []string{NeighbourBPF, NeighbourIPv6, NeighbourNFTables, NeighbourWireGuard}
	if !slices.Equal(st.Neighbours, want) {
		t.Errorf("neighbours %q, want %q", st.Neighbours, want)
	}
	notes := strings.Join(st.NotCovered, "\n")
	for _, w := range []string{"pool v6 (fd00:10:244::/48) is IPv6", "wireguard", "eBPF"} {
		if !strings.Contains(notes, w) {
			t.Errorf("not-covered notes lack %q:\n%s", w, notes)
		}
	}
	// Auto and Disabled nftables modes are not reported.
	in.Felix = Felix{NFTablesMode: "Auto"}
	if st, _ := Compute(in); slices.Contains(st.Neighbours, NeighbourNFTables) {
		t.Error("nftablesMode Auto reported as nftables")
	}
	_ = netip.Addr{}
}
