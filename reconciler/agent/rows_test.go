package agent

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	k8stesting "k8s.io/client-go/testing"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/noderow"
	"github.com/secureoverlay/secureoverlay/readiness"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
)

// rowPairs is n's rows-only shadow: by direction, agree/ahead/behind.
func rowPairs(n *v2node) (in, out [numVerdicts]float64) {
	for v, name := range VerdictNames {
		in[v] = value(n.a.d.Metrics.RowPairs.WithLabelValues("in", name))
		out[v] = value(n.a.d.Metrics.RowPairs.WithLabelValues("out", name))
	}
	return in, out
}

// claimsAll is "" when n's last report claims each of peers both ways, under the key
// incarnation of the peer's last report, and n's row for its keys is complete and written;
// else what is missing. Reports and rows are written apart (rows at most once per
// RowInterval), so until both are in, a peer's rows may run ahead of its lists or behind.
func claimsAll(n *v2node, peers ...*v2node) string {
	r := n.a.Published()
	if r == nil {
		return n.name + ": no report yet"
	}
	for _, p := range peers {
		pr := p.a.Published()
		if pr == nil {
			return p.name + ": no report yet"
		}
		tag := watch.IncarnationTag(watch.KeyIncarnation(pr.Incarnation, pr.UID, pr.Epoch))
		if r.InboundFrom[p.name] != tag || r.EncryptingTo[p.name] != tag {
			return fmt.Sprintf("%s: its report does not claim %s both ways", n.name, p.name)
		}
	}
	n.a.mu.Lock()
	defer n.a.mu.Unlock()
	if !n.a.rowComplete || n.a.rowHave == nil || !noderow.Equal(*n.a.rowHave, *n.a.rowWant) {
		return n.name + ": its complete row is not written yet"
	}
	return ""
}

// listsAlways is the startNode option of an agent that keeps its report's lists.
func listsAlways(c *Config) { c.ReportLists = ListsAlways }

// rowWrites counts n's successful NodeRow writes.
func rowWrites(n *v2node) float64 {
	return value(n.a.d.Metrics.ReportWrites.WithLabelValues("row", "ok"))
}

// TestAgentsPublishRows: three real agents (watchers, desired state, fake kernels, ledgers)
// on one fake API publish their readiness rows; once every pair is programmed each row is
// complete, and the rows alone confirm every pair on every agent, as the lists do (never
// ahead of them). Then c loses its state (a new SA epoch: new keys for all its pairs): c
// publishes a row for its new keys, which a and b take, while a and b, whose rows were
// complete, write none (another node's re-key costs no row of theirs); on c the rows of a
// and b, about c's old keys, confirm nothing (c's NodeView carries that side). The agents
// keep their lists (--report-lists=always): the rows are compared with them; their report
// writes are slowed, so rows and lists arrive in either order.
func TestAgentsPublishRows(t *testing.T) {
	ring := testRing(t, api.ModeEnforce, "a", "b", "c")
	cs, dc := fakeAPI(t, ring, testNode("a", "198.18.0.1", "boot-a"), testNode("b", "198.18.0.2", "boot-b"), testNode("c", "198.18.0.3", "boot-c"))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// Report writes take 300 ms, as under load: the rows (written apart) run ahead of the
	// lists for a moment, which the checks must wait out, not mistake for a settled state.
	for _, r := range []string{"nodereports", "nodestatuses"} {
		dc.PrependReactor("patch", r, func(k8stesting.Action) (bool, runtime.Object, error) {
			time.Sleep(300 * time.Millisecond)
			return false, nil, nil
		})
	}
	nodes := map[string]*v2node{}
	for _, name := range []string{"a", "b", "c"} {
		nodes[name] = startNode(t, ctx, cs, dc, name, seededLedger(t, name, "boot-"+name), listsAlways)
	}
	row := func(name string) (readiness.Status, error) {
		u, err := dc.Resource(noderow.GVR).Namespace(api.Namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return readiness.Status{}, err
		}
		return noderow.Parse(u)
	}
	// settled: every report claims every pair, every row is complete and written, and every
	// agent takes both peers' rows and the rows alone agree with its lists on every pair
	// but those in behind (names of nodes whose rows-only rule lags).
	settled := func(behind map[string]bool) string {
		for _, name := range []string{"a", "b", "c"} {
			n := nodes[name]
			var peers []*v2node
			for _, p := range []string{"a", "b", "c"} {
				if p != name {
					peers = append(peers, nodes[p])
				}
			}
			if why := claimsAll(n, peers...); why != "" {
				return why
			}
			in, out := rowPairs(n)
			taken := value(n.a.d.Metrics.Rows)
			want := [numVerdicts]float64{2, 0, 0}
			if behind[name] {
				want = [numVerdicts]float64{0, 0, 2}
			}
			if taken != 2 || in != want || out != want {
				return fmt.Sprintf("%s: %v rows taken, rows alone in %v out %v (want 2, %v)", name, taken, in, out, want)
			}
		}
		return ""
	}
	var why string
	if !waitUntil(30*time.Second, func() bool { why = settled(nil); return why == "" }) {
		t.Fatalf("rows never confirmed every pair: %s", why)
	}
	selfs := map[string]readiness.K{}
	for _, name := range []string{"a", "b", "c"} {
		r, err := row(name)
		if err != nil {
			t.Fatalf("%s's NodeRow: %v", name, err)
		}
		if r.ID != ring.Nodes[name[0]-'a'].ID {
			t.Errorf("%s's NodeRow has ID %d", name, r.ID)
		}
		selfs[name] = r.Self
	}
	// Ahead is never allowed; check once more after a few resyncs (every agent has taken
	// the last reports and rows since they were written).
	time.Sleep(1500 * time.Millisecond)
	if why := settled(nil); why != "" {
		t.Fatalf("after resyncs: %s", why)
	}
	before := map[string]float64{"a": rowWrites(nodes["a"]), "b": rowWrites(nodes["b"])}

	// c loses its state: a new SA epoch, new keys for all its pairs.
	nodes["c"].stop()
	nodes["c"] = startNode(t, ctx, cs, dc, "c", t.TempDir(), listsAlways)
	if !waitUntil(30*time.Second, func() bool {
		r, err := row("c")
		why = settled(map[string]bool{"c": true})
		return err == nil && r.Self != selfs["c"] && why == ""
	}) {
		t.Fatalf("after c's new epoch: %s", why)
	}
	time.Sleep(1500 * time.Millisecond) // more than RowInterval: a late write would show
	if why := settled(map[string]bool{"c": true}); why != "" {
		t.Fatalf("after c's new epoch, later: %s", why)
	}
	for _, name := range []string{"a", "b"} {
		if got := rowWrites(nodes[name]); got != before[name] {
			t.Errorf("%s wrote its row %v more times after c re-keyed; its row was complete", name, got-before[name])
		}
		if r, err := row(name); err != nil || r.Self != selfs[name] {
			t.Errorf("%s's NodeRow changed: %v", name, err)
		}
	}
	t.Logf("rows written: a %v, b %v, c (new epoch) %v", rowWrites(nodes["a"]), rowWrites(nodes["b"]), rowWrites(nodes["c"]))
}

// TestRowWriteRefused: a refused NodeRow write is retried, counted and named in the
// agent's status without making it unready (nothing decides with rows yet); once the API
// accepts it the row is written and the error cleared.
func TestRowWriteRefused(t *testing.T) {
	ring := testRing(t, api.ModeEnforce, "a", "b")
	cs, dc := fakeAPI(t, ring, testNode("a", "198.18.0.1", "boot-a"), testNode("b", "198.18.0.2", "boot-b"))
	var refuse atomic.Bool
	refuse.Store(true)
	dc.PrependReactor("*", "noderows", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if refuse.Load() && a.GetVerb() != "list" && a.GetVerb() != "watch" && a.GetVerb() != "get" {
			return true, nil, apierrors.NewForbidden(noderow.GVR.GroupResource(), "a", errors.New("test refuses"))
		}
		return false, nil, nil
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	na := startNode(t, ctx, cs, dc, "a", seededLedger(t, "a", "boot-a"))
	startNode(t, ctx, cs, dc, "b", seededLedger(t, "b", "boot-b"))
	if !waitUntil(30*time.Second, func() bool {
		s := na.a.Status()
		return s.Ready && strings.Contains(s.Error, "write readiness row") && value(na.a.d.Metrics.ReportWrites.WithLabelValues("row", "error")) > 0
	}) {
		t.Fatalf("a refused row write: status %+v", na.a.Status())
	}
	refuse.Store(false)
	if !waitUntil(30*time.Second, func() bool {
		_, err := dc.Resource(noderow.GVR).Namespace(api.Namespace).Get(ctx, "a", metav1.GetOptions{})
		return err == nil && na.a.Status().Error == "" && na.a.PublishedRow() != nil
	}) {
		t.Fatalf("after the API accepts rows: status %+v", na.a.Status())
	}
}
