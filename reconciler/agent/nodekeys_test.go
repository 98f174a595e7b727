package agent

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/internal/testkinds"
	"github.com/secureoverlay/secureoverlay/nodekeys"
	"github.com/secureoverlay/secureoverlay/nodereport"
)

// keysClient gives e's agent a dynamic client holding NodeReports and NodeKeys.
func keysClient(e *env) *dynamicfake.FakeDynamicClient {
	dc := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), testkinds.With(nil))
	e.a.d.Dynamic = dc
	return dc
}

// published reads node a's NodeKeys from dc and checks it against the ledger: one key per
// published generation, each the public half of the ledger's private key, no private
// byte in the object.
func published(t *testing.T, e *env, dc *dynamicfake.FakeDynamicClient) nodekeys.Keys {
	t.Helper()
	u, err := dc.Resource(nodekeys.GVR).Namespace(api.Namespace).Get(context.Background(), "a", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("node a's NodeKeys: %v", err)
	}
	k, err := nodekeys.Parse(u)
	if err != nil {
		t.Fatal(err)
	}
	if refs := u.GetOwnerReferences(); len(refs) != 1 || refs[0].Kind != "Node" || refs[0].Name != "a" || refs[0].UID != "uid-a" {
		t.Errorf("owners %+v", refs)
	}
	raw, _ := json.Marshal(u.Object)
	gens := e.a.led.PrivateKeyGenerations()
	if len(gens) != len(k.Keys) {
		t.Fatalf("ledger holds keys of %v, NodeKeys publishes %d", gens, len(k.Keys))
	}
	for i, g := range gens {
		p, _ := e.a.led.PrivateKey(g)
		if k.Keys[i].Generation != g || k.Keys[i].X25519 != p.Public() {
			t.Fatalf("NodeKeys key %d is not the ledger's key of generation %d", i, g)
		}
		if strings.Contains(string(raw), hex.EncodeToString(p.Bytes())) {
			t.Fatal("NodeKeys holds a private key")
		}
	}
	return k
}

// TestNodeKeysPublished: the agent publishes the public key of the next generation for
// its key incarnation; a restart in the same epoch publishes the same key, a generation
// the master creates (as v1) moves the published one on and erases the old private key,
// a new epoch draws new key pairs.
func TestNodeKeysPublished(t *testing.T) {
	e, ctx := epochEnv(t)
	dc := keysClient(e)
	waitFor(t, "the NodeIDs' list", e.src.ReadsNodeIDs)
	e.sync(ctx)
	first := published(t, e, dc)
	if !first.Has(api.CapabilityNodeIDs) {
		t.Errorf("capabilities %v: the agent reads the NodeIDs but does not say so (%s)", first.Capabilities, api.CapabilityNodeIDs)
	}
	next := currentRing(t, e).LastGeneration + 1
	if first.Incarnation != (nodekeys.Incarnation{BootID: "boot-a", UID: "uid-a", Epoch: "e-a"}) || len(first.Keys) != 1 || first.Keys[0].Generation != next {
		t.Fatalf("first NodeKeys %+v, want generation %d of boot-a/uid-a/e-a", first, next)
	}
	if got := e.a.PublishedKeys(); got == nil || !got.Equal(first) {
		t.Fatalf("PublishedKeys = %+v", got)
	}
	// installed: the generations the kernel holds inbound SAs of, as the report says.
	if r := e.report(); r == nil || len(r.Generations) == 0 || !slices.Equal(first.Installed, r.Generations) || !first.Has(api.CapabilityInstalled) {
		t.Fatalf("NodeKeys installed %v (capabilities %v), report's generations %v", first.Installed, first.Capabilities, r)
	}

	// A restart in the same epoch: the same key (a published key never changes within an
	// incarnation), written once more.
	e.restart()
	e.a.d.Dynamic = dc
	e.sync(ctx)
	if again := published(t, e, dc); !again.Equal(first) {
		t.Fatalf("after a clean restart: %+v, want %+v", again, first)
	}

	// The master creates generation `next` (v1, with a root): the agent publishes a key
	// for the one after and erases the key it held for `next`.
	old, _ := e.a.led.PrivateKey(next)
	putRing(t, e, withPending(t, currentRing(t, e)))
	e.sync(ctx)
	moved := published(t, e, dc)
	if len(moved.Keys) != 1 || moved.Keys[0].Generation != next+1 || moved.Keys[0].X25519 == first.Keys[0].X25519 {
		t.Fatalf("after generation %d was created: %+v", next, moved)
	}
	if old.Bytes() != nil {
		t.Fatal("the private key of a generation no longer published was not erased")
	}

	// Lost SA state: a new epoch, new key pairs.
	e.xk.Remove("state", func(string) bool { return true })
	e.a.Resync()
	e.sync(ctx)
	fresh := published(t, e, dc)
	if fresh.Incarnation.Epoch == "e-a" || fresh.Incarnation.Epoch != e.a.Epoch() || fresh.Keys[0].Generation != next+1 ||
		fresh.Keys[0].X25519 == moved.Keys[0].X25519 {
		t.Fatalf("after a new epoch: %+v (before %+v)", fresh, moved)
	}
	if v := value(e.m.ReportWrites.WithLabelValues("keys", "ok")); v != 3 {
		t.Errorf("keys writes since the restart = %v, want 3 (again, new generation, new epoch)", v)
	}
}

// TestNodeKeysWriteOffTheSyncPath: while NodeKeys cannot be written (CRD missing, policy,
// API down) the agent still programs the kernel and writes its report, says why in its
// status, and publishes the keys once writes succeed.
func TestNodeKeysWriteOffTheSyncPath(t *testing.T) {
	e := newEnv(t, api.ModeAccept, Config{})
	dc := keysClient(e)
	var refuse atomic.Bool
	refuse.Store(true)
	dc.PrependReactor("*", "nodekeys", func(k8stesting.Action) (bool, runtime.Object, error) {
		if refuse.Load() {
			return true, nil, errors.New("nodekeys refused for the test")
		}
		return false, nil, nil
	})
	stop := e.run()
	defer stop()
	waitFor(t, "report written and keys refused", func() bool {
		_, err := dc.Resource(nodereport.GVR).Namespace(api.Namespace).Get(context.Background(), "a", metav1.GetOptions{})
		return err == nil && value(e.m.ReportWrites.WithLabelValues("keys", "error")) >= 2 && e.a.Status().Ready
	})
	if s := e.a.Status(); !strings.Contains(s.Error, "write keys:") || !strings.Contains(s.Error, "refused for the test") {
		t.Fatalf("status while keys are refused: %+v", s)
	}
	if e.ourStates() == 0 {
		t.Fatal("kernel not programmed while keys were refused")
	}
	refuse.Store(false)
	waitFor(t, "keys written after the refusal ended", func() bool { return e.a.PublishedKeys() != nil })
	waitFor(t, "status clear", func() bool { return e.a.Status().Error == "" })
	published(t, e, dc)
}

// TestNodeKeysLanesPerEpoch: the agent declares that it takes its peers' lanes and
// publishes the lane count it sends on, fixed for its SA epoch (docs/dataplane.md §10): a
// restart in the same epoch never publishes more than was published (peers installed
// inbound states for that count), turning lanes off publishes 0 at once and for the rest
// of the epoch, and a new epoch takes the configured count again.
func TestNodeKeysLanesPerEpoch(t *testing.T) {
	e, ctx := epochEnv(t)
	e.a.d.Dynamic = e.dc // the watcher reads what the agent publishes
	restart := func(lanes uint16, off bool) {
		t.Helper()
		e.a.cfg.Lanes, e.a.cfg.Dataplane.LanesOff = lanes, off
		e.restart()
		e.a.d.Dynamic = e.dc
	}
	check := func(step string, want uint16) nodekeys.Keys {
		t.Helper()
		e.sync(ctx)
		k := published(t, e, e.dc)
		if !k.Has(api.CapabilityLanes) || k.Lanes != want || value(e.m.Lanes) != float64(want) {
			t.Fatalf("%s: lanes %d (capabilities %v, metric %v), want %d", step, k.Lanes, k.Capabilities, value(e.m.Lanes), want)
		}
		waitFor(t, step+": the watcher sees it", func() bool {
			snap := e.src.Snapshot()
			n := snap.Node("a")
			return n != nil && n.Keys != nil && n.Keys.Equal(k)
		})
		return k
	}
	restart(2, false)
	first := check("first epoch", 2)
	restart(4, false)
	check("restart with more lanes configured", 2)
	restart(4, true)
	check("turned off", 0)
	restart(4, false)
	check("on again in the same epoch", 0)

	// A new epoch (lost SA state) takes the configured count.
	e.xk.Remove("state", func(string) bool { return true })
	e.a.Resync()
	if k := check("new epoch", 4); k.Incarnation.Epoch == first.Incarnation.Epoch {
		t.Fatal("no new epoch")
	}
}
