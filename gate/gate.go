// Package gate keeps a node's pods from sending plaintext after the node reboots.
//
// A reboot wipes what the agent programmed (xfrm states and policies, the iptables drop
// rules) while the kubelet starts the node's pods again at once; the agent needs some
// seconds to minutes to start and program the node again. Without a gate, the pods talk
// plaintext IPIP to every other node in that window (measured on real nodes: 9, 43 and 173
// packets in three reboots, docs/lab.md). So the agent leaves two files, and the CNI
// plugin reads them before it lets a pod's sandbox come up:
//
//   - the state file (default /var/lib/secureoverlay/dataplane.json, on disk: it outlives
//     the boot) says which mode this node's data plane was last programmed to;
//   - the ready file (default /run/secureoverlay/ready.json, in the agent's ledger
//     directory on tmpfs: it does not outlive the boot, and carries the kernel's boot ID in
//     case /run is not tmpfs) says the agent has programmed the data plane in this boot.
//
// While the state file says encrypt or enforce and no ready file of this boot exists, the
// plugin refuses ADD with CNI error 11 ("try again later"): the runtime retries the
// sandbox, and the pod starts once the agent has programmed the node — with enforce's
// drop rules in place, a pod's first packets are dropped until its pairs re-key, never sent
// in the clear. The agent's own pods use the host network and are not gated.
//
// The price is the one any fail-closed design pays: an agent that cannot start (or an
// API server it cannot reach) after a reboot holds the node's new pods. docs/agent.md
// ("After a reboot") and the README's troubleshooting say how to see it and how to lift it.
//
// This package is pure decisions plus small file helpers: no Kubernetes, so the plugin
// binary stays small (plugin/deps_test.go).
package gate

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Default paths (the manifest mounts both into the agent; the plugin runs on the host).
const (
	DefaultStateFile = "/var/lib/secureoverlay/dataplane.json"
	DefaultReadyFile = "/run/secureoverlay/ready.json"
	// BootIDFile is the kernel's random ID of the current boot.
	BootIDFile = "/proc/sys/kernel/random/boot_id"
)

// State is the state file: the mode this node's data plane was last programmed to.
type State struct {
	Mode    string    `json:"mode"`
	Node    string    `json:"node,omitempty"`
	Updated time.Time `json:"updated"`
}

// Ready is the ready file: the agent programmed the data plane in boot BootID.
type Ready struct {
	BootID string    `json:"bootID"`
	Mode   string    `json:"mode"`
	At     time.Time `json:"at"`
}

// Protected reports whether a node in mode sends pod traffic to its peers encrypted, so
// that a pod sending before the agent has programmed the node would leak.
func Protected(mode string) bool { return mode == "encrypt" || mode == "enforce" }

// Verdict is the plugin's decision for one ADD.
type Verdict struct {
	Open bool
	// Why says, when closed, what holds the pod and what lifts it; when open, why the gate
	// does not apply (for the plugin's debug log).
	Why string
}

// Decide is the gate: state and ready as read (nil when the file does not exist),
// stateErr a failure to read or parse the state file, bootID the current boot's.
func Decide(state *State, stateErr error, ready *Ready, bootID string) Verdict {
	switch {
	case stateErr != nil:
		// The file exists but cannot be read or parsed: it may say enforce. Closed.
		return Verdict{Why: fmt.Sprintf("cannot tell whether this node encrypted pod traffic before it booted: %v", stateErr)}
	case state == nil:
		return Verdict{Open: true, Why: "no data plane state recorded on this node (never encrypted)"}
	case !Protected(state.Mode):
		return Verdict{Open: true, Why: fmt.Sprintf("this node's data plane was last in mode %q, which sends plaintext anyway", state.Mode)}
	case ready == nil:
		return Verdict{Why: fmt.Sprintf("this node's data plane was in mode %s and its agent has not programmed it in this boot yet", state.Mode)}
	case bootID == "" || ready.BootID != bootID:
		return Verdict{Why: fmt.Sprintf("this node's data plane was in mode %s and its agent last programmed it in another boot (%s, this is %s)", state.Mode, orNone(ready.BootID), orNone(bootID))}
	default:
		return Verdict{Open: true, Why: fmt.Sprintf("the agent programmed this boot's data plane (mode %s) at %s", ready.Mode, ready.At.UTC().Format(time.RFC3339))}
	}
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

// ReadState reads the state file; a missing file is (nil, nil).
func ReadState(path string) (*State, error) {
	var s State
	ok, err := readJSON(path, &s)
	if !ok {
		return nil, err
	}
	if s.Mode == "" {
		return nil, fmt.Errorf("%s: no mode", path)
	}
	return &s, nil
}

// ReadReady reads the ready file; a missing file or one that cannot be parsed is nil (the
// gate then stays closed, as it should).
func ReadReady(path string) *Ready {
	var r Ready
	if ok, err := readJSON(path, &r); !ok || err != nil {
		return nil
	}
	return &r
}

func readJSON(path string, v any) (bool, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return false, fmt.Errorf("%s: %w", path, err)
	}
	return true, nil
}

// BootID returns the current boot's ID.
func BootID() (string, error) {
	b, err := os.ReadFile(BootIDFile)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}

// WriteState records the mode the data plane is now programmed to (atomically, and
// synced: it must survive a power cut, which is what it is for).
func WriteState(path string, s State) error { return writeJSON(path, s, true) }

// WriteReady records that the data plane of this boot is programmed.
func WriteReady(path string, r Ready) error { return writeJSON(path, r, false) }

// RemoveState removes the state file (uninstall: nothing of ours is left to protect).
func RemoveState(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

func writeJSON(path string, v any, durable bool) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // after a successful rename there is nothing to remove
	if _, err := f.Write(append(b, '\n')); err != nil {
		f.Close()
		return err
	}
	if durable {
		if err := f.Sync(); err != nil {
			f.Close()
			return err
		}
	}
	if err := f.Chmod(0o644); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	if durable {
		if d, err := os.Open(dir); err == nil {
			_ = d.Sync()
			d.Close()
		}
	}
	return nil
}
