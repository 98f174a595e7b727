package readiness

import (
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"

	"github.com/secureoverlay/secureoverlay/api"
)

// MaxRefused bounds the refused peers a status names (docs/protocol-v2.md §6): the rest
// are counted, and their buckets cannot be confirmed until the list shrinks.
const MaxRefused = 8

// digestBytes is the size of one bucket digest on the wire (48 bits).
const digestBytes = 6

// Encode is s as a report carries it.
func Encode(s Status) *api.ReadinessStatus {
	w := &api.ReadinessStatus{ID: s.ID, Self: fmt.Sprintf("%016x", uint64(s.Self)), In: encodeBuckets(s.In), Out: encodeBuckets(s.Out)}
	if len(s.Refused) > MaxRefused {
		w.Refused, w.RefusedMore = append([]uint32(nil), s.Refused[:MaxRefused]...), len(s.Refused)-MaxRefused
	} else if len(s.Refused) > 0 {
		w.Refused = append([]uint32(nil), s.Refused...)
	}
	return w
}

func encodeBuckets(ds []uint64) string {
	b := make([]byte, 0, len(ds)*digestBytes)
	var x [8]byte
	for _, d := range ds {
		binary.BigEndian.PutUint64(x[:], d)
		b = append(b, x[8-digestBytes:]...)
	}
	return base64.StdEncoding.EncodeToString(b)
}

// Decode parses a report's readiness with the given number of buckets. A status whose
// refused list overflowed (RefusedMore) is decoded with its buckets as they are: the
// unnamed refused peers make their buckets differ from the master's, which then waits.
func Decode(w *api.ReadinessStatus, buckets int) (Status, error) {
	if w == nil {
		return Status{}, errors.New("no readiness status")
	}
	self, err := strconv.ParseUint(w.Self, 16, 64)
	if err != nil || len(w.Self) != 16 {
		return Status{}, fmt.Errorf("readiness self %q: want 16 hex digits", w.Self)
	}
	in, err := decodeBuckets(w.In, buckets)
	if err != nil {
		return Status{}, fmt.Errorf("readiness in: %w", err)
	}
	out, err := decodeBuckets(w.Out, buckets)
	if err != nil {
		return Status{}, fmt.Errorf("readiness out: %w", err)
	}
	if len(w.Refused) > MaxRefused {
		return Status{}, fmt.Errorf("readiness refused: %d ids, at most %d", len(w.Refused), MaxRefused)
	}
	return Status{ID: w.ID, Self: K(self), In: in, Out: out, Refused: append([]uint32(nil), w.Refused...)}, nil
}

func decodeBuckets(s string, buckets int) ([]uint64, error) {
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return nil, err
	}
	if len(b) != buckets*digestBytes {
		return nil, fmt.Errorf("%d bytes, want %d buckets of %d", len(b), buckets, digestBytes)
	}
	out := make([]uint64, buckets)
	for j := range out {
		var x [8]byte
		copy(x[8-digestBytes:], b[j*digestBytes:])
		out[j] = binary.BigEndian.Uint64(x[:])
	}
	return out, nil
}
