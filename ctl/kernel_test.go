package ctl

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/common/expfmt"

	"github.com/secureoverlay/secureoverlay/reconciler/agent"
	"github.com/secureoverlay/secureoverlay/reconciler/kernelinfo"
)

// agentText is the text exposition of a real agent.Metrics registry with the kernel info
// k (nil: not set, as an agent before the kernel check).
func agentText(t *testing.T, k *kernelinfo.Info) []byte {
	t.Helper()
	m := agent.NewMetrics(filepath.Join(t.TempDir(), "missing-xfrm_stat"))
	if k != nil {
		m.SetKernel(*k)
	}
	mfs, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	enc := expfmt.NewEncoder(&b, expfmt.NewFormat(expfmt.TypeTextPlain))
	for _, mf := range mfs {
		if err := enc.Encode(mf); err != nil {
			t.Fatal(err)
		}
	}
	return b.Bytes()
}

// TestAgentCountersKernel: the kernel info is read from what a real agent registry
// exports, and its absence (an older agent) is nil, not an error.
func TestAgentCountersKernel(t *testing.T) {
	for _, tc := range []struct {
		name string
		k    *kernelinfo.Info
		want *agentKernel
	}{
		{"bookworm", ptr(kernelinfo.Derive("6.1.0-41-amd64", map[string]bool{}, nil)), &agentKernel{"6.1.0-41-amd64", false, "not-loaded"}},
		{"backports, esp4_offload", ptr(kernelinfo.Derive("6.19.3+bpo-amd64", map[string]bool{"esp4_offload": true}, nil)), &agentKernel{"6.19.3+bpo-amd64", true, "loaded"}},
		{"built in", ptr(kernelinfo.Derive("6.12.57+deb13-amd64", map[string]bool{}, map[string]bool{"esp4_offload": true})), &agentKernel{"6.12.57+deb13-amd64", false, "builtin"}},
		{"older agent", nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, k, err := agentCounters(agentText(t, tc.k))
			if err != nil {
				t.Fatal(err)
			}
			if (k == nil) != (tc.want == nil) || k != nil && *k != *tc.want {
				t.Errorf("kernel %+v, want %+v", k, tc.want)
			}
		})
	}
}

func ptr[T any](v T) *T { return &v }

// TestKernelCheck: the kernel check's verdicts and details.
func TestKernelCheck(t *testing.T) {
	bookworm := &agentKernel{Release: "6.1.0-41-amd64", ESP4Offload: "not-loaded"}
	trixie := &agentKernel{Release: "6.12.57+deb13-amd64", ESP4Offload: "absent"}
	bpo := &agentKernel{Release: "6.19.3+bpo-amd64", PerCPUSAs: true, ESP4Offload: "not-loaded"}
	with := func(k *agentKernel, offload string) *agentKernel { c := *k; c.ESP4Offload = offload; return &c }
	pod := func(node string, k *agentKernel) podKernel {
		return podKernel{Pod: "secureoverlay-agent-" + node, Node: node, Kernel: k}
	}
	for _, tc := range []struct {
		name    string
		pods    []podKernel
		verdict string
		detail  string // exact, or the substrings in says
		says    []string
	}{
		{
			name:    "three bookworm nodes",
			pods:    []podKernel{pod("node-a", bookworm), pod("node-b", bookworm), pod("node-c", bookworm)},
			verdict: "pass",
			detail:  "3 nodes: 6.1.0-41-amd64 ×3; per-CPU SAs: none",
		},
		{
			name:    "kernels differ",
			pods:    []podKernel{pod("node-a", bookworm), pod("node-b", trixie), pod("node-c", bpo), pod("node-d", bookworm)},
			verdict: "pass",
			detail: "4 nodes, kernels differ: 6.1.0-41-amd64 ×2 (node-a, node-d), 6.12.57+deb13-amd64 ×1 (node-b), 6.19.3+bpo-amd64 ×1 (node-c); " +
				"per-CPU SAs: available on node-c (the agents send on per-CPU lanes there with pcpu-sas: auto)",
		},
		{
			name:    "all on backports",
			pods:    []podKernel{pod("node-a", bpo), pod("node-b", bpo)},
			verdict: "pass",
			detail:  "2 nodes: 6.19.3+bpo-amd64 ×2; per-CPU SAs: available on all (the agents send on per-CPU lanes there with pcpu-sas: auto)",
		},
		{
			name:    "esp4_offload loaded on one node",
			pods:    []podKernel{pod("node-a", bookworm), pod("node-b", with(bookworm, "loaded")), pod("node-c", bookworm)},
			verdict: "fail",
			says: []string{"esp4_offload loaded on node-b (6.1.0-41-amd64): observed in our lab", "XfrmInStateProtoError on 10-20% of ESP packets",
				"modprobe -r esp4_offload", "blacklist esp4_offload", "at its next full resync", "(3 nodes: 6.1.0-41-amd64 ×3; per-CPU SAs: none)"},
		},
		{
			name:    "esp4_offload built in",
			pods:    []podKernel{pod("node-a", with(bpo, "builtin")), pod("node-b", with(bookworm, "loaded"))},
			verdict: "fail",
			says:    []string{"esp4_offload built into node-a's kernel (6.19.3+bpo-amd64), loaded on node-b (6.1.0-41-amd64): observed in our lab", "kernels differ"},
		},
		{
			name:    "an agent before the kernel check",
			pods:    []podKernel{pod("node-a", bookworm), pod("node-b", nil)},
			verdict: "pass",
			detail:  "1 node: 6.1.0-41-amd64 ×1; per-CPU SAs: none; not reported by secureoverlay-agent-node-b (node node-b) (agents older than this secureoverlayctl)",
		},
		{
			name:    "no agent reports its kernel",
			pods:    []podKernel{pod("node-a", nil), {Pod: "secureoverlay-agent-x"}},
			verdict: "pass",
			detail:  "no agent reports its kernel (secureoverlay_agent_kernel_info: agents older than this secureoverlayctl): secureoverlay-agent-node-a (node node-a), secureoverlay-agent-x (node -)",
		},
		{
			name:    "/proc/modules unreadable, release unreadable",
			pods:    []podKernel{pod("node-a", &agentKernel{ESP4Offload: "unknown"}), pod("node-b", bookworm)},
			verdict: "pass",
			detail:  "2 nodes, kernels differ: 6.1.0-41-amd64 ×1 (node-b), unknown release ×1 (node-a); per-CPU SAs: none; esp4_offload unknown on node-a (/proc/modules unreadable)",
		},
		{
			name:    "no pods",
			verdict: "fail",
			detail:  "no agent pods",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := kernelCheck(tc.pods)
			if c.Name != "kernel" || c.Verdict != tc.verdict {
				t.Errorf("verdict %s %s, want %s: %s", c.Name, c.Verdict, tc.verdict, c.Detail)
			}
			if tc.says == nil && c.Detail != tc.detail {
				t.Errorf("detail\n %q\nwant\n %q", c.Detail, tc.detail)
			}
			for _, s := range tc.says {
				if !strings.Contains(c.Detail, s) {
					t.Errorf("detail %q does not say %q", c.Detail, s)
				}
			}
		})
	}
}
