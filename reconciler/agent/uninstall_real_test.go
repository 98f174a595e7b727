//go:build linux

package agent

import (
	"context"
	authorizationv1 "k8s.io/api/authorization/v1"
	"log/slog"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/install/owner"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/rules"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
	"github.com/secureoverlay/secureoverlay/reconciler/xfrm"
)

// policyLevels lists our policies in the namespace as "dir src>dst level".
func policyLevels(t *testing.T, k nsKernel, cfg desired.Config) []string {
	t.Helper()
	pols, err := k.ListPolicies()
	if err != nil {
		t.Fatalf("list policies: %v", err)
	}
	var out []string
	for _, p := range pols {
		if p.Foreign || !cfg.OwnsPolicy(p.Policy) {
			continue
		}
		level := "required"
		if p.Policy.Tmpl.Optional {
			level = "use"
		}
		out = append(out, p.Policy.Dir.String()+" "+p.Policy.Src.Addr().String()+">"+p.Policy.Dst.Addr().String()+" "+level)
	}
	slices.Sort(out)
	return out
}

// TestUninstallAgainstRealAPIServerAndKernel is the SIGTERM path of the agent (as the
// binary wires it: the owner.Tracker from the start, UninstallDecision, then Uninstall)
// against a real kube-apiserver, the agent's least-privilege ServiceAccount, and a fresh
// network namespace whose xfrm policies and iptables are real (SAs in xfrm.Fake: this
// host has no ESP). Three terminations of the agent pod:
//   - a pod replaced (rolling update, restart) while its DaemonSet lives: kernel untouched;
//   - the API server down at SIGTERM and no deletion seen: unclear, kernel untouched;
//   - `kubectl delete -f` (DaemonSet deleted, then the RBAC, before SIGTERM): the tracker's
//     observation decides "uninstall", the walk-down runs its three steps and the
//     namespace ends with nothing of ours.
func TestUninstallAgainstRealAPIServerAndKernel(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a real kube-apiserver; skipped with -short")
	}
	netns := newNetNS(t)
	sys, err := rules.NewSystem()
	if err != nil {
		skipOrFail(t, "iptables: "+err.Error())
	}
	c := kube.Start(t)
	admin := kubernetes.NewForConfigOrDie(c.AdminConfig())
	kube.InstallCalicoCRDs(t, c.AdminConfig())
	agentRBAC(t, admin)
	ctx := context.Background()
	const dsName = "secureoverlay-agent"
	ns := api.Namespace

	// The manifest's rules for the uninstall decision (docs/install.md): get our pod; get,
	// list and watch only our DaemonSet.
	ownerRole := &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "secureoverlay-agent-owner"}, Rules: []rbacv1.PolicyRule{
		{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"get"}},
		{APIGroups: []string{"apps"}, Resources: []string{"daemonsets"}, ResourceNames: []string{dsName}, Verbs: []string{"get", "list", "watch"}},
	}}
	if _, err := admin.RbacV1().Roles(ns).Create(ctx, ownerRole, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.RbacV1().RoleBindings(ns).Create(ctx, &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: ownerRole.Name},
		RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: ownerRole.Name},
		Subjects: []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Namespace: ns, Name: "agent"}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	kube.RequireAuthorized(t, admin, kube.ServiceAccountUser(ns, "agent"), kube.ServiceAccountGroups(ns),
		authorizationv1.ResourceAttributes{Group: "apps", Resource: "daemonsets", Namespace: ns, Name: dsName, Verb: "watch"})

	ring := testRing(t, api.ModeEnforce, "a", "b")
	data, err := keys.Marshal(ring)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: api.SecretName},
		Data: map[string][]byte{api.SecretDataKey: data}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := kube.CreateCalico(ctx, dynamic.NewForConfigOrDie(c.AdminConfig()), kube.CalicoV1GV, kube.NewIPPool("default-ipv4-ippool", "10.244.0.0/16", "Always")); err != nil {
		t.Fatal(err)
	}
	kube.CreateNode(t, c.AdminConfig(), kube.Node{Name: "a", IPv4: "198.18.0.1", BootID: "boot-a"})
	incA, ledgerDir := seedSelf(t, c.AdminConfig(), "boot-a")
	createPeer(t, c.AdminConfig(), "b", "198.18.0.2", "boot-b", incA)

	// The DaemonSet and its pods, by hand (the harness runs no controllers). A finalizer
	// keeps a deleted pod Terminating, as the kubelet does while the pod shuts down.
	labels := map[string]string{"app": dsName}
	no := false
	podSpec := corev1.PodSpec{ServiceAccountName: "agent", AutomountServiceAccountToken: &no,
		Containers: []corev1.Container{{Name: "agent", Image: "secureoverlay:test"}}}
	ds, err := admin.AppsV1().DaemonSets(ns).Create(ctx, &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: dsName},
		Spec: appsv1.DaemonSetSpec{Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: labels}, Spec: podSpec}}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	yes := true
	newPod := func(name string) {
		t.Helper()
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: labels, Finalizers: []string{"test.secureoverlay.io/terminating"},
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "DaemonSet", Name: ds.Name, UID: ds.UID, Controller: &yes, BlockOwnerDeletion: &yes}}},
			Spec: podSpec}
		if _, err := admin.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			_, _ = admin.CoreV1().Pods(ns).Patch(context.Background(), name, types.MergePatchType, []byte(`{"metadata":{"finalizers":null}}`), metav1.PatchOptions{})
		})
	}

	dp := desired.Config{}.WithDefaults()
	kern := nsKernel{ns: netns, states: xfrm.NewFake()}
	ipt := nsIPT{ns: netns, sys: sys}
	t.Cleanup(func() { _, _ = Cleanup(kern, ipt, dp) })
	saCfg := c.ServiceAccountConfig(ns, "agent")
	// While hang is set, every write of the agents' hangs until its request is cancelled:
	// an API server that does not answer while our namespace is torn down.
	var hang atomic.Bool
	var hung atomic.Int32
	saCfg.WrapTransport = func(rt http.RoundTripper) http.RoundTripper {
		return roundTripFunc(func(req *http.Request) (*http.Response, error) {
			if hang.Load() && req.Method != http.MethodGet {
				hung.Add(1)
				<-req.Context().Done()
				return nil, req.Context().Err()
			}
			return rt.RoundTrip(req)
		})
	}

	// What the kernel held during each wait of the walk-down.
	type view struct {
		policies []string
		raw      string
		states   int
	}
	var mu sync.Mutex
	var views []view
	var waits []time.Duration
	var dues []time.Time

	// pod runs one agent pod's life as the binary does (Serve: the tracker from the
	// start, the walk-down when the DaemonSet's deletion is seen, else the decision at
	// SIGTERM); sigterm ends it and returns what Serve decided.
	type podRun struct {
		a       *Agent
		sigterm func() (owner.Decision, error)
		ended   func() bool // Serve returned (it must not before SIGTERM)
		// following is closed once the tracker's watch on the DaemonSet is open.
		following <-chan struct{}
	}
	startPod := func(name string, step, heartbeat time.Duration) podRun {
		t.Helper()
		client := kubernetes.NewForConfigOrDie(saCfg)
		src := watch.New(watch.Config{Client: client, Dynamic: dynamic.NewForConfigOrDie(saCfg), Self: "a", DiscoveryRetry: 200 * time.Millisecond})
		a, err := New(Config{NodeName: "a", Dataplane: dp, ResyncInterval: time.Hour, ExternalMTU: 1500, LedgerDir: ledgerDir, HeartbeatInterval: heartbeat},
			Deps{Client: client, Source: src, Xfrm: xfrm.NewApplier(kern, dp), Rules: rules.NewApplier(ipt),
				Logger: slog.New(slog.NewTextHandler(os.Stderr, nil)),
				Sleep: func(ctx context.Context, d time.Duration) error {
					due := time.Now().Add(d) // when this step is due (the agent computed d just now)
					st, _ := kern.states.Snapshot()
					mu.Lock()
					views = append(views, view{policies: policyLevels(t, kern, dp), raw: rawRules(t, netns), states: len(st)})
					waits = append(waits, d)
					dues = append(dues, due)
					mu.Unlock()
					return sleepCtx(ctx, d)
				}})
		if err != nil {
			t.Fatal(err)
		}
		sig, term := context.WithCancel(ctx)
		following := make(chan struct{})
		type result struct {
			d   owner.Decision
			err error
		}
		res := make(chan result, 1)
		go func() {
			d, err := a.Serve(sig, Lifecycle{Client: client, PodNamespace: ns, PodName: name, DecisionTimeout: 2 * time.Second, UninstallStep: step,
				Following: func() { close(following) }})
			res <- result{d, err}
		}()
		var got *result
		wait := func() result {
			if got == nil {
				r := <-res
				got = &r
			}
			return *got
		}
		t.Cleanup(func() { term(); wait() })
		waitFor(t, "agent "+name+" ready", func() bool { return a.Status().Ready })
		return podRun{a: a,
			sigterm: func() (owner.Decision, error) { term(); r := wait(); return r.d, r.err },
			ended: func() bool {
				select {
				case r := <-res:
					got = &r
					return true
				default:
					return got != nil
				}
			},
			following: following}
	}
	enforcing := func(what string) {
		t.Helper()
		pl := strings.Join(policyLevels(t, kern, dp), ", ")
		raw := rawRules(t, netns)
		if pl != "in 198.18.0.2>198.18.0.1 required, out 198.18.0.1>198.18.0.2 required" || strings.Count(raw, "-j DROP") != 2 {
			t.Fatalf("%s: not enforcing toward b: %s\n%s", what, pl, raw)
		}
	}

	// 1. Rolling update / restart: the pod is deleted, the DaemonSet lives on.
	newPod("agent-1")
	p1 := startPod("agent-1", 200*time.Millisecond, 0)
	enforcing("agent-1 started")
	if err := admin.CoreV1().Pods(ns).Delete(ctx, "agent-1", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	newPod("agent-2") // its replacement, created meanwhile
	d, err := p1.sigterm()
	if err != nil || d.Uninstall {
		t.Fatalf("pod replaced under a live DaemonSet: %+v, %v; want keep", d, err)
	}
	t.Logf("restart: %s", d.Reason)
	enforcing("after a restart's SIGTERM")

	// 2. The API server is down at SIGTERM and no deletion was seen: unclear → untouched.
	p2 := startPod("agent-2", 200*time.Millisecond, 0)
	c.StopAPIServer()
	t0 := time.Now()
	d, err = p2.sigterm()
	if err == nil || d.Uninstall {
		t.Fatalf("API server down: %+v, %v; want keep with the error", d, err)
	}
	t.Logf("API server down: kept after %v: %s (%v)", time.Since(t0).Round(time.Millisecond), d.Reason, err)
	enforcing("after SIGTERM with the API server down")
	c.StartAPIServer()
	// The DaemonSet is left untouched across the API server restart: the tracker must
	// re-list and watch from the store's revision (a watch from the DaemonSet's own old
	// resourceVersion would be "too old" forever and miss the deletions below).

	// 3. Delete + apply: the DaemonSet is deleted, so the walk-down starts without any
	// SIGTERM; the DaemonSet is created again during its first step: the walk-down stops
	// there (no drops, ESP still sent: safe with peers in any mode), and the new
	// DaemonSet's agent takes over and enforces again.
	newPod("agent-3")
	p3 := startPod("agent-3", 5*time.Second, 0)
	enforcing("agent-3 started")
	select { // the tracker's watch is open (a deletion before it would only be inferred)
	case <-p3.following:
	case <-time.After(20 * time.Second):
		t.Fatal("agent-3's tracker did not open its watch on the DaemonSet")
	}
	if err := admin.AppsV1().DaemonSets(ns).Delete(ctx, dsName, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the walk-down's first step, without SIGTERM", func() bool { mu.Lock(); defer mu.Unlock(); return len(views) == 1 })
	re := ds.DeepCopy()
	re.ResourceVersion, re.UID, re.CreationTimestamp = "", "", metav1.Time{}
	if ds, err = admin.AppsV1().DaemonSets(ns).Create(ctx, re, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	accept := dues[0]
	mu.Unlock()
	time.Sleep(time.Until(accept.Add(time.Second))) // the accept step would have run by now
	mu.Lock()
	n := len(views)
	mu.Unlock()
	if n != 1 || p3.ended() {
		t.Fatalf("after the re-creation: %d walk-down waits (want 1: stopped at encrypt), Serve ended before SIGTERM: %v", n, p3.ended())
	}
	if got := strings.Join(policyLevels(t, kern, dp), ", "); got != "in 198.18.0.2>198.18.0.1 use, out 198.18.0.1>198.18.0.2 required" || strings.Contains(rawRules(t, netns), "-j DROP") {
		t.Fatalf("after the re-creation, not left at encrypt: %s\n%s", got, rawRules(t, netns))
	}
	d, err = p3.sigterm()
	if err != nil || d.Uninstall {
		t.Fatalf("re-created during the walk-down: %+v, %v; want the walk-down stopped", d, err)
	}
	t.Logf("delete + apply: %s", d.Reason)
	newPod("agent-4") // the new DaemonSet's pod
	p4 := startPod("agent-4", 400*time.Millisecond, 100*time.Millisecond)
	enforcing("the new DaemonSet's agent")

	// 4. kubectl delete -f: the DaemonSet goes (background propagation), then our RBAC.
	// The walk-down starts when the watch shows the deletion and runs to the end with no
	// SIGTERM; the agent then waits for SIGTERM. A report write hangs meanwhile (the API
	// server does not answer it): the first step must not wait for it (Run's writers
	// would hold it back by patchTimeout, while the peers walk on).
	mu.Lock()
	views, waits, dues = nil, nil, nil
	mu.Unlock()
	const step = 400 * time.Millisecond
	hang.Store(true)
	time.Sleep(200 * time.Millisecond) // the heartbeat (100 ms) is due: the next sync writes
	p4.a.Resync()
	waitFor(t, "a report write hanging", func() bool { return hung.Load() > 0 })
	t0 = time.Now()
	if err := admin.AppsV1().DaemonSets(ns).Delete(ctx, dsName, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the walk-down's first step", func() bool { mu.Lock(); defer mu.Unlock(); return len(views) >= 1 })
	if first := time.Since(t0); first > patchTimeout/2 {
		t.Errorf("the walk-down's first step came %v after the deletion, with a report write hanging: it waited for the writer", first.Round(time.Millisecond))
	} else {
		t.Logf("the walk-down's first step %v after the deletion, a report write hanging", first.Round(time.Millisecond))
	}
	hang.Store(false)
	for _, rb := range []string{ownerRole.Name, "secureoverlay-agent"} {
		if err := admin.RbacV1().RoleBindings(ns).Delete(ctx, rb, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if err := admin.RbacV1().ClusterRoleBindings().Delete(ctx, "secureoverlay-agent", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the walk-down's end, without SIGTERM", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(views) == 2 && len(policyLevels(t, kern, dp)) == 0 && !strings.Contains(rawRules(t, netns), "SECUREOVERLAY")
	})
	took := time.Since(t0)
	if p4.ended() {
		t.Fatal("Serve returned after the walk-down, before SIGTERM: the kubelet would restart the agent")
	}
	sa := kubernetes.NewForConfigOrDie(saCfg)
	waitFor(t, "rbac revoked", func() bool {
		_, err := sa.CoreV1().Pods(ns).Get(ctx, "agent-4", metav1.GetOptions{})
		return apierrors.IsForbidden(err)
	})
	d, err = p4.sigterm()
	if err != nil || !d.Uninstall {
		t.Fatalf("kubectl delete -f: %+v, %v; want uninstall", d, err)
	}
	t.Logf("uninstall decided (%s) and walked down in %v", d.Reason, took.Round(time.Millisecond))
	if took < 2*step {
		t.Errorf("walk-down took %v, want at least 2 steps (%v)", took, 2*step)
	}
	mu.Lock()
	defer mu.Unlock()
	// Each step waits a whole step after the previous one is in place, however long
	// applying it took; so two steps are due at least a step apart.
	if len(views) != 2 || waits[0] != step || waits[1] != step {
		t.Fatalf("waits %v, want two of %v", waits, step)
	}
	if apart := dues[1].Sub(dues[0]); apart < step {
		t.Fatalf("steps due %v apart (waits %v), want at least %v", apart, waits, step)
	}
	t.Logf("waits %v, due %v apart", waits, dues[1].Sub(dues[0]).Round(time.Millisecond))
	// Step 1: accepts ESP and plaintext, still sends ESP, drops nothing.
	if got := strings.Join(views[0].policies, ", "); got != "in 198.18.0.2>198.18.0.1 use, out 198.18.0.1>198.18.0.2 required" ||
		strings.Contains(views[0].raw, "-j DROP") || views[0].states != 2 {
		t.Errorf("step 1 (encrypt): %s, %d states\n%s", got, views[0].states, views[0].raw)
	}
	// Step 2: stops sending ESP, keeps the SAs and the optional inbound policy.
	if got := strings.Join(views[1].policies, ", "); got != "in 198.18.0.2>198.18.0.1 use" || strings.Contains(views[1].raw, "198.18.0.2") || views[1].states != 2 {
		t.Errorf("step 2 (accept): %s, %d states\n%s", got, views[1].states, views[1].raw)
	}
	// Step 3: nothing of ours.
	if got := policyLevels(t, kern, dp); len(got) != 0 {
		t.Errorf("policies left: %v", got)
	}
	if st, _ := kern.states.Snapshot(); len(st) != 0 {
		t.Errorf("%d states left", len(st))
	}
	if raw := rawRules(t, netns); strings.Contains(raw, "SECUREOVERLAY") || strings.Contains(raw, "secureoverlay") {
		t.Errorf("iptables left:\n%s", raw)
	}
}

// roundTripFunc is an http.RoundTripper from a function.
type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(req *http.Request) (*http.Response, error) { return f(req) }
