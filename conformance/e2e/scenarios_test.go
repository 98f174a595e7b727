package e2e

import (
	"context"
	"testing"
	"time"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/conformance/lab"
)

// standardPods are the pods Up attached, one per registered node.
func standardPods(l *Lab) []*Pod {
	var ps []*Pod
	for _, p := range l.Pods() {
		if p.Name == lab.PodNS(p.Node) {
			ps = append(ps, p)
		}
	}
	return ps
}

// ensureMode brings the cluster to mode m (enforce: enabled=true; off:
// enabled=false) and waits for it.
func ensureMode(ctx context.Context, t *testing.T, l *Lab, m api.Mode) {
	t.Helper()
	var err error
	switch m {
	case api.ModeEnforce:
		err = l.Enable(ctx)
	case api.ModeOff:
		err = l.Disable(ctx)
	default:
		err = l.SetMode(ctx, m)
	}
	if err != nil {
		t.Fatal(err)
	}
	d, err := l.WaitMode(ctx, string(m), 4*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("cluster reached mode %s in %s", m, d.Round(100*time.Millisecond))
}

// Scenario 1: pod-to-pod traffic across every node pair is ESP on the wire:
// a capture on the underlay sees zero plaintext IPIP and the SA counters grow.
func TestScenario1ESPOnTheWire(t *testing.T) {
	l := sharedLab(t)
	defer diagnose(t, l)
	ctx := ctxFor(t, 6*time.Minute)
	ensureMode(ctx, t, l, api.ModeEnforce)
	pods := standardPods(l)
	const n = 5

	before, err := l.ESPCounts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	capture, err := lab.StartCapture(ctx, l.VM, lab.UnderlayNS, lab.UnderlayBridge)
	if err != nil {
		t.Fatal(err)
	}
	sent, lost, err := l.PingAll(ctx, pods, n)
	if err != nil {
		t.Fatal(err)
	}
	dropped, err := capture.Stop(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ipip, err := capture.Count(ctx, "ip proto 4")
	if err != nil {
		t.Fatal(err)
	}
	esp, err := capture.Count(ctx, "ip proto 50")
	if err != nil {
		t.Fatal(err)
	}
	after, err := l.ESPCounts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("scenario 1: %d echo requests pod→pod across %d ordered pairs, %d lost", sent, len(after), lost)
	t.Logf("underlay capture: %d ESP packets, %d plaintext IPIP packets, %d dropped by the capture", esp, ipip, dropped)
	for _, p := range SortedPairs(after) {
		t.Logf("  SA %s: %d → %d packets (+%d)", p, before[p], after[p], after[p]-before[p])
	}
	if lost != 0 {
		t.Errorf("%d of %d echo requests lost", lost, sent)
	}
	if dropped != 0 {
		t.Errorf("capture dropped %d packets: the counts are not evidence", dropped)
	}
	if ipip != 0 {
		t.Errorf("%d plaintext IPIP packets on the underlay, want 0", ipip)
	}
	if want := 2 * sent; esp < want {
		t.Errorf("%d ESP packets on the underlay, want at least %d (request and reply per echo)", esp, want)
	}
	if len(after) != len(pods)*(len(pods)-1) {
		t.Errorf("SA counters for %d pairs, want %d", len(after), len(pods)*(len(pods)-1))
	}
	for p, a := range after {
		// Pair i→j carries pod i's requests to j and its replies to j's requests.
		if grew := a - before[p]; grew < 2*n {
			t.Errorf("SA %s grew by %d packets, want at least %d", p, grew, 2*n)
		}
	}
	for _, i := range l.RegisteredNodes() {
		st, err := l.XfrmStat(ctx, i)
		if err != nil {
			t.Fatal(err)
		}
		for k, v := range st {
			if v != 0 {
				t.Errorf("node%d xfrm_stat %s = %d, want 0", i, k, v)
			}
		}
	}
}
