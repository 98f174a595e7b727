package keys

import "slices"

// MaxPublishedKeys bounds the public keys one NodeKeys object carries: the live
// generations (at most 3) and the next one.
const MaxPublishedKeys = 4

// PublishedGenerations returns, ascending, the generations an agent holds an X25519 key
// pair for and publishes in its NodeKeys (docs/keys.md §10, "Published keys"): every live
// protocol v2 generation of the ring (its SAs are derived with the key pair) and the next
// generation the master will create, lastGeneration + 1, so its public keys are out before
// it exists (docs/protocol-v2.md §5). Protocol v1 generations carry a root and need no key
// pair. A nil ring (no Secret yet, or one that does not parse) publishes nothing: neither
// the live nor the next generations are known.
func PublishedGenerations(r *Ring) []uint32 {
	if r == nil {
		return nil
	}
	var out []uint32
	for i := range r.Generations {
		if g := &r.Generations[i]; g.V2() {
			out = append(out, g.Number)
		}
	}
	if r.LastGeneration != ^uint32(0) {
		out = append(out, r.LastGeneration+1)
	}
	slices.Sort(out)
	return slices.Compact(out)
}
