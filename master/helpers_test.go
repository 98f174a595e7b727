package master

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	authorizationv1 "k8s.io/api/authorization/v1"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/nodeid"
	"github.com/secureoverlay/secureoverlay/nodekeys"
	"github.com/secureoverlay/secureoverlay/nodereport"
	"github.com/secureoverlay/secureoverlay/noderow"
	"github.com/secureoverlay/secureoverlay/nodeview"
)

// envKeyDump names a file the tests append every key they saw to (hex, one per line);
// TestNoKeyBytesInTestOutput sets it for a child run and then scans the child's output.
const envKeyDump = "SECUREOVERLAY_TEST_KEY_DUMP"

// seenKeys collects every root and derived SA key the simulated agents saw.
var seenKeys = struct {
	sync.Mutex
	m map[string]bool
}{m: map[string]bool{}}

func recordRing(r *keys.Ring) {
	seenKeys.Lock()
	defer seenKeys.Unlock()
	for _, g := range r.Generations {
		seenKeys.m[hex.EncodeToString(g.Root)] = true
		sa, err := g.Derive(keys.Endpoint{IP: netip.MustParseAddr("198.18.0.1"), Incarnation: "a", NodeID: 1},
			keys.Endpoint{IP: netip.MustParseAddr("198.18.0.2"), Incarnation: "b", NodeID: 2})
		if err == nil {
			seenKeys.m[hex.EncodeToString(sa.Key)] = true
		}
	}
}

// recordKey adds key material a test planted (not from a ring) to the keys scanned for.
func recordKey(k []byte) {
	seenKeys.Lock()
	defer seenKeys.Unlock()
	seenKeys.m[hex.EncodeToString(k)] = true
}

func dumpKeys(t *testing.T) {
	path := os.Getenv(envKeyDump)
	if path == "" {
		return
	}
	seenKeys.Lock()
	defer seenKeys.Unlock()
	f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		t.Errorf("open key dump: %v", err)
		return
	}
	defer f.Close()
	for k := range seenKeys.m {
		fmt.Fprintln(f, k)
	}
}

// logSink sends the master's log lines to t.Log while the test runs and keeps them for
// tests that inspect what the master logged.
type logSink struct {
	mu   sync.Mutex
	t    *testing.T
	done bool
	all  bytes.Buffer
}

func (s *logSink) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.done {
		s.t.Log(strings.TrimRight(string(p), "\n"))
		s.all.Write(p)
	}
	return len(p), nil
}

// text returns every line logged so far.
func (s *logSink) text() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.all.String()
}

// env is one test's real API server plus helpers.
type env struct {
	t       *testing.T
	cluster *kube.Cluster
	cs      kubernetes.Interface
	log     *slog.Logger
	sink    *logSink
	ctx     context.Context
}

func newEnv(t *testing.T) *env {
	sink := &logSink{t: t}
	t.Cleanup(func() { sink.mu.Lock(); sink.done = true; sink.mu.Unlock() })
	t.Cleanup(func() { dumpKeys(t) })
	cluster := kube.Start(t)
	cs, err := kubernetes.NewForConfig(cluster.AdminConfig())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	e := &env{t: t, cluster: cluster, cs: cs, log: slog.New(slog.NewTextHandler(sink, &slog.HandlerOptions{Level: slog.LevelDebug})), sink: sink, ctx: ctx}
	installMasterRBAC(t, cs, api.Namespace)
	return e
}

// installMasterRBAC creates the least-privilege RBAC docs/keys.md lists for the master.
func installMasterRBAC(t *testing.T, cs kubernetes.Interface, ns string) {
	ctx := context.Background()
	const name = "secureoverlay-master"
	cr := &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: name}, Rules: []rbacv1.PolicyRule{
		{APIGroups: []string{""}, Resources: []string{"nodes"}, Verbs: []string{"get", "list", "watch"}},
	}}
	role := &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}, Rules: []rbacv1.PolicyRule{
		{APIGroups: []string{""}, Resources: []string{"secrets"}, Verbs: []string{"create"}},
		{APIGroups: []string{""}, Resources: []string{"secrets"}, ResourceNames: []string{api.SecretName}, Verbs: []string{"get", "list", "watch", "update"}},
		{APIGroups: []string{""}, Resources: []string{"configmaps"}, Verbs: []string{"create"}},
		{APIGroups: []string{""}, Resources: []string{"configmaps"}, ResourceNames: []string{api.ConfigMapName}, Verbs: []string{"get", "list", "watch"}},
		{APIGroups: []string{""}, Resources: []string{"configmaps"}, ResourceNames: []string{api.StatusConfigMapName, api.RingConfigMapName}, Verbs: []string{"get", "update"}},
		{APIGroups: []string{"rbac.authorization.k8s.io"}, Resources: []string{"rolebindings"}, ResourceNames: []string{api.AgentKeysAccess}, Verbs: []string{"get", "update"}},
		{APIGroups: []string{""}, Resources: []string{"events"}, Verbs: []string{"create", "patch"}},
		{APIGroups: []string{"coordination.k8s.io"}, Resources: []string{"leases"}, Verbs: []string{"create"}},
		{APIGroups: []string{"coordination.k8s.io"}, Resources: []string{"leases"}, ResourceNames: []string{name}, Verbs: []string{"get", "update"}},
		{APIGroups: []string{nodereport.Group}, Resources: []string{nodereport.Resource, nodereport.StatusResource, nodekeys.Resource, noderow.Resource}, Verbs: []string{"list", "watch"}},
		{APIGroups: []string{nodeview.Group}, Resources: []string{nodeview.Resource}, Verbs: []string{"get", "list", "watch", "create", "patch"}},
		{APIGroups: []string{nodeid.Group}, Resources: []string{nodeid.Resource}, Verbs: []string{"get", "list", "watch", "create", "patch", "delete"}},
	}}
	subj := []rbacv1.Subject{{Kind: "ServiceAccount", Name: name, Namespace: ns}}
	must := func(err error) {
		if err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatalf("install master rbac: %v", err)
		}
	}
	_, err := cs.RbacV1().ClusterRoles().Create(ctx, cr, metav1.CreateOptions{})
	must(err)
	_, err = cs.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: name},
		RoleRef: rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: name}, Subjects: subj}, metav1.CreateOptions{})
	must(err)
	_, err = cs.RbacV1().Roles(ns).Create(ctx, role, metav1.CreateOptions{})
	must(err)
	_, err = cs.RbacV1().RoleBindings(ns).Create(ctx, &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		RoleRef: rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: name}, Subjects: subj}, metav1.CreateOptions{})
	must(err)
	kube.RequireAuthorized(t, cs, kube.ServiceAccountUser(ns, name), kube.ServiceAccountGroups(ns),
		authorizationv1.ResourceAttributes{Resource: "nodes", Verb: "watch"},
		authorizationv1.ResourceAttributes{Resource: "secrets", Namespace: ns, Name: api.SecretName, Verb: "update"})
}

// masterConfig authenticates as the master's ServiceAccount, so RBAC is exercised.
func (e *env) masterConfig() *rest.Config {
	return e.cluster.ServiceAccountConfig(api.Namespace, "secureoverlay-master")
}

func testPolicy() keys.Config {
	return keys.Config{RotateInterval: 0, Grace: time.Second, NodeTimeout: 2 * time.Second, SeqThreshold: 0.5,
		Cipher: keys.AES128GCM, ICVBytes: 8}
}

type replica struct {
	id      string
	cancel  context.CancelFunc
	done    chan error
	metrics *Metrics
}

func (e *env) startMaster(id string, policy keys.Config) *replica {
	cs, err := kubernetes.NewForConfig(e.masterConfig())
	if err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(e.ctx)
	r := &replica{id: id, cancel: cancel, done: make(chan error, 1), metrics: NewMetrics()}
	go func() {
		// Like a Deployment's pod, a replica that lost its lease (the machine is shared
		// and may stall renewals) starts again; only the test stops it.
		for {
			err := Run(ctx, cs, Options{Identity: id, Dynamic: dynamic.NewForConfigOrDie(e.masterConfig()), LeaseDuration: 4 * time.Second, RenewDeadline: 3 * time.Second,
				RetryPeriod: 200 * time.Millisecond, Resync: 300 * time.Millisecond, Policy: policy,
				Logger: e.log.With("replica", id), Metrics: r.metrics})
			if ctx.Err() != nil {
				r.done <- err
				return
			}
			e.log.Warn("replica exited, restarting", "replica", id, "err", err)
			time.Sleep(100 * time.Millisecond)
		}
	}()
	e.t.Cleanup(r.stop)
	return r
}

func (r *replica) stop() {
	r.cancel()
	select {
	case <-r.done:
	case <-time.After(30 * time.Second):
		panic("master replica " + r.id + " did not stop")
	}
	r.done <- nil // later stops return at once
}

// agent simulates a node's agent: it follows the ring in the Secret and reports it after
// a random "install" delay: in its NodeReport (object), else on its Node as agents of 0.1
// did. Clusters mix both, as during a rolling update.
type agent struct {
	name, boot string
	// kind is where the agent writes its report: kindAnnotation (as 0.1), kindReport
	// (a NodeReport) or kindStatus (a NodeStatus, which only the master and the CLI read).
	kind    int
	paused  atomic.Bool
	seqFrac atomic.Value            // float64: the highest sequence fraction ...
	seqGen  atomic.Uint32           // ... measured on an SA of this generation
	inSeq   atomic.Pointer[float64] // the inbound counters' fraction (nil: not reported, as 0.1)
	inGen   atomic.Uint32
	// publish: the agent publishes NodeKeys (protocol v2 keys) for its incarnation, as
	// agents since NodeKeys do; false: as an agent that predates them.
	publish atomic.Bool
	// readsRing: its NodeKeys declare api.CapabilityRingConfigMap (it reads the public
	// ring, not the Secret).
	readsRing atomic.Bool
	// readsIDs: its NodeKeys declare api.CapabilityNodeIDs (it reads the NodeIDs).
	readsIDs atomic.Bool
	lastKeys nodekeys.Keys // runAgent only
	cancel   context.CancelFunc
	done     chan struct{}
}

// Where a simulated agent writes its report (agent.kind).
const (
	kindAnnotation = iota
	kindReport
	kindStatus
)

// addNode creates Node name (address 198.18.0.i) and runs a simulated agent for it that
// writes its report as a NodeReport when i is even, else as an annotation.
func (e *env) addNode(name string, i int) *agent {
	kind := kindAnnotation
	if i%2 == 0 {
		kind = kindReport
	}
	return e.addNodeWith(name, i, kind, "")
}

// addNodeWith is addNode with the report's kind, and with boot ID boot ("": random).
func (e *env) addNodeWith(name string, i, kind int, boot string) *agent {
	return e.addNodeSetup(name, i, kind, boot, nil)
}

// addNodeSetup is addNodeWith, calling setup (when set) on the agent before it runs.
func (e *env) addNodeSetup(name string, i, kind int, boot string, setup func(*agent)) *agent {
	if boot == "" {
		boot = fmt.Sprintf("boot-%s-%d", name, rand.IntN(1e6))
	}
	kube.CreateNode(e.t, e.cluster.AdminConfig(), kube.Node{Name: name, IPv4: fmt.Sprintf("198.18.0.%d", i), BootID: boot})
	ctx, cancel := context.WithCancel(e.ctx)
	a := &agent{name: name, boot: boot, kind: kind, cancel: cancel, done: make(chan struct{})}
	a.seqFrac.Store(0.0)
	if setup != nil {
		setup(a)
	}
	go e.runAgent(ctx, a)
	e.t.Cleanup(a.stop)
	return a
}

// setInSeq makes the agent report its inbound counters at frac of generation gen.
func (a *agent) setInSeq(frac float64, gen uint32) {
	a.inGen.Store(gen)
	a.inSeq.Store(&frac)
}

// setSeq makes the agent report a sequence fraction measured on generation gen's SAs.
func (a *agent) setSeq(frac float64, gen uint32) {
	a.seqGen.Store(gen)
	a.seqFrac.Store(frac)
}

func (a *agent) stop() {
	a.cancel()
	<-a.done
}

func (e *env) runAgent(ctx context.Context, a *agent) {
	defer close(a.done)
	last := ""
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(50 * time.Millisecond):
		}
		if a.paused.Load() {
			continue
		}
		sec, err := e.cs.CoreV1().Secrets(api.Namespace).Get(ctx, api.SecretName, metav1.GetOptions{})
		if err != nil {
			continue
		}
		ring, err := keys.Parse(sec.Data[api.SecretDataKey])
		if err != nil {
			continue // a real agent keeps its last good state
		}
		recordRing(ring)
		rep := api.NodeReport{Mode: ring.Mode, Generations: ring.Numbers(), Incarnation: a.boot, UID: "uid-" + a.name, Epoch: "e-" + a.name,
			MaxSeqFraction: a.seqFrac.Load().(float64), PeersEncrypted: 1, PeersExpected: 1}
		if a.publish.Load() || a.readsRing.Load() {
			nk := nodekeys.Keys{Incarnation: nodekeys.Incarnation{BootID: rep.Incarnation, UID: rep.UID, Epoch: rep.Epoch}}
			if a.readsRing.Load() {
				nk.Capabilities = []string{api.CapabilityRingConfigMap}
			}
			if a.readsIDs.Load() {
				nk.Capabilities = append(nk.Capabilities, api.CapabilityNodeIDs)
			}
			for _, g := range keys.PublishedGenerations(ring) {
				if !a.publish.Load() {
					break
				}
				var pub keys.PublicKey
				pub[0], pub[1] = byte(g), 0x42 // public keys are not secret; the master only counts them
				nk.Keys = append(nk.Keys, nodekeys.Key{Generation: g, X25519: pub})
			}
			if !nk.Equal(a.lastKeys) && nodekeys.Write(ctx, e.dyn(), api.Namespace, a.name, "", nk) == nil {
				a.lastKeys = nk
			}
		}
		rep.SeqGeneration = a.seqGen.Load()
		rep.MaxInSeqFraction, rep.InSeqGeneration = a.inSeq.Load(), a.inGen.Load()
		b, _ := json.Marshal(rep)
		if string(b) == last {
			continue
		}
		content := string(b)
		rep.LastSync = time.Now().UTC() // readers pick the later of two kinds by it
		b, _ = json.Marshal(rep)
		// "Install" before advertising: a random delay.
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Duration(rand.IntN(300)) * time.Millisecond):
		}
		if a.paused.Load() {
			continue
		}
		switch a.kind {
		case kindReport:
			if err := nodereport.Write(ctx, e.dyn(), api.Namespace, a.name, "", string(rep.Mode), b); err == nil {
				last = content
			}
		case kindStatus:
			if err := nodereport.WriteStatus(ctx, e.dyn(), api.Namespace, a.name, "", string(rep.Mode), b); err == nil {
				last = content
			}
		default:
			patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]string{api.ReportAnnotation: string(b)}}})
			if _, err := e.cs.CoreV1().Nodes().Patch(ctx, a.name, types.MergePatchType, patch, metav1.PatchOptions{}); err == nil {
				last = content
			}
		}
	}
}

// dyn is an admin dynamic client.
func (e *env) dyn() dynamic.Interface { return dynamic.NewForConfigOrDie(e.cluster.AdminConfig()) }

// report is node's report as the master reads it (nodereport.Read).
func (e *env) report(node string) string {
	raw, err := nodereport.Read(e.ctx, e.cs, e.dyn(), api.Namespace, node)
	if err != nil {
		e.t.Error(err)
	}
	return raw
}

func (e *env) setConfig(data map[string]string, annotations map[string]string) {
	e.t.Helper()
	cms := e.cs.CoreV1().ConfigMaps(api.Namespace)
	cm, err := cms.Get(e.ctx, api.ConfigMapName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		_, err = cms.Create(e.ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: api.ConfigMapName, Annotations: annotations}, Data: data}, metav1.CreateOptions{})
		if err != nil {
			e.t.Fatal(err)
		}
		return
	}
	if err != nil {
		e.t.Fatal(err)
	}
	if cm.Data == nil {
		cm.Data = map[string]string{}
	}
	if cm.Annotations == nil {
		cm.Annotations = map[string]string{}
	}
	for k, v := range data {
		cm.Data[k] = v
	}
	for k, v := range annotations {
		cm.Annotations[k] = v
	}
	if _, err := cms.Update(e.ctx, cm, metav1.UpdateOptions{}); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) requestRotation(id string) {
	e.setConfig(nil, map[string]string{api.RotateRequestAnnotation: id})
}

func (e *env) secret() *corev1.Secret {
	e.t.Helper()
	s, err := e.cs.CoreV1().Secrets(api.Namespace).Get(e.ctx, api.SecretName, metav1.GetOptions{})
	if err != nil {
		e.t.Fatalf("get secret: %v", err)
	}
	return s
}

// ring returns the ring in the Secret, nil if absent or invalid.
func (e *env) ring() *keys.Ring {
	s, err := e.cs.CoreV1().Secrets(api.Namespace).Get(e.ctx, api.SecretName, metav1.GetOptions{})
	if err != nil {
		return nil
	}
	r, err := keys.Parse(s.Data[api.SecretDataKey])
	if err != nil {
		return nil
	}
	recordRing(r)
	return r
}

func (e *env) status() api.MasterStatus {
	var st api.MasterStatus
	cm, err := e.cs.CoreV1().ConfigMaps(api.Namespace).Get(e.ctx, api.StatusConfigMapName, metav1.GetOptions{})
	if err == nil {
		_ = json.Unmarshal([]byte(cm.Data[api.StatusDataKey]), &st)
	}
	return st
}

// eventually polls cond until it holds or the timeout passes; cond's string says why not.
func (e *env) eventually(what string, timeout time.Duration, cond func() (bool, string)) {
	e.t.Helper()
	deadline := time.Now().Add(timeout)
	why := ""
	for time.Now().Before(deadline) {
		var ok bool
		if ok, why = cond(); ok {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	e.t.Fatalf("timed out after %s waiting for %s: %s", timeout, what, why)
}

// ringIs waits until the ring is in mode with exactly the generations gens (in order).
func (e *env) ringIs(mode api.Mode, timeout time.Duration, gens ...string) *keys.Ring {
	e.t.Helper()
	var r *keys.Ring
	e.eventually(fmt.Sprintf("ring mode %s generations %v", mode, gens), timeout, func() (bool, string) {
		r = e.ring()
		if r == nil {
			return false, "no valid ring"
		}
		var got []string
		for _, g := range r.Generations {
			got = append(got, fmt.Sprintf("%d:%s", g.Number, g.State))
		}
		return r.Mode == mode && strings.Join(got, " ") == strings.Join(gens, " "), keys.Summary(r)
	})
	return r
}

func (e *env) leaseHolder() string {
	l, err := e.cs.CoordinationV1().Leases(api.Namespace).Get(e.ctx, "secureoverlay-master", metav1.GetOptions{})
	if err != nil || l.Spec.HolderIdentity == nil {
		return ""
	}
	return *l.Spec.HolderIdentity
}

// metricsText renders a replica's metrics in the exposition format.
func metricsText(t *testing.T, m *Metrics) string {
	reg := newRegistry(t, m)
	var buf bytes.Buffer
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		for _, mt := range mf.Metric {
			fmt.Fprintf(&buf, "%s %v\n", mf.GetName(), mt.String())
		}
	}
	return buf.String()
}

// events lists the reasons of Events on the key Secret.
func (e *env) eventReasons() []string {
	evs, err := e.cs.CoreV1().Events(api.Namespace).List(e.ctx, metav1.ListOptions{})
	if err != nil {
		return nil
	}
	var out []string
	for _, ev := range evs.Items {
		if ev.InvolvedObject.Kind == "Secret" && ev.InvolvedObject.Name == api.SecretName {
			out = append(out, ev.Reason+": "+ev.Message)
		}
	}
	return out
}
