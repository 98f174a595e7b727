package install

import (
	"encoding/json"
	"fmt"
)

// A minimal JSON scanner that reports byte spans instead of values. The installer uses it
// to splice its entry into a conflist without re-encoding anything it does not own: every
// byte outside the spliced range stays exactly as the other writer (Calico's install-cni,
// an operator) wrote it. Inputs are always validated by encoding/json (through libcni)
// before they reach these functions; the scanner still rejects malformed input rather
// than guessing.

// span is a half-open byte range [start, end) of one JSON value.
type span struct{ start, end int }

// member is one key/value pair of a JSON object.
type member struct {
	key string
	val span
}

func isSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

func skipSpace(b []byte, i int) int {
	for i < len(b) && isSpace(b[i]) {
		i++
	}
	return i
}

// skipValue returns the end of the JSON value that starts at b[i] (no leading space).
func skipValue(b []byte, i int) (int, error) {
	if i >= len(b) {
		return 0, fmt.Errorf("json: unexpected end at offset %d", i)
	}
	switch c := b[i]; {
	case c == '"':
		return skipString(b, i)
	case c == '{' || c == '[':
		return skipContainer(b, i)
	default:
		j := i
		for j < len(b) && !isSpace(b[j]) && b[j] != ',' && b[j] != '}' && b[j] != ']' {
			j++
		}
		if j == i {
			return 0, fmt.Errorf("json: unexpected %q at offset %d", c, i)
		}
		return j, nil
	}
}

func skipString(b []byte, i int) (int, error) {
	for j := i + 1; j < len(b); j++ {
		switch b[j] {
		case '\\':
			j++
		case '"':
			return j + 1, nil
		}
	}
	return 0, fmt.Errorf("json: unterminated string at offset %d", i)
}

// skipContainer skips an object or array by bracket depth, honouring strings.
func skipContainer(b []byte, i int) (int, error) {
	depth := 0
	for j := i; j < len(b); j++ {
		switch b[j] {
		case '"':
			end, err := skipString(b, j)
			if err != nil {
				return 0, err
			}
			j = end - 1
		case '{', '[':
			depth++
		case '}', ']':
			depth--
			if depth == 0 {
				return j + 1, nil
			}
		}
	}
	return 0, fmt.Errorf("json: unterminated container at offset %d", i)
}

// objectMembers lists the members of the object that starts at b[i].
func objectMembers(b []byte, i int) ([]member, error) {
	if i >= len(b) || b[i] != '{' {
		return nil, fmt.Errorf("json: expected object at offset %d", i)
	}
	var out []member
	j := skipSpace(b, i+1)
	if j < len(b) && b[j] == '}' {
		return out, nil
	}
	for {
		if j >= len(b) || b[j] != '"' {
			return nil, fmt.Errorf("json: expected key at offset %d", j)
		}
		kend, err := skipString(b, j)
		if err != nil {
			return nil, err
		}
		var key string
		if err := json.Unmarshal(b[j:kend], &key); err != nil {
			return nil, fmt.Errorf("json: key at offset %d: %w", j, err)
		}
		j = skipSpace(b, kend)
		if j >= len(b) || b[j] != ':' {
			return nil, fmt.Errorf("json: expected ':' at offset %d", j)
		}
		j = skipSpace(b, j+1)
		vend, err := skipValue(b, j)
		if err != nil {
			return nil, err
		}
		out = append(out, member{key: key, val: span{j, vend}})
		j = skipSpace(b, vend)
		if j < len(b) && b[j] == ',' {
			j = skipSpace(b, j+1)
			continue
		}
		if j < len(b) && b[j] == '}' {
			return out, nil
		}
		return nil, fmt.Errorf("json: expected ',' or '}' at offset %d", j)
	}
}

// arrayElems lists the element spans of the array that starts at b[i].
func arrayElems(b []byte, i int) ([]span, error) {
	if i >= len(b) || b[i] != '[' {
		return nil, fmt.Errorf("json: expected array at offset %d", i)
	}
	var out []span
	j := skipSpace(b, i+1)
	if j < len(b) && b[j] == ']' {
		return out, nil
	}
	for {
		end, err := skipValue(b, j)
		if err != nil {
			return nil, err
		}
		out = append(out, span{j, end})
		j = skipSpace(b, end)
		if j < len(b) && b[j] == ',' {
			j = skipSpace(b, j+1)
			continue
		}
		if j < len(b) && b[j] == ']' {
			return out, nil
		}
		return nil, fmt.Errorf("json: expected ',' or ']' at offset %d", j)
	}
}
