package keys

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite keys/testdata golden files")

// testRoot is the fixed, public test root: bytes 0x00..0x1f (gen 1) or 0x20..0x3f (gen 2).
func testRoot(gen uint32) Key {
	k := make(Key, RootKeyBytes)
	for i := range k {
		k[i] = byte(int(gen-1)*RootKeyBytes + i)
	}
	return k
}

type vector struct {
	Generation     uint32 `json:"generation"`
	Cipher         Cipher `json:"cipher"`
	ICVBytes       int    `json:"icvBytes"`
	RootHex        string `json:"rootHex"`
	SrcIP          string `json:"srcIP"`
	DstIP          string `json:"dstIP"`
	SrcIncarnation string `json:"srcIncarnation"`
	DstIncarnation string `json:"dstIncarnation"`
	SrcNodeID      uint32 `json:"srcNodeID"`
	Kind           string `json:"kind,omitempty"` // "" = transport, "tunnel"
	InfoHex        string `json:"infoHex"`
	SPI            string `json:"spi"`
	KeyHex         string `json:"keyHex"` // AES key || salt
}

func vectorInputs() []vector {
	a, b := "198.18.0.1", "198.18.0.2"
	ia, ib := "8f1c2a9e-5b7d-4e3f-9a61-0c2d4e6f8a10", "1d3b5f79-2c4e-4a6b-8d0f-2a4c6e8f0b13"
	return []vector{
		{Generation: 1, Cipher: AES128GCM, ICVBytes: 8, SrcIP: a, DstIP: b, SrcIncarnation: ia, DstIncarnation: ib, SrcNodeID: 1},
		{Generation: 1, Cipher: AES128GCM, ICVBytes: 8, SrcIP: b, DstIP: a, SrcIncarnation: ib, DstIncarnation: ia, SrcNodeID: 2},
		{Generation: 2, Cipher: AES128GCM, ICVBytes: 8, SrcIP: a, DstIP: b, SrcIncarnation: ia, DstIncarnation: ib, SrcNodeID: 1},
		{Generation: 1, Cipher: AES128GCM, ICVBytes: 8, SrcIP: a, DstIP: b, SrcIncarnation: "reboot-2", DstIncarnation: ib, SrcNodeID: 1},
		{Generation: 2, Cipher: AES256GCM, ICVBytes: 16, SrcIP: a, DstIP: b, SrcIncarnation: ia, DstIncarnation: ib, SrcNodeID: 4194303},
		{Generation: 7, Cipher: AES128GCM, ICVBytes: 12, SrcIP: "198.19.255.254", DstIP: "198.18.0.1", SrcIncarnation: "", DstIncarnation: ia, SrcNodeID: 300},
		{Generation: 1, Cipher: AES128GCM, ICVBytes: 8, SrcIP: a, DstIP: b, SrcIncarnation: ia, DstIncarnation: ib, SrcNodeID: 1, Kind: "tunnel"},
	}
}

func computeVector(t testing.TB, v vector) vector {
	t.Helper()
	g := &Generation{Number: v.Generation, State: StateActive, Cipher: v.Cipher, ICVBytes: v.ICVBytes, Root: testRoot(1 + (v.Generation+1)%2)}
	src := Endpoint{IP: netip.MustParseAddr(v.SrcIP), Incarnation: v.SrcIncarnation, NodeID: v.SrcNodeID}
	dst := Endpoint{IP: netip.MustParseAddr(v.DstIP), Incarnation: v.DstIncarnation, NodeID: 9}
	kind := KindTransport
	if v.Kind == "tunnel" {
		kind = KindTunnel
	}
	sa, err := g.DeriveKind(kind, src, dst)
	if err != nil {
		t.Fatalf("derive %s->%s: %v", v.SrcIP, v.DstIP, err)
	}
	info, err := KindInfo(kind, v.Cipher, v.ICVBytes, v.Generation, src, dst)
	if err != nil {
		t.Fatal(err)
	}
	v.RootHex = hex.EncodeToString(g.Root)
	v.InfoHex = hex.EncodeToString(info)
	v.SPI = fmt.Sprintf("0x%08x", sa.SPI)
	v.KeyHex = hex.EncodeToString(sa.Key)
	return v
}

// goldenRow is what docs/keys.md shows of a vector: its info and its table cells.
type goldenRow struct{ info, spi, key string }

// checkGolden compares the vectors computed from inputs with the file path (rewritten
// with -update), recomputes each vector from the file's own inputs (the file is the source
// of truth), and checks that docs/keys.md shows the first vector's info and every
// vector's SPI and key blob. It returns the file's vectors.
func checkGolden[V comparable](t *testing.T, path string, inputs []V, compute func(testing.TB, V) V, row func(V) goldenRow) []V {
	t.Helper()
	var got []V
	for _, v := range inputs {
		got = append(got, compute(t, v))
	}
	if *update {
		b, _ := json.MarshalIndent(got, "", "  ")
		if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read golden vectors: %v", err)
	}
	var want []V
	if err := json.Unmarshal(b, &want); err != nil {
		t.Fatalf("parse %s: %v", path, err)
	}
	if len(want) != len(got) {
		t.Fatalf("%s has %d vectors, computed %d", path, len(want), len(got))
	}
	doc, err := os.ReadFile(filepath.Join("..", "docs", "keys.md"))
	if err != nil {
		t.Fatalf("docs/keys.md shows the vectors too: %v", err)
	}
	if !strings.Contains(string(doc), row(want[0]).info) {
		t.Errorf("docs/keys.md does not show the first vector's info of %s", path)
	}
	for i := range want {
		r := row(want[i])
		if !strings.Contains(string(doc), "`"+r.spi+"` | `"+r.key+"`") {
			t.Errorf("docs/keys.md does not show vector %d of %s (SPI %s, key blob)", i, path, r.spi)
		}
		if c := compute(t, want[i]); c != want[i] {
			t.Errorf("vector %d: file %+v\ncomputed %+v", i, want[i], c)
		}
	}
	return want
}

// TestGoldenVectors pins the derivation (HKDF info layout, output split, SPI layout).
// docs/keys.md shows the same vectors; regenerate both with -update only on purpose.
func TestGoldenVectors(t *testing.T) {
	want := checkGolden(t, filepath.Join("testdata", "vectors.json"), vectorInputs(), computeVector,
		func(v vector) goldenRow { return goldenRow{v.InfoHex, v.SPI, v.KeyHex} })
	for i := range want {
		if want[i].Cipher == AES128GCM && len(want[i].KeyHex) != 2*(16+4) || want[i].Cipher == AES256GCM && len(want[i].KeyHex) != 2*(32+4) {
			t.Errorf("vector %d: key blob length %d hex chars", i, len(want[i].KeyHex))
		}
	}
}

func TestSPILayout(t *testing.T) {
	cases := []struct {
		gen, id uint32
		want    uint32
	}{
		{1, 1, 0x40000100},
		{2, 1, 0x80000100},
		{3, 1, 0xc0000100},
		{4, 1, 0x00000100},
		{4, MaxNodeID, 0x3fffff00},
		{5, 0x1234, 0x40123400},
	}
	for _, c := range cases {
		spi, err := SPI(c.gen, c.id)
		if err != nil || spi != c.want {
			t.Errorf("SPI(%d,%d) = %#x, %v; want %#x", c.gen, c.id, spi, err, c.want)
		}
		if spi < 256 {
			t.Errorf("SPI(%d,%d) = %d < 256", c.gen, c.id, spi)
		}
		g, id, ok := ParseSPI(spi)
		if !ok || g != c.gen%4 || id != c.id {
			t.Errorf("ParseSPI(%#x) = %d,%d,%v", spi, g, id, ok)
		}
	}
	for _, id := range []uint32{0, MaxNodeID + 1} {
		if _, err := SPI(1, id); err == nil {
			t.Errorf("SPI(1,%d) accepted", id)
		}
	}
	if _, _, ok := ParseSPI(0x40000101); ok {
		t.Error("ParseSPI accepted a tunnel SPI")
	}
	if _, _, ok := ParseSPI(0x40000102); ok {
		t.Error("ParseSPI accepted a lane SPI")
	}
}

// TestLaneSPILayout: lanes take bits 7..1 (docs/keys.md §2); lane 0 is KindSPI exactly, and
// every (kind, lane) of one sender and generation has its own SPI.
func TestLaneSPILayout(t *testing.T) {
	for _, c := range []struct {
		kind      Kind
		lane      uint16
		gen, id   uint32
		want      uint32
		laneZeroS bool
	}{
		{KindTransport, 0, 1, 1, 0x40000100, true},
		{KindTunnel, 0, 1, 1, 0x40000101, true},
		{KindTransport, 3, 1, 1, 0x40000106, false},
		{KindTunnel, 3, 1, 1, 0x40000107, false},
		{KindTunnel, MaxSPILane, 6, MaxNodeID, 0xbfffffff, false},
	} {
		spi, err := LaneSPI(c.kind, c.lane, c.gen, c.id)
		if err != nil || spi != c.want {
			t.Errorf("LaneSPI(%s,%d,%d,%d) = %#x, %v; want %#x", c.kind, c.lane, c.gen, c.id, spi, err, c.want)
		}
		kind, lane, g, id, ok := ParseLaneSPI(spi)
		if !ok || kind != c.kind || lane != c.lane || g != c.gen%4 || id != c.id {
			t.Errorf("ParseLaneSPI(%#x) = %s,%d,%d,%d,%v", spi, kind, lane, g, id, ok)
		}
		if _, _, _, ok := ParseKindSPI(spi); ok != c.laneZeroS {
			t.Errorf("ParseKindSPI(%#x) ok = %v, want %v (lane 0 only)", spi, ok, c.laneZeroS)
		}
	}
	seen := map[uint32]string{}
	for _, kind := range []Kind{KindTransport, KindTunnel} {
		for lane := uint16(0); lane <= MaxSPILane; lane++ {
			spi, err := LaneSPI(kind, lane, 2, 7)
			if err != nil {
				t.Fatal(err)
			}
			name := fmt.Sprintf("%s lane %d", kind, lane)
			if prev, dup := seen[spi]; dup {
				t.Fatalf("%s has the SPI %#x of %s", name, spi, prev)
			}
			seen[spi] = name
		}
	}
	if _, err := LaneSPI(KindTransport, MaxSPILane+1, 1, 1); err == nil {
		t.Errorf("lane %d accepted", MaxSPILane+1)
	}
	if _, _, _, _, ok := ParseLaneSPI(0x40000006); ok {
		t.Error("ParseLaneSPI accepted node ID 0")
	}
}

func TestDeriveRejectsBadInput(t *testing.T) {
	g := &Generation{Number: 1, Cipher: AES128GCM, ICVBytes: 8, Root: testRoot(1)}
	a := Endpoint{IP: netip.MustParseAddr("198.18.0.1"), NodeID: 1}
	for name, c := range map[string]struct {
		g        *Generation
		src, dst Endpoint
	}{
		"same address":     {g, a, Endpoint{IP: netip.MustParseAddr("::ffff:198.18.0.1"), NodeID: 2}},
		"invalid dst":      {g, a, Endpoint{NodeID: 2}},
		"node id 0":        {g, Endpoint{IP: netip.MustParseAddr("198.18.0.3")}, a},
		"short root":       {&Generation{Number: 1, Cipher: AES128GCM, ICVBytes: 8, Root: make(Key, 16)}, a, Endpoint{IP: netip.MustParseAddr("198.18.0.2")}},
		"unknown cipher":   {&Generation{Number: 1, Cipher: "des", ICVBytes: 8, Root: testRoot(1)}, a, Endpoint{IP: netip.MustParseAddr("198.18.0.2")}},
		"icv 4 bytes":      {&Generation{Number: 1, Cipher: AES128GCM, ICVBytes: 4, Root: testRoot(1)}, a, Endpoint{IP: netip.MustParseAddr("198.18.0.2")}},
		"huge incarnation": {g, Endpoint{IP: netip.MustParseAddr("198.18.0.3"), NodeID: 3, Incarnation: string(make([]byte, 70000))}, a},
	} {
		if _, err := c.g.Derive(c.src, c.dst); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// TestInfoInjective: length-prefixing keeps incarnation boundaries unambiguous.
func TestInfoInjective(t *testing.T) {
	a := netip.MustParseAddr("198.18.0.1")
	b := netip.MustParseAddr("198.18.0.2")
	i1, _ := Info(AES128GCM, 8, 1, Endpoint{IP: a, Incarnation: "ab"}, Endpoint{IP: b, Incarnation: "c"})
	i2, _ := Info(AES128GCM, 8, 1, Endpoint{IP: a, Incarnation: "a"}, Endpoint{IP: b, Incarnation: "bc"})
	if string(i1) == string(i2) {
		t.Fatal("incarnation boundary is ambiguous")
	}
}

// TestDerivationProperties: 5,000 nodes and 2 live generations.
//   - SPIs: every receiver sees SPI(gen, sender ID) for every other node and both
//     generations; the complete set of (generation, node) SPIs is checked to be unique,
//     which covers every receiver's subset exhaustively.
//   - Keys: every node derives its SAs with 8 random peers in each direction in both
//     generations, plus all pairs of a 100-node clique; the sender's outbound SA must equal
//     the receiver's independently derived inbound SA (the receiver parses the sender's
//     address in a different form), and no key blob may repeat across all of them
//     (all 50 million pair SAs would take minutes under -race; see docs/keys.md).
func TestDerivationProperties(t *testing.T) {
	n := 5000
	if testing.Short() {
		n = 500
	}
	rng := rand.New(rand.NewPCG(1, 2))
	type node struct {
		ip   netip.Addr
		inc  string
		id   uint32
		name string
	}
	// Node IDs come from the real assignment code, in a shuffled order.
	r := NewRing()
	var views []nodeView
	nodes := make([]node, n)
	for i := range nodes {
		nodes[i].name = fmt.Sprintf("node-%05d", i)
		nodes[i].ip = netip.AddrFrom4([4]byte{198, 18 + byte(i>>16), byte(i >> 8), byte(i)})
		nodes[i].inc = fmt.Sprintf("%08x-boot", rng.Uint32())
		views = append(views, nodeView{NodeState: NodeState{Name: nodes[i].name}})
	}
	rng.Shuffle(len(views), func(i, j int) { views[i], views[j] = views[j], views[i] })
	assignNodeIDs(r, views, func(Action) {})
	for i := range nodes {
		nodes[i].id = r.NodeID(nodes[i].name)
		if nodes[i].id == 0 {
			t.Fatalf("%s got no id", nodes[i].name)
		}
	}
	gens := []*Generation{
		{Number: 6, State: StateRetiring, Cipher: AES128GCM, ICVBytes: 8, Root: testRoot(1)},
		{Number: 7, State: StateActive, Cipher: AES128GCM, ICVBytes: 8, Root: testRoot(2)},
	}
	derivers := make([]*Deriver, len(gens))
	for i, g := range gens {
		d, err := NewDeriver(g)
		if err != nil {
			t.Fatal(err)
		}
		derivers[i] = d
	}

	spis := make(map[uint32]string, 2*n)
	for _, g := range gens {
		for _, nd := range nodes {
			spi, err := SPI(g.Number, nd.id)
			if err != nil {
				t.Fatal(err)
			}
			if spi < 256 {
				t.Fatalf("spi %#x < 256", spi)
			}
			if o, dup := spis[spi]; dup {
				t.Fatalf("spi %#x of %s gen %d collides with %s", spi, nd.name, g.Number, o)
			}
			spis[spi] = fmt.Sprintf("%s gen %d", nd.name, g.Number)
		}
	}

	seen := make(map[[16]byte]string)
	check := func(s, d int) {
		for gi, der := range derivers {
			src, dst := nodes[s], nodes[d]
			out, err := der.Derive(Endpoint{src.ip, src.inc, src.id}, Endpoint{dst.ip, dst.inc, dst.id})
			if err != nil {
				t.Fatal(err)
			}
			// The receiver's view: the sender's address as IPv4-mapped IPv6.
			in, err := der.Derive(Endpoint{netip.AddrFrom16(src.ip.As16()), src.inc, src.id}, Endpoint{dst.ip, dst.inc, dst.id})
			if err != nil {
				t.Fatal(err)
			}
			if out.SPI != in.SPI || !out.Key.Equal(in.Key) {
				t.Fatalf("%s->%s gen %d: outbound and inbound SA differ", src.name, dst.name, gens[gi].Number)
			}
			if out.SPI != mustSPI(gens[gi].Number, src.id) {
				t.Fatalf("%s->%s: SA SPI %#x does not follow the layout", src.name, dst.name, out.SPI)
			}
			h := sha256.Sum256(out.Key)
			var k [16]byte
			copy(k[:], h[:])
			label := fmt.Sprintf("%s->%s gen %d", src.name, dst.name, gens[gi].Number)
			if o, dup := seen[k]; dup {
				if o == label {
					continue // the same SA reached again through another sample
				}
				t.Fatalf("key material of %s equals that of %s", label, o)
			}
			seen[k] = label
		}
	}
	for s := range nodes {
		for range 8 {
			d := rng.IntN(n)
			if d == s {
				continue
			}
			check(s, d)
			check(d, s)
		}
	}
	for s := 0; s < 100; s++ {
		for d := 0; d < 100; d++ {
			if s != d {
				check(s, d)
			}
		}
	}
	if len(seen) < 100*99*2 {
		t.Fatalf("only %d distinct SAs checked", len(seen))
	}
	t.Logf("%d nodes, %d SPIs unique, %d SAs derived on both ends, all keys distinct", n, len(spis), len(seen))
}

func mustSPI(gen, id uint32) uint32 {
	s, err := SPI(gen, id)
	if err != nil {
		panic(err)
	}
	return s
}

// TestKindsNeverShare: for the same pair and generation, transport and tunnel SAs differ in
// key and SPI, both ends agree per kind, and an unknown kind is refused.
func TestKindsNeverShare(t *testing.T) {
	g := &Generation{Number: 3, State: StateActive, Cipher: AES128GCM, ICVBytes: 8, Root: testRoot(1)}
	a := Endpoint{IP: netip.MustParseAddr("198.18.0.1"), Incarnation: "a", NodeID: 5}
	b := Endpoint{IP: netip.MustParseAddr("198.18.0.2"), Incarnation: "b", NodeID: 6}
	tr, err := g.DeriveKind(KindTransport, a, b)
	if err != nil {
		t.Fatal(err)
	}
	tu, err := g.DeriveKind(KindTunnel, a, b)
	if err != nil {
		t.Fatal(err)
	}
	if tr.Key.Equal(tu.Key) || tr.SPI == tu.SPI {
		t.Fatalf("transport and tunnel SAs share key or SPI (spi %#x / %#x)", tr.SPI, tu.SPI)
	}
	plain, err := g.Derive(a, b)
	if err != nil || !plain.Key.Equal(tr.Key) || plain.SPI != tr.SPI {
		t.Fatalf("Derive differs from DeriveKind(KindTransport): %v", err)
	}
	kind, gen, id, ok := ParseKindSPI(tu.SPI)
	if !ok || kind != KindTunnel || gen != 3 || id != 5 {
		t.Fatalf("ParseKindSPI(%#x) = %v %d %d %v", tu.SPI, kind, gen, id, ok)
	}
	if _, _, ok := ParseSPI(tu.SPI); ok {
		t.Fatalf("ParseSPI accepted tunnel SPI %#x as transport", tu.SPI)
	}
	if _, err := g.DeriveKind(Kind(7), a, b); err == nil {
		t.Fatal("unknown kind accepted")
	}
}
