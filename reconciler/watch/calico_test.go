package watch

import (
	"net/netip"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"

	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

func obj(t *testing.T, y string) *unstructured.Unstructured {
	t.Helper()
	m := map[string]any{}
	if err := yaml.Unmarshal([]byte(y), &m); err != nil {
		t.Fatal(err)
	}
	return &unstructured.Unstructured{Object: m}
}

func TestParseIPAMBlockBorrowedAndUnknownFields(t *testing.T) {
	b, err := ParseIPAMBlock(obj(t, `
apiVersion: crd.projectcalico.org/v1
kind: IPAMBlock
metadata: {name: 10-65-1-0-26}
spec:
  cidr: 10.65.1.0/26
  affinity: host:node-a
  strictAffinity: false
  somethingNew: {x: 1}
  allocations: [0, null, 1, 2, null, 1]
  unallocated: [1, 4]
  attributes:
  - {handle_id: ipip-tunnel-addr-node-a, secondary: {node: node-a, type: ipipTunnelAddress}}
  - {handle_id: k8s-pod-network.abc, secondary: {node: node-b, namespace: default, pod: p1}}
  - {handle_id: k8s-pod-network.def, secondary: {namespace: default, pod: p2}}
`))
	if err != nil {
		t.Fatal(err)
	}
	if b.CIDR != netip.MustParsePrefix("10.65.1.0/26") || b.Affinity != "host:node-a" || b.Deleted {
		t.Errorf("block = %+v", b)
	}
	want := []desired.Borrowed{{IP: netip.MustParseAddr("10.65.1.2"), Node: "node-b"}, {IP: netip.MustParseAddr("10.65.1.5"), Node: "node-b"}}
	if len(b.Borrowed) != len(want) {
		t.Fatalf("borrowed = %v, want %v", b.Borrowed, want)
	}
	for i := range want {
		if b.Borrowed[i] != want[i] {
			t.Errorf("borrowed[%d] = %v, want %v", i, b.Borrowed[i], want[i])
		}
	}
}

func TestParseIPAMBlockDeletedAndErrors(t *testing.T) {
	b, err := ParseIPAMBlock(obj(t, `{metadata: {name: b}, spec: {cidr: 10.65.2.0/26, deleted: true}}`))
	if err != nil || !b.Deleted || b.Affinity != "" {
		t.Errorf("deleted block: %+v %v", b, err)
	}
	b, err = ParseIPAMBlock(obj(t, `{metadata: {name: b}, spec: {cidr: 10.65.2.0/26, affinity: null, deleted: "true"}}`))
	if err != nil || !b.Deleted {
		t.Errorf("string deleted tolerated: %+v %v", b, err)
	}
	for _, y := range []string{`{metadata: {name: b}, spec: {}}`, `{metadata: {name: b}, spec: {cidr: nonsense}}`, `{metadata: {name: b}}`} {
		if _, err := ParseIPAMBlock(obj(t, y)); err == nil {
			t.Errorf("%s: no error", y)
		}
	}
	// Allocation ordinals outside the block are ignored, not a panic.
	b, err = ParseIPAMBlock(obj(t, `{metadata: {name: b}, spec: {cidr: 10.65.3.0/31, affinity: host:a, allocations: [null, null, 0], attributes: [{secondary: {node: z}}]}}`))
	if err != nil || len(b.Borrowed) != 0 {
		t.Errorf("out-of-range ordinal: %+v %v", b, err)
	}
}

func TestParseBlockAffinityDeletedIsAString(t *testing.T) {
	for _, tc := range []struct {
		y       string
		deleted bool
	}{
		{`{metadata: {name: a}, spec: {node: n1, cidr: 10.65.1.0/26, state: confirmed, deleted: "false"}}`, false},
		{`{metadata: {name: a}, spec: {node: n1, cidr: 10.65.1.0/26, state: confirmed, deleted: "true"}}`, true},
		{`{metadata: {name: a}, spec: {node: n1, cidr: 10.65.1.0/26, deleted: true}}`, true},
		{`{metadata: {name: a}, spec: {node: n1, cidr: 10.65.1.0/26, state: pendingDeletion}}`, true},
		{`{metadata: {name: a}, spec: {node: n1, cidr: 10.65.1.0/26}}`, false},
	} {
		a, err := ParseBlockAffinity(obj(t, tc.y))
		if err != nil || a.Deleted != tc.deleted || a.Node != "n1" {
			t.Errorf("%s: %+v %v, want deleted=%v", tc.y, a, err, tc.deleted)
		}
	}
	if _, err := ParseBlockAffinity(obj(t, `{metadata: {name: a}, spec: {cidr: 10.65.1.0/26}}`)); err == nil {
		t.Error("no node: no error")
	}
	blocks := []desired.Block{{CIDR: netip.MustParsePrefix("10.65.1.0/26"), Affinity: "host:n1"}, {CIDR: netip.MustParsePrefix("10.65.2.0/26"), Affinity: "host:n1"}}
	ApplyAffinities(blocks, []BlockAffinity{{Node: "n1", CIDR: netip.MustParsePrefix("10.65.1.0/26"), Deleted: true}, {Node: "n2", CIDR: netip.MustParsePrefix("10.65.2.0/26"), Deleted: true}})
	if !blocks[0].Deleted || blocks[1].Deleted {
		t.Errorf("affinities applied: %+v", blocks)
	}
}

func TestParseIPPool(t *testing.T) {
	for _, tc := range []struct {
		y        string
		mode     string
		disabled bool
	}{
		{`{metadata: {name: p}, spec: {cidr: 10.65.0.0/16, ipipMode: Always, natOutgoing: true}}`, "Always", false},
		{`{metadata: {name: p}, spec: {cidr: 10.65.0.0/16, ipipMode: CrossSubnet, disabled: true}}`, "CrossSubnet", true},
		{`{metadata: {name: p}, spec: {cidr: 10.65.0.0/16}}`, "", false},
		// The pre-3.0 spec.ipip form is pruned by Calico's real CRDs (a legacy pool reads
		// as ipipMode ""): it is not interpreted.
		{`{metadata: {name: p}, spec: {cidr: 10.65.0.0/16, ipip: {enabled: true, mode: cross-subnet}}}`, "", false},
	} {
		p, err := ParseIPPool(obj(t, tc.y))
		if err != nil || p.IPIPMode != tc.mode || p.Disabled != tc.disabled || p.Name != "p" || p.CIDR != netip.MustParsePrefix("10.65.0.0/16") {
			t.Errorf("%s: %+v %v", tc.y, p, err)
		}
	}
	if _, err := ParseIPPool(obj(t, `{metadata: {name: p}, spec: {cidr: "10.65.0.0"}}`)); err == nil {
		t.Error("bad cidr: no error")
	}
}

func TestParseBGPPeer(t *testing.T) {
	for _, tc := range []struct {
		y  string
		ip string
		ok bool
	}{
		{`{metadata: {name: tor}, spec: {peerIP: 198.18.0.1, asNumber: 64512}}`, "198.18.0.1", true},
		{`{metadata: {name: tor}, spec: {peerIP: "198.18.0.1:179"}}`, "198.18.0.1", true},
		{`{metadata: {name: tor}, spec: {peerIP: "[2001:db8::1]:179"}}`, "2001:db8::1", true},
		{`{metadata: {name: rr}, spec: {peerSelector: "route-reflector == 'true'"}}`, "", false},
	} {
		p, ok, err := ParseBGPPeer(obj(t, tc.y))
		if err != nil || ok != tc.ok || (ok && p.PeerIP != netip.MustParseAddr(tc.ip)) {
			t.Errorf("%s: %+v ok=%v %v", tc.y, p, ok, err)
		}
	}
	if _, _, err := ParseBGPPeer(obj(t, `{metadata: {name: x}, spec: {peerIP: banana}}`)); err == nil {
		t.Error("bad peerIP: no error")
	}
}

func TestParseIPPoolVXLANAndFelix(t *testing.T) {
	p, err := ParseIPPool(obj(t, `{metadata: {name: vx}, spec: {cidr: 10.96.0.0/16, vxlanMode: CrossSubnet, ipipMode: Never}}`))
	if err != nil || p.VXLANMode != "CrossSubnet" || p.IPIPMode != "Never" {
		t.Errorf("vxlan pool: %+v %v", p, err)
	}
	def, err := ParseFelixConfiguration(obj(t, `{metadata: {name: default}, spec: {wireguardEnabled: true, nftablesMode: Auto, ipipMTU: 1480}}`))
	if err != nil {
		t.Fatal(err)
	}
	node, err := ParseFelixConfiguration(obj(t, `{metadata: {name: node.a}, spec: {wireguardEnabled: false, bpfEnabled: true, nftablesMode: Enabled}}`))
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]FelixConfig{"default": def, "node.a": node}
	if got, want := FelixFor("a", byName), (desired.Felix{WireGuard: false, BPF: true, NFTablesMode: "Enabled"}); got != want {
		t.Errorf("node a: %+v, want %+v (node.a overrides default field by field)", got, want)
	}
	if got, want := FelixFor("b", byName), (desired.Felix{WireGuard: true, NFTablesMode: "Auto"}); got != want {
		t.Errorf("node b: %+v, want %+v", got, want)
	}
	if _, err := ParseFelixConfiguration(obj(t, `{metadata: {name: default}, spec: {bpfEnabled: "yes please"}}`)); err == nil {
		t.Error("felix configuration with a non-boolean bpfEnabled: no error")
	}
}

func TestParseIPAMBlockReleasedAndVirtual(t *testing.T) {
	// Calico released the affinity: every allocation with a node is that node's.
	b, err := ParseIPAMBlock(obj(t, `{metadata: {name: b}, spec: {cidr: 10.65.4.0/26, allocations: [0, null, 1], unallocated: [1],
  strictAffinity: false, attributes: [{handle_id: h1, secondary: {node: node-a}}, {handle_id: h2, secondary: {node: node-b}}]}}`))
	if err != nil {
		t.Fatal(err)
	}
	want := []desired.Borrowed{{IP: netip.MustParseAddr("10.65.4.0"), Node: "node-a"}, {IP: netip.MustParseAddr("10.65.4.2"), Node: "node-b"}}
	if b.Affinity != "" || len(b.Borrowed) != 2 || b.Borrowed[0] != want[0] || b.Borrowed[1] != want[1] {
		t.Errorf("released block: %+v, want borrowed %v", b, want)
	}
	b, err = ParseIPAMBlock(obj(t, `{metadata: {name: b}, spec: {cidr: 10.65.5.0/26, affinity: "virtual:lb", allocations: [], unallocated: [], attributes: [], strictAffinity: false}}`))
	if err != nil || b.Affinity != "virtual:lb" {
		t.Errorf("virtual block: %+v %v", b, err)
	}
}
