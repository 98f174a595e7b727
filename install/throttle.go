package install

import "time"

// bucket is a token bucket bounding how often the installer rewrites a config file, so
// that it never fights another writer in a tight loop: at most burst writes at once, then
// one per every. It is not safe for concurrent use (the watch loop owns it).
type bucket struct {
	burst  float64
	every  time.Duration
	tokens float64
	last   time.Time
}

func newBucket(burst int, every time.Duration) *bucket {
	return &bucket{burst: float64(burst), every: every, tokens: float64(burst)}
}

func (b *bucket) refill(now time.Time) {
	if !b.last.IsZero() && now.After(b.last) {
		b.tokens += float64(now.Sub(b.last)) / float64(b.every)
		if b.tokens > b.burst {
			b.tokens = b.burst
		}
	}
	b.last = now
}

// take consumes a token if one is available at now; otherwise it reports how long until
// one will be.
func (b *bucket) take(now time.Time) (bool, time.Duration) {
	b.refill(now)
	if b.tokens >= 1 {
		b.tokens--
		return true, 0
	}
	return false, time.Duration((1 - b.tokens) * float64(b.every))
}

// passScheduler decides when the watch loop's next pass runs. Retries and resyncs ask for
// a pass at a time (the earliest request wins). File events are debounced: a pass runs
// once events have been quiet for settle, so a file being written in several steps is
// read once it is complete, but no later than maxSettle after the first event of a burst,
// so a writer that never pauses cannot postpone repairs indefinitely.
type passScheduler struct {
	settle, maxSettle time.Duration
	at                time.Time // requested by retry/resync (zero: none)
	atEvent           time.Time // requested by events (zero: none)
	burst             time.Time // first event of the current burst
}

func (s *passScheduler) event(now time.Time) {
	if s.burst.IsZero() {
		s.burst = now
	}
	s.atEvent = now.Add(s.settle)
	if limit := s.burst.Add(s.maxSettle); limit.Before(s.atEvent) {
		s.atEvent = limit
	}
}

func (s *passScheduler) after(now time.Time, d time.Duration) {
	if t := now.Add(d); s.at.IsZero() || t.Before(s.at) {
		s.at = t
	}
}

// next is when the next pass is due, if any.
func (s *passScheduler) next() (time.Time, bool) {
	switch {
	case s.at.IsZero() && s.atEvent.IsZero():
		return time.Time{}, false
	case s.at.IsZero():
		return s.atEvent, true
	case s.atEvent.IsZero() || s.at.Before(s.atEvent):
		return s.at, true
	}
	return s.atEvent, true
}

// ran records that a pass started: every request so far is served by it.
func (s *passScheduler) ran() { *s = passScheduler{settle: s.settle, maxSettle: s.maxSettle} }
