//go:build !linux

package ctl

import (
	"fmt"
	"net"

	"github.com/secureoverlay/secureoverlay/budget"
)

// hostLinks lists this host's interfaces with the standard library on systems without
// netlink (an operator's laptop): up and running counts as operationally up.
func hostLinks() ([]budget.LinkInfo, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return nil, fmt.Errorf("list interfaces: %w", err)
	}
	out := make([]budget.LinkInfo, 0, len(ifs))
	for _, i := range ifs {
		li := budget.LinkInfo{Name: i.Name, MTU: i.MTU, AdminUp: i.Flags&net.FlagUp != 0, LowerUp: i.Flags&net.FlagRunning != 0}
		li.OperState = "down"
		if li.AdminUp && li.LowerUp {
			li.OperState = budget.OperUp
		}
		out = append(out, li)
	}
	return out, nil
}
