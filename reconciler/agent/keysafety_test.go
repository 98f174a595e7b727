package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/nodekeys"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/ledger"
	"github.com/secureoverlay/secureoverlay/reconciler/rules"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
	"github.com/secureoverlay/secureoverlay/reconciler/xfrm"
)

// The key-safety property (docs/keys.md, "No key twice"): no AEAD key is ever installed
// twice on a node, under any interleaving of restarts and kills at any point of a sync,
// cleanup, flushes by another tool, peer flaps, re-created Nodes, reboots, rotations,
// enable/disable, master failovers and a key Secret deleted, edited or restored from any
// earlier copy. The simulation drives the real agent (agent, watch.Inputs, desired,
// xfrm applier, ledger on a real directory) against the fake kernel, which remembers every
// key it was ever given across flushes, restarts and reboots.

// simSource serves snapshots straight from the fake API (no informers: every step sees
// the world as it is, deterministically). It has a CrossSubnet pool so that both SA kinds
// are exercised.
type simSource struct {
	cs *fake.Clientset
	// keys are the peers' published protocol v2 keys (their NodeKeys), by node.
	keys map[string]*nodekeys.Keys
}

func (s *simSource) SetOnChange(func(string)) {}
func (s *simSource) Run(ctx context.Context)  { <-ctx.Done() }
func (s *simSource) HasSynced() bool          { return true }
func (s *simSource) NodeCacheSynced() bool    { return true }
func (s *simSource) Err() error               { return nil }

func (s *simSource) Node(name string) *watch.NodeInfo {
	n, err := s.cs.CoreV1().Nodes().Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		return nil
	}
	ni := watch.ParseNode(n)
	return &ni
}

func (s *simSource) Snapshot() watch.Snapshot {
	var snap watch.Snapshot
	nl, _ := s.cs.CoreV1().Nodes().List(context.Background(), metav1.ListOptions{})
	for i := range nl.Items {
		ni := watch.ParseNode(&nl.Items[i])
		ni.Keys = s.keys[ni.Name]
		snap.Nodes = append(snap.Nodes, ni)
	}
	sortNodes(snap.Nodes)
	sec, err := s.cs.CoreV1().Secrets(api.Namespace).Get(context.Background(), api.SecretName, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		snap.RingErr = fmt.Errorf("secret: %w", watch.ErrNoSecret)
	case err != nil:
		snap.RingErr = err
	default:
		snap.Ring, snap.RingErr = keys.Parse(sec.Data[api.SecretDataKey])
	}
	snap.Pools = []desired.Pool{{Name: "cs", CIDR: netip.MustParsePrefix("10.244.0.0/16"), IPIPMode: desired.IPIPCrossSubnet}}
	for i, n := range []string{"a", "b", "c"} {
		snap.Blocks = append(snap.Blocks, desired.Block{CIDR: netip.MustParsePrefix(fmt.Sprintf("10.244.%d.0/26", i+1)), Affinity: "host:" + n})
	}
	return snap
}

func sortNodes(ns []watch.NodeInfo) {
	for i := 1; i < len(ns); i++ {
		for j := i; j > 0 && ns[j].Name < ns[j-1].Name; j-- {
			ns[j], ns[j-1] = ns[j-1], ns[j]
		}
	}
}

var errKilled = errors.New("process killed")

// peerSim is a simulated peer agent: it publishes reports for its own boot, Node object
// and epoch, claiming the ring's generations and readiness toward a's current report.
type peerSim struct {
	epoch       string
	unreadable  bool
	unpublished bool // Node re-created or rebooted, not reported since
}

// sim is the world around node a's agent.
type sim struct {
	t      *testing.T
	rng    *rand.Rand
	cs     *fake.Clientset
	src    *simSource
	xk     *xfrm.Fake
	rk     *rules.Fake
	dir    string
	a      *Agent
	peers  map[string]*peerSim
	boot   int // a's boot counter
	uids   map[string]int
	ring   *keys.Ring // the master's ring
	rings  [][]byte   // every ring version the master wrote
	secret string     // "current", "deleted", "invalid", "restored"
	// killIn counts operations (kernel, rules, ledger, report patch) until the agent
	// process dies; -1: not armed.
	killIn int
	dead   bool
	// accepted is the highest lastGeneration the agent accepted since its ledger was last
	// lost: a restored ring below it must never reach the kernel.
	accepted uint32
	log      []string
	counts   map[string]int
	clock    time.Time
	v2       map[uint32]bool // the protocol v2 generations the master made
	// peerLanes: the peers publish per-CPU lane counts (the random sequences; the lab
	// test counts its states without them).
	peerLanes bool
}

// now is the simulation's clock: one second per step (runs are reproducible).
func (s *sim) now() time.Time { return s.clock }

func newSim(t *testing.T, seed uint64) *sim {
	s := &sim{t: t, rng: rand.New(rand.NewPCG(seed, seed^0x5eed)), xk: xfrm.NewFake(), rk: rules.NewFake(),
		dir: t.TempDir(), peers: map[string]*peerSim{"b": {epoch: "eb0"}, "c": {epoch: "ec0"}},
		uids: map[string]int{}, killIn: -1, counts: map[string]int{}, clock: simT0, v2: map[uint32]bool{}}
	s.ring = keys.NewRing()
	s.ring.Nodes = []keys.NodeID{{Name: "a", ID: 1}, {Name: "b", ID: 2}, {Name: "c", ID: 3}}
	var objs []runtime.Object
	for i, n := range []string{"a", "b", "c"} {
		objs = append(objs, s.newNode(n, fmt.Sprintf("198.18.0.%d", i+1), "boot-"+n+"-0"))
	}
	s.cs = fake.NewClientset(objs...)
	s.cs.PrependReactor("patch", "nodes", func(k8stesting.Action) (bool, runtime.Object, error) {
		if err := s.op("patch"); err != nil {
			return true, nil, err
		}
		return false, nil, nil
	})
	s.src = &simSource{cs: s.cs, keys: map[string]*nodekeys.Keys{}}
	s.xk.Fail = func(op, id string) error { return s.op("xfrm " + op) }
	s.writeRing()
	s.start()
	for _, p := range []string{"b", "c"} {
		s.publishPeer(p)
	}
	return s
}

func (s *sim) newNode(name, ip, boot string) *corev1.Node {
	s.uids[name]++
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, UID: types.UID(fmt.Sprintf("uid-%s-%d", name, s.uids[name])),
		Annotations: map[string]string{api.CalicoIPv4AddressAnnotation: ip + "/24"}}}
	n.Status.NodeInfo.BootID = boot
	return n
}

// op is called before every operation of the agent process that touches the world.
func (s *sim) op(what string) error {
	if s.dead {
		return errKilled
	}
	if s.killIn == 0 {
		s.dead, s.killIn = true, -1
		s.counts["killed at "+strings.Fields(what)[0]]++
		if what == "ledger record" && s.rng.IntN(2) == 0 {
			// Killed inside the write: part of a line reaches the file.
			if f, err := os.OpenFile(filepath.Join(s.dir, "ledger"), os.O_WRONLY|os.O_APPEND, 0); err == nil {
				_, _ = f.WriteString("k 1 0123456789abcdef")
				_ = f.Close()
			}
		}
		return errKilled
	}
	if s.killIn > 0 {
		s.killIn--
	}
	return nil
}

// start starts a new agent process (the old one is gone).
func (s *sim) start() {
	if s.a != nil {
		s.a.Close()
	}
	s.dead = false
	rk := s.rk
	rk.Fail = func(op string) error { return s.op("rules " + op) }
	// Per-CPU lanes (docs/dataplane.md §10): 2 per epoch, now and then turned off for a
	// process's life (and on again in the next: never more than the epoch published).
	dp := desired.Config{LanesOff: s.rng.IntN(5) == 0}
	a, err := New(Config{NodeName: "a", ExternalMTU: 1500, LedgerDir: s.dir, RetryMin: time.Millisecond, RetryMax: time.Millisecond,
		Lanes: 2, Dataplane: dp},
		Deps{Client: s.cs, Source: s.src, Xfrm: xfrm.NewApplier(s.xk, desired.Config{}), Rules: rules.NewApplier(rk),
			Metrics: NewMetrics(""), Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Now: s.now,
			LedgerFail: func(op string) error { return s.op("ledger " + op) }})
	if err != nil {
		s.t.Fatal(err)
	}
	s.a = a
}

func (s *sim) node(name string) *corev1.Node {
	n, err := s.cs.CoreV1().Nodes().Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		return nil
	}
	return n
}

func (s *sim) update(n *corev1.Node) {
	if _, err := s.cs.CoreV1().Nodes().Update(context.Background(), n, metav1.UpdateOptions{}); err != nil {
		s.t.Fatal(err)
	}
}

// selfTag is the tag of a's key incarnation as a's current report states it ("" if a has
// no current report).
func (s *sim) selfTag() string {
	n := s.node("a")
	ni := watch.ParseNode(n)
	r := ni.CurrentReport()
	if r == nil {
		return ""
	}
	return watch.IncarnationTag(watch.KeyIncarnation(r.Incarnation, r.UID, r.Epoch))
}

func (s *sim) publishPeer(name string) {
	p, n := s.peers[name], s.node(name)
	if n == nil {
		return
	}
	p.unpublished = false
	rep := watch.Report{NodeReport: api.NodeReport{Mode: s.ring.Mode, Generations: s.ring.Numbers(),
		Incarnation: n.Status.NodeInfo.BootID, UID: string(n.UID), Epoch: p.epoch}}
	if tag := s.selfTag(); tag != "" {
		rep.InboundFrom = map[string]string{"a": tag}
		if s.ring.Mode.Rank() >= api.ModeEncrypt.Rank() {
			rep.EncryptingTo = map[string]string{"a": tag}
		}
	}
	b, _ := json.Marshal(rep)
	raw := string(b)
	if p.unreadable {
		raw = "{not json"
	}
	n.Annotations[api.ReportAnnotation] = raw
	s.update(n)
	// Its NodeKeys: a key pair per published generation, drawn per incarnation (a real
	// agent's are random; these come from the run's seed).
	nk := &nodekeys.Keys{Incarnation: nodekeys.Incarnation{BootID: rep.Incarnation, UID: rep.UID, Epoch: rep.Epoch}}
	if s.peerLanes {
		// With a lane count of its own, fixed for the incarnation (docs/dataplane.md §10).
		nk.Capabilities, nk.Lanes = []string{api.CapabilityLanes}, uint16(s.rng.IntN(4))
		if old := s.src.keys[name]; old != nil && old.Incarnation == nk.Incarnation {
			nk.Lanes = old.Lanes
		}
	}
	for _, g := range keys.PublishedGenerations(s.ring) {
		k, err := keys.GeneratePrivateKey(rngReader{s.rng})
		if err != nil {
			s.t.Fatal(err)
		}
		if old := s.src.keys[name]; old != nil && old.Incarnation == nk.Incarnation {
			if pub, ok := old.Key(g); ok { // published keys never change within an incarnation
				nk.Keys = append(nk.Keys, nodekeys.Key{Generation: g, X25519: pub})
				continue
			}
		}
		nk.Keys = append(nk.Keys, nodekeys.Key{Generation: g, X25519: k.Public()})
	}
	s.src.keys[name] = nk
}

// rngReader reads from a seeded generator (reproducible test key pairs).
type rngReader struct{ r *rand.Rand }

func (r rngReader) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = byte(r.r.Uint32())
	}
	return len(p), nil
}

// writeRing stores the master's ring in the Secret (created if missing).
func (s *sim) writeRing() {
	data, err := keys.Marshal(s.ring)
	if err != nil {
		s.t.Fatalf("master ring does not validate: %v", err)
	}
	s.rings = append(s.rings, data)
	s.putSecret(data)
	s.secret = "current"
}

func (s *sim) putSecret(data []byte) {
	ctx := context.Background()
	sec := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: api.Namespace, Name: api.SecretName}, Data: map[string][]byte{api.SecretDataKey: data}}
	if _, err := s.cs.CoreV1().Secrets(api.Namespace).Update(ctx, sec, metav1.UpdateOptions{}); apierrors.IsNotFound(err) {
		_, err = s.cs.CoreV1().Secrets(api.Namespace).Create(ctx, sec, metav1.CreateOptions{})
		if err != nil {
			s.t.Fatal(err)
		}
	} else if err != nil {
		s.t.Fatal(err)
	}
}

var simT0 = time.Date(2026, 5, 1, 0, 0, 0, 0, time.UTC)

func (s *sim) newGeneration(state keys.State) keys.Generation {
	s.ring.LastGeneration++
	root := make(keys.Key, keys.RootKeyBytes)
	for i := range root {
		root[i] = byte(s.rng.Uint32())
	}
	g := keys.Generation{Number: s.ring.LastGeneration, State: state, Cipher: keys.AES128GCM, ICVBytes: 8, Root: root, Created: simT0}
	if s.rng.IntN(2) == 0 {
		// A protocol v2 generation (the master makes one once every node publishes its
		// key for it; here at random, so peers lagging with their keys are exercised).
		g.Root, g.Salt = nil, root
		s.v2[g.Number] = true
	}
	if state != keys.StatePending {
		g.Activated = simT0
	}
	return g
}

// master steps the ring the way the master does: one rotation or cutover step.
func (s *sim) master() string {
	r := s.ring
	switch s.rng.IntN(6) {
	case 0, 1: // rotation step
		if r.Mode == api.ModeOff {
			return ""
		}
		switch {
		case r.Pending() != nil:
			for i := range r.Generations {
				if r.Generations[i].State == keys.StateActive {
					r.Generations[i].State, r.Generations[i].Retiring = keys.StateRetiring, simT0
				}
			}
			p := r.Pending()
			p.State, p.Activated = keys.StateActive, simT0
			s.writeRing()
			return "activate"
		case len(r.Generations) > 1:
			r.Generations = r.Generations[1:] // the oldest (retiring) leaves
			s.writeRing()
			return "remove retiring"
		default:
			r.Generations = append(r.Generations, s.newGeneration(keys.StatePending))
			s.writeRing()
			return "rotate"
		}
	case 2, 3: // enable step
		switch r.Mode {
		case api.ModeOff:
			r.Generations = []keys.Generation{s.newGeneration(keys.StateActive)}
			r.Mode = api.ModeAccept
		case api.ModeAccept:
			r.Mode = api.ModeEncrypt
		case api.ModeEncrypt:
			r.Mode = api.ModeEnforce
		default:
			return ""
		}
		r.Target = api.ModeEnforce
		s.writeRing()
		return "enable step"
	case 4: // disable step
		switch r.Mode {
		case api.ModeEnforce:
			r.Mode = api.ModeEncrypt
		case api.ModeEncrypt:
			r.Mode = api.ModeAccept
		case api.ModeAccept:
			r.Mode, r.Generations = api.ModeOff, []keys.Generation{}
		default:
			return ""
		}
		r.Target = api.ModeOff
		s.writeRing()
		return "disable step"
	default: // failover: the new leader writes the same ring again
		s.writeRing()
		return "master failover"
	}
}

func (s *sim) restoredRing() ([]byte, *keys.Ring) {
	data := s.rings[s.rng.IntN(len(s.rings))]
	r, err := keys.Parse(data)
	if err != nil {
		s.t.Fatal(err)
	}
	return data, r
}

// step applies one random event and returns its name.
func (s *sim) step() string {
	ctx := context.Background()
	s.clock = s.clock.Add(time.Second)
	switch x := s.rng.IntN(100); {
	case x < 30: // the agent syncs (maybe killed at a random point)
		if s.rng.IntN(4) == 0 {
			s.killIn = s.rng.IntN(12)
		}
		if s.rng.IntN(3) == 0 {
			s.a.Resync()
		}
		before := len(s.xk.Log)
		restoredBelow := false
		if s.secret == "restored" {
			if sec, err := s.cs.CoreV1().Secrets(api.Namespace).Get(ctx, api.SecretName, metav1.GetOptions{}); err == nil {
				if r, err := keys.Parse(sec.Data[api.SecretDataKey]); err == nil && r.LastGeneration < s.accepted {
					restoredBelow = true
				}
			}
		}
		err := s.a.Sync(ctx)
		if k := s.a.keysWantCopy(); k != nil {
			// Its NodeKeys as written (the writer's write landed at once; the object
			// outlives the process, as in the API).
			c := *k
			s.src.keys["a"] = &c
		}
		if restoredBelow && len(s.xk.Log) != before {
			s.t.Fatalf("the agent wrote to the kernel from a restored ring older than one it accepted: %v", s.xk.Log[before:])
		}
		if s.dead {
			s.killIn = -1
			s.start()
			return "sync, killed, restarted"
		}
		s.killIn = -1
		if err == nil && s.secret == "current" {
			s.accepted = max(s.accepted, s.ring.LastGeneration)
		}
		if err != nil {
			return "sync failed"
		}
		if st := s.a.lastState; st != nil && slices.ContainsFunc(st.SAs, func(sa desired.SA) bool { return s.v2[sa.Generation] }) {
			s.counts["v2-sync"]++
		}
		if st := s.a.lastState; st != nil {
			for _, dir := range []desired.Dir{desired.In, desired.Out} {
				if slices.ContainsFunc(st.SAs, func(sa desired.SA) bool {
					_, lane, _, _, _ := keys.ParseLaneSPI(sa.SPI)
					return sa.Dir == dir && lane > 0
				}) {
					s.counts["lanes-"+dir.String()]++
				}
			}
		}
		return "sync"
	case x < 45: // a peer agent publishes
		p := []string{"b", "c"}[s.rng.IntN(2)]
		s.publishPeer(p)
		return "peer " + p + " publishes"
	case x < 48: // clean restart (SIGTERM, upgrade)
		s.start()
		return "restart"
	case x < 51: // `secureoverlay-agent cleanup`, then a new agent
		if _, err := Cleanup(s.xk, s.rk, desired.Config{}); err != nil {
			s.t.Fatal(err)
		}
		if err := ledger.RemoveFile(s.dir); err != nil {
			s.t.Fatal(err)
		}
		s.accepted = 0
		s.start()
		return "cleanup and restart"
	case x < 55: // another tool flushes states (all or some), or policies
		switch s.rng.IntN(3) {
		case 0:
			s.xk.Remove("state", func(string) bool { return true })
			return "ip xfrm state flush"
		case 1:
			s.xk.Remove("state", func(string) bool { return s.rng.IntN(2) == 0 })
			return "some states flushed"
		default:
			s.xk.Remove("policy", func(string) bool { return true })
			return "ip xfrm policy flush"
		}
	case x < 59: // a peer's report becomes unreadable, or comes back
		p := []string{"b", "c"}[s.rng.IntN(2)]
		s.peers[p].unreadable = !s.peers[p].unreadable
		s.publishPeer(p)
		return "peer " + p + " report readable=" + strconv.FormatBool(!s.peers[p].unreadable)
	case x < 61: // a peer's Node is re-created (same name, IP, boot)
		p := []string{"b", "c"}[s.rng.IntN(2)]
		old := s.node(p)
		if err := s.cs.CoreV1().Nodes().Delete(ctx, p, metav1.DeleteOptions{}); err != nil {
			s.t.Fatal(err)
		}
		n := s.newNode(p, strings.TrimSuffix(old.Annotations[api.CalicoIPv4AddressAnnotation], "/24"), old.Status.NodeInfo.BootID)
		if rep, ok := old.Annotations[api.ReportAnnotation]; ok && s.rng.IntN(2) == 0 {
			n.Annotations[api.ReportAnnotation] = rep // the old report copied over
		}
		if _, err := s.cs.CoreV1().Nodes().Create(ctx, n, metav1.CreateOptions{}); err != nil {
			s.t.Fatal(err)
		}
		s.peers[p].unpublished = true
		return "peer " + p + " Node re-created"
	case x < 64: // a peer reboots, or its agent takes a new epoch
		p := []string{"b", "c"}[s.rng.IntN(2)]
		if s.rng.IntN(2) == 0 {
			n := s.node(p)
			n.Status.NodeInfo.BootID += "r"
			s.update(n)
			s.peers[p].unpublished = true
			return "peer " + p + " reboots"
		}
		s.peers[p].epoch += "n"
		s.publishPeer(p)
		return "peer " + p + " new epoch"
	case x < 66: // this node reboots: kernel state and /run are gone, new boot ID
		s.boot++
		n := s.node("a")
		n.Status.NodeInfo.BootID = fmt.Sprintf("boot-a-%d", s.boot)
		s.update(n)
		s.xk.Remove("state", func(string) bool { return true })
		s.xk.Remove("policy", func(string) bool { return true })
		s.rk = rules.NewFake()
		if err := os.RemoveAll(s.dir); err != nil {
			s.t.Fatal(err)
		}
		s.accepted = 0
		s.start()
		return "node a reboots"
	case x < 67: // this node's Node object is re-created
		old := s.node("a")
		if err := s.cs.CoreV1().Nodes().Delete(ctx, "a", metav1.DeleteOptions{}); err != nil {
			s.t.Fatal(err)
		}
		if _, err := s.cs.CoreV1().Nodes().Create(ctx, s.newNode("a", "198.18.0.1", old.Status.NodeInfo.BootID), metav1.CreateOptions{}); err != nil {
			s.t.Fatal(err)
		}
		return "node a re-created"
	case x < 85: // the master steps
		if s.secret != "current" && s.rng.IntN(2) == 0 {
			s.writeRing() // the master repairs the Secret from its last good ring
			return "master rewrites the Secret"
		}
		if w := s.master(); w != "" {
			return w
		}
		return "master idle"
	default: // the key Secret is deleted, edited or restored from an earlier copy
		switch s.rng.IntN(4) {
		case 0:
			_ = s.cs.CoreV1().Secrets(api.Namespace).Delete(ctx, api.SecretName, metav1.DeleteOptions{})
			s.secret = "deleted"
			return "Secret deleted"
		case 1:
			s.putSecret([]byte(`{"schemaVersion": 1, "mode": "loud"}`))
			s.secret = "invalid"
			return "Secret edited (invalid)"
		default:
			data, r := s.restoredRing()
			s.putSecret(data)
			s.secret = "restored"
			if data != nil && string(data) == string(s.rings[len(s.rings)-1]) {
				s.secret = "current"
			}
			return fmt.Sprintf("Secret restored (lastGeneration %d of %d)", r.LastGeneration, s.ring.LastGeneration)
		}
	}
}

func keySafetyRun(t *testing.T, seed uint64, steps int) map[string]int {
	s := newSim(t, seed)
	s.peerLanes = true
	t.Cleanup(func() { s.a.Close() })
	for i := range steps {
		what := s.step()
		s.counts[strings.Fields(what)[0]]++
		s.log = append(s.log, what)
		if len(s.log) > 40 {
			s.log = s.log[1:]
		}
		if r := s.xk.ReusedKeys(); len(r) != 0 {
			t.Fatalf("seed %d step %d (%s): SAs re-created under a key they used before: %v\nlast steps:\n  %s\nreplay: SECUREOVERLAY_KEYSAFETY_SEED=%d go test -run TestKeySafetyRandomSequences ./reconciler/agent",
				seed, i, what, r, strings.Join(s.log, "\n  "), seed)
		}
	}
	s.counts["distinct keys installed"] = s.xk.KeysAdded()
	return s.counts
}

// TestKeySafetyRandomSequences runs seeded random sequences of every event above (set
// SECUREOVERLAY_KEYSAFETY_SEED to replay one) and fails on the first key installed twice.
func TestKeySafetyRandomSequences(t *testing.T) {
	seeds := []uint64{1, 2, 3, 4}
	steps := 2500
	if testing.Short() {
		seeds, steps = []uint64{1, 2}, 1000
	}
	if v := os.Getenv("SECUREOVERLAY_KEYSAFETY_SEED"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		seeds = []uint64{n}
	}
	for _, seed := range seeds {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			c := keySafetyRun(t, seed, steps)
			t.Logf("seed %d: %d steps, %v", seed, steps, c)
			// The run must have exercised the dangerous paths, or it proves nothing.
			for _, k := range []string{"sync,", "cleanup", "ip", "Secret", "peer", "node", "rotate", "activate", "v2-sync", "lanes-in", "lanes-out"} {
				if c[k] == 0 {
					t.Errorf("seed %d never exercised %q", seed, k)
				}
			}
			if c["distinct keys installed"] < 50 {
				t.Errorf("only %d distinct keys installed: the sequence did not program enough", c["distinct keys installed"])
			}
		})
	}
}
