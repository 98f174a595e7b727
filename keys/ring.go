// Package keys is the pure core of secureoverlay's key management: the key ring stored in
// the Secret, per-pair SA key and SPI derivation, and the rotation and cutover state
// machines the master runs. It has no client-go, no clock and no I/O: times, node state
// and entropy are passed in.
//
// Invariants this package guarantees (and its tests check):
//   - Key bytes never leave through fmt, slog or an error: Key redacts itself for every
//     fmt verb and for slog, and every parse or validation error names the place (JSON
//     path, byte offset) and what is allowed, never any content of the data: no value, no
//     node name, not even the name of a field that is not in the schema.
//   - No two SAs share an AEAD key: an SA key is HKDF-SHA256 of the generation's random
//     root with an injective, direction-bound encoding of (cipher, ICV length, generation,
//     src IP, dst IP, src incarnation, dst incarnation) as info.
//   - No receiver sees two equal SPIs: an SPI encodes the generation modulo 4 and the
//     sender's master-assigned node ID; at most 3 generations are live at once and they are
//     consecutive, and a node ID is never reused while any generation that saw it is live.
//     Every SPI is at least 256 (SPIs 1..255 are reserved by RFC 4303).
//   - A ring that does not validate is never produced by Step and never accepted by Parse.
//   - Generation numbers never repeat (LastGeneration only grows), and the ring drops every
//     generation when the cluster reaches mode off, so re-enabling never reuses a key.
package keys

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sort"
	"strings"
	"time"

	"github.com/secureoverlay/secureoverlay/api"
)

// SchemaVersion is the ring format this build reads and writes.
const SchemaVersion = 1

// RootKeyBytes is the length of every generation's root key.
const RootKeyBytes = 32

// MaxLiveGenerations bounds pending+active+retiring generations; SPIs encode the
// generation modulo 4, so up to 4 consecutive generations would still be distinct, and we
// keep one value of headroom.
const MaxLiveGenerations = 3

// MaxNodeID is the largest node ID an SPI can carry (22 bits).
const MaxNodeID = 1<<22 - 1

// ErrInvalid is wrapped by every error about a ring that does not parse or validate.
var ErrInvalid = errors.New("invalid key ring")

// Key is secret key material. It never prints: every fmt verb, GoString, String and slog
// show only its length. Only MarshalJSON (for the Secret) emits the bytes.
type Key []byte

const redacted = "[redacted]"

// String implements fmt.Stringer without revealing the key.
func (k Key) String() string { return fmt.Sprintf("%s %d-byte key", redacted, len(k)) }

// GoString implements fmt.GoStringer without revealing the key.
func (k Key) GoString() string { return k.String() }

// Format implements fmt.Formatter so that %x, %X, %v, %+v, %#v, %s, %q and %d of a Key
// (alone or inside a struct, slice or map) never reveal it.
func (k Key) Format(f fmt.State, _ rune) { _, _ = io.WriteString(f, k.String()) }

// LogValue implements slog.LogValuer (the JSON handler would otherwise call MarshalJSON).
func (k Key) LogValue() slog.Value { return slog.StringValue(k.String()) }

// MarshalJSON emits the redaction marker: a Key inside any struct that gets JSON-encoded
// (slog's JSON handler, an API object) never leaks. Marshal writes the Secret through its
// own wire types instead.
func (k Key) MarshalJSON() ([]byte, error) { return json.Marshal(k.String()) }

// Equal reports whether two keys are the same bytes.
func (k Key) Equal(o Key) bool { return bytes.Equal(k, o) }

// State is a generation's place in its life cycle.
type State string

const (
	// StatePending: agents install inbound SAs; nobody sends with it yet.
	StatePending State = "pending"
	// StateActive: the generation senders use for every peer that reports it installed.
	StateActive State = "active"
	// StateRetiring: still installed inbound (and outbound to peers not yet switched)
	// until the grace period ends; then it is removed from the ring.
	StateRetiring State = "retiring"
)

func (s State) valid() bool {
	return s == StatePending || s == StateActive || s == StateRetiring
}

// Cipher names the ESP AEAD; both are rfc4106(gcm(aes)).
type Cipher string

const (
	AES128GCM Cipher = "aes128gcm"
	AES256GCM Cipher = "aes256gcm"
)

// KeyBytes is the AES key length of c (without the 4-byte rfc4106 salt), 0 if unknown.
func (c Cipher) KeyBytes() int {
	switch c {
	case AES128GCM:
		return 16
	case AES256GCM:
		return 32
	}
	return 0
}

// id is the cipher's byte in the derivation info.
func (c Cipher) id() byte {
	switch c {
	case AES128GCM:
		return 1
	case AES256GCM:
		return 2
	}
	return 0
}

// ValidICV reports whether n is an ICV length rfc4106 supports (8, 12 or 16 bytes).
func ValidICV(n int) bool { return n == 8 || n == 12 || n == 16 }

// Generation is one key generation.
type Generation struct {
	Number   uint32 `json:"number"`
	State    State  `json:"state"`
	Cipher   Cipher `json:"cipher"`
	ICVBytes int    `json:"icvBytes"`
	Root     Key    `json:"root"`
	// Salt is a protocol v2 generation's public salt (docs/keys.md §10): such a generation
	// has no Root — every pair's key comes from its two nodes' X25519 keys (NodeKeys).
	// Exactly one of Root and Salt is set.
	Salt []byte `json:"salt,omitempty"`
	// Sealed marks a v1 generation of the public ring (docs/keys.md §11): its root is
	// withheld, to be read from the Secret (Unseal). Exactly one of Root, Salt and Sealed
	// is set; the Secret's ring never has a sealed generation.
	Sealed bool `json:"sealed,omitempty"`
	// Reason says why it was created: initial, interval, request, sequence.
	Reason    string    `json:"reason,omitempty"`
	Created   time.Time `json:"created"`
	Activated time.Time `json:"activated,omitzero"`
	Retiring  time.Time `json:"retiring,omitzero"`
}

// LogValue summarises the generation for slog without the root key.
func (g Generation) LogValue() slog.Value {
	return slog.GroupValue(slog.Any("number", g.Number), slog.String("state", string(g.State)),
		slog.String("cipher", string(g.Cipher)))
}

// NodeID is a node's small, stable ID (used in SPIs). When the node leaves, the ID is held
// until every generation that existed while the node was present has been removed.
type NodeID struct {
	Name string `json:"name"`
	ID   uint32 `json:"id"`
	// Released is set when the node left; ReleasedAt is the newest generation number at
	// that time. The entry is dropped (the ID freed) once no live generation is <= it.
	Released   bool   `json:"released,omitempty"`
	ReleasedAt uint32 `json:"releasedAt,omitempty"`
}

// Ring is the content of the Secret's data key: keys plus the cluster mode, one snapshot.
type Ring struct {
	SchemaVersion int `json:"schemaVersion"`
	// Mode is the cutover step the master has set; Target is where it is heading.
	Mode        api.Mode  `json:"mode"`
	Target      api.Mode  `json:"target"`
	ModeChanged time.Time `json:"modeChanged,omitzero"`
	// LastGeneration is the highest generation number ever created; it never decreases.
	LastGeneration uint32 `json:"lastGeneration"`
	// LastRotateRequest is the last operator rotation request ID the master acted on.
	LastRotateRequest string       `json:"lastRotateRequest,omitempty"`
	Generations       []Generation `json:"generations"`
	Nodes             []NodeID     `json:"nodes"`
}

// NewRing is the empty ring of a cluster that never enabled encryption.
func NewRing() *Ring {
	return &Ring{SchemaVersion: SchemaVersion, Mode: api.ModeOff, Target: api.ModeOff,
		Generations: []Generation{}, Nodes: []NodeID{}}
}

// LogValue summarises the ring for slog without key material.
func (r *Ring) LogValue() slog.Value {
	if r == nil {
		return slog.StringValue("<nil ring>")
	}
	gens := make([]string, 0, len(r.Generations))
	for _, g := range r.Generations {
		gens = append(gens, fmt.Sprintf("%d:%s", g.Number, g.State))
	}
	return slog.GroupValue(slog.String("mode", string(r.Mode)), slog.String("target", string(r.Target)),
		slog.Any("generations", gens), slog.Int("nodes", len(r.Nodes)))
}

// Clone returns a deep copy.
func (r *Ring) Clone() *Ring {
	c := *r
	c.Generations = make([]Generation, len(r.Generations))
	for i, g := range r.Generations {
		g.Root = append(Key(nil), g.Root...)
		if g.Salt != nil {
			g.Salt = append([]byte(nil), g.Salt...)
		}
		c.Generations[i] = g
	}
	c.Nodes = append([]NodeID{}, r.Nodes...)
	return &c
}

// Active returns the active generation, or nil.
func (r *Ring) Active() *Generation { return r.byState(StateActive) }

// Pending returns the pending generation, or nil.
func (r *Ring) Pending() *Generation { return r.byState(StatePending) }

func (r *Ring) byState(s State) *Generation {
	for i := range r.Generations {
		if r.Generations[i].State == s {
			return &r.Generations[i]
		}
	}
	return nil
}

// Generation returns generation n, or nil.
func (r *Ring) Generation(n uint32) *Generation {
	for i := range r.Generations {
		if r.Generations[i].Number == n {
			return &r.Generations[i]
		}
	}
	return nil
}

// NodeID returns the ID assigned to the node name (0 if none or released).
func (r *Ring) NodeID(name string) uint32 {
	for _, n := range r.Nodes {
		if n.Name == name && !n.Released {
			return n.ID
		}
	}
	return 0
}

// Numbers lists the live generation numbers, oldest first.
func (r *Ring) Numbers() []uint32 {
	out := make([]uint32, 0, len(r.Generations))
	for _, g := range r.Generations {
		out = append(out, g.Number)
	}
	return out
}

// wireRing and wireGeneration are the Secret's JSON form; roots are standard base64
// (encoding/json's []byte encoding). Only Parse and Marshal use them.
type wireRing struct {
	SchemaVersion     int              `json:"schemaVersion"`
	Mode              api.Mode         `json:"mode"`
	Target            api.Mode         `json:"target"`
	ModeChanged       time.Time        `json:"modeChanged,omitzero"`
	LastGeneration    uint32           `json:"lastGeneration"`
	LastRotateRequest string           `json:"lastRotateRequest,omitempty"`
	Generations       []wireGeneration `json:"generations"`
	Nodes             []NodeID         `json:"nodes"`
}

type wireGeneration struct {
	Number    uint32    `json:"number"`
	State     State     `json:"state"`
	Cipher    Cipher    `json:"cipher"`
	ICVBytes  int       `json:"icvBytes"`
	Root      []byte    `json:"root,omitempty"`
	Salt      []byte    `json:"salt,omitempty"`
	Sealed    bool      `json:"sealed,omitempty"`
	Reason    string    `json:"reason,omitempty"`
	Created   time.Time `json:"created"`
	Activated time.Time `json:"activated,omitzero"`
	Retiring  time.Time `json:"retiring,omitzero"`
}

func toWire(r *Ring) wireRing {
	w := wireRing{SchemaVersion: r.SchemaVersion, Mode: r.Mode, Target: r.Target, ModeChanged: r.ModeChanged,
		LastGeneration: r.LastGeneration, LastRotateRequest: r.LastRotateRequest,
		Generations: make([]wireGeneration, 0, len(r.Generations)), Nodes: append([]NodeID{}, r.Nodes...)}
	for _, g := range r.Generations {
		w.Generations = append(w.Generations, wireGeneration{Number: g.Number, State: g.State, Cipher: g.Cipher,
			ICVBytes: g.ICVBytes, Root: g.Root, Salt: g.Salt, Sealed: g.Sealed, Reason: g.Reason, Created: g.Created, Activated: g.Activated, Retiring: g.Retiring})
	}
	return w
}

func fromWire(w wireRing) *Ring {
	r := &Ring{SchemaVersion: w.SchemaVersion, Mode: w.Mode, Target: w.Target, ModeChanged: w.ModeChanged,
		LastGeneration: w.LastGeneration, LastRotateRequest: w.LastRotateRequest,
		Generations: make([]Generation, 0, len(w.Generations)), Nodes: append([]NodeID{}, w.Nodes...)}
	for _, g := range w.Generations {
		r.Generations = append(r.Generations, Generation{Number: g.Number, State: g.State, Cipher: g.Cipher,
			ICVBytes: g.ICVBytes, Root: Key(g.Root), Salt: g.Salt, Sealed: g.Sealed, Reason: g.Reason, Created: g.Created, Activated: g.Activated, Retiring: g.Retiring})
	}
	return r
}

// Validate checks every invariant of a ring. Errors wrap ErrInvalid and name the field by
// its JSON path (generations[1].cipher, nodes[3]) and what is allowed; they never contain
// a value of the ring: no node name, no string, no number beyond lengths and counts
// (Parse's errors follow the same rule).
func (r *Ring) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{ErrInvalid}, a...)...)
	}
	if r.SchemaVersion != SchemaVersion {
		return bad("unsupported schemaVersion (this build reads %d)", SchemaVersion)
	}
	if !r.Mode.Valid() {
		return bad("mode %s", notOneOf(api.Modes))
	}
	if !r.Target.Valid() {
		return bad("target %s", notOneOf(api.Modes))
	}
	seen := map[uint32]int{}
	mod4 := map[uint32]int{}
	count := map[State]int{}
	for i, g := range r.Generations {
		switch {
		case g.Number == 0:
			return bad("generations[%d].number is 0 (numbers start at 1)", i)
		case g.Number > r.LastGeneration:
			return bad("generations[%d].number is above lastGeneration", i)
		case !g.State.valid():
			return bad("generations[%d].state %s", i, notOneOf(states))
		case g.Cipher.KeyBytes() == 0:
			return bad("generations[%d].cipher %s", i, notOneOf(ciphers))
		case !ValidICV(g.ICVBytes):
			return bad("generations[%d].icvBytes %s", i, notOneOf(icvs))
		case len(g.Root) == 0 && g.Salt == nil && !g.Sealed:
			return bad("generations[%d] has neither root (protocol v1) nor salt (v2)", i)
		case b2i(len(g.Root) != 0)+b2i(g.Salt != nil)+b2i(g.Sealed) > 1:
			return bad("generations[%d] has more than one of root (protocol v1), salt (v2) and sealed (v1, public ring)", i)
		case g.Salt == nil && !g.Sealed && len(g.Root) != RootKeyBytes:
			return bad("generations[%d].root is %d bytes, want %d", i, len(g.Root), RootKeyBytes)
		case g.Salt != nil && len(g.Salt) != GenerationSaltBytes:
			return bad("generations[%d].salt is %d bytes, want %d", i, len(g.Salt), GenerationSaltBytes)
		case g.Reason != "" && !validReason(g.Reason):
			return bad("generations[%d].reason %s", i, notOneOf(Reasons))
		case g.Created.IsZero():
			return bad("generations[%d].created is missing", i)
		case g.State != StatePending && g.Activated.IsZero():
			return bad("generations[%d].activated is missing (required unless the state is %s)", i, StatePending)
		case g.State == StateRetiring && g.Retiring.IsZero():
			return bad("generations[%d].retiring is missing (required when the state is %s)", i, StateRetiring)
		}
		if o, ok := seen[g.Number]; ok {
			return bad("generations[%d] and generations[%d] have the same number", o, i)
		}
		if o, ok := mod4[g.Number%4]; ok {
			return bad("generations[%d] and generations[%d] share an SPI generation field (number mod 4)", o, i)
		}
		seen[g.Number] = i
		mod4[g.Number%4] = i
		count[g.State]++
	}
	if n := len(r.Generations); n > MaxLiveGenerations {
		return bad("%d live generations, at most %d allowed", n, MaxLiveGenerations)
	}
	if count[StateActive] > 1 || count[StatePending] > 1 {
		return bad("%d active and %d pending generations, at most one of each allowed", count[StateActive], count[StatePending])
	}
	if r.Mode != api.ModeOff && count[StateActive] != 1 {
		// r.Mode is one of api.Modes here: printing it quotes the schema, not the data.
		return bad("mode %s needs exactly one active generation, found %d", r.Mode, count[StateActive])
	}
	names := map[string]int{}
	ids := map[uint32]int{}
	for i, n := range r.Nodes {
		switch {
		case n.Name == "":
			return bad("nodes[%d].name is empty", i)
		case !validNodeName(n.Name):
			return bad("nodes[%d].name is not a valid node name (a lowercase RFC 1123 subdomain of at most 253 characters)", i)
		case n.ID == 0 || n.ID > MaxNodeID:
			return bad("nodes[%d].id is outside 1..%d", i, MaxNodeID)
		}
		if o, ok := names[n.Name]; ok && !n.Released {
			return bad("nodes[%d].name repeats nodes[%d].name (only released entries may share a name)", i, o)
		}
		if o, ok := ids[n.ID]; ok {
			return bad("nodes[%d] and nodes[%d] share an id", o, i)
		}
		if !n.Released {
			names[n.Name] = i
		}
		ids[n.ID] = i
	}
	return nil
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// Reasons are the values of Generation.Reason Step writes (why a generation was created).
var Reasons = []string{"initial", "interval", "request", "sequence"}

func validReason(s string) bool {
	for _, r := range Reasons {
		if s == r {
			return true
		}
	}
	return false
}

var (
	states  = []State{StatePending, StateActive, StateRetiring}
	ciphers = []Cipher{AES128GCM, AES256GCM}
	icvs    = []int{8, 12, 16}
)

// notOneOf says what a field must be, from the schema's own names: "is not one of a, b".
func notOneOf[T any](allowed []T) string {
	s := make([]string, len(allowed))
	for i, a := range allowed {
		s[i] = fmt.Sprint(a)
	}
	return "is not one of " + strings.Join(s, ", ")
}

// validNodeName reports whether s is a Kubernetes node name: a lowercase RFC 1123
// subdomain (what the API server enforces for Node objects).
func validNodeName(s string) bool {
	if len(s) > 253 {
		return false
	}
	for _, label := range strings.Split(s, ".") {
		if label == "" || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for i := 0; i < len(label); i++ {
			if c := label[i]; !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}

// Marshal validates and encodes a ring for the Secret (indented, stable order).
func Marshal(r *Ring) ([]byte, error) {
	if err := r.Validate(); err != nil {
		return nil, err
	}
	c := r.Clone()
	sort.Slice(c.Generations, func(i, j int) bool { return c.Generations[i].Number < c.Generations[j].Number })
	sort.Slice(c.Nodes, func(i, j int) bool { return c.Nodes[i].ID < c.Nodes[j].ID })
	b, err := json.MarshalIndent(toWire(c), "", "  ")
	if err != nil {
		return nil, errors.New("encode key ring: json encoding failed")
	}
	return b, nil
}
