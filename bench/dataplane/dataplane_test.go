package dataplane

import (
	"slices"
	"testing"
)

func TestOrderRotates(t *testing.T) {
	seen := map[string][]int{}
	for r := range len(Modes) {
		o := Order(Modes, r)
		if len(o) != len(Modes) {
			t.Fatalf("round %d: %v", r, o)
		}
		for pos, m := range o {
			seen[m] = append(seen[m], pos)
		}
	}
	for m, ps := range seen {
		slices.Sort(ps)
		if !slices.Equal(ps, []int{0, 1, 2, 3}) {
			t.Errorf("%s ran at positions %v over %d rounds, want each once", m, ps, len(Modes))
		}
	}
}

func TestParseModes(t *testing.T) {
	if m, err := ParseModes(""); err != nil || !slices.Equal(m, Modes) {
		t.Errorf(`ParseModes("") = %v, %v; want Modes`, m, err)
	}
	if m, err := ParseModes("ipip, esp,esp-offload,espnull-offload"); err != nil || !slices.Equal(m, []string{"ipip", "esp", "esp-offload", "espnull-offload"}) {
		t.Errorf("ParseModes = %v, %v", m, err)
	}
	for _, bad := range []string{"esp", "ipip,esp,esp", "ipip,aes", "ipip,wireguard-offload"} {
		if m, err := ParseModes(bad); err == nil {
			t.Errorf("ParseModes(%q) = %v, want an error", bad, m)
		}
	}
	for m, want := range map[string][2]any{"esp": {"esp", false}, "esp-offload": {"esp", true}, "espnull-offload": {"espnull", true}, "espnoesn-offload": {"espnoesn", true}} {
		if b, o := BaseMode(m); b != want[0] || o != want[1] {
			t.Errorf("BaseMode(%q) = %q, %v", m, b, o)
		}
	}
}

func TestParsers(t *testing.T) {
	busy, total, err := CPUJiffies("cpu  100 5 50 1000 20 3 2 1 0 0")
	if err != nil || busy != 161 || total != 1181 {
		t.Errorf("CPUJiffies: %d %d %v", busy, total, err)
	}
	if _, _, err := CPUJiffies("cpu0 1 2"); err == nil {
		t.Error("CPUJiffies accepted a short line")
	}
	ticks, err := ProcessTicks("4242 (qemu-system-x86 (x)) S 1 2 3 0 -1 4194560 100 0 0 0 1234 567 0 0 20 0 3 0")
	if err != nil || ticks != 1801 {
		t.Errorf("ProcessTicks: %d %v", ticks, err)
	}
	x0, err := XfrmStat("XfrmInError 0\nXfrmInNoStates 2\n")
	if err != nil {
		t.Fatal(err)
	}
	x1, _ := XfrmStat("XfrmInError 0\nXfrmInNoStates 5\n")
	if g := Grown(x0, x1); !slices.Equal(g, []string{"XfrmInNoStates +3"}) {
		t.Errorf("Grown: %v", g)
	}
	r, err := ParseIperf3([]byte(`{"end":{"sum_sent":{"retransmits":7,"bytes":1000},"sum_received":{"bytes":900,"seconds":3.0}}}`))
	if err != nil || r.Bytes != 900 || r.Seconds != 3 || r.Retransmits != 7 {
		t.Errorf("ParseIperf3: %+v %v", r, err)
	}
	if _, err := ParseIperf3([]byte(`{"error":"unable to connect"}`)); err == nil {
		t.Error("ParseIperf3 accepted an error report")
	}
	p, err := ParsePerf([]byte(`{"ops":10,"bytes":20,"errors":0,"seconds":2}`))
	if err != nil || p.Ops != 10 || p.Secs != 2 {
		t.Errorf("ParsePerf: %+v %v", p, err)
	}
}

func TestSummarizeAndRatios(t *testing.T) {
	s := Summarize([]float64{3, 1, 2, 10})
	if s.Median != 2.5 || s.Min != 1 || s.Max != 10 || s.N != 4 {
		t.Errorf("Summarize: %+v", s)
	}
	if s := Summarize([]float64{5, 1, 3}); s.Median != 3 {
		t.Errorf("odd median: %+v", s)
	}
	if r := Ratios([]float64{2, -1, 3}, []float64{4, 4, 0}); !slices.Equal(r, []float64{0.5}) {
		t.Errorf("Ratios: %v", r)
	}
	if PerGB(2, 1e9) != 2 || PerGB(1, 0) != 0 {
		t.Error("PerGB")
	}
}

func TestParseTCFilters(t *testing.T) {
	out := `filter parent ffff: protocol ip pref 4 u32 chain 0
filter parent ffff: protocol ip pref 4 u32 chain 0 fh 800: ht divisor 1
filter parent ffff: protocol ip pref 4 u32 chain 0 fh 800::800 order 2048 key ht 800 bkt 0 not_in_hw
  match 00040000/00ff0000 at 8
	action order 1: gact action pass
	 random type none pass val 0
	 index 1 ref 1 bind 1 installed 10 sec used 1 sec
	Action statistics:
	Sent 3000 bytes 2 pkt (dropped 0, overlimits 0 requeues 0)
	backlog 0b 0p requeues 0
filter parent ffff: protocol ip pref 50 u32 chain 0 fh 801::800 order 2048 key ht 801 bkt 0 not_in_hw
	Sent 100 bytes 1 pkt (dropped 0, overlimits 0 requeues 0)
filter parent ffff: protocol ip pref 4 u32 chain 0 fh 800::800 order 2048 key ht 800 bkt 0 not_in_hw
	Sent 1000 bytes 1 pkt (dropped 0, overlimits 0 requeues 0)
`
	m := ParseTCFilters(out)
	if m[4] != (Wire{4000, 3}) || m[50] != (Wire{100, 1}) || len(m) != 2 {
		t.Errorf("ParseTCFilters = %v", m)
	}
}

func TestParseOutput(t *testing.T) {
	out := "C0 #kernel\nC0 TcpRetransSegs 10 0.0\nC0 RxTcpExtTCPOFOQueue 5 0.0\nC0 SoftnetDrops 0\n" +
		"C1 #kernel\nC1 TcpRetransSegs 25 0.0\nC1 RxTcpExtTCPOFOQueue 9 0.0\nC1 SoftnetDrops 2\n" +
		"S0 cpu  100 0 50 1000 0 0 0 0 0 0\nS1 cpu  300 0 150 1100 0 0 0 0 0 0\n{\"ops\": 1,\n\"bytes\": 2}\n"
	o, err := ParseOutput(out)
	if err != nil {
		t.Fatal(err)
	}
	if o.GuestBusy != 300 || o.Counters["TcpRetransSegs"] != 15 || o.Counters["RxTcpExtTCPOFOQueue"] != 4 || o.Counters["SoftnetDrops"] != 2 {
		t.Errorf("ParseOutput: %+v", o)
	}
	if p, err := ParsePerf([]byte(o.JSON)); err != nil || p.Ops != 1 {
		t.Errorf("JSON %q: %v", o.JSON, err)
	}
	if o, err := ParseOutput("S0 cpu 1 2 3 4 5 6 7 8\nS1 cpu 1 2 3 4 5 6 7 8\n{}"); err != nil || o.Counters != nil {
		t.Errorf("without counters: %+v %v", o, err)
	}
	if _, err := ParseOutput("{}"); err == nil {
		t.Error("ParseOutput accepted output without /proc/stat lines")
	}
}
