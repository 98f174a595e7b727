package agent

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	v3 "github.com/projectcalico/api/pkg/apis/projectcalico/v3"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/rules"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
	"github.com/secureoverlay/secureoverlay/reconciler/xfrm"
)

// TestCalicoMigrationUnderARunningAgent runs Calico's v1→v3 datastore migration against
// a real kube-apiserver with Calico's real CRDs while an agent (least-privilege
// ServiceAccount, the manifest's rules) runs, and samples its kernel (xfrm.Fake) every
// millisecond or so: the tunnel-mode policies of every IPAM block present at each step
// are there at every sample — no coverage is lost.
//
//  1. crd.projectcalico.org/v1 only: a CrossSubnet pool, blocks of a (self) and its
//     same-subnet peer b.
//  2. kube-controllers start the migration: the v3 CRDs and the DatastoreMigration CRD
//     appear, the migration is Migrating and the objects are copied to v3 (v1 locked):
//     Calico, and the agent, still use v1.
//  3. The migration converges: Calico uses v3 and v1 is frozen. Calico allocates a new
//     block for b, in v3 only. The agent must read v3 (the new block is covered) and
//     never a half-synced cache.
//  4. Complete, the migration object is deleted, and the v1 CRDs (with every v1 object)
//     are removed.
func TestCalicoMigrationUnderARunningAgent(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a real kube-apiserver; skipped with -short")
	}
	c := kube.Start(t)
	admin := kubernetes.NewForConfigOrDie(c.AdminConfig())
	adminDyn := dynamic.NewForConfigOrDie(c.AdminConfig())
	kube.InstallCalicoCRDs(t, c.AdminConfig(), kube.CalicoV1)
	agentRBAC(t, admin)
	ctx := context.Background()

	data, err := keys.Marshal(testRing(t, api.ModeAccept, "a", "b"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin.CoreV1().Secrets(api.Namespace).Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: api.Namespace, Name: api.SecretName},
		Data: map[string][]byte{api.SecretDataKey: data}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	kube.CreateNode(t, c.AdminConfig(), kube.Node{Name: "a", IPv4: "198.18.0.1", BootID: "boot-a"})
	incA, ledgerDir := seedSelf(t, c.AdminConfig(), "boot-a")
	createPeer(t, c.AdminConfig(), "b", "198.18.0.2", "boot-b", incA)

	// Calico's objects as its IPAM writes them, in group-version gv.
	blockA, blockB, blockB2 := "10.244.1.0/26", "10.244.2.0/26", "10.244.3.0/26"
	calicoObjects := func(gv schema.GroupVersion, blocks ...string) {
		t.Helper()
		objs := []runtime.Object{kube.NewIPPool("default-ipv4-ippool", "10.244.0.0/16", v3.IPIPModeCrossSubnet)}
		for _, cidr := range blocks {
			node := map[string]string{blockA: "a", blockB: "b", blockB2: "b"}[cidr]
			b := kube.NewIPAMBlock(cidr, "host:"+node)
			kube.Allocate(b, 0, "ipip-tunnel-addr-"+node, node, map[string]string{"type": "ipipTunnelAddress"})
			kube.Allocate(b, 1, "k8s-pod-network."+node+"-pod", node, map[string]string{"namespace": "default", "pod": node + "-pod"})
			objs = append(objs, b, kube.NewBlockAffinity(node, cidr))
		}
		for _, o := range objs {
			if _, err := kube.CreateCalico(ctx, adminDyn, gv, o); err != nil {
				t.Fatal(err)
			}
		}
	}
	calicoObjects(kube.CalicoV1GV, blockA, blockB)

	// The agent.
	dp := desired.Config{}.WithDefaults()
	kern := xfrm.NewFake()
	saCfg := c.ServiceAccountConfig(api.Namespace, "agent")
	client := kubernetes.NewForConfigOrDie(saCfg)
	src := watch.New(watch.Config{Client: client, Dynamic: dynamic.NewForConfigOrDie(saCfg), Self: "a",
		DiscoveryRetry: 200 * time.Millisecond, Recheck: 200 * time.Millisecond})
	a, err := New(Config{NodeName: "a", Dataplane: dp, ResyncInterval: time.Hour, ExternalMTU: 1500, LedgerDir: ledgerDir},
		Deps{Client: client, Source: src, Xfrm: xfrm.NewApplier(kern, dp), Rules: rules.NewApplier(rules.NewFake()),
			Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))})
	if err != nil {
		t.Fatal(err)
	}
	actx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { a.Run(actx); close(done) }()
	defer func() { cancel(); <-done }()

	// covered lists the blocks of b whose fwd tunnel policy toward a's block is in the
	// kernel.
	covered := func() []string {
		_, pols := kern.Snapshot()
		var out []string
		for _, p := range pols {
			if p.Policy.Dir == desired.Fwd && p.Policy.Dst.String() == blockA && p.Policy.Tmpl.Kind == desired.Tunnel {
				out = append(out, p.Policy.Src.String())
			}
		}
		slices.Sort(out)
		return out
	}
	report := func() *watch.Report {
		n, err := admin.CoreV1().Nodes().Get(ctx, "a", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		r, _ := watch.ParseReport(n.Annotations[api.ReportAnnotation])
		return r
	}
	waitFor(t, "coverage of b's block from v1", func() bool { return slices.Equal(covered(), []string{blockB}) })
	waitFor(t, "report naming v1", func() bool { r := report(); return r != nil && r.CalicoAPI == kube.CalicoV1GV.String() })

	// The sampler: from now on, every block that must be covered is covered at every
	// sample.
	var must atomic.Pointer[[]string]
	must.Store(&[]string{blockB})
	var samples atomic.Int64
	var mu sync.Mutex
	var lost []string
	stopSampling := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			select {
			case <-stopSampling:
				return
			default:
			}
			want := *must.Load()
			got := covered()
			samples.Add(1)
			for _, w := range want {
				if !slices.Contains(got, w) {
					mu.Lock()
					lost = append(lost, fmt.Sprintf("%s not covered at sample %d (kernel covers %v)", w, samples.Load(), got))
					mu.Unlock()
				}
			}
			time.Sleep(500 * time.Microsecond)
		}
	}()
	check := func(step string) {
		t.Helper()
		mu.Lock()
		defer mu.Unlock()
		if len(lost) > 0 {
			t.Fatalf("%s: coverage lost: %s", step, strings.Join(lost[:min(len(lost), 5)], "; "))
		}
	}

	// 2. The migration starts: both groups served, v1 locked and copied to v3.
	kube.InstallCalicoCRDs(t, c.AdminConfig(), kube.CalicoV3)
	t.Logf("DatastoreMigration CRD: %s", kube.InstallMigrationCRD(t, c.AdminConfig()))
	migrations := adminDyn.Resource(schema.GroupVersionResource{Group: kube.MigrationGroup, Version: "v1", Resource: "datastoremigrations"})
	_, err = migrations.Create(ctx, &unstructured.Unstructured{Object: map[string]any{"apiVersion": kube.MigrationGroup + "/v1", "kind": "DatastoreMigration",
		// kube-controllers add this finalizer in Pending: deleting a Complete migration
		// deletes the v1 CRDs before the object goes.
		"metadata": map[string]any{"name": "v1-to-v3", "finalizers": []any{"migration.projectcalico.org/v1-crd-cleanup"}},
		"spec":     map[string]any{"type": "V1ToV3"}}}, kube.StrictCreate)
	if err != nil {
		t.Fatal(err)
	}
	setPhase := func(phase string) {
		t.Helper()
		cur, err := migrations.Get(ctx, "v1-to-v3", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		_ = unstructured.SetNestedField(cur.Object, phase, "status", "phase")
		if _, err := migrations.UpdateStatus(ctx, cur, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	setPhase("Migrating")
	calicoObjects(kube.CalicoV3GV, blockA, blockB)
	time.Sleep(time.Second) // several re-selections: Calico still uses v1
	if r := report(); r.CalicoAPI != kube.CalicoV1GV.String() {
		t.Fatalf("while Migrating the agent reads %q, want v1", r.CalicoAPI)
	}
	check("migrating")

	// 3. Converged: Calico uses v3, v1 is frozen; a new block of b exists only in v3.
	setPhase("Converged")
	waitFor(t, "the agent reads v3", func() bool { r := report(); return r != nil && r.CalicoAPI == kube.CalicoV3GV.String() })
	check("converged")
	b2 := kube.NewIPAMBlock(blockB2, "host:b")
	kube.Allocate(b2, 0, "k8s-pod-network.b-pod-2", "b", map[string]string{"namespace": "default", "pod": "b-pod-2"})
	if _, err := kube.CreateCalico(ctx, adminDyn, kube.CalicoV3GV, b2); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "coverage of b's new (v3 only) block", func() bool { return slices.Equal(covered(), []string{blockB, blockB2}) })
	must.Store(&[]string{blockB, blockB2})

	// 4. Complete; the migration object is deleted: its finalizer (kube-controllers)
	// deletes the v1 CRDs (and every v1 object), then lets the object go.
	setPhase("Complete")
	if err := migrations.Delete(ctx, "v1-to-v3", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	kube.RemoveCalicoCRDs(t, c.AdminConfig(), kube.CalicoV1)
	cur, err := migrations.Get(ctx, "v1-to-v3", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cur.SetFinalizers(nil)
	if _, err := migrations.Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // several re-selections without v1
	close(stopSampling)
	<-sampled
	check("v1 removed")
	if got := covered(); !slices.Equal(got, []string{blockB, blockB2}) {
		t.Fatalf("after v1 was removed: covered %v", got)
	}
	if r := report(); r.CalicoAPI != kube.CalicoV3GV.String() || r.Error != "" {
		t.Fatalf("report after the migration: calicoAPI %q error %q", r.CalicoAPI, r.Error)
	}
	if st := a.Status(); !st.Ready {
		t.Fatalf("agent not ready after the migration: %+v", st)
	}
	t.Logf("%d kernel samples, coverage complete in each", samples.Load())
}
