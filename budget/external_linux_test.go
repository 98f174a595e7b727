package budget

import (
	"fmt"
	"os"
	"regexp"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"
)

// newTestNS creates a fresh network namespace, or skips when the machine cannot (not root)
// unless SECUREOVERLAY_REQUIRE_ALL=1 demands every test run.
func newTestNS(t *testing.T) ns.NetNS {
	t.Helper()
	skip := func(reason string) {
		if os.Getenv("SECUREOVERLAY_REQUIRE_ALL") == "1" {
			t.Fatalf("SECUREOVERLAY_REQUIRE_ALL=1 but %s", reason)
		}
		t.Skip(reason)
	}
	if os.Geteuid() != 0 {
		skip("needs root to create network namespaces")
	}
	n, err := testutils.NewNS()
	if err != nil {
		skip("cannot create a network namespace: " + err.Error())
	}
	t.Cleanup(func() {
		_ = n.Close()
		_ = testutils.UnmountNS(n)
	})
	return n
}

func addVeth(name, peer string, mtu int, up, peerUp bool) error {
	la := netlink.NewLinkAttrs()
	la.Name, la.MTU = name, mtu
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: peer}); err != nil {
		return fmt.Errorf("add veth %s: %w", name, err)
	}
	if err := setUp(name, up); err != nil {
		return err
	}
	return setUp(peer, peerUp)
}

// addBridge adds a port-less bridge: like dummy or tun devices it reports the operational
// state "unknown" while up with carrier (dummy needs a module CI kernels may lack).
func addBridge(name string, mtu int, up bool) error {
	la := netlink.NewLinkAttrs()
	la.Name, la.MTU = name, mtu
	if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: la}); err != nil {
		return fmt.Errorf("add bridge %s: %w", name, err)
	}
	return setUp(name, up)
}

// addTap adds a persistent tap device nobody reads: admin up, no carrier.
func addTap(name string, mtu int) error {
	la := netlink.NewLinkAttrs()
	la.Name, la.MTU = name, mtu
	tap := &netlink.Tuntap{LinkAttrs: la, Mode: netlink.TUNTAP_MODE_TAP, Flags: netlink.TUNTAP_DEFAULTS}
	if err := netlink.LinkAdd(tap); err != nil {
		return fmt.Errorf("add tap %s: %w", name, err)
	}
	for _, f := range tap.Fds {
		_ = f.Close()
	}
	l, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("link %s: %w", name, err)
	}
	if err := netlink.LinkSetMTU(l, mtu); err != nil {
		return fmt.Errorf("set %s mtu: %w", name, err)
	}
	return setUp(name, true)
}

func setUp(name string, up bool) error {
	if !up {
		return nil
	}
	l, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("link %s: %w", name, err)
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return fmt.Errorf("set %s up: %w", name, err)
	}
	return nil
}

// TestDetectExternalMTUInNetns builds links of different MTUs and states in a fresh
// namespace and checks that detection picks the smallest up, matching one.
func TestDetectExternalMTUInNetns(t *testing.T) {
	n := newTestNS(t)
	err := n.Do(func(ns.NetNS) error {
		for _, err := range []error{
			addVeth("eth0", "peer0", 1500, true, true),    // up: counts
			addVeth("ens5", "peer1", 1450, true, true),    // up: counts, smallest
			addVeth("eth1", "peer2", 1300, true, false),   // peer down: no carrier, excluded
			addVeth("wlan0", "peer3", 1200, false, true),  // admin down: excluded
			addVeth("cali123", "peer4", 1000, true, true), // up but not external
			addBridge("eth9", 1460, true),                 // oper state unknown with carrier: counts
			addBridge("eth8", 1100, false),                // admin down: excluded
			addTap("eth7", 1150),                          // admin up, no carrier: excluded
		} {
			if err != nil {
				return err
			}
		}

		// Operational state changes reach rtnetlink through the kernel's linkwatch,
		// which may lag by up to a second; wait until the veths have settled.
		deadline := time.Now().Add(5 * time.Second)
		for {
			links, err := Links()
			if err != nil {
				return err
			}
			state := map[string]OperState{}
			for _, l := range links {
				state[l.Name] = l.OperState
			}
			if state["eth0"] == OperUp && state["ens5"] == OperUp && state["cali123"] == OperUp {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("veths never became oper-up: %v", state)
			}
			time.Sleep(50 * time.Millisecond)
		}

		links, _ := Links()
		for _, l := range links {
			t.Logf("link %-8s mtu=%-5d oper=%-16s adminUp=%v lowerUp=%v usable=%v", l.Name, l.MTU, l.OperState, l.AdminUp, l.LowerUp, l.Usable())
		}

		mtu, name, err := DetectExternalMTU(nil)
		if err != nil || mtu != 1450 || name != "ens5" {
			t.Errorf("DetectExternalMTU(default) = %d %q %v; want 1450 ens5", mtu, name, err)
		}
		for _, c := range []struct {
			pattern string
			mtu     int
			name    string
		}{
			{`^eth`, 1460, "eth9"},     // eth1, eth7 (no carrier) and eth8 (down) skipped; eth9 unknown counts
			{`^eth0$`, 1500, "eth0"},   // single link
			{`^cali`, 1000, "cali123"}, // overridden pattern
			{`^(eth|wlan)`, 1460, "eth9"},
		} {
			mtu, name, err := DetectExternalMTU(regexp.MustCompile(c.pattern))
			if err != nil || mtu != c.mtu || name != c.name {
				t.Errorf("DetectExternalMTU(%s) = %d %q %v; want %d %s", c.pattern, mtu, name, err, c.mtu, c.name)
			}
		}
		for _, p := range []string{`^eth1$`, `^wlan0$`, `^eth8$`, `^eth7$`, `^nomatch$`} {
			if mtu, name, err := DetectExternalMTU(regexp.MustCompile(p)); err == nil {
				t.Errorf("DetectExternalMTU(%s) = %d %q; want an error (no up link)", p, mtu, name)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
