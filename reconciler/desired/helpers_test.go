package desired

import (
	"crypto/sha256"
	"fmt"
	"net/netip"
	"strings"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
)

// testKeys is a deterministic KeyFunc with the keys package's SPI layout (keys.LaneSPI)
// and a key that depends on every argument. Generations ≥ 100 have no lanes (as v1).
func testKeys(gen uint32, kind Kind, lane uint16, src, dst Endpoint) (uint32, Key, error) {
	if lane > 0 && gen >= 100 {
		return 0, Key{}, fmt.Errorf("generation %d: %w", gen, ErrNoLanes)
	}
	spi, err := keys.LaneSPI(kind, lane, gen, src.NodeID)
	if err != nil {
		return 0, Key{}, err
	}
	h := sha256.Sum256(fmt.Appendf(nil, "%d|%d|%d|%s|%s|%s|%s", gen, kind, lane, src.IP, src.Incarnation, dst.IP, dst.Incarnation))
	return spi, NewKey(h[:20]), nil
}

func ring(mode api.Mode, gens ...Generation) Ring { return Ring{Mode: mode, Generations: gens} }

func active(id uint32) Generation   { return Generation{ID: id, State: GenActive} }
func pending(id uint32) Generation  { return Generation{ID: id, State: GenPending} }
func retiring(id uint32) Generation { return Generation{ID: id, State: GenRetiring} }

// node builds a node; ip may be a CIDR or bare.
func node(name, ip string, id uint32) Node {
	return Node{Name: name, IPv4Address: ip, Incarnation: "boot-" + name, NodeID: id}
}

// withReport attaches a current report that is fully ready toward self.
func withReport(n Node, mode api.Mode, gens ...uint32) Node {
	n.Report = &Report{Incarnation: n.Incarnation, Mode: mode, Generations: gens,
		InboundFromSelf: true, EncryptsToSelf: mode.Rank() >= api.ModeEncrypt.Rank()}
	return n
}

// render prints a State as stable text (like `ip xfrm state/policy` plus rules), the form
// the table tests compare against.
func render(st State) string {
	var b strings.Builder
	fmt.Fprintf(&b, "mode %s\n", st.Mode)
	for _, sa := range st.SAs {
		fmt.Fprintf(&b, "sa %s %s %s->%s spi=0x%08x gen=%d reqid=0x%x\n", sa.Dir, sa.Kind, sa.Src, sa.Dst, sa.SPI, sa.Generation, sa.ReqID)
	}
	for _, p := range st.Policies {
		fmt.Fprintf(&b, "%s\n", p)
	}
	for _, r := range st.Rules {
		fmt.Fprintf(&b, "rule %s (%s)\n", r.ID(), r.Peer)
	}
	for _, s := range st.Skipped {
		fmt.Fprintf(&b, "skip %s: %s\n", s.Object, s.Reason)
	}
	for _, n := range st.NotCovered {
		fmt.Fprintf(&b, "not covered: %s\n", n)
	}
	return b.String()
}

func mustPrefix(s string) netip.Prefix { return netip.MustParsePrefix(s) }
func mustAddr(s string) netip.Addr     { return netip.MustParseAddr(s) }
