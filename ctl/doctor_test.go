package ctl

import (
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	v3 "github.com/projectcalico/api/pkg/apis/projectcalico/v3"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/reconciler/kernelinfo"
)

var allChecks = []string{"calico-crds", "calico-ipip", "calico-modes", "master", "agents", "node-addresses", "mtu", "key-secret", "sequence", "xfrm-errors", "plaintext-drops", "kernel"}

// doctor runs doctor -o json with a short sample and returns the failed check names.
func (e *env) doctor(extra ...string) ([]string, DoctorOutput, result) {
	e.t.Helper()
	r := e.run(append([]string{"doctor", "-o", "json", "--sample", "300ms"}, extra...)...)
	var out DoctorOutput
	if err := json.Unmarshal([]byte(r.stdout), &out); err != nil {
		e.t.Fatalf("doctor -o json does not parse: %v\n%s", err, r)
	}
	var failed []string
	var names []string
	for _, c := range out.Checks {
		names = append(names, c.Name)
		if c.Verdict != "pass" {
			failed = append(failed, c.Name)
		}
	}
	if !slices.Equal(names, allChecks) {
		e.t.Fatalf("doctor ran %v, want %v", names, allChecks)
	}
	want := ExitOK
	if len(failed) > 0 {
		want = ExitNotOK
	}
	if r.code != want || r.stderr != "" || out.Passed != (len(failed) == 0) {
		e.t.Fatalf("doctor: exit %d, want %d (failed %v):\n%s", r.code, want, failed, r)
	}
	sort.Strings(failed)
	return failed, out, r
}

func detail(out DoctorOutput, name string) string {
	for _, c := range out.Checks {
		if c.Name == name {
			return c.Detail
		}
	}
	return ""
}

// TestDoctor: every check passes on a healthy cluster, and each broken condition it
// checks makes exactly the expected checks fail (exit 1), against a real API server.
func TestDoctor(t *testing.T) {
	e := newEnv(t)
	e.healthyCluster()

	failed, _, _ := e.doctor()
	if len(failed) != 0 {
		t.Fatalf("healthy cluster: failed %v", failed)
	}
	r := e.run("doctor", "--sample", "300ms")
	if r.code != ExitOK {
		t.Fatalf("doctor table:\n%s", r)
	}
	goldenCheck(t, "doctor-healthy.txt", strings.ReplaceAll(r.stdout, "300ms", "SAMPLE"))

	ring := e.ring7("node-a", "node-b", "node-c")
	cases := []struct {
		name   string
		args   []string
		breakf func()
		fix    func()
		want   []string
		say    string // substring of the first failed check's detail
	}{
		{
			name:   "calico CRDs not readable (RBAC)",
			args:   []string{"--as", "operator-nocalico"},
			breakf: func() { e.installOperatorRBAC("operator-nocalico", false, true) },
			fix:    func() {},
			want:   []string{"calico-crds", "calico-ipip", "calico-modes", "mtu"},
			say:    "forbidden",
		},
		{
			name:   "operator RBAC is enough for a healthy verdict",
			args:   []string{"--as", "operator"},
			breakf: func() { e.installOperatorRBAC("operator", true, true) },
			fix:    func() {},
		},
		{
			name:   "without reading the Secret (the manifest's operator Role), the master's verdict counts",
			args:   []string{"--as", "viewer"},
			breakf: func() { e.installOperatorRBAC("viewer", true, false) },
			fix:    func() {},
		},
		{
			name: "... and when the master refuses the ring, key-secret fails too",
			args: []string{"--as", "viewer"},
			breakf: func() {
				ms := healthyMaster()
				ms.LastError = "refusing invalid key ring: schemaVersion: unsupported"
				e.setMasterStatus(ms)
			},
			fix:  func() { e.setMasterStatus(healthyMaster()) },
			want: []string{"key-secret", "master"},
			say:  "forbidden: User \"viewer\" cannot get resource \"secrets\"",
		},
		{
			name: "IPPool not in IPIP mode",
			breakf: func() {
				e.applyCalico(ipPool("default-ipv4-ippool", "10.244.0.0/16", v3.IPIPModeNever, func(s *v3.IPPoolSpec) { s.VXLANMode = v3.VXLANModeAlways }))
			},
			fix: func() {
				e.applyCalico(ipPool("default-ipv4-ippool", "10.244.0.0/16", v3.IPIPModeAlways, nil))
			},
			want: []string{"calico-ipip"},
			say:  "no enabled IPPool uses IPIP",
		},
		{
			name: "Calico WireGuard and the eBPF data plane",
			breakf: func() {
				e.applyCalico(felixDefault(v3.FelixConfigurationSpec{IPIPMTU: intp(1452), WireguardEnabled: boolp(true), BPFEnabled: boolp(true)}))
			},
			fix:  func() { e.applyCalico(felixDefault(v3.FelixConfigurationSpec{IPIPMTU: intp(1452)})) },
			want: []string{"calico-modes"},
			say:  "default: bpfEnabled (eBPF data plane",
		},
		{
			name:   "a second pool without IPIP",
			breakf: func() { e.applyCalico(ipPool("plain", "10.250.0.0/16", v3.IPIPModeNever, nil)) },
			fix: func() {
				e.applyCalico(ipPool("plain", "10.250.0.0/16", v3.IPIPModeNever, func(s *v3.IPPoolSpec) { s.Disabled = true }))
			},
			want: []string{"calico-ipip"},
			say:  "plain 10.250.0.0/16 ipipMode Never",
		},
		{
			name: "master reports an error",
			breakf: func() {
				ms := healthyMaster()
				ms.LastError = "refusing invalid key ring: generations[0].root: wrong length"
				e.setMasterStatus(ms)
			},
			fix:  func() { e.setMasterStatus(healthyMaster()) },
			want: []string{"master"},
			say:  "refusing invalid key ring",
		},
		{
			name:   "no master status",
			breakf: func() { e.setMasterStatus(nil) },
			fix:    func() { e.setMasterStatus(healthyMaster()) },
			want:   []string{"master"},
			say:    "is secureoverlay-master running?",
		},
		{
			name:   "two nodes claim one address",
			breakf: func() { e.setAddress("node-c", "198.18.0.2/24") },
			fix:    func() { e.setAddress("node-c", "198.18.0.3/24") },
			want:   []string{"node-addresses"},
			say:    "198.18.0.2 claimed by nodes node-b, node-c",
		},
		{
			name:   "a node without an agent report",
			breakf: func() { e.setReport("node-c", nil, "") },
			fix:    func() { e.setReport("node-c", healthyReport("node-c"), "") },
			want:   []string{"agents"},
			say:    "node-c: no agent report",
		},
		{
			name:   "an unreadable report",
			breakf: func() { e.setReport("node-c", nil, `{"mode":"sideways"}`) },
			fix:    func() { e.setReport("node-c", healthyReport("node-c"), "") },
			want:   []string{"agents"},
			say:    `mode \"sideways\" is not a mode`,
		},
		{
			name: "a report with a sync error",
			breakf: func() {
				r := healthyReport("node-b")
				r.Error = "list xfrm states: interrupted dump"
				e.setReport("node-b", r, "")
			},
			fix:  func() { e.setReport("node-b", healthyReport("node-b"), "") },
			want: []string{"agents"},
			say:  "node-b: sync error: list xfrm states",
		},
		{
			name:   "a report from before the node's reboot",
			breakf: func() { e.reboot("node-a", "boot-a-2") },
			fix:    func() { e.reboot("node-a", "boot-a-1") },
			want:   []string{"agents"},
			say:    "node-a: report predates the node's last reboot",
		},
		{
			name:   "ipipMTU above the budget",
			breakf: func() { e.applyCalico(felixDefault(v3.FelixConfigurationSpec{IPIPMTU: intp(1480)})) },
			fix:    func() { e.applyCalico(felixDefault(v3.FelixConfigurationSpec{IPIPMTU: intp(1452)})) },
			want:   []string{"mtu"},
			say:    "Calico's pod MTU 1480 exceeds this node's budget 1452",
		},
		{
			name:   "ipipMTU unset",
			breakf: func() { e.applyCalico(felixDefault(v3.FelixConfigurationSpec{LogSeverityScreen: "Info"})) },
			fix:    func() { e.applyCalico(felixDefault(v3.FelixConfigurationSpec{IPIPMTU: intp(1452)})) },
			want:   []string{"mtu"},
			say:    "Calico's pod MTU 1480 (auto: 1500 - 20) exceeds this node's budget 1452",
		},
		{
			name: "a node on a smaller external MTU",
			breakf: func() {
				r := healthyReport("node-b")
				r.ExternalMTU, r.BudgetMTU = 1450, 1402
				e.setReport("node-b", r, "")
			},
			fix:  func() { e.setReport("node-b", healthyReport("node-b"), "") },
			want: []string{"mtu"},
			say:  "node-b: Calico's pod MTU 1452 exceeds this node's budget 1402",
		},
		{
			name: "a node reporting a budget the rule does not give",
			breakf: func() {
				r := healthyReport("node-b")
				r.ExternalMTU, r.BudgetMTU = 1450, 1404 // the documented rule's overrun
				e.setReport("node-b", r, "")
			},
			fix:  func() { e.setReport("node-b", healthyReport("node-b"), "") },
			want: []string{"mtu"},
			say:  "reports budget 1404, the rule gives 1402",
		},
		{
			name:   "key Secret missing",
			breakf: func() { e.setSecret(nil) },
			fix:    func() { e.setSecret(map[string][]byte{api.SecretDataKey: ring}) },
			want:   []string{"key-secret"},
			say:    "secret secureoverlay/keys not found",
		},
		{
			name: "key Secret malformed (its bytes never printed)",
			breakf: func() {
				bad := strings.Replace(string(ring), `"schemaVersion": 1`, `"schemaVersion": 9`, 1)
				e.setSecret(map[string][]byte{api.SecretDataKey: []byte(bad)})
			},
			fix:  func() { e.setSecret(map[string][]byte{api.SecretDataKey: ring}) },
			want: []string{"key-secret"},
			say:  "is not a valid key ring",
		},
		{
			name: "key Secret with a truncated root",
			breakf: func() {
				i := strings.Index(string(ring), `"root": "`) + len(`"root": "`)
				bad := string(ring[:i]) + string(ring[i+8:]) // drop 8 base64 chars
				e.setSecret(map[string][]byte{api.SecretDataKey: []byte(bad)})
			},
			fix:  func() { e.setSecret(map[string][]byte{api.SecretDataKey: ring}) },
			want: []string{"key-secret"},
			say:  "is not a valid key ring",
		},
		{
			// Every run's output is checked for the roots in e.roots (checkNoKeys).
			name: "key material pasted as a field name of the key Secret (never printed)",
			breakf: func() {
				k := e.plantedRoot()
				bad := strings.Replace(string(ring), `"mode": `, `"`+base64.StdEncoding.EncodeToString(k)+`": 1, "mode": `, 1)
				e.setSecret(map[string][]byte{api.SecretDataKey: []byte(bad)})
			},
			fix:  func() { e.setSecret(map[string][]byte{api.SecretDataKey: ring}) },
			want: []string{"key-secret"},
			say:  "unknown field at byte offset",
		},
		{
			name: "key material pasted as the cipher of the key Secret (never printed)",
			breakf: func() {
				k := e.plantedRoot()
				bad := strings.Replace(string(ring), `"cipher": "aes128gcm"`, `"cipher": "`+hex.EncodeToString(k)+`"`, 1)
				e.setSecret(map[string][]byte{api.SecretDataKey: []byte(bad)})
			},
			fix:  func() { e.setSecret(map[string][]byte{api.SecretDataKey: ring}) },
			want: []string{"key-secret"},
			say:  "generations[0].cipher is not one of aes128gcm, aes256gcm",
		},
		{
			name:   "key Secret without its data key",
			breakf: func() { e.setSecret(map[string][]byte{"other": []byte("x")}) },
			fix:    func() { e.setSecret(map[string][]byte{api.SecretDataKey: ring}) },
			want:   []string{"key-secret"},
			say:    `has no data key \"keys\"`,
		},
		{
			name: "an SA near sequence exhaustion",
			breakf: func() {
				r := healthyReport("node-a")
				r.MaxSeqFraction = 0.9
				e.setReport("node-a", r, "")
			},
			fix:  func() { e.setReport("node-a", healthyReport("node-a"), "") },
			want: []string{"sequence"},
			say:  "node-a at 90% (generation 7)",
		},
		{
			name:   "xfrm error counter rising on one agent",
			breakf: func() { e.mu.Lock(); e.rising["secureoverlay-agent-node-b"] = true; e.mu.Unlock() },
			fix:    func() { e.mu.Lock(); e.rising["secureoverlay-agent-node-b"] = false; e.mu.Unlock() },
			want:   []string{"xfrm-errors"},
			say:    "secureoverlay-agent-node-b (node node-b): XfrmInNoStates +1",
		},
		{
			name:   "plaintext IPIP dropped on one agent",
			breakf: func() { e.mu.Lock(); e.dropping["secureoverlay-agent-node-c"] = "drop"; e.mu.Unlock() },
			fix:    func() { e.mu.Lock(); delete(e.dropping, "secureoverlay-agent-node-c"); e.mu.Unlock() },
			want:   []string{"plaintext-drops"},
			say:    "secureoverlay-agent-node-c (node node-c): in +10",
		},
		{
			name:   "plaintext only counted (accept/encrypt) is not a drop",
			breakf: func() { e.mu.Lock(); e.dropping["secureoverlay-agent-node-c"] = "count"; e.mu.Unlock() },
			fix:    func() { e.mu.Lock(); delete(e.dropping, "secureoverlay-agent-node-c"); e.mu.Unlock() },
		},
		{
			name: "esp4_offload loaded on one node",
			breakf: func() {
				e.setKernel("secureoverlay-agent-node-b", kernelinfo.Derive("6.1.0-41-amd64", map[string]bool{"esp4_offload": true, "esp4": true}, nil))
			},
			fix:  func() { e.setKernel("secureoverlay-agent-node-b", healthyKernel()) },
			want: []string{"kernel"},
			say:  "esp4_offload loaded on node-b (6.1.0-41-amd64): observed in our lab",
		},
		{
			name: "kernels differ across nodes (named, not a failure)",
			breakf: func() {
				e.setKernel("secureoverlay-agent-node-c", kernelinfo.Derive("6.19.3+bpo-amd64", map[string]bool{}, nil))
			},
			fix: func() { e.setKernel("secureoverlay-agent-node-c", healthyKernel()) },
		},
		{
			name:   "no agent pods",
			args:   []string{"--agent-selector", "app=nothing"},
			breakf: func() {},
			fix:    func() {},
			want:   []string{"kernel", "plaintext-drops", "xfrm-errors"},
			say:    `no agent pods match \"app=nothing\"`,
		},
		{
			name: "a node outside --node-selector is not checked",
			args: []string{"--node-selector", "secureoverlay.io/agent=true"},
			breakf: func() {
				e.createNode("win-1", "198.18.0.9", "boot-w", map[string]string{"kubernetes.io/os": "windows"})
			},
			fix: func() {},
		},
		{
			name: "... but is without the selector",
			want: []string{"agents"},
			say:  "win-1: no agent report",
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.breakf != nil {
				tc.breakf()
			}
			failed, out, r := e.doctor(tc.args...)
			if fmt.Sprint(failed) != fmt.Sprint(tc.want) && !(len(failed) == 0 && len(tc.want) == 0) {
				t.Errorf("failed checks %v, want %v:\n%s", failed, tc.want, r)
			}
			if tc.say != "" && len(tc.want) > 0 {
				if d := detail(out, tc.want[0]); !strings.Contains(d, strings.ReplaceAll(tc.say, `\"`, `"`)) {
					t.Errorf("%s detail %q does not say %q", tc.want[0], d, tc.say)
				}
			}
			if tc.fix != nil {
				tc.fix()
			}
		})
	}
	// The agents' metrics port comes from the ConfigMap (agent-metrics-port) unless the
	// flag is given.
	e.setConfigMap(map[string]string{api.ConfigEnabledKey: "true", "agent-metrics-port": "19467"})
	e.doctor("-l", "secureoverlay.io/agent=true")
	if e.port != 19467 {
		t.Errorf("doctor scraped port %d, want the ConfigMap's 19467", e.port)
	}
	e.doctor("-l", "secureoverlay.io/agent=true", "--agent-metrics-port", "9555")
	if e.port != 9555 {
		t.Errorf("doctor scraped port %d, want the flag's 9555", e.port)
	}
	e.setConfigMap(map[string]string{api.ConfigEnabledKey: "true"})

	// The real fetcher goes through the API server's pod proxy; these Pods have no IP
	// (no kubelet), so the API server refuses, and doctor says so in one line per pod.
	var out, errb strings.Builder
	code := (&CLI{Now: func() time.Time { return fixedNow }}).Run(e.ctx,
		[]string{"--kubeconfig", e.kc, "doctor", "-o", "json", "--sample", "10ms", "-l", "secureoverlay.io/agent=true"}, &out, &errb)
	var real DoctorOutput
	if err := json.Unmarshal([]byte(out.String()), &real); err != nil || code != ExitNotOK {
		t.Fatalf("doctor with the pod proxy: exit %d, %v\n%s%s", code, err, out.String(), errb.String())
	}
	t.Logf("xfrm-errors through the pod proxy: %s", detail(real, "xfrm-errors"))
	if d := detail(real, "xfrm-errors"); !strings.Contains(d, "metrics of pod secureoverlay-agent-node-a: pod proxy answered 400: address not allowed") {
		t.Errorf("xfrm-errors through the pod proxy: %q", d)
	}

	// Several things broken at once, as an operator sees it (docs/operating.md).
	e.setSecret(nil)
	e.setReport("node-c", nil, "")
	e.applyCalico(felixDefault(v3.FelixConfigurationSpec{IPIPMTU: intp(1480)}))
	r = e.run("doctor", "--sample", "300ms", "--node-selector", "secureoverlay.io/agent=true")
	if r.code != ExitNotOK {
		t.Fatalf("doctor with three faults:\n%s", r)
	}
	goldenCheck(t, "doctor-broken.txt", strings.ReplaceAll(r.stdout, "300ms", "SAMPLE"))
	e.setSecret(map[string][]byte{api.SecretDataKey: ring})
	e.setReport("node-c", healthyReport("node-c"), "")
	e.applyCalico(felixDefault(v3.FelixConfigurationSpec{IPIPMTU: intp(1452)}))

	// Back to healthy after every fix (but win-1 stays: select the agent nodes).
	if failed, _, r := e.doctor("--node-selector", "secureoverlay.io/agent=true"); len(failed) != 0 {
		t.Fatalf("after the fixes: failed %v\n%s", failed, r)
	}
}

// TestDoctorFollowsCalicosGroup: doctor (as an operator bound to the manifest's
// secureoverlay-operator rules) reads the group Calico uses: on a cluster with only the
// native projectcalico.org/v3 CRDs, and mid-migration with both groups served and the
// DatastoreMigration converged, where the v1 copy is frozen (it lacks the block Calico
// allocated since) and must not be read.
func TestDoctorFollowsCalicosGroup(t *testing.T) {
	t.Run("v3 only", func(t *testing.T) {
		e := newEnvCalico(t, kube.CalicoV3)
		e.healthyCluster()
		e.installOperatorRBAC("op", true, false)
		failed, out, _ := e.doctor("--as", "op")
		if len(failed) != 0 {
			t.Fatalf("failed %v:\n%+v", failed, out)
		}
		if d := detail(out, "calico-crds"); !strings.HasPrefix(d, "projectcalico.org/v3: 1 ippools") || !strings.Contains(d, "only projectcalico.org is served") {
			t.Errorf("calico-crds: %q", d)
		}
	})
	t.Run("migration converged", func(t *testing.T) {
		e := newEnvCalico(t, kube.CalicoBoth)
		e.healthyCluster() // in v1
		e.installOperatorRBAC("op", true, false)
		failed, out, _ := e.doctor("--as", "op")
		if d := detail(out, "calico-crds"); len(failed) != 0 || !strings.HasPrefix(d, "crd.projectcalico.org/v1: 1 ippools, 0 ipamblocks") {
			t.Fatalf("before the migration: failed %v, calico-crds %q", failed, d)
		}
		// kube-controllers copied everything to v3, then Calico allocated a block there.
		e.calico = kube.CalicoV3GV
		e.applyCalico(ipPool("default-ipv4-ippool", "10.244.0.0/16", v3.IPIPModeAlways, nil))
		e.applyCalico(felixDefault(v3.FelixConfigurationSpec{IPIPMTU: intp(1452)}))
		if _, err := kube.CreateCalico(e.ctx, e.dyn, kube.CalicoV3GV, kube.NewIPAMBlock("10.244.7.0/26", "host:node-a")); err != nil {
			t.Fatal(err)
		}
		kube.InstallMigrationCRD(t, e.cluster.AdminConfig())
		migrations := e.dyn.Resource(schema.GroupVersionResource{Group: kube.MigrationGroup, Version: "v1", Resource: "datastoremigrations"})
		m := &unstructured.Unstructured{Object: map[string]any{"apiVersion": kube.MigrationGroup + "/v1", "kind": "DatastoreMigration",
			"metadata": map[string]any{"name": "v1-to-v3"}, "spec": map[string]any{"type": "V1ToV3"}}}
		m, err := migrations.Create(e.ctx, m, kube.StrictCreate)
		if err != nil {
			t.Fatal(err)
		}
		_ = unstructured.SetNestedField(m.Object, "Converged", "status", "phase")
		if _, err := migrations.UpdateStatus(e.ctx, m, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		failed, out, _ = e.doctor("--as", "op")
		d := detail(out, "calico-crds")
		if len(failed) != 0 || !strings.HasPrefix(d, "projectcalico.org/v3: 1 ippools, 1 ipamblocks") ||
			!strings.Contains(d, "v1-to-v3 Converged") || !strings.Contains(d, "crd.projectcalico.org/v1 is a frozen copy, not read") {
			t.Fatalf("after the migration converged: failed %v, calico-crds %q", failed, d)
		}
		// An explicit setting wins, as in Calico (here: someone pinned v1).
		_, out, _ = e.doctor("--as", "op", "--calico-api-group", "crd.projectcalico.org/v1")
		if d := detail(out, "calico-crds"); !strings.HasPrefix(d, "crd.projectcalico.org/v1:") || !strings.Contains(d, "CALICO_API_GROUP=crd.projectcalico.org/v1") {
			t.Errorf("explicit v1: %q", d)
		}
		if r := e.run("doctor", "--calico-api-group", "projectcalico.org"); r.code != ExitUsage || !strings.Contains(r.stderr, "projectcalico.org/v3") {
			t.Errorf("invalid --calico-api-group: exit %d, %s", r.code, r.stderr)
		}
	})
}
