package ctl

import (
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	v3 "github.com/projectcalico/api/pkg/apis/projectcalico/v3"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/bench/cluster"
	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/nodereport"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
)

var testNodes = []struct{ name, ip, boot string }{
	{"node-a", "198.18.0.1", "boot-a-1"},
	{"node-b", "198.18.0.2", "boot-b-1"},
	{"node-c", "198.18.0.3", "boot-c-1"},
}

func bootOf(name string) string {
	for _, n := range testNodes {
		if n.name == name {
			return n.boot
		}
	}
	return ""
}

// healthyReport is what a real agent in enforce with generation 7 reports.
func healthyReport(self string) *watch.Report {
	r := &watch.Report{NodeReport: api.NodeReport{Mode: api.ModeEnforce, Generations: []uint32{7}, Incarnation: bootOf(self),
		BudgetMTU: 1452, ExternalMTU: 1500, MaxSeqFraction: 0.02, SeqGeneration: 7,
		PeersEncrypted: len(testNodes) - 1, PeersExpected: len(testNodes) - 1, LastSync: fixedNow.Add(-30 * time.Second)},
		InboundFrom: map[string]string{}, EncryptingTo: map[string]string{}}
	for _, n := range testNodes {
		if n.name != self {
			r.InboundFrom[n.name] = watch.IncarnationTag(n.boot)
			r.EncryptingTo[n.name] = watch.IncarnationTag(n.boot)
		}
	}
	return r
}

func healthyMaster() *api.MasterStatus {
	return &api.MasterStatus{Leader: "secureoverlay-master-0", Mode: api.ModeEnforce, Target: api.ModeEnforce, ActiveGeneration: 7,
		Generations: []api.GenerationStatus{{Number: 7, State: "active", Cipher: "aes128gcm", Reason: "request",
			Created: fixedNow.Add(-2 * time.Hour), Activated: fixedNow.Add(-2*time.Hour + 3*time.Second)}},
		LastRotateRequest: "2026-03-04T08:00:00Z", Nodes: len(testNodes),
		AgentSecretAccess: "revoked", AgentSecretAccessWhy: "no v1 generation is live and every agent reads the public ring",
		NodeTable: api.NodeTableIDs}
}

// healthyCluster writes what a healthy enforcing cluster publishes: nodes with agent
// reports and agent pods, the master's status, the operator's ConfigMap, an IPIP pool,
// FelixConfiguration ipipMTU 1452 and a valid key ring.
func (e *env) healthyCluster() {
	e.t.Helper()
	var names []string
	for _, n := range testNodes {
		e.createNode(n.name, n.ip, n.boot, map[string]string{"secureoverlay.io/agent": "true"})
		e.setReport(n.name, healthyReport(n.name), "")
		e.addAgentPod(n.name)
		names = append(names, n.name)
	}
	e.setMasterStatus(healthyMaster())
	e.setConfigMap(map[string]string{api.ConfigEnabledKey: "true"})
	e.applyCalico(ipPool("default-ipv4-ippool", "10.244.0.0/16", v3.IPIPModeAlways, nil))
	e.applyCalico(felixDefault(v3.FelixConfigurationSpec{IPIPMTU: intp(1452)}))
	e.setSecret(map[string][]byte{api.SecretDataKey: e.ring7(names...)})
}

// TestStatusGolden: status in table, wide, json and yaml, healthy and degraded, and the
// per-peer detail of one node, against a real API server, with an injected clock.
func TestStatusGolden(t *testing.T) {
	e := newEnv(t)
	e.healthyCluster()

	for _, f := range []struct{ golden, format string }{
		{"status-healthy.txt", "table"}, {"status-healthy-wide.txt", "wide"},
		{"status-healthy.json", "json"}, {"status-healthy.yaml", "yaml"},
	} {
		r := e.run("status", "-o", f.format)
		if r.code != ExitOK || r.stderr != "" {
			t.Fatalf("status -o %s on a healthy cluster:\n%s", f.format, r)
		}
		goldenCheck(t, f.golden, r.stdout)
	}
	r := e.run("status", "-o", "json")
	var st StatusOutput
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil {
		t.Fatalf("status -o json does not parse: %v", err)
	}
	if !st.Healthy || st.Summary != "all 3 nodes encrypting and enforcing, generation 7" || len(st.Nodes) != 3 {
		t.Fatalf("healthy status: %+v", st)
	}

	r = e.run("status", "--node", "node-a")
	if r.code != ExitOK {
		t.Fatalf("status --node node-a:\n%s", r)
	}
	goldenCheck(t, "status-node-a.txt", r.stdout)

	// Degrade: node-b rebooted (new boot ID) and its agent has not re-reported, so node-a's
	// facts about node-b are stale too; node-c's
	// agent reports a sync error, lags at accept without generation 8 (pending), and
	// node-a encrypts to only one peer; the master is mid-rotation.
	e.createNode("node-d", "198.18.0.4", "boot-d-1", nil) // no agent at all
	ms := healthyMaster()
	ms.PendingGeneration, ms.RotationInProgress = 8, true
	ms.Generations = append(ms.Generations, api.GenerationStatus{Number: 8, State: "pending", Cipher: "aes128gcm", Reason: "sequence", Created: fixedNow.Add(-time.Minute)})
	ms.Waiting = "every live node to install generation 8"
	ms.Lagging = []api.NodeLagging{{Node: "node-c", Reason: "generation 8 not installed"}, {Node: "node-d", Reason: "no report"}}
	ms.NodeTable, ms.NodeTableWhy = api.NodeTableRing, "agents that do not read the NodeIDs: 1 (node node-c first)"
	e.setMasterStatus(ms)
	e.reboot("node-b", "boot-b-2")
	rc := healthyReport("node-c")
	rc.Mode, rc.Error = api.ModeAccept, "apply xfrm state spi=0x80000300 dst=198.18.0.1: operation not permitted"
	rc.LastSync = fixedNow.Add(-20 * time.Minute)
	e.setReport("node-c", rc, "")
	ra := healthyReport("node-a")
	ra.Generations = []uint32{7, 8}
	ra.PeersEncrypted = 1
	delete(ra.EncryptingTo, "node-c")
	e.setReport("node-a", ra, "")

	for _, f := range []struct{ golden, format string }{{"status-degraded.txt", "table"}, {"status-degraded.json", "json"}} {
		r := e.run("status", "-o", f.format)
		if r.code != ExitNotOK || r.stderr != "" {
			t.Fatalf("status -o %s on a degraded cluster must exit 1:\n%s", f.format, r)
		}
		goldenCheck(t, f.golden, r.stdout)
	}
	r = e.run("status", "--node", "node-a")
	if r.code != ExitNotOK || !strings.Contains(r.stdout, "not encrypting to node-c (no)") || !strings.Contains(r.stdout, "stale") {
		t.Fatalf("status --node node-a on the degraded cluster:\n%s", r)
	}
	goldenCheck(t, "status-node-a-degraded.txt", r.stdout)

	// --node-selector: node-d (no agent label, like a Windows node without the agent's
	// DaemonSet) is not counted.
	r = e.run("status", "-o", "json", "-l", "secureoverlay.io/agent=true")
	var sel StatusOutput
	if err := json.Unmarshal([]byte(r.stdout), &sel); err != nil || len(sel.Nodes) != 3 ||
		slices.ContainsFunc(sel.Problems, func(p string) bool { return strings.HasPrefix(p, "node-d") }) {
		t.Fatalf("status -l secureoverlay.io/agent=true must leave node-d out: %v\n%s", err, r)
	}

	// Without -l, the ConfigMap's node-selector (the manifest's setting) applies; -l ""
	// overrides it. Its heartbeat-interval sets the staleness limit (3 heartbeats).
	e.setConfigMap(map[string]string{api.ConfigEnabledKey: "true", "node-selector": "secureoverlay.io/agent=true", "heartbeat-interval": "5s"})
	r = e.run("status", "-o", "json")
	if err := json.Unmarshal([]byte(r.stdout), &sel); err != nil || len(sel.Nodes) != 3 || sel.NodeSelector != "secureoverlay.io/agent=true" {
		t.Fatalf("status with the ConfigMap's node-selector must leave node-d out: %v\n%s", err, r)
	}
	if !slices.Contains(sel.Nodes[1].Problems, "last sync 30s ago") {
		t.Fatalf("heartbeat-interval 5s: a 30s old sync is stale: %+v", sel.Nodes[1])
	}
	r = e.run("status", "-o", "json", "-l", "", "--stale-after", "1h")
	if err := json.Unmarshal([]byte(r.stdout), &sel); err != nil || len(sel.Nodes) != 4 || slices.Contains(sel.Nodes[1].Problems, "last sync 30s ago") {
		t.Fatalf("status -l '' --stale-after 1h overrides the ConfigMap: %v\n%s", err, r)
	}
	e.setConfigMap(map[string]string{api.ConfigEnabledKey: "true", "node-selector": "a b c"})
	r = e.run("status")
	if r.code != ExitNotOK || !strings.Contains(r.stderr, `configmap secureoverlay/secureoverlay-config key node-selector "a b c" (use --node-selector)`) {
		t.Fatalf("status with an invalid node-selector setting:\n%s", r)
	}
	e.setConfigMap(map[string]string{api.ConfigEnabledKey: "true"})

	r = e.run("status", "--node", "nope")
	if r.code != ExitNotOK || r.stderr != "error: node \"nope\" not found\n" {
		t.Fatalf("status --node nope:\n%s", r)
	}

	// No master status at all: one problem, named.
	e.setMasterStatus(nil)
	r = e.run("status", "-o", "json")
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil || r.code != ExitNotOK {
		t.Fatalf("status without a master: %v\n%s", err, r)
	}
	if !slices.ContainsFunc(st.Problems, func(p string) bool { return strings.Contains(p, "is secureoverlay-master running?") }) {
		t.Fatalf("status without a master must say so: %+v", st.Problems)
	}
}

// TestStatusLargeCluster: status of 200 nodes against a real API server: the summary
// first (node states, at most 20 problems and how many more), the per-node table only
// with --nodes or -o wide, every node and problem in -o json; reports read from the
// NodeReports' summary annotations, and whole for the objects without one (agents
// predating it) and for --node.
func TestStatusLargeCluster(t *testing.T) {
	e := newEnv(t)
	const n = 200
	name := func(i int) string { return fmt.Sprintf("node-%03d", i) }
	boot := func(i int) string { return "boot-" + name(i) }
	syncError := func(i int) bool { return i%8 == 3 }  // 25 nodes
	noReport := func(i int) bool { return i%40 == 5 }  // 5 nodes
	oldAgent := func(i int) bool { return i%20 == 11 } // 10 objects without the summary (node-011, node-031, …), 5 of them with a sync error
	report := func(i int, errText string) []byte {
		r := &watch.Report{NodeReport: api.NodeReport{Mode: api.ModeEnforce, Generations: []uint32{7}, Incarnation: boot(i),
			BudgetMTU: 1452, ExternalMTU: 1500, PeersEncrypted: n - 1, PeersExpected: n - 1, LastSync: fixedNow.Add(-30 * time.Second), Error: errText},
			InboundFrom: map[string]string{}, EncryptingTo: map[string]string{}}
		for j := range n {
			if j != i {
				r.InboundFrom[name(j)] = watch.IncarnationTag(boot(j))
				r.EncryptingTo[name(j)] = watch.IncarnationTag(boot(j))
			}
		}
		b, err := json.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	cfg := e.cluster.AdminConfig()
	cfg.QPS, cfg.Burst = 1000, 2000
	cs := kubernetes.NewForConfigOrDie(cfg)
	dyn := dynamic.NewForConfigOrDie(cfg)
	if err := kube.Parallel(n, 8, func(i int) error {
		node, err := kube.CreateNodeContext(e.ctx, cs, kube.Node{Name: name(i), IPv4: cluster.IP(i).String(), BootID: boot(i)})
		if err != nil || noReport(i) {
			return err
		}
		errText := ""
		if syncError(i) {
			errText = "apply xfrm state spi=0x80000300 dst=198.18.0.1: operation not permitted"
		}
		raw := report(i, errText)
		if !oldAgent(i) {
			return nodereport.Write(e.ctx, dyn, api.Namespace, name(i), string(node.UID), string(api.ModeEnforce), raw)
		}
		obj := nodereport.Object(api.Namespace, name(i), string(node.UID), string(api.ModeEnforce), raw)
		obj.SetAnnotations(nil)
		_, err = dyn.Resource(nodereport.GVR).Namespace(api.Namespace).Create(e.ctx, obj, metav1.CreateOptions{})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	ms := healthyMaster()
	ms.Nodes = n
	e.setMasterStatus(ms)
	e.setConfigMap(map[string]string{api.ConfigEnabledKey: "true"})

	r := e.run("status")
	if r.code != ExitNotOK || r.stderr != "" {
		t.Fatalf("status of 200 nodes, 30 with problems, must exit 1:\n%s", r)
	}
	for _, want := range []string{
		"Summary:  170 of 200 nodes encrypting and enforcing, generation 7; 30 problem(s), first: node-003: sync error: ",
		"States:   200 nodes: 170 ok, 25 error, 5 no-report\n",
		"\nProblems:\n  - node-003: sync error: ",
		"  - node-005: no agent report\n",
		"  … and 10 more (-o json lists every one)\n",
		"The table of the 200 nodes is left out above 50 nodes: --nodes or -o wide prints it, --node NAME shows one node.\n",
	} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("status output lacks %q:\n%s", want, r.stdout)
		}
	}
	if got := strings.Count(r.stdout, "\n  - "); got != 20 || strings.Contains(r.stdout, "NODE ") || strings.Count(r.stdout, "\n") > 40 {
		t.Errorf("status: want 20 problem lines and no table, got %d problem lines:\n%s", got, r.stdout)
	}
	// The summary and the problems come before the table.
	for _, args := range [][]string{{"status", "--nodes"}, {"status", "-o", "wide"}} {
		r := e.run(args...)
		table := strings.Index(r.stdout, "\nNODE ")
		if r.code != ExitNotOK || table < 0 || table < strings.Index(r.stdout, "Problems:") || strings.Count(r.stdout, "\nnode-") != n {
			t.Fatalf("%v must print the summary, then every node's row:\n%s", args, r)
		}
		if args[1] == "-o" {
			if !strings.Contains(r.stdout, "  INCARNATION  ") {
				t.Errorf("status -o wide: no wide columns:\n%s", r.stdout)
			}
			continue
		}
		if !strings.Contains(r.stdout, "\nnode-031  yes    enforce  7            199/199  1452    30s ago    ok") ||
			!strings.Contains(r.stdout, "\nnode-011  yes    enforce  7            199/199  1452    30s ago    sync error: ") {
			t.Errorf("%v: the rows of objects without a summary (read whole) are wrong:\n%s", args, r.stdout)
		}
	}
	r = e.run("status", "-o", "json")
	var st StatusOutput
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil || r.code != ExitNotOK {
		t.Fatalf("status -o json: %v\n%s", err, r)
	}
	want := map[string]int{StateOK: 170, StateError: 25, StateNoReport: 5, StateLagging: 0, StateExcluded: 0, StateStale: 0, StateNotReady: 0}
	if len(st.Nodes) != n || len(st.Problems) != 30 || !maps.Equal(st.States, want) || st.Nodes[3].State != StateError || st.Nodes[0].State != StateOK {
		t.Fatalf("status -o json: %d nodes, %d problems, states %v; want 200, 30, %v", len(st.Nodes), len(st.Problems), st.States, want)
	}

	// --node reads the reports whole: node-000's claims about every peer and theirs about it.
	r = e.run("status", "--node", "node-000")
	if r.code != ExitOK || strings.Count(r.stdout, "\nnode-") != n-1 || strings.Contains(r.stdout, " no ") || strings.Contains(r.stdout, "stale") {
		t.Fatalf("status --node node-000 (every pair in place):\n%.3000s", r)
	}
	if !strings.Contains(r.stdout, "node-011  198.18.0.12/24   yes                yes                 yes           yes              enforce") ||
		!strings.Contains(r.stdout, "node-005  198.18.0.6/24    yes                yes                 -             -                -") {
		t.Errorf("status --node node-000: rows of a peer read whole and a peer without a report:\n%s", r.stdout)
	}

	// An agent's next write (a merge patch) replaces the summary with the report.
	if err := nodereport.Write(e.ctx, dyn, api.Namespace, name(1), "", string(api.ModeEnforce), report(1, "netlink: no buffer space available")); err != nil {
		t.Fatal(err)
	}
	r = e.run("status", "-o", "json")
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil || st.Nodes[1].Error != "netlink: no buffer space available" || st.States[StateError] != 26 {
		t.Fatalf("status after node-001's agent wrote a sync error: %v, %+v, states %v", err, st.Nodes[1], st.States)
	}
}

// TestStatusReadsNodeStatuses: status takes each node's report from the later of its
// NodeReport and its NodeStatus (nodereport.PickObject), read as summaries and whole.
func TestStatusReadsNodeStatuses(t *testing.T) {
	e := newEnv(t)
	name := func(i int) string { return fmt.Sprintf("node-%d", i) }
	const n = 4
	report := func(i int, age time.Duration, errText string) []byte {
		r := &watch.Report{NodeReport: api.NodeReport{Mode: api.ModeEnforce, Generations: []uint32{7}, Incarnation: "boot-" + name(i),
			BudgetMTU: 1452, ExternalMTU: 1500, PeersEncrypted: n - 1, PeersExpected: n - 1, LastSync: fixedNow.Add(-age), Error: errText},
			InboundFrom: map[string]string{}, EncryptingTo: map[string]string{}}
		for j := range n {
			if j != i {
				r.InboundFrom[name(j)] = watch.IncarnationTag("boot-" + name(j))
				r.EncryptingTo[name(j)] = watch.IncarnationTag("boot-" + name(j))
			}
		}
		b, err := json.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	dyn := dynamic.NewForConfigOrDie(e.cluster.AdminConfig())
	write := func(status bool, i int, raw []byte) {
		t.Helper()
		w := nodereport.Write
		if status {
			w = nodereport.WriteStatus
		}
		if err := w(e.ctx, dyn, api.Namespace, name(i), "", string(api.ModeEnforce), raw); err != nil {
			t.Fatal(err)
		}
	}
	for i := range n {
		kube.CreateNode(t, e.cluster.AdminConfig(), kube.Node{Name: name(i), IPv4: cluster.IP(i).String(), BootID: "boot-" + name(i)})
	}
	write(false, 0, report(0, 30*time.Second, ""))                      // a NodeReport only
	write(true, 1, report(1, 30*time.Second, ""))                       // a NodeStatus only
	write(false, 2, report(2, 10*time.Minute, "left behind"))           // a NodeReport left behind ...
	write(true, 2, report(2, 30*time.Second, ""))                       // ... by an agent that writes its NodeStatus
	write(true, 3, report(3, 10*time.Minute, ""))                       // a NodeStatus left behind ...
	write(false, 3, report(3, 30*time.Second, "agent rolled back: ok")) // ... by an agent rolled back to NodeReports
	ms := healthyMaster()
	ms.Nodes = n
	e.setMasterStatus(ms)
	e.setConfigMap(map[string]string{api.ConfigEnabledKey: "true"})

	r := e.run("status", "-o", "json")
	var st StatusOutput
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil || len(st.Nodes) != n {
		t.Fatalf("status -o json: %v\n%s", err, r)
	}
	for i, want := range []string{"", "", "", "agent rolled back: ok"} {
		if got := st.Nodes[i]; !got.Reported || got.Error != want || !got.LastSync.Equal(fixedNow.Add(-30*time.Second)) {
			t.Errorf("%s: reported %v, error %q, last sync %v; want its current report (error %q, 30s ago)", name(i), got.Reported, got.Error, got.LastSync, want)
		}
	}
	// --node reads whole reports, from either kind: every pair in place.
	r = e.run("status", "--node", name(1))
	if r.code != ExitOK || strings.Count(r.stdout, "\nnode-") != n-1 || strings.Contains(r.stdout, " no ") {
		t.Fatalf("status --node %s:\n%s", name(1), r)
	}

	// node-1's agent leaves a superseded NodeReport (later than its NodeStatus, as when it
	// stops writing NodeReports): marked in its metadata, and read as none.
	var sup watch.Report
	if err := json.Unmarshal(report(1, 0, "left behind"), &sup); err != nil {
		t.Fatal(err)
	}
	sup.OmitLists()
	sup.Superseded = true
	b, _ := json.Marshal(sup)
	write(false, 1, b)
	u, err := dyn.Resource(nodereport.GVR).Namespace(api.Namespace).Get(e.ctx, name(1), metav1.GetOptions{})
	if err != nil || u.GetAnnotations()[nodereport.SupersededAnnotation] != "true" {
		t.Fatalf("superseded NodeReport: annotations %v (%v)", u.GetAnnotations(), err)
	}
	r = e.run("status", "-o", "json")
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil || st.Nodes[1].Error != "" || !st.Nodes[1].LastSync.Equal(fixedNow.Add(-30*time.Second)) {
		t.Fatalf("status with node-1's NodeReport superseded: %v, %+v; want its NodeStatus", err, st.Nodes[1])
	}
	// Written current again (a peer reads NodeReports): the mark goes.
	write(false, 1, report(1, 0, ""))
	if u, err = dyn.Resource(nodereport.GVR).Namespace(api.Namespace).Get(e.ctx, name(1), metav1.GetOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, ok := u.GetAnnotations()[nodereport.SupersededAnnotation]; ok {
		t.Fatalf("current NodeReport still marked superseded: %v", u.GetAnnotations())
	}
}
