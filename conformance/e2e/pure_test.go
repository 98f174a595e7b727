package e2e

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
)

func TestCountStream(t *testing.T) {
	out := `PING 10.244.2.5 (10.244.2.5) 56(84) bytes of data.
64 bytes from 10.244.2.5: icmp_seq=1 ttl=62 time=1.10 ms
64 bytes from 10.244.2.5: icmp_seq=2 ttl=62 time=1.20 ms
64 bytes from 10.244.2.5: icmp_seq=4 ttl=62 time=1.20 ms
64 bytes from 10.244.2.5: icmp_seq=4 ttl=62 time=1.20 ms (DUP!)
64 bytes from 10.244.2.5: icmp_seq=5 ttl=62 time=1.30 ms

--- 10.244.2.5 ping statistics ---
6 packets transmitted, 4 received, +1 duplicates, 16.6667% packet loss, time 250ms
`
	st, err := countStream([]byte(out))
	if err != nil {
		t.Fatal(err)
	}
	// seq 3 is lost (a later one was answered); seq 6 was in flight at the stop.
	if st.Sent != 6 || st.Received != 4 || st.Lost != 1 || st.Unanswered != 1 || !slices.Equal(st.LostSeqs, []int{3}) {
		t.Errorf("countStream = %+v", st)
	}
	if _, err := countStream([]byte("64 bytes from x: icmp_seq=1 ttl=1 time=1 ms\n")); err == nil {
		t.Error("no summary: want an error")
	}
}

// With ping -D, each lost sequence is bracketed by the reply times of its neighbours.
func TestCountStreamTimestamps(t *testing.T) {
	out := `PING 10.244.2.5 (10.244.2.5) 56(84) bytes of data.
[1700000000.100000] 64 bytes from 10.244.2.5: icmp_seq=1 ttl=63 time=0.5 ms
[1700000000.200000] 64 bytes from 10.244.2.5: icmp_seq=2 ttl=63 time=0.5 ms
[1700000000.500000] 64 bytes from 10.244.2.5: icmp_seq=5 ttl=63 time=0.5 ms

--- 10.244.2.5 ping statistics ---
5 packets transmitted, 3 received, 40% packet loss, time 400ms
`
	st, err := countStream([]byte(out))
	if err != nil {
		t.Fatal(err)
	}
	want := [][2]float64{{1700000000.2, 1700000000.5}, {1700000000.2, 1700000000.5}}
	if st.Lost != 2 || !slices.Equal(st.LostSeqs, []int{3, 4}) || len(st.LostBetween) != 2 ||
		st.LostBetween[0] != want[0] || st.LostBetween[1] != want[1] {
		t.Errorf("countStream = %+v", st)
	}
}

func TestParseNetCounters(t *testing.T) {
	out := `XFRM
XfrmInNoStates          	3
XfrmOutPolBlock         	0
TABLES
Ip: Forwarding DefaultTTL InReceives InDiscards
Ip: 1 64 1000 2
Icmp: InMsgs InErrors
Icmp: 10 1
RAW
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
   1: 00000000:0001 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0000000000000000 5
ICMP
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
SOFTNET
0000a000 0000000a 00000003 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000
0000b000 00000001 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000001
`
	before := parseNetCounters(out)
	if before["Xfrm.XfrmInNoStates"] != 3 || before["Ip.InDiscards"] != 2 || before["Icmp.InErrors"] != 1 ||
		before["Sock.raw.drops"] != 5 || before["Ip.InReceives"] != 1000 || before["Softnet.dropped"] != 11 || before["Softnet.time_squeeze"] != 3 {
		t.Fatalf("parseNetCounters = %v", before)
	}
	after := parseNetCounters(strings.ReplaceAll(strings.ReplaceAll(out, "Ip: 1 64 1000 2", "Ip: 1 64 5000 4"), "InNoStates          \t3", "InNoStates          \t7"))
	d := CounterDelta(before, after)
	if len(d) != 2 || d["Ip.InDiscards"] != 2 || d["Xfrm.XfrmInNoStates"] != 4 {
		t.Errorf("CounterDelta = %v (InReceives is traffic, not a drop)", d)
	}
}

// The conflist is what libcni accepts, with the primary plugin first and ours
// right after it, and the node's block as the IPAM range.
func TestConflist(t *testing.T) {
	b := Conflist(2, PodConfig{MTU: 1402, PluginMode: "clamp"})
	list, err := libcni.ConfListFromBytes(b)
	if err != nil {
		t.Fatal(err)
	}
	if len(list.Plugins) != 2 || list.Plugins[0].Network.Type != "ptp" || list.Plugins[1].Network.Type != "secureoverlay" {
		t.Fatalf("plugins: %+v", list.Plugins)
	}
	var ptp struct {
		MTU  int `json:"mtu"`
		IPAM struct {
			Ranges [][]struct{ Subnet, Gateway string } `json:"ranges"`
		} `json:"ipam"`
	}
	if err := json.Unmarshal(list.Plugins[0].Bytes, &ptp); err != nil {
		t.Fatal(err)
	}
	if ptp.MTU != 1402 || ptp.IPAM.Ranges[0][0].Subnet != "10.244.2.0/26" || ptp.IPAM.Ranges[0][0].Gateway != "10.244.2.2" {
		t.Errorf("ptp: %+v", ptp)
	}
	var ours map[string]any
	if err := json.Unmarshal(list.Plugins[1].Bytes, &ours); err != nil {
		t.Fatal(err)
	}
	if ours["mode"] != "clamp" {
		t.Errorf("secureoverlay entry: %v", ours)
	}
}
