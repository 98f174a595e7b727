package e2e

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"

	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/conformance/lab"
	"github.com/secureoverlay/secureoverlay/conformance/lab/wire"
)

// ip -ts xfrm monitor SA policy, as iproute2 6.1 prints it (key lines already removed).
const monitorFixture = `[2026-12-03T14:48:43.096950] Deleted src 198.18.0.1 dst 198.18.0.2
	proto esp spi 0x00001012 reqid 1 mode transport
	replay-window 0 flag esn
	anti-replay esn context:
	 seq-hi 0x0, seq 0x0, oseq-hi 0x0, oseq 0x36
	 replay_window 1024, bitmap-length 32
	 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 
	sel src 0.0.0.0/0 dst 0.0.0.0/0 
[2026-12-03T14:48:43.792796] Updated src 198.18.0.1/32 dst 198.18.0.2/32 proto ipencap 
	dir out priority 0 ptype main 
	tmpl src 198.18.0.1 dst 198.18.0.2
		proto esp spi 0x40000012 reqid 2 mode transport
`

func TestParseXfrmMonitor(t *testing.T) {
	evs := parseXfrmMonitor(monitorFixture)
	want := []string{
		"Deleted src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x00001012 reqid 1 mode transport",
		"Updated src 198.18.0.1/32 dst 198.18.0.2/32 proto ipencap dir out priority 0 ptype main tmpl src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x40000012 reqid 2 mode transport",
	}
	if len(evs) != 2 || evs[0].text != want[0] || evs[1].text != want[1] {
		t.Fatalf("events %+v", evs)
	}
	at := time.Date(2026, 12, 3, 14, 48, 43, 96950000, time.UTC)
	if d := evs[0].at - float64(at.UnixNano())/1e9; d > 1e-6 || d < -1e-6 {
		t.Errorf("first event at %f, want %f", evs[0].at, float64(at.UnixNano())/1e9)
	}
	if w := window(evs, evs[1].at-0.1, evs[1].at+0.1); len(w) != 1 || w[0].text != want[1] {
		t.Errorf("window: %+v", w)
	}
}

// The xfrm changes of run 2 of scenario 2 under load (rotation 2 → 3; SPIs 0x8… are
// generation 2, 0xc… generation 3): node2 switched and removed its generation-2 SAs at
// once at +45.5, while node3 still sent generation 2 until +54.64.
func TestMakeBeforeBreak(t *testing.T) {
	ev := func(at float64, text string) timedLine { return timedLine{at: 1000 + at, text: text} }
	out := func(from, to int, spi string) string {
		return fmt.Sprintf("Updated src 198.18.0.%d/32 dst 198.18.0.%d/32 proto ipencap dir out priority 24256 ptype main tmpl src 198.18.0.%d dst 198.18.0.%d proto esp spi %s reqid 24256 mode transport", from, to, from, to, spi)
	}
	del := func(from, to int, spi string) string {
		return fmt.Sprintf("Deleted src 198.18.0.%d dst 198.18.0.%d proto esp spi %s reqid 24256 mode transport", from, to, spi)
	}
	r := LossReport{t0: 1000, events: map[int][]timedLine{
		1: {ev(42.0, out(1, 2, "0xc0000100")), ev(42.0, out(1, 3, "0xc0000100")), ev(52.97, del(2, 1, "0x80000200")), ev(52.99, del(3, 1, "0x80000300")), ev(53.0, del(1, 2, "0x80000100"))},
		2: {ev(45.489, out(2, 1, "0xc0000200")), ev(45.491, out(2, 3, "0xc0000200")), ev(45.541, del(2, 1, "0x80000200")), ev(45.602, del(1, 2, "0x80000100")), ev(45.611, del(3, 2, "0x80000300"))},
		3: {ev(54.638, out(3, 1, "0xc0000300")), ev(54.640, out(3, 2, "0xc0000300")), ev(54.715, del(3, 1, "0x80000300")), ev(54.726, del(1, 3, "0x80000100")), ev(54.727, del(2, 3, "0x80000200"))},
	}}
	text, v := r.MakeBeforeBreak([]int{1, 2, 3}, 2, 3)
	if len(v) != 2 || !strings.Contains(v[0], "node1 removed its inbound SA of generation 2 from node3 1.65 s before node3 switched") ||
		!strings.Contains(v[1], "node2 removed its inbound SA of generation 2 from node3 9.03 s before node3 switched") {
		t.Errorf("violations %q\n%s", v, text)
	}
	if !strings.Contains(text, "node3→node2: +54.64 / +45.61  ← removed 9.03 s before the sender switched") || !strings.Contains(text, "node1→node2: +42.00 / +45.60\n") {
		t.Errorf("text:\n%s", text)
	}
	// The same changes in make-before-break order: node2 and node1 remove after node3 switched.
	r.events[2][4] = ev(55.0, del(3, 2, "0x80000300"))
	r.events[1][3] = ev(55.0, del(3, 1, "0x80000300"))
	if text, v := r.MakeBeforeBreak([]int{1, 2, 3}, 2, 3); len(v) != 0 {
		t.Errorf("violations %q\n%s", v, text)
	}
	// A monitor that recorded nothing proves nothing.
	r.events[3] = nil
	if _, v := r.MakeBeforeBreak([]int{1, 2, 3}, 2, 3); len(v) != 4 {
		t.Errorf("node3 recorded nothing: violations %q, want 4 (its two switches and two removals missing)", v)
	}
}

func TestParseAgentLog(t *testing.T) {
	ls := parseAgentLog(`time=2026-12-03T14:34:24.739Z level=INFO msg="caches synced" node=node3
not a log line
time=2026-12-03T14:34:25.150Z level=DEBUG msg=synced kind=full mode=enforce writes=4
`)
	if len(ls) != 2 || ls[0].text != "INFO caches synced node=node3" || ls[1].text != "DEBUG synced kind=full mode=enforce writes=4" {
		t.Fatalf("lines %+v", ls)
	}
	if ls[1].at-ls[0].at < 0.410 || ls[1].at-ls[0].at > 0.412 {
		t.Errorf("times %f %f", ls[0].at, ls[1].at)
	}
}

func TestLossTimeline(t *testing.T) {
	if got := seqRuns([]int{3, 4, 5, 9, 11, 12}); !slices.Equal(got, [][2]int{{3, 5}, {9, 9}, {11, 12}}) {
		t.Errorf("seqRuns = %v", got)
	}
	ms := []timeMark{{"streams starting", 100}, {"rotation requested", 102}, {"new generation active everywhere", 110.5}}
	if got := phase(ms, 111, 100); got != "0.50 s after new generation active everywhere" {
		t.Errorf("phase = %q", got)
	}
	if got := phase(ms, 99, 100); got != "before the first mark" {
		t.Errorf("phase = %q", got)
	}
	e := lab.Echoes{PingReport: wire.PingReport{Stopped: 3e9, Sent: []int64{1e9, 2e9, 3e9}, Reply: []int64{1.1e9, 0, 3.5e9}}}
	st := newStreamStats(Pair{1, 3}, e)
	if st.Sent != 3 || st.Received != 2 || st.Lost != 1 || !slices.Equal(st.LostSeqs, []int{2}) || st.AfterStop != 1 || st.MaxRTT != 500*time.Millisecond {
		t.Errorf("newStreamStats = %+v", st)
	}
}

// The conflist is what libcni accepts: Calico's own template rendered for the node with
// the pod MTU, then ours right after calico, then Calico's portmap.
func TestConflist(t *testing.T) {
	cm, err := kube.CalicoConfig(kube.RequireCalico(t))
	if err != nil {
		t.Fatal(err)
	}
	b, err := Conflist(cm, 2, PodConfig{MTU: 1402, PluginMode: "clamp"})
	if err != nil {
		t.Fatal(err)
	}
	list, err := libcni.ConfListFromBytes(b)
	if err != nil {
		t.Fatal(err)
	}
	var types []string
	for _, p := range list.Plugins {
		types = append(types, p.Network.Type)
	}
	if !slices.Equal(types, []string{"calico", "secureoverlay", "portmap"}) {
		t.Fatalf("plugins: %v", types)
	}
	var calico struct {
		MTU        int                         `json:"mtu"`
		Nodename   string                      `json:"nodename"`
		Datastore  string                      `json:"datastore_type"`
		IPAM       struct{ Type string }       `json:"ipam"`
		Kubernetes struct{ Kubeconfig string } `json:"kubernetes"`
	}
	if err := json.Unmarshal(list.Plugins[0].Bytes, &calico); err != nil {
		t.Fatal(err)
	}
	if calico.MTU != 1402 || calico.Nodename != "node2" || calico.Datastore != "kubernetes" || calico.IPAM.Type != "calico-ipam" || calico.Kubernetes.Kubeconfig != calicoKubeconfig {
		t.Errorf("calico: %+v", calico)
	}
	var ours map[string]any
	if err := json.Unmarshal(list.Plugins[1].Bytes, &ours); err != nil {
		t.Fatal(err)
	}
	if ours["mode"] != "clamp" || ours["logFile"] != "/tmp/e2e/secureoverlay-cni-node2.log" {
		t.Errorf("secureoverlay entry: %v", ours)
	}
}

// An outbound policy that sends on per-CPU lanes names no SPI: its generation is its lane
// reqid's (0x5ec2 + 2·(g mod 4) + kind).
func TestTemplateGeneration(t *testing.T) {
	for _, c := range []struct {
		spi, reqid string
		gen        uint32
		ok         bool
	}{
		{"c0000100", "24256", 3, true}, // lane 0 of generation 3 (mod 4)
		{"00000000", "24262", 2, true}, // lanes of generation 2, transport: 0x5ec6
		{"00000000", "24263", 2, true}, // lanes of generation 2, tunnel
		{"00000000", "24264", 3, true},
		{"00000000", "24256", 0, false}, // no SPI under the plain reqid: not ours
		{"00000000", "24266", 0, false}, // past the lanes' reqids
		{"", "24262", 2, true},          // as iproute2 prints a template without an SPI
	} {
		if g, ok := templateGeneration(c.spi, c.reqid); g != c.gen || ok != c.ok {
			t.Errorf("spi %s reqid %s: %d %v, want %d %v", c.spi, c.reqid, g, ok, c.gen, c.ok)
		}
	}
	// iproute2 prints a template without an SPI without one (the kernel matrix's monitor).
	line := "Updated src 198.18.0.1/32 dst 198.18.0.2/32 proto ipencap dir out priority 24256 ptype main tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 24262 mode transport"
	if m := outPolicyRE.FindStringSubmatch(line); m == nil || m[3] != "" || m[4] != "24262" {
		t.Errorf("outPolicyRE: %q", m)
	} else if g, ok := templateGeneration(m[3], m[4]); !ok || g != 2 {
		t.Errorf("lane template: generation %d %v, want 2", g, ok)
	}
	line = "Updated src 198.18.0.1/32 dst 198.18.0.2/32 proto ipencap dir out priority 24256 ptype main tmpl src 198.18.0.1 dst 198.18.0.2 proto esp spi 0xc0000100 reqid 24256 mode transport"
	if m := outPolicyRE.FindStringSubmatch(line); m == nil || m[3] != "c0000100" || m[4] != "24256" {
		t.Errorf("outPolicyRE: %q", m)
	}
}
