package lab

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/secureoverlay/secureoverlay/conformance/lab/wire"
)

// tc -s filter show of one port, as iproute2 6.1 prints it in the guest.
const tcFixture = `filter protocol ip pref 4 u32 chain 0 
filter protocol ip pref 4 u32 chain 0 fh 800: ht divisor 1 
filter protocol ip pref 4 u32 chain 0 fh 800::800 order 2048 key ht 800 bkt 0 terminal flowid not_in_hw (rule hit 76 success 24)
  match 00040000/00ff0000 at 8 (success 24 ) 
	action order 1: gact action pass
	 random type none pass val 0
	 index 1 ref 1 bind 1 installed 5 sec firstused 0 sec
	Action statistics:
	Sent 2496 bytes 24 pkt (dropped 0, overlimits 0 requeues 0) 
	backlog 0b 0p requeues 0

filter protocol ip pref 50 u32 chain 0 
filter protocol ip pref 50 u32 chain 0 fh 801: ht divisor 1 
filter protocol ip pref 50 u32 chain 0 fh 801::800 order 2048 key ht 801 bkt 0 terminal flowid not_in_hw (rule hit 52 success 52)
  match 00320000/00ff0000 at 8 (success 52 ) 
	action order 1: gact action pass
	 random type none pass val 0
	 index 2 ref 1 bind 1 installed 4 sec used 0 sec firstused 2 sec
	Action statistics:
	Sent 6864 bytes 52 pkt (dropped 0, overlimits 0 requeues 0) 
	backlog 0b 0p requeues 0
`

func TestParseWireCounters(t *testing.T) {
	out := "PORT ul1\n" + tcFixture + "PORT ul2\n" + strings.ReplaceAll(tcFixture, "bytes 24 pkt", "bytes 0 pkt")
	m, err := parseWireCounters(out)
	if err != nil {
		t.Fatal(err)
	}
	if m["ul1"] != (WireCounts{IPIP: 24, ESP: 52}) || m["ul2"] != (WireCounts{IPIP: 0, ESP: 52}) || len(m) != 2 {
		t.Errorf("parseWireCounters = %v", m)
	}
	if got := Total(m); got != (WireCounts{IPIP: 24, ESP: 104}) {
		t.Errorf("Total = %+v", got)
	}
	if got := FormatWireCounts(m); got != "ul1 24 IPIP 52 ESP, ul2 0 IPIP 52 ESP" {
		t.Errorf("FormatWireCounts = %q", got)
	}
	// A port whose ESP filter is missing cannot be read as "0 ESP".
	cut := tcFixture[:strings.Index(tcFixture, "filter protocol ip pref 50")]
	if _, err := parseWireCounters("PORT ul1\n" + cut); err == nil {
		t.Error("a port without its ESP counter parsed")
	}
}

func TestEchoes(t *testing.T) {
	e := Echoes{wire.PingReport{
		Stopped:    1000,
		Sent:       []int64{100, 200, 300, 400},
		Reply:      []int64{150, 0, 1300, 0},
		SendErrors: map[int]string{4: "network is unreachable"},
	}}
	if e.Requests() != 4 || e.Answered() != 2 || !slices.Equal(e.Lost(), []int{2, 4}) || e.AnsweredAfterStop() != 1 || e.MaxRTT() != 1000*time.Nanosecond {
		t.Errorf("requests %d answered %d lost %v after stop %d max rtt %s", e.Requests(), e.Answered(), e.Lost(), e.AnsweredAfterStop(), e.MaxRTT())
	}
	if e.Why(4) != "send failed: network is unreachable" || e.Why(2) != "" {
		t.Errorf("why: %q %q", e.Why(4), e.Why(2))
	}
	es, err := parseEchoes([]byte(`{"dst":"10.244.2.5","sent":[1,2],"reply":[3,0],"stopped":2}`+"\n\n"+`{"dst":"10.244.3.5","sent":[],"reply":[]}`+"\n"), 2)
	if err != nil || len(es) != 2 || es[0].Dst != "10.244.2.5" || es[0].Answered() != 1 || es[1].Requests() != 0 {
		t.Errorf("parseEchoes = %+v, %v", es, err)
	}
	if _, err := parseEchoes([]byte(`{"dst":"x"}`+"\n"), 2); err == nil {
		t.Error("one report where two were expected: no error")
	}
}

func TestEchoArgs(t *testing.T) {
	if got := (EchoOptions{}).args("/tmp/r.json", "10.0.0.1"); got != "-i 50ms -W 30s -s 56 -o '/tmp/r.json' '10.0.0.1'" {
		t.Errorf("defaults: %q", got)
	}
	if got := (EchoOptions{Count: 3, Interval: 200 * time.Millisecond, Linger: time.Second, Size: 1374, DF: true}).args("", "10.0.0.1"); got != "-i 200ms -W 1s -s 1374 -c 3 -M do '10.0.0.1'" {
		t.Errorf("bounded: %q", got)
	}
}
