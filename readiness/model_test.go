package readiness

import (
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"testing"
)

// The model: n nodes in enforce, one master, and every watch lagging independently. Each
// node's kernel holds inbound SAs (peer → the peer's K they were derived for, made with
// the node's own current K), outbound ESP (peer → the peer's K used) and plaintext drops
// (peer). Events, in random order: a node's agent syncs (programs from its lagging key view
// and the last view it received, then reports — program before advertise); a watch
// delivers (NodeKeys to an agent or the master, a NodeStatus to the master, a NodeView to
// its agent); the master writes views; a node reboots (new K, kernel and agent state gone,
// its NodeKeys rewritten); the master fails over (a new leader with no confirmations).
//
// Checked after every event, against the kernels:
//   - no black hole: while B's K is the one A's ESP to B was made for, B holds the inbound
//     SA for A's current K (once B reboots, A's ESP with B's old K is lost until A sees
//     B's new NodeKeys: the reboot window, which no protocol closes, v1 included);
//   - no plaintext drop of a sender that is not gated: A sends plaintext to B only when
//     B does not drop plaintext from A (a rebooted node is gated, as v1's boot gate: it
//     sends a peer nothing until it sends it ESP);
// and at the end, with churn stopped and every watch delivered, liveness: every pair
// sends ESP both ways and drops plaintext both ways.

type kernel struct {
	in    Keys            // peer -> peer K the inbound SA was derived for (own K = node's current)
	esp   map[uint32][2]K // peer -> (peer K used, own K used)
	drops map[uint32]bool
	gated bool
}

type lagged[T any] struct {
	hist []T
	seen map[int]int // observer -> index into hist (-1: nothing yet)
}

func (l *lagged[T]) write(v T) { l.hist = append(l.hist, v) }
func (l *lagged[T]) get(o int) (T, bool) {
	var zero T
	i, ok := l.seen[o]
	if !ok || i < 0 {
		return zero, false
	}
	return l.hist[i], true
}
func (l *lagged[T]) deliver(o int) bool {
	i, ok := l.seen[o]
	if !ok {
		i = -1
	}
	if i+1 >= len(l.hist) {
		return false
	}
	l.seen[o] = i + 1
	return true
}

type model struct {
	t       *testing.T
	rng     *rand.Rand
	n       int
	buckets int
	k       []K // truth: current K per node (index = id)
	kern    []*kernel
	agents  []*Agent
	keys    []*lagged[K]         // NodeKeys per node; observers: agents 1..n, master 0
	status  []*lagged[statusMsg] // NodeStatus per node; observer: master 0
	views   []*lagged[View]      // NodeView per node; observer: its agent
	// With rows (§9 step 3, revised): each node's row (its status, published with its
	// NodeKeys; observers: the other agents), and the master writes a node's view only
	// when the node's K changed since its last view or that view still lists someone —
	// every other pair's readiness must then come from rows.
	rows        []*lagged[Status]
	withRows    bool
	ours        map[int]bool // the node's last written view is the current master's
	rowComplete map[int]bool // a node's last row was complete
	master      *Master
	counter     uint64
	log         []string
	// With restarts (§9 step 4): an agent restarts with its node's K and kernel kept, its
	// memory lost and its informers listing afresh; it saves its confirmations before each
	// sync programs from them (saved) and restores them at its first sync (restore).
	withRestarts bool
	saved        map[int]Saved
	restore      map[int]bool
	// reportsUsed: agents say which view they last used, and the master weighs the view
	// it holds for them by it (Master.ObserveUsed).
	reportsUsed bool
}

const masterObs = 0

// statusMsg is a node's NodeStatus as the master reads it: its readiness status and, with
// reportsUsed, the key digest of the last view its agent used (Agent.Used).
type statusMsg struct {
	st     Status
	used   uint64
	usedOK bool
}

func newModel(t *testing.T, seed uint64, n, buckets int, withRows, withRestarts bool) *model {
	m := &model{t: t, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), n: n, buckets: buckets, master: NewMaster(buckets), withRows: withRows, ours: map[int]bool{}, rowComplete: map[int]bool{},
		withRestarts: withRestarts, saved: map[int]Saved{}, restore: map[int]bool{}, reportsUsed: withRows && os.Getenv("SECUREOVERLAY_READINESS_NO_USED") == ""}
	m.rows = make([]*lagged[Status], n+1)
	m.k = make([]K, n+1)
	m.kern = make([]*kernel, n+1)
	m.agents = make([]*Agent, n+1)
	m.keys = make([]*lagged[K], n+1)
	m.status = make([]*lagged[statusMsg], n+1)
	m.views = make([]*lagged[View], n+1)
	for id := 1; id <= n; id++ {
		m.keys[id] = &lagged[K]{seen: map[int]int{}}
		m.status[id] = &lagged[statusMsg]{seen: map[int]int{}}
		m.views[id] = &lagged[View]{seen: map[int]int{}}
		m.rows[id] = &lagged[Status]{seen: map[int]int{}}
		m.boot(id)
		m.kern[id].gated = false // the cluster starts as if it had always run
	}
	return m
}

func (m *model) logf(format string, a ...any) { m.log = append(m.log, fmt.Sprintf(format, a...)) }

func (m *model) boot(id int) {
	m.counter++
	m.k[id] = KeyDigest(fmt.Sprintf("boot-%d/%d", id, m.counter))
	m.kern[id] = &kernel{in: Keys{}, esp: map[uint32][2]K{}, drops: map[uint32]bool{}, gated: true}
	m.agents[id] = &Agent{ID: uint32(id)}
	m.keys[id].write(m.k[id]) // the agent publishes its NodeKeys first
	m.logf("boot %d k=%x", id, m.k[id])
}

// keyView is what observer o's NodeKeys cache shows (its own node's K it knows directly).
func (m *model) keyView(o int) Keys {
	ks := Keys{}
	for id := 1; id <= m.n; id++ {
		if o == id {
			ks[uint32(id)] = m.k[id]
			continue
		}
		if k, ok := m.keys[id].get(o); ok {
			ks[uint32(id)] = k
		}
	}
	return ks
}

func (m *model) sync(id int) {
	mine := m.keyView(id)
	kn, a := m.kern[id], m.agents[id]
	if m.restore[id] {
		delete(m.restore, id)
		if s, ok := m.saved[id]; ok {
			a.Restore(s, mine)
		}
	}
	if v, ok := m.views[id].get(id); ok {
		a.Consider(v, mine)
	}
	for p := 1; p <= m.n && m.withRows; p++ {
		if row, ok := m.rows[p].get(id); ok && p != id {
			a.ConsiderRow(row, mine, m.buckets)
		}
	}
	if m.withRestarts {
		m.saved[id] = a.Save(mine) // before the kernel follows
	}
	// Inbound: every peer this node knows, with the K it knows (an old K's SA is replaced).
	for p := range kn.in {
		if _, ok := mine[p]; !ok {
			delete(kn.in, p)
		}
	}
	for p, k := range mine {
		if int(p) != id {
			kn.in[p] = k
		}
	}
	// Outbound and drops from the agent's confirmations.
	for p, k := range mine {
		if int(p) == id {
			continue
		}
		if a.SendESP(p, mine) {
			kn.esp[p] = [2]K{k, m.k[id]}
		} else {
			delete(kn.esp, p)
		}
		kn.drops[p] = a.DropPlaintext(p, mine)
	}
	for p := range kn.esp {
		if _, ok := mine[p]; !ok {
			delete(kn.esp, p)
		}
	}
	if len(kn.esp) == m.n-1 {
		kn.gated = false // the boot gate opens once every peer gets ESP
	}
	// Report what the kernel now holds.
	out := Keys{}
	for p, e := range kn.esp {
		out[p] = e[0]
	}
	st := NewStatus(uint32(id), m.k[id], kn.in, out, nil, m.buckets)
	used, usedOK := a.Used()
	m.status[id].write(statusMsg{st, used, usedOK})
	if m.withRows {
		m.publishRow(id, st, mine)
	}
	m.logf("sync %d in=%v esp=%v", id, kn.in, out)
}

func (m *model) masterWrite() {
	for id := 1; id <= m.n; id++ {
		v := m.master.ViewFor(uint32(id))
		last, ok := lastOf(m.views[id])
		if ok && equalView(last, v) {
			continue
		}
		held := last
		if !m.ours[id] {
			held.Seq = 0 // a previous leader's view: its sequence means nothing to this master
		}
		if m.withRows && ok && !m.master.NeedsView(uint32(id), &held, v, m.rowOf) {
			continue // every pair it would gain, its peers' rows give it
		}
		m.views[id].write(v)
		m.ours[id] = true
	}
}

// publishRow: with rows, a node republishes its row only while its current K's last row
// was incomplete (its kernel did not yet hold inbound from, and send ESP to, every peer it
// knew) or its K changed since: another node's re-key does not make N rows change.
func (m *model) publishRow(id int, st Status, mine Keys) {
	last, ok := lastOf(m.rows[id])
	if ok && (fmt.Sprint(last) == fmt.Sprint(st) || (last.Self == st.Self && m.rowComplete[id])) {
		return
	}
	m.rows[id].write(st)
	kn := m.kern[id]
	m.rowComplete[id] = len(kn.in) == len(mine)-1 && len(kn.esp) == len(mine)-1
}

// rowOf is node p's row as the API holds it (the master reads it there).
func (m *model) rowOf(p uint32) *Status {
	if int(p) < 1 || int(p) > m.n {
		return nil
	}
	if r, ok := lastOf(m.rows[p]); ok {
		return &r
	}
	return nil
}

func lastOf[T any](l *lagged[T]) (T, bool) {
	var zero T
	if len(l.hist) == 0 {
		return zero, false
	}
	return l.hist[len(l.hist)-1], true
}

func equalView(a, b View) bool {
	return a.Keys == b.Keys && fmt.Sprint(a.NotIn) == fmt.Sprint(b.NotIn) && fmt.Sprint(a.NotOut) == fmt.Sprint(b.NotOut)
}

// deliver one pending watch event, chosen at random; false if none is pending.
func (m *model) deliverOne() bool {
	type ev func() bool
	var evs []ev
	for id := 1; id <= m.n; id++ {
		id := id
		for o := 0; o <= m.n; o++ {
			o := o
			if o == id {
				continue
			}
			evs = append(evs, func() bool {
				if !m.keys[id].deliver(o) {
					return false
				}
				if o == masterObs {
					k, _ := m.keys[id].get(o)
					m.master.SetKeys(uint32(id), k)
				}
				return true
			})
		}
		evs = append(evs, func() bool {
			if !m.status[id].deliver(masterObs) {
				return false
			}
			s, _ := m.status[id].get(masterObs)
			m.observe(uint32(id), s)
			return true
		})
		evs = append(evs, func() bool { return m.views[id].deliver(id) })
		for o := 1; o <= m.n && m.withRows; o++ {
			o := o
			if o != id {
				evs = append(evs, func() bool { return m.rows[id].deliver(o) })
			}
		}
	}
	m.rng.Shuffle(len(evs), func(i, j int) { evs[i], evs[j] = evs[j], evs[i] })
	for _, e := range evs {
		if e() {
			return true
		}
	}
	return false
}

// observe gives the master node id's status (and, with reportsUsed, the view its agent
// last used).
func (m *model) observe(id uint32, s statusMsg) {
	m.master.Observe(s.st)
	if m.reportsUsed {
		m.master.ObserveUsed(id, s.used, s.usedOK)
	}
}

// restart: node id's agent process restarts (K and kernel kept, memory lost); its
// informers list afresh, so it sees the latest of every object at once.
func (m *model) restart(id int) {
	m.agents[id] = &Agent{ID: uint32(id)}
	m.restore[id] = true
	for p := 1; p <= m.n; p++ {
		if p != id {
			m.keys[p].seen[id] = len(m.keys[p].hist) - 1
			if m.withRows {
				m.rows[p].seen[id] = len(m.rows[p].hist) - 1
			}
		}
	}
	m.views[id].seen[id] = len(m.views[id].hist) - 1
	m.logf("restart %d", id)
}

func (m *model) failover() {
	m.master = NewMaster(m.buckets)
	clear(m.ours)
	// The new leader lists everything it can see (its caches start from what is written).
	for id := 1; id <= m.n; id++ {
		if k, ok := lastOf(m.keys[id]); ok {
			m.master.SetKeys(uint32(id), k)
		}
	}
	for id := 1; id <= m.n; id++ {
		if s, ok := lastOf(m.status[id]); ok {
			m.observe(uint32(id), s)
		}
		m.keys[id].seen[masterObs] = len(m.keys[id].hist) - 1
		m.status[id].seen[masterObs] = len(m.status[id].hist) - 1
	}
	m.logf("failover")
}

func (m *model) check(when string) {
	for a := 1; a <= m.n; a++ {
		for b := 1; b <= m.n; b++ {
			if a == b {
				continue
			}
			ka, kb := m.kern[a], m.kern[b]
			if e, ok := ka.esp[uint32(b)]; ok {
				// ESP made for a K of b that b no longer has is the reboot window no
				// protocol can close (b's kernel and keys are gone; v1 the same): a
				// sender learns it from b's NodeKeys.
				if e[1] != m.k[a] || (e[0] == m.k[b] && kb.in[uint32(a)] != m.k[a]) {
					m.fail(when, "black hole: %d sends ESP to %d with (peer %x, own %x); %d's K %x holds inbound from %d for %x (%d's K %x)",
						a, b, e[0], e[1], b, m.k[b], a, kb.in[uint32(a)], a, m.k[a])
				}
				continue
			}
			if !ka.gated && kb.drops[uint32(a)] {
				m.fail(when, "plaintext drop: %d sends plaintext to %d, which drops plaintext from it", a, b)
			}
		}
	}
}

func (m *model) fail(when, format string, a ...any) {
	m.t.Helper()
	tail := m.log
	if len(tail) > 40 {
		tail = tail[len(tail)-40:]
	}
	for _, l := range tail {
		m.t.Log(l)
	}
	m.t.Fatalf("after %s: "+format, append([]any{when}, a...)...)
}

func (m *model) run(steps int) {
	for i := 0; i < steps; i++ {
		var what string
		switch r := m.rng.IntN(100); {
		case r < 30:
			id := 1 + m.rng.IntN(m.n)
			m.sync(id)
			what = fmt.Sprintf("sync %d", id)
		case r >= 70 && r < 75 && m.withRestarts:
			id := 1 + m.rng.IntN(m.n)
			m.restart(id)
			what = fmt.Sprintf("restart %d", id)
		case r < 75:
			m.deliverOne()
			what = "deliver"
		case r < 90:
			m.masterWrite()
			what = "views"
		case r < 97:
			id := 1 + m.rng.IntN(m.n)
			m.boot(id)
			what = fmt.Sprintf("reboot %d", id)
		default:
			m.failover()
			what = "failover"
		}
		m.check(what)
	}
	// Quiesce: deliver everything, sync everyone, write views, until nothing changes.
	for round := 0; round < 20; round++ {
		for m.deliverOne() {
			m.check("deliver (quiesce)")
		}
		for id := 1; id <= m.n; id++ {
			m.sync(id)
			m.check("sync (quiesce)")
		}
		for m.deliverOne() {
			m.check("deliver (quiesce)")
		}
		m.masterWrite()
	}
	for a := 1; a <= m.n; a++ {
		for b := 1; b <= m.n; b++ {
			if a == b {
				continue
			}
			if _, ok := m.kern[a].esp[uint32(b)]; !ok {
				m.fail("quiesce", "liveness: %d does not send ESP to %d", a, b)
			}
			if !m.kern[a].drops[uint32(b)] {
				m.fail("quiesce", "liveness: %d does not drop plaintext from %d", a, b)
			}
		}
	}
}

// TestModelRandomInterleavings: the readiness design under random interleavings of syncs,
// lagging watches, view writes, reboots and master failovers (reproduce one seed with
// SECUREOVERLAY_READINESS_SEED).
func TestModelRandomInterleavings(t *testing.T) { runModels(t, false, false) }

// TestModelRowsRandomInterleavings: the same with rows (docs/protocol-v2.md §9 step 3,
// revised): every node publishes its status as its row while incomplete, every agent
// confirms its pairs from its peers' rows as well as from its view, and the master writes a
// node's view only in the node's own re-key phase. Safety as before; liveness at the end
// must come from rows for every pair no view confirmed.
func TestModelRowsRandomInterleavings(t *testing.T) { runModels(t, true, false) }

// TestModelRestartsRandomInterleavings: the same with agent restarts (docs/protocol-v2.md
// §9 step 4): an agent process restarts with its node's keys and kernel kept and its
// memory lost, and — the agents deciding from views and rows alone, as once the lists go
// — restores the confirmations it saved before each sync programmed from them. Without
// the restore a restarted agent withdraws ESP its peers count on (they drop its
// plaintext) until a view consistent with its keys comes, which the master, writing views
// only when rows do not cover them, may never write.
func TestModelRestartsRandomInterleavings(t *testing.T) { runModels(t, true, true) }

// runModels runs the model over 400 seeds (50 with -short) × 3 shapes.
func runModels(t *testing.T, withRows, withRestarts bool) {
	seeds, steps := 400, 400
	if testing.Short() {
		seeds = 50
	}
	first := uint64(1)
	if s := os.Getenv("SECUREOVERLAY_READINESS_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		first, seeds = v, 1
	}
	for seed := first; seed < first+uint64(seeds); seed++ {
		for _, shape := range []struct{ n, buckets int }{{4, 2}, {6, 3}, {3, 32}} {
			t.Run(fmt.Sprintf("seed%d/n%d/b%d", seed, shape.n, shape.buckets), func(t *testing.T) {
				newModel(t, seed, shape.n, shape.buckets, withRows, withRestarts).run(steps)
			})
		}
	}
}
