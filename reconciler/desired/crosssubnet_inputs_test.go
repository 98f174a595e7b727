package desired

import "github.com/secureoverlay/secureoverlay/api"

// crossSubnetInputs: a (self) and b, d share 198.18.0.0/24; c is in another subnet.
// Blocks: a 10.244.1.0/26; b 10.244.2.0/26 of which .5 lives on a, .9 on c, .20 on d;
// c 10.244.3.0/26; d 10.244.4.0/26. A ToR BGP peer and a Never pool are not covered.
func crossSubnetInputs(mode api.Mode) Inputs {
	return Inputs{
		Self: "a",
		Nodes: []Node{
			node("a", "198.18.0.1/24", 1),
			withReport(node("b", "198.18.0.2/24", 2), mode, 1),
			withReport(node("c", "198.19.0.3/24", 3), mode, 1),
			withReport(node("d", "198.18.0.4/24", 4), mode, 1),
		},
		Blocks: []Block{
			{CIDR: mustPrefix("10.244.1.0/26"), Affinity: "host:a"},
			{CIDR: mustPrefix("10.244.2.0/26"), Affinity: "host:b", Borrowed: []Borrowed{
				{IP: mustAddr("10.244.2.5"), Node: "a"}, {IP: mustAddr("10.244.2.9"), Node: "c"}, {IP: mustAddr("10.244.2.20"), Node: "d"}}},
			{CIDR: mustPrefix("10.244.3.0/26"), Affinity: "host:c"},
			{CIDR: mustPrefix("10.244.4.0/26"), Affinity: "host:d"},
			{CIDR: mustPrefix("10.244.5.0/26"), Affinity: "host:b", Deleted: true},
			{CIDR: mustPrefix("10.99.0.0/26"), Affinity: "host:b"}, // Never pool: ignored
		},
		Pools: []Pool{
			{Name: "cross", CIDR: mustPrefix("10.244.0.0/16"), IPIPMode: IPIPCrossSubnet},
			{Name: "plain", CIDR: mustPrefix("10.99.0.0/16"), IPIPMode: IPIPNever},
		},
		BGPPeers: []BGPPeer{{Name: "tor", PeerIP: mustAddr("198.18.0.254")}, {Name: "to-b", PeerIP: mustAddr("198.18.0.2")}},
		Ring:     ring(mode, active(1)),
		Keys:     testKeys,
	}
}
