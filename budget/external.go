package budget

import (
	"fmt"
	"regexp"
	"sort"
	"strings"
)

// DefaultInterfacePattern is Calico's default pattern for the node's external interfaces
// (felix MTUIfacePattern).
const DefaultInterfacePattern = `^((en|wl|ww|sl|ib)[Pcopsvx].*|(eth|wlan|wwan).*)`

var defaultPattern = regexp.MustCompile(DefaultInterfacePattern)

// OperState is a link's RFC 2863 operational state as the kernel reports it
// (IFLA_OPERSTATE), in the kernel's lowercase spelling.
type OperState string

// The operational states the selection distinguishes.
const (
	OperUp      OperState = "up"
	OperUnknown OperState = "unknown"
)

// LinkInfo is what external MTU detection needs to know about one link.
type LinkInfo struct {
	Name      string
	MTU       int
	OperState OperState
	AdminUp   bool // IFF_UP
	LowerUp   bool // IFF_LOWER_UP: the driver signals carrier
}

// Usable reports whether the link counts as an up external link: its operational state is
// "up", or it is "unknown" (drivers that do not implement RFC 2863 states, e.g. dummy,
// tun and some paravirtual NICs, always report unknown) while administratively up with
// carrier (IFF_UP and IFF_LOWER_UP). Every other state (down, lowerlayerdown, dormant,
// testing, notpresent) is excluded: such a link carries no traffic, so its MTU cannot
// bound anything.
func (l LinkInfo) Usable() bool {
	switch l.OperState {
	case OperUp:
		return true
	case OperUnknown:
		return l.AdminUp && l.LowerUp
	default:
		return false
	}
}

// SmallestMTU returns the smallest MTU among the usable links whose name matches pattern
// (nil means DefaultInterfacePattern) and the name of that link. Ties go to the name that
// sorts first, so the answer does not depend on the kernel's link order.
func SmallestMTU(links []LinkInfo, pattern *regexp.Regexp) (int, string, error) {
	if pattern == nil {
		pattern = defaultPattern
	}
	sorted := append([]LinkInfo(nil), links...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Name < sorted[j].Name })
	best, bestName := 0, ""
	var skipped []string
	for _, l := range sorted {
		if !pattern.MatchString(l.Name) {
			continue
		}
		if !l.Usable() {
			skipped = append(skipped, fmt.Sprintf("%s(%s)", l.Name, l.OperState))
			continue
		}
		if l.MTU <= 0 {
			continue
		}
		if best == 0 || l.MTU < best {
			best, bestName = l.MTU, l.Name
		}
	}
	if best == 0 {
		msg := fmt.Sprintf("no up link matches interface pattern %q", pattern.String())
		if len(skipped) > 0 {
			msg += "; matching links not up: " + strings.Join(skipped, ", ")
		}
		return 0, "", fmt.Errorf("detect external mtu: %s", msg)
	}
	return best, bestName, nil
}

// CompilePattern compiles an interface pattern; the empty string means
// DefaultInterfacePattern.
func CompilePattern(expr string) (*regexp.Regexp, error) {
	if expr == "" {
		return defaultPattern, nil
	}
	re, err := regexp.Compile(expr)
	if err != nil {
		return nil, fmt.Errorf("interface pattern %q: %w", expr, err)
	}
	return re, nil
}
