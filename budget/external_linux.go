package budget

import (
	"errors"
	"fmt"
	"regexp"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// dumpRetries bounds how often an interrupted netlink link dump is repeated.
const dumpRetries = 5

// Links lists the links of the calling thread's network namespace (like `ip -d link show`),
// retrying a dump the kernel interrupted because the link table changed under it.
func Links() ([]LinkInfo, error) {
	var (
		links []netlink.Link
		err   error
	)
	for range dumpRetries {
		links, err = netlink.LinkList()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	out := make([]LinkInfo, 0, len(links))
	for _, l := range links {
		a := l.Attrs()
		out = append(out, LinkInfo{
			Name:      a.Name,
			MTU:       a.MTU,
			OperState: OperState(a.OperState.String()),
			AdminUp:   a.RawFlags&unix.IFF_UP != 0,
			LowerUp:   a.RawFlags&unix.IFF_LOWER_UP != 0,
		})
	}
	return out, nil
}

// DetectExternalMTU returns the smallest MTU among the up links of the calling thread's
// network namespace whose names match pattern (nil means DefaultInterfacePattern), as
// Calico does for its own MTU auto-detection, and the name of that link.
func DetectExternalMTU(pattern *regexp.Regexp) (int, string, error) {
	links, err := Links()
	if err != nil {
		return 0, "", fmt.Errorf("detect external mtu: %w", err)
	}
	return SmallestMTU(links, pattern)
}
