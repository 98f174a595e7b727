package api

import (
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"testing"
)

func TestTrimReport(t *testing.T) {
	in := map[string]string{}
	enc := map[string]string{}
	for i := range 1000 {
		in[fmt.Sprintf("node-%04d", i)] = fmt.Sprintf("%08x", i)
		enc[fmt.Sprintf("node-%04d", i)] = fmt.Sprintf("%08x", i+1)
	}
	full := map[string]any{"mode": "enforce", "generations": []int{3, 4}, "peersEncrypted": 999,
		"lastSync": "2026-11-22T12:00:00Z", "futureField": map[string]any{"x": 1.5},
		"inboundFrom": in, "encryptingTo": enc}
	raw, _ := json.Marshal(full)

	var got map[string]any
	trimmed := TrimReport(string(raw), "node-0042")
	if err := json.Unmarshal([]byte(trimmed), &got); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{"mode": "enforce", "generations": []any{3.0, 4.0}, "peersEncrypted": 999.0,
		"lastSync": "2026-11-22T12:00:00Z", "futureField": map[string]any{"x": 1.5},
		"inboundFrom": map[string]any{"node-0042": "0000002a"}, "encryptingTo": map[string]any{"node-0042": "0000002b"}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("TrimReport(keep node-0042) = %s", trimmed)
	}
	if len(trimmed)*50 > len(raw) {
		t.Errorf("trimmed %d bytes of %d", len(trimmed), len(raw))
	}
	// The report is parsed the same way for the fields the agent reads.
	var a, b NodeReport
	if err := json.Unmarshal(raw, &a); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(trimmed), &b); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(a, b) {
		t.Errorf("NodeReport changed: %+v vs %+v", a, b)
	}

	// keep "" (the master) or a peer the report does not name: no claims at all.
	for _, keep := range []string{"", "node-9999"} {
		s := TrimReport(string(raw), keep)
		if strings.Contains(s, "inboundFrom") || strings.Contains(s, "encryptingTo") || !strings.Contains(s, `"futureField"`) {
			t.Errorf("TrimReport(keep %q) = %s", keep, s)
		}
	}
	// The readiness digests are for the master and the CLI's summaries (keep ""); a reader
	// of one peer's claims (an agent's cache) does not keep them.
	withDigests, _ := json.Marshal(map[string]any{"mode": "enforce", "inboundFrom": in, "readiness": map[string]any{"id": 3, "self": "00000000000000ff"}})
	if s := TrimReport(string(withDigests), ""); !strings.Contains(s, `"readiness":{`) {
		t.Errorf("TrimReport(keep \"\") dropped the readiness digests: %s", s)
	}
	if s := TrimReport(string(withDigests), "node-0042"); strings.Contains(s, "readiness") || !strings.Contains(s, "node-0042") {
		t.Errorf("TrimReport(keep node-0042) = %s, want its claim and no readiness digests", s)
	}
	// Not a JSON object, or claims of the wrong shape: unchanged (the parser says why).
	for _, bad := range []string{"", "not json", "[1,2]", "null", `{"inboundFrom":[1]}`} {
		if s := TrimReport(bad, "x"); s != bad {
			t.Errorf("TrimReport(%q) = %q, want it unchanged", bad, s)
		}
	}
}
