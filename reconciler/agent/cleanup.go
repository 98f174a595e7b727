package agent

import (
	"errors"
	"fmt"

	"github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/rules"
	"github.com/secureoverlay/secureoverlay/reconciler/xfrm"
)

// Cleanup removes everything the agent owns in the current network namespace: xfrm
// policies and states carrying our reqids (and template-less policies in our priority
// band), then our iptables jumps and chains. Objects of other tools are never touched. It
// is what `secureoverlay-agent cleanup` runs; the agent itself never calls it.
func Cleanup(k xfrm.Kernel, ipt rules.IPTables, cfg desired.Config) (xfrm.Result, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return xfrm.Result{}, err
	}
	res, xerr := xfrm.NewApplier(k, cfg).Cleanup()
	rerr := rules.NewApplier(ipt).Cleanup()
	return res, errors.Join(wrapNonNil("remove xfrm objects", xerr), wrapNonNil("remove iptables rules", rerr))
}

// CheckMark rejects a packet mark that overlaps bits other components use: Calico
// (0xffff0000 by default), kube-proxy (0x4000, 0x8000) and Cilium (0x0f00). The current
// rules need no mark (they match on the IPsec policy instead, see package rules); the
// --mark flag is validated so a future mark-based rule cannot collide.
func CheckMark(mark uint32) error {
	const taken = 0xffff0000 | 0x4000 | 0x8000 | 0x0f00
	if mark == 0 {
		return errors.New("mark 0 is not a mark")
	}
	if mark&taken != 0 {
		return fmt.Errorf("mark 0x%x overlaps bits used by Calico (0xffff0000), kube-proxy (0x4000, 0x8000) or Cilium (0x0f00)", mark)
	}
	return nil
}
