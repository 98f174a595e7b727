package agent

import (
	"encoding/json"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
)

// slowAPI is the agent's own client for its report writes, apart from the watcher's (the
// fake clientset serialises every call, so a patch held in a reactor would hold the
// watcher too). While hold is set, every Node patch waits on release. It records the
// peers each written report claims inbound SAs from, in the order written.
type slowAPI struct {
	cs      *fake.Clientset
	hold    atomic.Bool
	delay   atomic.Int64 // every patch takes this long
	entered chan struct{}
	release chan struct{}
	once    sync.Once
	mu      sync.Mutex
	written [][]string
}

func newSlowAPI(t *testing.T, e *env) *slowAPI {
	s := &slowAPI{cs: fake.NewClientset(testNode("a", "198.18.0.1", "boot-a")), entered: make(chan struct{}, 100), release: make(chan struct{})}
	s.cs.PrependReactor("patch", "nodes", func(action k8stesting.Action) (bool, runtime.Object, error) {
		if s.hold.Load() {
			select {
			case s.entered <- struct{}{}:
			default:
			}
			<-s.release
		}
		time.Sleep(time.Duration(s.delay.Load()))
		var body struct {
			Metadata struct {
				Annotations map[string]string `json:"annotations"`
			} `json:"metadata"`
		}
		if err := json.Unmarshal(action.(k8stesting.PatchAction).GetPatch(), &body); err != nil {
			t.Errorf("patch: %v", err)
			return false, nil, nil
		}
		r, err := watch.ParseReport(body.Metadata.Annotations[api.ReportAnnotation])
		if err != nil {
			t.Errorf("report: %v", err)
			return false, nil, nil
		}
		var peers []string
		for p := range r.InboundFrom {
			peers = append(peers, p)
		}
		slices.Sort(peers)
		s.mu.Lock()
		s.written = append(s.written, peers)
		s.mu.Unlock()
		return false, nil, nil
	})
	e.a.d.Client = s.cs
	return s
}

func (s *slowAPI) open() { s.once.Do(func() { s.hold.Store(false); close(s.release) }) }

func (s *slowAPI) report(t *testing.T) *watch.Report {
	t.Helper()
	n, err := s.cs.CoreV1().Nodes().Get(t.Context(), "a", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	r, err := watch.ParseReport(n.Annotations[api.ReportAnnotation])
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// noBAfterGone checks the order of the writes: once a report without peer b is written
// after one with it (b was deleted), no later write claims b again.
func (s *slowAPI) noBAfterGone(t *testing.T) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	saw, gone := false, false
	for i, w := range s.written {
		has := slices.Contains(w, "b")
		if gone && has {
			t.Errorf("write %d claims b after a write without it: %v", i, s.written)
		}
		saw = saw || has
		gone = gone || (saw && !has)
	}
}

func inboundFrom(e *env, ip string) bool {
	states, _ := e.xk.Snapshot()
	for _, s := range states {
		if s.SA.Src.String() == ip {
			return true
		}
	}
	return false
}

// A slow API server does not hold the kernel back: while this node's report write is
// blocked, the next Node event's sync still reaches the kernel; the writer then writes
// the newest report, never an older one after it.
func TestSyncDoesNotWaitForTheReportWrite(t *testing.T) {
	e := newEnv(t, api.ModeAccept, Config{})
	s := newSlowAPI(t, e)
	stop := e.run()
	defer stop()
	defer s.open() // before stop: the writer's last write must not wait forever
	waitFor(t, "ready", func() bool { return e.a.Status().Ready && inboundFrom(e, "198.18.0.2") })
	s.hold.Store(true)

	// A peer joins: its sync programs it, then the report write claiming it blocks.
	if _, err := e.cs.CoreV1().Nodes().Create(t.Context(), testNode("c", "198.18.0.3", "boot-c"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "c programmed", func() bool { return inboundFrom(e, "198.18.0.3") })
	select {
	case <-s.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("no report write claiming c started")
	}
	// A peer leaves while that write is blocked: its sync must reach the kernel now.
	if err := e.cs.CoreV1().Nodes().Delete(t.Context(), "b", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	for inboundFrom(e, "198.18.0.2") {
		if time.Since(start) > 5*time.Second {
			t.Fatal("b's SAs still in the kernel 5 s after its Node was deleted: the sync waits for the blocked report write")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if !e.a.Status().Ready {
		t.Errorf("not ready while a report write is in flight: %+v", e.a.Status())
	}
	s.open()
	waitFor(t, "the newest report written", func() bool {
		r := s.report(t)
		return r.InboundFrom["c"] != "" && r.InboundFrom["b"] == ""
	})
	s.noBAfterGone(t)
}

// Run returns only once the last report handed over is written: the published claims
// match what the kernel is left holding.
func TestShutdownWritesTheLastReport(t *testing.T) {
	e := newEnv(t, api.ModeAccept, Config{})
	s := newSlowAPI(t, e)
	s.delay.Store(int64(200 * time.Millisecond))
	stop := e.run()
	defer s.open()
	waitFor(t, "ready", func() bool { return e.a.Status().Ready && inboundFrom(e, "198.18.0.2") })
	full := value(e.m.Syncs.WithLabelValues("full", "ok"))
	if err := e.cs.CoreV1().Nodes().Delete(t.Context(), "b", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b removed and a full sync handed its report over", func() bool {
		return !inboundFrom(e, "198.18.0.2") && value(e.m.Syncs.WithLabelValues("full", "ok")) > full
	})
	stop()
	if r := s.report(t); r.InboundFrom["b"] != "" {
		t.Errorf("after Run returned the report still claims b: %+v", r)
	}
	s.noBAfterGone(t)
}

// TestReportSlot drives the writer's pure state through sequences of hand-overs and
// writes: the newest report wins, a failed write is retried unless a newer one replaced
// it, and nothing older is ever written after something newer.
func TestReportSlot(t *testing.T) {
	rep := func(mode api.Mode) watch.Report { return watch.Report{NodeReport: api.NodeReport{Mode: mode}} }
	// Steps: "put M" hands over a report in mode M; "unannotate" hands over a job that only
	// removes the annotation (with a report in mode enforce it must not write); "take M" expects Take to return it
	// ("take -": nothing to write now); "ok"/"fail" end the write taken last; "want M"
	// expects Wanted ("want -": all written); "backoff D" expects Backoff(10ms, 80ms).
	cases := []struct {
		name  string
		steps []string
	}{
		{"one report", []string{"want -", "take -", "put off", "want off", "take off", "take -", "want off", "ok", "want -", "take -"}},
		{"latest wins while idle", []string{"put off", "put accept", "put encrypt", "take encrypt", "ok", "take -", "want -"}},
		{"latest wins during a write", []string{"put off", "take off", "put accept", "put encrypt", "take -", "want encrypt",
			"ok", "want encrypt", "take encrypt", "ok", "take -", "want -"}},
		{"a failed write is retried", []string{"put off", "take off", "fail", "want off", "backoff 10ms", "take off", "fail",
			"backoff 20ms", "take off", "ok", "backoff 0s", "want -"}},
		{"a newer report replaces a failed one", []string{"put off", "take off", "put accept", "fail", "take accept", "ok", "take -", "want -"}},
		{"backoff is capped", []string{"put off", "take off", "fail", "take off", "fail", "take off", "fail", "take off", "fail",
			"backoff 80ms", "take off", "fail", "backoff 80ms", "put accept", "take accept", "ok", "backoff 0s"}},
		{"an annotation removal keeps an unwritten report", []string{"put off", "put accept", "unannotate", "want accept", "take accept", "ok", "want -"}},
		{"an annotation removal alone writes no report", []string{"put off", "take off", "ok", "unannotate", "want -", "take -", "ok", "take -"}},
		{"an annotation removal keeps a report whose write failed", []string{"put off", "take off", "fail", "unannotate", "want off", "take off", "ok", "want -"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var s reportSlot
			var taken uint64
			var writtenSeq []uint64
			for i, st := range c.steps {
				var op, arg string
				if n, _ := fmt.Sscan(st, &op, &arg); n < 1 {
					t.Fatalf("bad step %q", st)
				}
				switch op {
				case "put":
					s.Put(reportJob{report: rep(api.Mode(arg)), reason: "changed", write: true})
				case "unannotate":
					s.Put(reportJob{report: rep(api.ModeEnforce), unannotate: true})
				case "take":
					j, ok := s.Take()
					got := "-"
					if ok {
						got, taken = string(j.report.Mode), j.seq
						if !j.write {
							got = "-"
						}
					}
					if got != arg {
						t.Fatalf("step %d (%s): took %s", i, st, got)
					}
				case "ok", "fail":
					if op == "ok" {
						writtenSeq = append(writtenSeq, taken)
					}
					s.Done(taken, op == "ok")
				case "want":
					got := "-"
					if w := s.Wanted(); w != nil {
						got = string(w.Mode)
					}
					if got != arg {
						t.Fatalf("step %d (%s): wanted %s", i, st, got)
					}
				case "backoff":
					if got := s.Backoff(10*time.Millisecond, 80*time.Millisecond).String(); got != arg {
						t.Fatalf("step %d (%s): backoff %s", i, st, got)
					}
				default:
					t.Fatalf("bad step %q", st)
				}
			}
			if !slices.IsSorted(writtenSeq) || len(slices.Compact(slices.Clone(writtenSeq))) != len(writtenSeq) {
				t.Errorf("written out of order: %v", writtenSeq)
			}
		})
	}
}

func TestPublishDue(t *testing.T) {
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	hb := 5 * time.Minute
	r := func(mode api.Mode, lastSync time.Time) *watch.Report {
		return &watch.Report{NodeReport: api.NodeReport{Mode: mode, LastSync: lastSync}}
	}
	cases := []struct {
		name    string
		prev    *watch.Report
		pending bool
		pubAt   time.Time
		want    string // "" when not due
	}{
		{"nothing before", nil, false, time.Time{}, "changed"},
		{"claims changed", r(api.ModeOff, now), false, now, "changed"},
		{"claims changed while a write is pending", r(api.ModeOff, now), true, now, "changed"},
		{"same claims, written just now", r(api.ModeAccept, now), false, now, ""},
		{"same claims, heartbeat due", r(api.ModeAccept, now), false, now.Add(-hb), "heartbeat"},
		{"same claims pending, heartbeat due: the pending write refreshes it", r(api.ModeAccept, now), true, now.Add(-hb), ""},
		{"adopted from the Node, recent", r(api.ModeAccept, now.Add(-time.Minute)), false, time.Time{}, ""},
		{"adopted from the Node, old", r(api.ModeAccept, now.Add(-hb)), false, time.Time{}, "heartbeat"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			reason, due := publishDue(c.prev, c.pending, c.pubAt, now, hb, *r(api.ModeAccept, now))
			if due != (c.want != "") || reason != c.want {
				t.Errorf("publishDue = %q, %v; want %q", reason, due, c.want)
			}
		})
	}
}
