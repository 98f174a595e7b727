package keys

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"strings"
	"testing"
	"time"
)

// TestPublicRing: the public ring withholds every v1 root and nothing else, parses back,
// and Unseal with the Secret's ring gives the Secret's ring again (docs/keys.md §11).
func TestPublicRing(t *testing.T) {
	r := v2Ring() // generation 5 v1 (active), 6 v2 (pending)
	orig := r.Clone()
	data, err := MarshalPublic(r)
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range orig.Generations {
		if g.Root == nil {
			continue
		}
		for _, enc := range []string{base64.StdEncoding.EncodeToString(g.Root), hex.EncodeToString(g.Root), string(g.Root)} {
			if strings.Contains(string(data), enc) {
				t.Fatalf("the public ring holds generation %d's root", g.Number)
			}
		}
	}
	if !bytes.Equal(r.Generation(5).Root, orig.Generation(5).Root) {
		t.Fatal("Public changed its argument")
	}
	pub, err := Parse(data)
	if err != nil {
		t.Fatal(err)
	}
	if g := pub.Generation(5); !g.Sealed || g.Root != nil || g.V2() || !pub.Sealed() || !pub.HasRoots() {
		t.Fatalf("generation 5 of the public ring = %+v", g)
	}
	if g := pub.Generation(6); g.Sealed || !bytes.Equal(g.Salt, orig.Generation(6).Salt) {
		t.Fatalf("generation 6 of the public ring = %+v", g)
	}
	open, err := Unseal(pub, orig)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := Marshal(orig)
	if got, _ := Marshal(open); !bytes.Equal(got, want) {
		t.Fatalf("unsealed ring differs from the Secret's:\n%s\nwant\n%s", got, want)
	}
	if pub.Generation(5).Root != nil {
		t.Fatal("Unseal changed the public ring")
	}
	// A Secret a step ahead (6 active, 5 retiring) still unseals 5: it is the same generation.
	ahead := orig.Clone()
	ahead.Generation(5).State, ahead.Generation(5).Retiring = StateRetiring, t0.Add(3*time.Hour)
	ahead.Generation(6).State, ahead.Generation(6).Activated = StateActive, t0.Add(3*time.Hour)
	if open, err := Unseal(pub, ahead); err != nil || open.Generation(5).State != StateActive {
		t.Fatalf("Unseal with a newer Secret: %v", err)
	}

	// A v2-only ring has nothing to withhold: the public ring is the ring.
	v2only := orig.Clone()
	v2only.Generations = v2only.Generations[1:]
	v2only.Generations[0].State, v2only.Generations[0].Activated = StateActive, t0.Add(3*time.Hour)
	if Public(v2only).Sealed() || v2only.HasRoots() {
		t.Fatal("a v2-only ring is sealed or has roots")
	}
	if same, err := Unseal(v2only, nil); err != nil || same != v2only {
		t.Fatalf("Unseal of an unsealed ring: %v", err)
	}
}

// TestUnsealRefuses: a Secret without the generation, or with another generation of that
// number, is "not yet"; the error names no value of either ring.
func TestUnsealRefuses(t *testing.T) {
	orig := v2Ring()
	pub := Public(orig)
	for _, tc := range []struct {
		name string
		mod  func(*Ring) *Ring
	}{
		{"no secret", func(*Ring) *Ring { return nil }},
		{"generation missing", func(r *Ring) *Ring { r.Generations = r.Generations[1:]; return r }},
		{"other creation time", func(r *Ring) *Ring { g := r.Generation(5); g.Created = g.Created.Add(time.Second); return r }},
		{"other cipher", func(r *Ring) *Ring { r.Generation(5).Cipher = AES256GCM; return r }},
		{"other icv", func(r *Ring) *Ring { r.Generation(5).ICVBytes = 16; return r }},
		{"sealed in the secret", func(r *Ring) *Ring { return Public(r) }},
	} {
		_, err := Unseal(pub, tc.mod(orig.Clone()))
		if !errors.Is(err, ErrRootNotYet) {
			t.Errorf("%s: err = %v, want ErrRootNotYet", tc.name, err)
			continue
		}
		if strings.ContainsAny(err.Error(), "56") {
			t.Errorf("%s: the error %q carries a generation number", tc.name, err)
		}
	}
	// Sealed alongside a root or a salt is invalid.
	for _, mod := range []func(*Generation){
		func(g *Generation) { g.Sealed = true },
	} {
		r := orig.Clone()
		mod(r.Generation(5))
		if err := r.Validate(); !errors.Is(err, ErrInvalid) {
			t.Errorf("sealed with a root: %v", err)
		}
		r = orig.Clone()
		mod(r.Generation(6))
		if err := r.Validate(); !errors.Is(err, ErrInvalid) {
			t.Errorf("sealed with a salt: %v", err)
		}
	}
}
