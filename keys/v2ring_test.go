package keys

import (
	"bytes"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"
)

// v2Ring is sampleRing with generation 6 pending as a protocol v2 generation (a public
// salt, no root): the first step of the upgrade (docs/protocol-v2.md §8).
func v2Ring() *Ring {
	r := sampleRing()
	r.LastGeneration = 6
	r.Generations = append(r.Generations[1:], Generation{Number: 6, State: StatePending, Cipher: AES128GCM, ICVBytes: 8,
		Salt: bytes.Repeat([]byte{0xa6}, GenerationSaltBytes), Reason: "request", Created: t0.Add(2 * time.Hour)})
	return r
}

func TestV2GenerationInRing(t *testing.T) {
	r := v2Ring()
	if err := r.Validate(); err != nil {
		t.Fatal(err)
	}
	data, err := Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	back, err := Parse(data)
	if err != nil {
		t.Fatal(err)
	}
	g := back.Generation(6)
	if g == nil || !g.V2() || len(g.Root) != 0 || !bytes.Equal(g.Salt, r.Generations[1].Salt) || back.Generation(5).V2() {
		t.Fatalf("round trip: %+v", back.Generations)
	}
	if c := back.Clone(); &c.Generations[1].Salt[0] == &back.Generations[1].Salt[0] {
		t.Fatal("Clone shares the salt")
	}
	if got := PublishedGenerations(back); !slices.Equal(got, []uint32{6, 7}) {
		t.Fatalf("PublishedGenerations = %v, want the live v2 generation and the next", got)
	}

	for _, tc := range []struct {
		name, want string
		edit       func(g *Generation)
	}{
		{"neither", "neither root (protocol v1) nor salt (v2)", func(g *Generation) { g.Salt = nil }},
		{"both", "more than one of root (protocol v1), salt (v2)", func(g *Generation) { g.Root = secretRoot(0xc3) }},
		{"short salt", "salt is 16 bytes, want 32", func(g *Generation) { g.Salt = g.Salt[:16] }},
		{"empty salt", "salt is 0 bytes, want 32", func(g *Generation) { g.Salt = []byte{} }},
	} {
		r := v2Ring()
		tc.edit(&r.Generations[1])
		if err := r.Validate(); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
}

// TestHistoryPinsTheSalt: a v2 generation's salt is pinned like a root — a ring whose
// generation 6 has another salt than first seen went backwards (or was edited) — and a
// salt never matches a root fingerprint.
func TestHistoryPinsTheSalt(t *testing.T) {
	r := v2Ring()
	h := History{}.Observe(r)
	if err := h.Check(r); err != nil {
		t.Fatal(err)
	}
	edited := r.Clone()
	edited.Generations[1].Salt[0] ^= 1
	if err := h.Check(edited); !errors.Is(err, ErrRingWentBackwards) {
		t.Fatalf("another salt for generation 6: %v", err)
	}
	g := Generation{Salt: []byte(r.Generations[0].Root)}
	if g.Fingerprint() == RootFingerprint(r.Generations[0].Root) {
		t.Fatal("a salt with a root's bytes has the root's fingerprint")
	}
}
