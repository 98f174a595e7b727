package desired

import (
	"crypto/subtle"
	"fmt"
	"io"
	"log/slog"
)

// Key is an AEAD key blob for rfc4106(gcm(aes)): the AES key followed by the 4-byte salt
// (20 or 36 bytes). It is immutable and comparable with ==, so States stay comparable, and
// it never prints its bytes: every fmt verb, slog and JSON/text marshalling show only
// "[redacted N-byte key]".
type Key struct {
	b string // immutable copy; never exposed except through Bytes
}

// NewKey copies b into a Key.
func NewKey(b []byte) Key { return Key{b: string(b)} }

// Bytes returns a copy of the key bytes, for the netlink writer only.
func (k Key) Bytes() []byte { return []byte(k.b) }

// Len is the key length in bytes.
func (k Key) Len() int { return len(k.b) }

// IsZero reports whether k holds no bytes.
func (k Key) IsZero() bool { return k.b == "" }

// Equal compares two keys in constant time (for equal lengths).
func (k Key) Equal(o Key) bool {
	return subtle.ConstantTimeCompare([]byte(k.b), []byte(o.b)) == 1
}

// String redacts the key.
func (k Key) String() string { return fmt.Sprintf("[redacted %d-byte key]", len(k.b)) }

// GoString redacts the key for %#v.
func (k Key) GoString() string { return k.String() }

// Format redacts the key for every verb (%v %+v %#v %s %q %x %X %d ...).
func (k Key) Format(f fmt.State, _ rune) { _, _ = io.WriteString(f, k.String()) }

// LogValue redacts the key for slog.
func (k Key) LogValue() slog.Value { return slog.StringValue(k.String()) }

// MarshalText redacts the key for encoding/json, yaml and friends.
func (k Key) MarshalText() ([]byte, error) { return []byte(k.String()), nil }
