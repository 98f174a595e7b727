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
