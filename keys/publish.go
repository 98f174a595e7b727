package keys

// MaxPublishedKeys bounds the public keys one NodeKeys object carries: the live
// generations (at most 3) and the next one.
const MaxPublishedKeys = 4

// PublishedGenerations returns, ascending, the generations an agent holds an X25519 key
// pair for and publishes in its NodeKeys (docs/keys.md §10, "Published keys"): the next
// generation the master will create, lastGeneration + 1, so its public keys are out before
// it exists (docs/protocol-v2.md §5). Protocol v1 generations carry a root and need no key
// pair; v2 generations (not made by any master yet) will be added here when the ring can
// name them. A nil ring (no Secret yet, or one that does not parse) publishes nothing: the
// next number is unknown.
func PublishedGenerations(r *Ring) []uint32 {
	if r == nil || r.LastGeneration == ^uint32(0) {
		return nil
	}
	return []uint32{r.LastGeneration + 1}
}
