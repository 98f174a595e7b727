// Package cluster builds synthetic clusters for the benchmarks: n nodes, four /26 IPAM
// blocks each, two live key generations, every peer reporting ready. It is bench-only
// (no product code imports it).
//
// Node i (0-based) has address 198.18.(i/250).(1+i%250)/24, so nodes share /24 subnets
// in groups of 250 (what CrossSubnet pools care about), node ID i+1, and blocks
// 10.x.y.z/26 numbered 4i..4i+3.
package cluster

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"net/netip"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// BlocksPerNode is the number of IPAM blocks affine to each node.
const BlocksPerNode = 4

// Name is node i's name.
func Name(i int) string { return fmt.Sprintf("node-%05d", i) }

// IP is node i's address.
func IP(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{198, 18 + byte(i/(250*256)), byte(i / 250 % 256), byte(1 + i%250)})
}

// Block is node i's j-th block.
func Block(i, j int) netip.Prefix {
	b := uint32(i*BlocksPerNode+j) << 6
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(b >> 16), byte(b >> 8), byte(b)}), 26)
}

// Keys is a deterministic KeyFunc with the keys package's SPI layout (keys.LaneSPI) and a
// key that depends on every argument.
func Keys(gen uint32, kind desired.Kind, lane uint16, src, dst desired.Endpoint) (uint32, desired.Key, error) {
	spi, err := keys.LaneSPI(kind, lane, gen, src.NodeID)
	if err != nil {
		return 0, desired.Key{}, err
	}
	var buf [64]byte
	binary.BigEndian.PutUint32(buf[0:], gen)
	buf[4] = byte(kind)
	s, d := src.IP.As4(), dst.IP.As4()
	copy(buf[5:], s[:])
	copy(buf[9:], d[:])
	binary.BigEndian.PutUint16(buf[13:], lane)
	n := 15 + copy(buf[15:], src.Incarnation)
	n += copy(buf[n:], dst.Incarnation)
	h := sha256.Sum256(buf[:n])
	return spi, desired.NewKey(h[:20]), nil
}

// Joiner is node i as a joining node in round r: a fresh key incarnation per round, so
// that a join, leave and re-join never re-create an SA under a used key.
func Joiner(i, r int, mode api.Mode) desired.Node {
	n := Node(i, mode)
	n.Incarnation = fmt.Sprintf("boot-%s-%d", n.Name, r)
	n.Report.Incarnation = n.Incarnation
	return n
}

// Join returns in with node len(in.Nodes) joined in round r (Joiner), sorted last. It
// shares in's node array, which Inputs leaves room for: no copy of the cluster, and the
// next Join overwrites this one's joiner.
func Join(in desired.Inputs, r int) desired.Inputs {
	n := len(in.Nodes)
	in.Nodes = in.Nodes[:n+1]
	in.Nodes[n] = Joiner(n, r, in.Ring.Mode)
	return in
}

// Options shape a synthetic cluster.
type Options struct {
	Nodes int
	// Self is the index of the node the state is computed for.
	Self int
	Mode api.Mode
	// IPIPMode of the single pool 10.0.0.0/8 (desired.IPIPAlways or IPIPCrossSubnet).
	IPIPMode string
}

// Inputs returns the desired.Inputs of the cluster: generation 1 active, 2 pending, every
// peer reporting both installed and ready both ways.
func Inputs(o Options) desired.Inputs {
	if o.Mode == "" {
		o.Mode = api.ModeEnforce
	}
	if o.IPIPMode == "" {
		o.IPIPMode = desired.IPIPAlways
	}
	in := desired.Inputs{
		Self:   Name(o.Self),
		Nodes:  make([]desired.Node, 0, o.Nodes+1), // room for Join
		Blocks: make([]desired.Block, 0, o.Nodes*BlocksPerNode),
		Pools:  []desired.Pool{{Name: "default", CIDR: netip.MustParsePrefix("10.0.0.0/8"), IPIPMode: o.IPIPMode}},
		Ring: desired.Ring{Mode: o.Mode, Generations: []desired.Generation{
			{ID: 1, State: desired.GenActive}, {ID: 2, State: desired.GenPending}}},
		Keys:        Keys,
		KeysVersion: "bench/cluster.Keys",
	}
	for i := range o.Nodes {
		in.Nodes = append(in.Nodes, Node(i, o.Mode))
		for j := range BlocksPerNode {
			in.Blocks = append(in.Blocks, desired.Block{CIDR: Block(i, j), Affinity: "host:" + Name(i)})
		}
	}
	return in
}

// Node is node i, reporting generations 1 and 2 installed and ready both ways.
func Node(i int, mode api.Mode) desired.Node {
	n := desired.Node{Name: Name(i), IPv4Address: IP(i).String() + "/24", Incarnation: "boot-" + Name(i), NodeID: uint32(i + 1)}
	n.Report = &desired.Report{Incarnation: n.Incarnation, Mode: mode, Generations: []uint32{1, 2},
		InboundFromSelf: true, EncryptsToSelf: mode.Rank() >= api.ModeEncrypt.Rank()}
	return n
}
