package rules

import (
	"bytes"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"

	"github.com/coreos/go-iptables/iptables"
)

// System is the real IPTables: go-iptables for single rules and listings, and
// iptables-restore of the same variant (nft or legacy) as the iptables binary for atomic
// chain writes. It acts in the network namespace of the calling thread.
type System struct {
	*iptables.IPTables
	restore []string // argv prefix
}

// NewSystem finds iptables and its iptables-restore for IPv4.
func NewSystem() (*System, error) {
	ipt, err := iptables.NewWithProtocol(iptables.ProtocolIPv4)
	if err != nil {
		return nil, fmt.Errorf("find iptables: %w", err)
	}
	s := &System{IPTables: ipt}
	if p, err := exec.LookPath("iptables"); err == nil {
		if real, err := filepath.EvalSymlinks(p); err == nil && strings.HasPrefix(filepath.Base(real), "xtables-") && strings.HasSuffix(real, "-multi") {
			s.restore = []string{real, "iptables-restore"}
		}
	}
	if s.restore == nil {
		p, err := exec.LookPath("iptables-restore")
		if err != nil {
			return nil, fmt.Errorf("find iptables-restore: %w", err)
		}
		s.restore = []string{p}
	}
	return s, nil
}

// Restore implements IPTables.
func (s *System) Restore(data []byte) error {
	args := append(slices.Clone(s.restore[1:]), "--noflush", "-w", "5")
	cmd := exec.Command(s.restore[0], args...)
	cmd.Stdin = bytes.NewReader(data)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("iptables-restore: %w: %s", err, bytes.TrimSpace(out.Bytes()))
	}
	return nil
}
