package gate

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestDecide(t *testing.T) {
	at := time.Date(2026, 12, 4, 12, 0, 0, 0, time.UTC)
	enforce := &State{Mode: "enforce"}
	cases := []struct {
		name     string
		state    *State
		stateErr error
		ready    *Ready
		boot     string
		open     bool
		why      string
	}{
		{"never encrypted", nil, nil, nil, "b1", true, "never encrypted"},
		{"last off", &State{Mode: "off"}, nil, nil, "b1", true, `mode "off"`},
		{"last accept: plaintext is sent in accept anyway", &State{Mode: "accept"}, nil, nil, "b1", true, `mode "accept"`},
		{"enforce, agent not yet back", enforce, nil, nil, "b1", false, "has not programmed it in this boot"},
		{"encrypt, agent not yet back", &State{Mode: "encrypt"}, nil, nil, "b1", false, "mode encrypt"},
		{"enforce, ready of an earlier boot (/run not tmpfs)", enforce, nil, &Ready{BootID: "b0", Mode: "enforce", At: at}, "b1", false, "another boot (b0, this is b1)"},
		{"enforce, boot ID unknown", enforce, nil, &Ready{BootID: "b1", Mode: "enforce", At: at}, "", false, "another boot"},
		{"enforce, ready of this boot", enforce, nil, &Ready{BootID: "b1", Mode: "enforce", At: at}, "b1", true, "programmed this boot's data plane"},
		{"state unreadable: may say enforce", nil, errors.New("permission denied"), nil, "b1", false, "permission denied"},
		{"state unreadable even with a ready file", nil, errors.New("bad json"), &Ready{BootID: "b1"}, "b1", false, "bad json"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			v := Decide(c.state, c.stateErr, c.ready, c.boot)
			if v.Open != c.open || !strings.Contains(v.Why, c.why) {
				t.Errorf("Decide = %+v; want open=%v, why containing %q", v, c.open, c.why)
			}
		})
	}
}

func TestFiles(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "lib", "dataplane.json")
	ready := filepath.Join(dir, "run", "ready.json")

	if s, err := ReadState(state); s != nil || err != nil {
		t.Fatalf("missing state file: %v, %v; want nil, nil", s, err)
	}
	if r := ReadReady(ready); r != nil {
		t.Fatalf("missing ready file read as %+v", r)
	}
	now := time.Date(2026, 12, 4, 12, 0, 0, 0, time.UTC)
	if err := WriteState(state, State{Mode: "enforce", Node: "n1", Updated: now}); err != nil {
		t.Fatal(err)
	}
	if err := WriteReady(ready, Ready{BootID: "b1", Mode: "enforce", At: now}); err != nil {
		t.Fatal(err)
	}
	s, err := ReadState(state)
	if err != nil || s.Mode != "enforce" || s.Node != "n1" || !s.Updated.Equal(now) {
		t.Fatalf("state read back as %+v, %v", s, err)
	}
	if r := ReadReady(ready); r == nil || r.BootID != "b1" {
		t.Fatalf("ready read back as %+v", r)
	}
	if v := Decide(s, nil, ReadReady(ready), "b1"); !v.Open {
		t.Errorf("files of this boot keep the gate closed: %s", v.Why)
	}
	// No temporary files are left beside them.
	for _, d := range []string{filepath.Dir(state), filepath.Dir(ready)} {
		es, _ := os.ReadDir(d)
		if len(es) != 1 {
			t.Errorf("%s holds %d entries, want 1", d, len(es))
		}
	}

	// A state file that cannot be parsed is an error (the gate closes on it); a ready file
	// that cannot be parsed is no ready file.
	if err := os.WriteFile(state, []byte("{"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadState(state); err == nil {
		t.Error("a truncated state file parsed")
	}
	if err := os.WriteFile(state, []byte(`{"node":"n1"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadState(state); err == nil {
		t.Error("a state file without a mode parsed")
	}
	if err := os.WriteFile(ready, []byte("garbage"), 0o644); err != nil {
		t.Fatal(err)
	}
	if r := ReadReady(ready); r != nil {
		t.Errorf("garbage ready file read as %+v", r)
	}

	if err := RemoveState(state); err != nil {
		t.Fatal(err)
	}
	if err := RemoveState(state); err != nil {
		t.Errorf("removing a missing state file: %v", err)
	}
	if s, err := ReadState(state); s != nil || err != nil {
		t.Errorf("after RemoveState: %v, %v", s, err)
	}
}

func TestBootID(t *testing.T) {
	id, err := BootID()
	if err != nil {
		t.Skipf("no %s here: %v", BootIDFile, err)
	}
	if len(id) != 36 {
		t.Errorf("boot ID %q is not a UUID", id)
	}
}
