package ctl

import "github.com/secureoverlay/secureoverlay/budget"

// hostLinks lists this host's links through netlink (operational state included).
func hostLinks() ([]budget.LinkInfo, error) { return budget.Links() }
