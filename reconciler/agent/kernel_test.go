package agent

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/reconciler/kernelinfo"
	"github.com/secureoverlay/secureoverlay/reconciler/rules"
	"github.com/secureoverlay/secureoverlay/reconciler/xfrm"
)

// TestKernelMetricAndLog: New detects the kernel once (Deps.Kernel), exports
// secureoverlay_agent_kernel_info and logs one line, a warning when esp4_offload is in
// the kernel.
func TestKernelMetricAndLog(t *testing.T) {
	for _, tc := range []struct {
		name    string
		info    kernelinfo.Info
		metric  string
		level   string
		message string
	}{
		{
			name:    "bookworm, esp4_offload not loaded",
			info:    kernelinfo.Derive("6.1.0-41-amd64", map[string]bool{"esp4": true, "xfrm_user": true}, nil),
			metric:  `secureoverlay_agent_kernel_info{esp4_offload="not-loaded",pcpu_sa="false",release="6.1.0-41-amd64"} 1`,
			level:   "INFO",
			message: `msg=kernel node=a release=6.1.0-41-amd64 perCPUSAs=false perCPUSAsProbed=false esp4_offload=not-loaded esp4=loaded xfrm_user=loaded authencesn=not-loaded`,
		},
		{
			name: "trixie, probed: per-CPU SAs on 6.12",
			info: func() kernelinfo.Info {
				i := kernelinfo.Derive("6.12.117+deb13-amd64", map[string]bool{}, nil)
				i.SetPerCPUProbe(true, nil)
				return i
			}(),
			metric:  `secureoverlay_agent_kernel_info{esp4_offload="not-loaded",pcpu_sa="true",release="6.12.117+deb13-amd64"} 1`,
			message: `msg=kernel node=a release=6.12.117+deb13-amd64 perCPUSAs=true perCPUSAsProbed=true`,
		},
		{
			name:    "backports with esp4_offload loaded",
			info:    kernelinfo.Derive("6.19.3+bpo-amd64", map[string]bool{"esp4_offload": true}, nil),
			metric:  `secureoverlay_agent_kernel_info{esp4_offload="loaded",pcpu_sa="true",release="6.19.3+bpo-amd64"} 1`,
			level:   "WARN",
			message: `esp4_offload is loaded; in our lab (QEMU)`,
		},
		{
			name:    "nothing readable",
			info:    kernelinfo.Derive("", nil, nil),
			metric:  `secureoverlay_agent_kernel_info{esp4_offload="unknown",pcpu_sa="false",release=""} 1`,
			level:   "INFO",
			message: `msg=kernel node=a release="" perCPUSAs=false perCPUSAsProbed=false esp4_offload=unknown`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, api.ModeAccept, Config{})
			var logs bytes.Buffer
			m := NewMetrics(filepath.Join(t.TempDir(), "missing-xfrm_stat"))
			calls := 0
			_, err := New(Config{NodeName: "a", ExternalMTU: 1500, LedgerDir: seededLedger(t, "a", "boot-a")},
				Deps{Client: e.cs, Source: e.src, Xfrm: xfrm.NewApplier(e.xk, e.a.cfg.Dataplane), Rules: rules.NewApplier(e.rk),
					Metrics: m, Logger: slog.New(slog.NewTextHandler(&logs, nil)),
					Kernel: func() kernelinfo.Info { calls++; return tc.info }})
			if err != nil {
				t.Fatal(err)
			}
			if calls != 1 {
				t.Errorf("Kernel called %d times, want once", calls)
			}
			if got := kernelSeries(t, m); len(got) != 1 || got[0] != tc.metric {
				t.Errorf("kernel_info series %q, want [%s]", got, tc.metric)
			}
			lines := strings.Split(strings.TrimSpace(logs.String()), "\n")
			if len(lines) != 1 || !strings.Contains(lines[0], "level="+tc.level) || !strings.Contains(lines[0], tc.message) {
				t.Errorf("log = %q, want one %s line with %q", logs.String(), tc.level, tc.message)
			}
		})
	}
}

// kernelSeries gathers m's registry and returns its kernel_info series in the text
// exposition's form.
func kernelSeries(t *testing.T, m *Metrics) []string {
	t.Helper()
	mfs, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, mf := range mfs {
		if mf.GetName() != "secureoverlay_agent_kernel_info" {
			continue
		}
		if mf.GetType() != dto.MetricType_GAUGE || !strings.Contains(mf.GetHelp(), "esp4_offload") {
			t.Errorf("kernel_info: type %s, help %q", mf.GetType(), mf.GetHelp())
		}
		for _, s := range mf.GetMetric() {
			var l []string
			for _, p := range s.GetLabel() {
				l = append(l, fmt.Sprintf("%s=%q", p.GetName(), p.GetValue()))
			}
			out = append(out, fmt.Sprintf("%s{%s} %g", mf.GetName(), strings.Join(l, ","), s.GetGauge().GetValue()))
		}
	}
	return out
}

// TestKernelMetricReplaced: SetKernel keeps one series.
func TestKernelMetricReplaced(t *testing.T) {
	m := NewMetrics(filepath.Join(t.TempDir(), "missing-xfrm_stat"))
	m.SetKernel(kernelinfo.Derive("6.1.0-41-amd64", map[string]bool{"esp4_offload": true}, nil))
	m.SetKernel(kernelinfo.Derive("6.12.57+deb13-amd64", map[string]bool{}, nil))
	want := `secureoverlay_agent_kernel_info{esp4_offload="not-loaded",pcpu_sa="false",release="6.12.57+deb13-amd64"} 1`
	if got := kernelSeries(t, m); len(got) != 1 || got[0] != want {
		t.Errorf("kernel_info series %q, want [%s]", got, want)
	}
}

// TestKernelRefreshedAtResync: a full resync detects the kernel again, so an operator's
// `modprobe -r esp4_offload` shows in the metric (and one log line) without an agent
// restart; a resync that finds nothing new logs nothing.
func TestKernelRefreshedAtResync(t *testing.T) {
	e := newEnv(t, api.ModeAccept, Config{})
	var logs bytes.Buffer
	m := NewMetrics(filepath.Join(t.TempDir(), "missing-xfrm_stat"))
	loaded := kernelinfo.Derive("6.1.0-41-amd64", map[string]bool{"esp4_offload": true}, nil)
	unloaded := kernelinfo.Derive("6.1.0-41-amd64", map[string]bool{}, nil)
	cur := loaded
	a, err := New(Config{NodeName: "a", ExternalMTU: 1500, LedgerDir: seededLedger(t, "a", "boot-a")},
		Deps{Client: e.cs, Source: e.src, Xfrm: xfrm.NewApplier(e.xk, e.a.cfg.Dataplane), Rules: rules.NewApplier(e.rk),
			Metrics: m, Logger: slog.New(slog.NewTextHandler(&logs, nil)), Kernel: func() kernelinfo.Info { return cur }})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go e.src.Run(ctx)
	waitFor(t, "synced", e.src.HasSynced)
	resync := func() {
		t.Helper()
		a.reset.Store(true)
		a.full.Store(true)
		if err := a.Sync(ctx); err != nil {
			t.Fatal(err)
		}
	}
	resync()
	if n := strings.Count(logs.String(), "esp4_offload is loaded"); n != 1 {
		t.Fatalf("%d warnings with esp4_offload loaded, want 1:\n%s", n, logs.String())
	}
	cur = unloaded
	resync()
	resync()
	want := `secureoverlay_agent_kernel_info{esp4_offload="not-loaded",pcpu_sa="false",release="6.1.0-41-amd64"} 1`
	if got := kernelSeries(t, m); len(got) != 1 || got[0] != want {
		t.Errorf("after modprobe -r and a resync: %q, want [%s]", got, want)
	}
	if n := strings.Count(logs.String(), "msg=kernel "); n != 1 {
		t.Errorf("%d info lines for the unloaded module, want 1:\n%s", n, logs.String())
	}
}
