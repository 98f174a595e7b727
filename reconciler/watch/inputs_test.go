package watch

import (
	"crypto/rand"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// testRing builds a valid ring with one active generation (random root, never printed)
// and node IDs 1.. for names.
func testRing(t *testing.T, mode api.Mode, icv int, names ...string) *keys.Ring {
	t.Helper()
	r := keys.NewRing()
	r.Mode, r.Target, r.LastGeneration = mode, mode, 1
	root := make([]byte, keys.RootKeyBytes)
	if _, err := rand.Read(root); err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	r.Generations = []keys.Generation{{Number: 1, State: keys.StateActive, Cipher: keys.AES128GCM, ICVBytes: icv,
		Root: root, Reason: "initial", Created: now, Activated: now}}
	for i, n := range names {
		r.Nodes = append(r.Nodes, keys.NodeID{Name: n, ID: uint32(i + 1)})
	}
	if err := r.Validate(); err != nil {
		t.Fatal(err)
	}
	return r
}

func TestInputsPerPairReadiness(t *testing.T) {
	ring := testRing(t, api.ModeEncrypt, 8, "a", "b", "c", "d", "e")
	incA := KeyIncarnation("boot-a", "uid-a", "ea")
	tagA := IncarnationTag(incA)
	snap := Snapshot{Ring: ring, Nodes: []NodeInfo{
		{Name: "a", IPv4Address: "198.18.0.1/24", Incarnation: "boot-a", UID: "uid-a"},
		{Name: "b", IPv4Address: "198.18.0.2/24", Incarnation: "boot-b", UID: "uid-b", Report: &Report{
			NodeReport:  api.NodeReport{Mode: api.ModeEncrypt, Incarnation: "boot-b", UID: "uid-b", Epoch: "eb", Generations: []uint32{1}},
			InboundFrom: map[string]string{"a": tagA}, EncryptingTo: map[string]string{"a": tagA}}},
		// c's report was made for an older incarnation (epoch) of a: not ready toward a.
		{Name: "c", IPv4Address: "198.18.0.3", Incarnation: "boot-c", Report: &Report{
			NodeReport:  api.NodeReport{Mode: api.ModeEncrypt, Incarnation: "boot-c", Epoch: "ec", Generations: []uint32{1}},
			InboundFrom: map[string]string{"a": IncarnationTag(KeyIncarnation("boot-a", "uid-a", "old"))}}},
		// d's agent publishes no epoch (predates epochs): nothing is derived for d.
		{Name: "d", IPv4Address: "198.18.0.4", Incarnation: "boot-d", Report: &Report{
			NodeReport:  api.NodeReport{Mode: api.ModeEncrypt, Incarnation: "boot-d", Generations: []uint32{1}},
			InboundFrom: map[string]string{"a": tagA}}},
		// e's Node object was re-created (new UID): its report is stale.
		{Name: "e", IPv4Address: "198.18.0.5", Incarnation: "boot-e", UID: "uid-e2", Report: &Report{
			NodeReport:  api.NodeReport{Mode: api.ModeEncrypt, Incarnation: "boot-e", UID: "uid-e1", Epoch: "ee", Generations: []uint32{1}},
			InboundFrom: map[string]string{"a": tagA}}},
	}}
	in, err := Inputs("a", snap, desired.Config{}, "ea")
	if err != nil {
		t.Fatal(err)
	}
	if in.Ring.Mode != api.ModeEncrypt || len(in.Ring.Generations) != 1 || in.Ring.Generations[0] != (desired.Generation{ID: 1, State: desired.GenActive}) {
		t.Errorf("ring = %+v", in.Ring)
	}
	byName := map[string]desired.Node{}
	for _, n := range in.Nodes {
		byName[n.Name] = n
	}
	if n := byName["a"]; n.Incarnation != incA {
		t.Errorf("self incarnation = %q, want %q", n.Incarnation, incA)
	}
	if n := byName["b"]; n.NodeID != 2 || n.Report == nil || !n.Report.InboundFromSelf || !n.Report.EncryptsToSelf ||
		n.Report.Incarnation != "boot-b/uid-b/eb" || n.Incarnation != "boot-b/uid-b/eb" {
		t.Errorf("b = %+v report %+v", n, n.Report)
	}
	if n := byName["c"]; n.Report == nil || n.Report.InboundFromSelf || n.Report.EncryptsToSelf {
		t.Errorf("c = %+v report %+v", n, n.Report)
	}
	for _, name := range []string{"d", "e"} {
		if n := byName[name]; n.Incarnation != "" {
			t.Errorf("%s: incarnation %q, want none (no usable report)", name, n.Incarnation)
		}
	}
	if byName["a"].Report != nil {
		t.Error("own report passed as a peer report")
	}
	st, err := desired.Compute(in)
	if err != nil {
		t.Fatal(err)
	}
	if got := st.EncryptingPeers(); len(got) != 1 || got[0] != "b" {
		t.Errorf("encrypting peers = %v, want [b]", got)
	}
}

func TestInputsRefusesWithoutUsableRing(t *testing.T) {
	nodes := []NodeInfo{{Name: "a", IPv4Address: "198.18.0.1/24", Incarnation: "x"}}
	if _, err := Inputs("a", Snapshot{Nodes: nodes}, desired.Config{}, "e"); !errors.Is(err, ErrNoSecret) {
		t.Errorf("no ring: %v", err)
	}
	bad := fmt.Errorf("secret: %w", keys.ErrInvalid)
	if _, err := Inputs("a", Snapshot{Nodes: nodes, RingErr: bad}, desired.Config{}, "e"); !errors.Is(err, keys.ErrInvalid) {
		t.Errorf("bad ring: %v", err)
	}
	ring := testRing(t, api.ModeAccept, 16, "a")
	_, err := Inputs("a", Snapshot{Nodes: nodes, Ring: ring}, desired.Config{ICVBytes: 8}, "e")
	if err == nil || !strings.Contains(err.Error(), "icv") {
		t.Errorf("icv mismatch: %v", err)
	}
	if _, err := Inputs("zz", Snapshot{Nodes: nodes, Ring: ring}, desired.Config{ICVBytes: 16}, "e"); err == nil {
		t.Error("unknown self: no error")
	}
}

func TestKeyFuncBothEndsAgreeAndKindsDiffer(t *testing.T) {
	ring := testRing(t, api.ModeAccept, 8, "a", "b")
	kf := KeyFunc(ring)
	a := desired.Endpoint{IP: netip.MustParseAddr("198.18.0.1"), Incarnation: "ia", NodeID: 1}
	b := desired.Endpoint{IP: netip.MustParseAddr("198.18.0.2"), Incarnation: "ib", NodeID: 2}
	spi1, k1, err := kf(1, desired.Transport, 0, a, b)
	if err != nil {
		t.Fatal(err)
	}
	spi2, k2, err := KeyFunc(ring)(1, desired.Transport, 0, a, b)
	if err != nil || spi1 != spi2 || !k1.Equal(k2) {
		t.Fatalf("two derivations of a->b differ (err %v)", err)
	}
	spi3, k3, err := kf(1, desired.Transport, 0, b, a)
	if err != nil || k3.Equal(k1) || spi3 == spi1 {
		t.Error("b->a shares the key or SPI of a->b")
	}
	if k1.Len() != 20 {
		t.Errorf("key length %d, want 20", k1.Len())
	}
	want, _ := ring.Generation(1).Derive(keys.Endpoint(a), keys.Endpoint(b))
	if want.SPI != spi1 || !k1.Equal(desired.NewKey(want.Key)) {
		t.Error("KeyFunc disagrees with keys.Generation.Derive")
	}
	spiT, kT, err := kf(1, desired.Tunnel, 0, a, b)
	if err != nil {
		t.Fatalf("tunnel: %v", err)
	}
	if spiT == spi1 || kT.Equal(k1) {
		t.Error("tunnel SA shares the SPI or key of the transport SA a->b")
	}
	wantT, _ := ring.Generation(1).DeriveKind(keys.KindTunnel, keys.Endpoint(a), keys.Endpoint(b))
	if wantT.SPI != spiT || !kT.Equal(desired.NewKey(wantT.Key)) {
		t.Error("KeyFunc(tunnel) disagrees with keys.Generation.DeriveKind")
	}
	if _, _, err := kf(7, desired.Transport, 0, a, b); err == nil {
		t.Error("unknown generation: no error")
	}
}

func TestReportRoundTripAndTolerance(t *testing.T) {
	r, err := ParseReport(`{"mode":"accept","generations":[3],"incarnation":"x","peersEncrypted":0,"peersExpected":2,"inboundFrom":{"b":"0011aabb"},"futureField":{"y":1}}`)
	if err != nil || r.Mode != api.ModeAccept || r.InboundFrom["b"] != "0011aabb" || r.PeersExpected != 2 {
		t.Errorf("report = %+v %v", r, err)
	}
	if _, err := ParseReport(`{"mode":"sideways"}`); err == nil {
		t.Error("bad mode: no error")
	}
	if _, err := ParseReport(`{`); err == nil {
		t.Error("bad json: no error")
	}
	if IncarnationTag("") != "" || IncarnationTag("a") == IncarnationTag("b") || len(IncarnationTag("a")) != 8 {
		t.Error("incarnation tags")
	}
}

// TestNodeIDsAsRing: the map Inputs uses gives Ring.NodeID's answer for every name
// (released entries skipped, the first live one wins), and follows a new ring.
func TestNodeIDsAsRing(t *testing.T) {
	r := testRing(t, api.ModeEnforce, 8, "a", "b", "c")
	r.Nodes[1].Released = true
	r.Nodes = append(r.Nodes, keys.NodeID{Name: "b", ID: 7}, keys.NodeID{Name: "c", ID: 9})
	for _, ring := range []*keys.Ring{r, testRing(t, api.ModeEnforce, 8, "c", "d")} {
		ids := nodeIDs(ring)
		for _, name := range []string{"a", "b", "c", "d", "e"} {
			if ids[name] != ring.NodeID(name) {
				t.Errorf("node %s: id %d, Ring.NodeID %d", name, ids[name], ring.NodeID(name))
			}
		}
	}
}
