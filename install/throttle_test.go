package install

import (
	"testing"
	"time"
)

func TestBucket(t *testing.T) {
	t0 := time.Unix(1000, 0)
	b := newBucket(3, 2*time.Second)
	for i := range 3 {
		if ok, _ := b.take(t0); !ok {
			t.Fatalf("burst token %d refused", i)
		}
	}
	ok, wait := b.take(t0)
	if ok || wait != 2*time.Second {
		t.Fatalf("empty bucket: ok=%v wait=%v, want refused for 2s", ok, wait)
	}
	if ok, wait := b.take(t0.Add(500 * time.Millisecond)); ok || wait != 1500*time.Millisecond {
		t.Fatalf("after 0.5s: ok=%v wait=%v", ok, wait)
	}
	if ok, _ := b.take(t0.Add(2 * time.Second)); !ok {
		t.Fatal("token not refilled after 2s")
	}
	// A long quiet period refills only up to the burst.
	later := t0.Add(time.Hour)
	n := 0
	for {
		if ok, _ := b.take(later); !ok {
			break
		}
		n++
	}
	if n != 3 {
		t.Fatalf("after an hour %d tokens, want 3", n)
	}
	// Against a writer that never stops, writes over a minute stay within burst + 60/2.
	b = newBucket(3, 2*time.Second)
	writes := 0
	for ms := 0; ms < 60000; ms += 20 {
		if ok, _ := b.take(t0.Add(time.Duration(ms) * time.Millisecond)); ok {
			writes++
		}
	}
	if writes > 3+30 || writes < 30 {
		t.Fatalf("%d writes in a minute of fighting, want 30..33", writes)
	}
}

func TestPassScheduler(t *testing.T) {
	t0 := time.Unix(1000, 0)
	ms := func(n int) time.Time { return t0.Add(time.Duration(n) * time.Millisecond) }
	s := &passScheduler{settle: 100 * time.Millisecond, maxSettle: time.Second}
	if _, ok := s.next(); ok {
		t.Fatal("pass due with nothing requested")
	}
	// One event: a pass once quiet for settle.
	s.event(ms(0))
	if at, _ := s.next(); !at.Equal(ms(100)) {
		t.Fatalf("single event: due %v", at.Sub(t0))
	}
	// Another event 50 ms later pushes it (the file is still being written).
	s.event(ms(50))
	if at, _ := s.next(); !at.Equal(ms(150)) {
		t.Fatalf("second event: due %v", at.Sub(t0))
	}
	// A writer that never pauses cannot push it past maxSettle.
	for n := 100; n < 3000; n += 50 {
		s.event(ms(n))
	}
	if at, _ := s.next(); !at.Equal(ms(1000)) {
		t.Fatalf("endless events: due %v, want 1s", at.Sub(t0))
	}
	// An earlier retry wins; a later one does not postpone.
	s.after(ms(0), 300*time.Millisecond)
	if at, _ := s.next(); !at.Equal(ms(300)) {
		t.Fatalf("retry: due %v", at.Sub(t0))
	}
	s.after(ms(0), 5*time.Second)
	if at, _ := s.next(); !at.Equal(ms(300)) {
		t.Fatalf("later retry postponed the pass: due %v", at.Sub(t0))
	}
	s.ran()
	if _, ok := s.next(); ok {
		t.Fatal("pass still due after it ran")
	}
	// A new burst starts its own maxSettle window.
	s.event(ms(5000))
	if at, _ := s.next(); !at.Equal(ms(5100)) {
		t.Fatalf("new burst: due %v", at.Sub(t0))
	}
}
