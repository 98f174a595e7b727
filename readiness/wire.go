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

// MaxViewIDs bounds the IDs a view's list may hold when decoded: more than the node IDs a
// ring can hand out (docs/keys.md §2) is not a view.
const MaxViewIDs = 1 << 16

// EncodeView is v as a NodeView carries it.
func EncodeView(v View) *api.ReadinessView {
	return &api.ReadinessView{Keys: fmt.Sprintf("%016x", v.Keys), NotIn: encodeIDs(v.NotIn), NotOut: encodeIDs(v.NotOut)}
}

// encodeIDs packs sorted ids as varint deltas (base64; empty for none).
func encodeIDs(ids []uint32) string {
	if len(ids) == 0 {
		return ""
	}
	b := make([]byte, 0, len(ids)*2)
	prev := uint32(0)
	for _, id := range ids {
		b = binary.AppendUvarint(b, uint64(id-prev))
		prev = id
	}
	return base64.StdEncoding.EncodeToString(b)
}

// DecodeView parses a NodeView's content.
func DecodeView(w *api.ReadinessView) (View, error) {
	if w == nil {
		return View{}, errors.New("no readiness view")
	}
	k, err := strconv.ParseUint(w.Keys, 16, 64)
	if err != nil || len(w.Keys) != 16 {
		return View{}, fmt.Errorf("readiness view keys %q: want 16 hex digits", w.Keys)
	}
	v := View{Keys: k}
	if v.NotIn, err = decodeIDs(w.NotIn); err != nil {
		return View{}, fmt.Errorf("readiness view notIn: %w", err)
	}
	if v.NotOut, err = decodeIDs(w.NotOut); err != nil {
		return View{}, fmt.Errorf("readiness view notOut: %w", err)
	}
	return v, nil
}

// decodeIDs is encodeIDs' inverse; it refuses IDs that do not ascend strictly (a zero
// delta after the first), overflow 32 bits, or number more than MaxViewIDs.
func decodeIDs(s string) ([]uint32, error) {
	if s == "" {
		return nil, nil
	}
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return nil, err
	}
	var ids []uint32
	cur := uint64(0)
	for len(b) > 0 {
		d, n := binary.Uvarint(b)
		if n <= 0 {
			return nil, errors.New("truncated varint")
		}
		b = b[n:]
		if d == 0 && len(ids) > 0 {
			return nil, errors.New("ids do not ascend")
		}
		if d > 0xffffffff || cur+d > 0xffffffff {
			return nil, errors.New("id past 32 bits")
		}
		cur += d
		if len(ids) == MaxViewIDs {
			return nil, fmt.Errorf("more than %d ids", MaxViewIDs)
		}
		ids = append(ids, uint32(cur))
	}
	return ids, nil
}

// EncodeUsed is what a report's readiness says of the last view its agent used
// (Agent.Used): the view's digest (View.Digest), or api.UsedNone.
func EncodeUsed(keys uint64, ok bool) string {
	if !ok {
		return api.UsedNone
	}
	return fmt.Sprintf("%016x", keys)
}

// DecodeUsed parses EncodeUsed's text: the digest and whether a view was used; an error
// for anything else.
func DecodeUsed(s string) (uint64, bool, error) {
	if s == api.UsedNone {
		return 0, false, nil
	}
	k, err := strconv.ParseUint(s, 16, 64)
	if err != nil || len(s) != 16 {
		return 0, false, fmt.Errorf("readiness used %q: want 16 hex digits or %q", s, api.UsedNone)
	}
	return k, true, nil
}
