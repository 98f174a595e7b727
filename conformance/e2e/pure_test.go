package e2e

import (
	"encoding/json"
	"slices"
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
