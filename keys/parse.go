package keys

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"
)

// Parse decodes and validates a ring. Errors wrap ErrInvalid and never contain any of the
// data: not a value, not a field name that is not in the schema, not a fragment quoted by
// encoding/json. They name the place by its JSON path (generations[1].cipher, nodes[3])
// and byte offset, and say what is allowed; that is all.
//
// Field names are matched exactly (encoding/json would also accept "Mode" for "mode"); a
// field given twice, an unknown field, trailing data and wrong JSON types are refused. A
// JSON null stands for an absent field.
func Parse(data []byte) (*Ring, error) {
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, fmt.Errorf("%w: empty", ErrInvalid)
	}
	p := &parser{data: data, dec: json.NewDecoder(bytes.NewReader(data))}
	p.dec.UseNumber()
	w, err := p.ring()
	if err != nil {
		return nil, err
	}
	if off := p.dec.InputOffset(); len(bytes.TrimSpace(data[off:])) != 0 {
		rest := data[off:]
		return nil, p.fail("trailing data after the JSON object at byte offset %d", off+int64(len(rest)-len(bytes.TrimLeft(rest, " \t\r\n"))))
	}
	r := fromWire(w)
	if err := r.Validate(); err != nil {
		return nil, err
	}
	return r, nil
}

// parser decodes the ring token by token against the schema, so that every error is built
// here from the schema's names and byte offsets. encoding/json's own messages are never
// used: they quote unknown field names, parts of values and offending characters.
type parser struct {
	data []byte
	dec  *json.Decoder
}

func (p *parser) fail(format string, a ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrInvalid}, a...)...)
}

// start returns the offset where the token after offset off begins (skipping whitespace
// and the separators the decoder consumes with the next token).
func (p *parser) start(off int64) int64 {
	for off < int64(len(p.data)) {
		switch p.data[off] {
		case ' ', '\t', '\r', '\n', ',', ':':
			off++
			continue
		}
		break
	}
	return off
}

// next reads one token inside path and returns it with its starting offset.
func (p *parser) next(path string) (json.Token, int64, error) {
	before := p.dec.InputOffset()
	tok, err := p.dec.Token()
	if err != nil {
		return nil, 0, p.tokenError(err, path)
	}
	return tok, p.start(before), nil
}

// tokenError describes a decoder error by its kind and offset only.
func (p *parser) tokenError(err error, path string) error {
	var syn *json.SyntaxError
	switch {
	case errors.As(err, &syn):
		// The Decoder's offsets are not always from the start of the input; a fresh scan
		// of the whole input finds the same first error with an exact offset.
		off := p.dec.InputOffset()
		if errors.As(json.Unmarshal(p.data, new(json.RawMessage)), &syn) && syn.Offset > 0 {
			off = syn.Offset - 1 // the offending byte
		}
		return p.fail("malformed JSON at byte offset %d (%s)", off, reading(path))
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return p.fail("truncated JSON: the data ends at byte offset %d (%s)", len(p.data), reading(path))
	}
	return p.fail("undecodable JSON after byte offset %d (%s)", p.dec.InputOffset(), reading(path))
}

// reading names what the parser was reading when the JSON broke off.
func reading(path string) string {
	if path == "" {
		return "reading the key ring"
	}
	return "reading " + path
}

// within names a place for an error: "at the top level" or "inside generations[1]".
func within(path string) string {
	if path == "" {
		return "at the top level"
	}
	return "inside " + path
}

func member(path, field string) string {
	if path == "" {
		return field
	}
	return path + "." + field
}

// jsonKind names the JSON type of a token (never its content).
func jsonKind(tok json.Token) string {
	switch t := tok.(type) {
	case json.Delim:
		if t == '{' {
			return "an object"
		}
		if t == '[' {
			return "an array"
		}
		return "a closing delimiter"
	case string:
		return "a string"
	case json.Number:
		return "a number"
	case bool:
		return "a boolean"
	case nil:
		return "null"
	}
	return "a value"
}

func (p *parser) wrongType(path string, tok json.Token, off int64, want string) error {
	return p.fail("%s: found %s where %s was expected (byte offset %d)", path, jsonKind(tok), want, off)
}

// object reads an object at path whose fields must be among known, calling field for each
// (which reads the value). null is an absent object when nullOK.
func (p *parser) object(path string, nullOK bool, known []string, field func(name, path string) error) error {
	tok, off, err := p.next(path)
	if err != nil {
		return err
	}
	if tok == nil && nullOK {
		return nil
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		what := path
		if what == "" {
			what = "the key ring"
		}
		return p.wrongType(what, tok, off, "an object")
	}
	seen := map[string]bool{}
	for p.dec.More() {
		tok, off, err := p.next(path)
		if err != nil {
			return err
		}
		name, _ := tok.(string) // the decoder only returns strings as object keys
		if !contains(known, name) {
			return p.fail("unknown field at byte offset %d (%s); the fields there are %s", off, within(path), strings.Join(known, ", "))
		}
		if seen[name] {
			return p.fail("%s is given twice (byte offset %d)", member(path, name), off)
		}
		seen[name] = true
		if err := field(name, member(path, name)); err != nil {
			return err
		}
	}
	_, _, err = p.next(path) // '}'
	return err
}

// array reads an array at path (null: absent), calling elem for each element.
func (p *parser) array(path string, elem func(path string) error) error {
	tok, off, err := p.next(path)
	if err != nil {
		return err
	}
	if tok == nil {
		return nil
	}
	if d, ok := tok.(json.Delim); !ok || d != '[' {
		return p.wrongType(path, tok, off, "an array")
	}
	for i := 0; p.dec.More(); i++ {
		if err := elem(fmt.Sprintf("%s[%d]", path, i)); err != nil {
			return err
		}
	}
	_, _, err = p.next(path) // ']'
	return err
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// scalar reads one value; ok is false for null. Each typed reader below refuses any other
// kind of token (an object or array included) by its kind.
func (p *parser) scalar(path string) (tok json.Token, off int64, ok bool, err error) {
	tok, off, err = p.next(path)
	if err != nil {
		return nil, 0, false, err
	}
	return tok, off, tok != nil, nil
}

func (p *parser) str(path string, dst *string) error {
	tok, off, ok, err := p.scalar(path)
	if err != nil || !ok {
		return err
	}
	s, isStr := tok.(string)
	if !isStr {
		return p.wrongType(path, tok, off, "a string")
	}
	*dst = s
	return nil
}

func (p *parser) boolean(path string, dst *bool) error {
	tok, off, ok, err := p.scalar(path)
	if err != nil || !ok {
		return err
	}
	b, isBool := tok.(bool)
	if !isBool {
		return p.wrongType(path, tok, off, "true or false")
	}
	*dst = b
	return nil
}

// integer reads an integer that fits a signed 64-bit or, with u32, an unsigned 32-bit Go
// field (what encoding/json accepts for the field's type).
func (p *parser) integer(path string, u32 bool) (int64, error) {
	tok, off, ok, err := p.scalar(path)
	if err != nil || !ok {
		return 0, err
	}
	n, isNum := tok.(json.Number)
	if !isNum {
		return 0, p.wrongType(path, tok, off, "an integer")
	}
	v, err := strconv.ParseInt(string(n), 10, 64)
	switch {
	case u32 && (err != nil || v < 0 || v > 1<<32-1):
		return 0, p.fail("%s is not an integer in 0..4294967295 (byte offset %d)", path, off)
	case err != nil:
		return 0, p.fail("%s is not a 64-bit integer (byte offset %d)", path, off)
	}
	return v, nil
}

func (p *parser) u32(path string, dst *uint32) error {
	v, err := p.integer(path, true)
	*dst = uint32(v)
	return err
}

func (p *parser) i64(path string, dst *int) error {
	v, err := p.integer(path, false)
	*dst = int(v)
	return err
}

// timestamp reads an RFC 3339 timestamp (as encoding/json reads a time.Time).
func (p *parser) timestamp(path string, dst *time.Time) error {
	tok, off, ok, err := p.scalar(path)
	if err != nil || !ok {
		return err
	}
	s, isStr := tok.(string)
	if !isStr {
		return p.wrongType(path, tok, off, "an RFC 3339 time string")
	}
	if err := dst.UnmarshalText([]byte(s)); err != nil { // its message quotes s
		return p.fail("%s is not an RFC 3339 time (byte offset %d)", path, off)
	}
	return nil
}

// root reads standard base64 bytes (as encoding/json reads a []byte).
func (p *parser) root(path string, dst *[]byte) error {
	tok, off, ok, err := p.scalar(path)
	if err != nil || !ok {
		return err
	}
	s, isStr := tok.(string)
	if !isStr {
		return p.wrongType(path, tok, off, "a standard base64 string")
	}
	b := make([]byte, base64.StdEncoding.DecodedLen(len(s)))
	n, err := base64.StdEncoding.Decode(b, []byte(s))
	if err != nil {
		return p.fail("%s is not valid standard base64 (byte offset %d)", path, off)
	}
	*dst = b[:n]
	return nil
}

var (
	ringFields       = []string{"schemaVersion", "mode", "target", "modeChanged", "lastGeneration", "lastRotateRequest", "generations", "nodes"}
	generationFields = []string{"number", "state", "cipher", "icvBytes", "root", "salt", "sealed", "reason", "created", "activated", "retiring"}
	nodeFields       = []string{"name", "id", "released", "releasedAt"}
)

// ring reads the top-level object into the wire form (the same fields and JSON names as
// wireRing, wireGeneration and NodeID).
func (p *parser) ring() (wireRing, error) {
	var w wireRing
	err := p.object("", false, ringFields, func(name, path string) error {
		switch name {
		case "schemaVersion":
			return p.i64(path, &w.SchemaVersion)
		case "mode":
			return p.str(path, (*string)(&w.Mode))
		case "target":
			return p.str(path, (*string)(&w.Target))
		case "modeChanged":
			return p.timestamp(path, &w.ModeChanged)
		case "lastGeneration":
			return p.u32(path, &w.LastGeneration)
		case "lastRotateRequest":
			return p.str(path, &w.LastRotateRequest)
		case "generations":
			w.Generations = []wireGeneration{}
			return p.array(path, func(path string) error {
				var g wireGeneration
				if err := p.generation(path, &g); err != nil {
					return err
				}
				w.Generations = append(w.Generations, g)
				return nil
			})
		case "nodes":
			w.Nodes = []NodeID{}
			return p.array(path, func(path string) error {
				var n NodeID
				if err := p.node(path, &n); err != nil {
					return err
				}
				w.Nodes = append(w.Nodes, n)
				return nil
			})
		}
		return nil
	})
	return w, err
}

func (p *parser) generation(path string, g *wireGeneration) error {
	return p.object(path, false, generationFields, func(name, path string) error {
		switch name {
		case "number":
			return p.u32(path, &g.Number)
		case "state":
			return p.str(path, (*string)(&g.State))
		case "cipher":
			return p.str(path, (*string)(&g.Cipher))
		case "icvBytes":
			return p.i64(path, &g.ICVBytes)
		case "root":
			return p.root(path, &g.Root)
		case "salt":
			return p.root(path, &g.Salt)
		case "sealed":
			return p.boolean(path, &g.Sealed)
		case "reason":
			return p.str(path, &g.Reason)
		case "created":
			return p.timestamp(path, &g.Created)
		case "activated":
			return p.timestamp(path, &g.Activated)
		case "retiring":
			return p.timestamp(path, &g.Retiring)
		}
		return nil
	})
}

func (p *parser) node(path string, n *NodeID) error {
	return p.object(path, false, nodeFields, func(name, path string) error {
		switch name {
		case "name":
			return p.str(path, &n.Name)
		case "id":
			return p.u32(path, &n.ID)
		case "released":
			return p.boolean(path, &n.Released)
		case "releasedAt":
			return p.u32(path, &n.ReleasedAt)
		}
		return nil
	})
}
