package keys

import (
	"errors"
	"fmt"
)

// The public ring (docs/keys.md §11): what agents read instead of the Secret.

// ErrRootNotYet is wrapped by Unseal when the Secret's ring does not hold a sealed
// generation's root (yet): the agent keeps its kernel as it is until the Secret changes.
var ErrRootNotYet = errors.New("the key Secret does not hold this generation's root yet")

// Public returns r as the public ring: a clone with every v1 generation's root replaced
// by Sealed. Nothing of it is secret.
func Public(r *Ring) *Ring {
	c := r.Clone()
	for i := range c.Generations {
		g := &c.Generations[i]
		if g.Salt == nil && len(g.Root) > 0 {
			clear(g.Root)
			g.Root, g.Sealed = nil, true
		}
	}
	return c
}

// HasRoots reports whether r has a v1 generation (with a root, or sealed).
func (r *Ring) HasRoots() bool {
	for i := range r.Generations {
		if g := &r.Generations[i]; g.Salt == nil {
			return true
		}
	}
	return false
}

// Sealed reports whether r has a sealed generation (a public ring that needs the Secret).
func (r *Ring) Sealed() bool {
	for i := range r.Generations {
		if r.Generations[i].Sealed {
			return true
		}
	}
	return false
}

// Unseal returns the public ring pub with each sealed generation's root taken from the
// Secret's ring secret: the generation of the same number, cipher, ICV and creation time
// (numbers never repeat, so that is the same generation in any later version of the
// ring). pub itself is not changed; a pub without sealed generations is returned as is.
// Errors name the generation by position only (no value of the ring, as Parse's).
func Unseal(pub, secret *Ring) (*Ring, error) {
	if !pub.Sealed() {
		return pub, nil
	}
	out := pub.Clone()
	for i := range out.Generations {
		g := &out.Generations[i]
		if !g.Sealed {
			continue
		}
		var s *Generation
		if secret != nil {
			s = secret.Generation(g.Number)
		}
		if s == nil || s.Sealed || len(s.Root) != RootKeyBytes || s.Cipher != g.Cipher || s.ICVBytes != g.ICVBytes || !s.Created.Equal(g.Created) {
			return nil, fmt.Errorf("public ring generations[%d] is sealed: %w", i, ErrRootNotYet)
		}
		g.Root, g.Sealed = append(Key(nil), s.Root...), false
	}
	if err := out.Validate(); err != nil {
		return nil, err
	}
	return out, nil
}

// MarshalPublic encodes Public(r) for the ConfigMap.
func MarshalPublic(r *Ring) ([]byte, error) { return Marshal(Public(r)) }
