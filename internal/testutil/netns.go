package testutil

import (
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"
)

// InNS runs f on a thread inside network namespace n and returns its result.
func InNS[T any](n ns.NetNS, f func() (T, error)) (T, error) {
	var out T
	err := n.Do(func(ns.NetNS) error {
		var err error
		out, err = f()
		return err
	})
	return out, err
}

// NSProxy listens on 127.0.0.1 inside n and forwards every connection to target on the
// caller's loopback (the test API server), so a process in n reaches it. It returns the
// listening address inside n; the listener closes when the test ends.
func NSProxy(t testing.TB, n ns.NetNS, target string) string {
	t.Helper()
	l, err := InNS(n, func() (net.Listener, error) { return net.Listen("tcp", "127.0.0.1:0") })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				u, err := net.Dial("tcp", target)
				if err != nil {
					return
				}
				defer u.Close()
				go func() { _, _ = io.Copy(u, c) }()
				_, _ = io.Copy(c, u)
			}()
		}
	}()
	return l.Addr().String()
}

// LoopbackNS creates a network namespace with its loopback up, removed when the test
// ends. The caller decides whether an error skips or fails the test.
func LoopbackNS(t testing.TB) (ns.NetNS, error) {
	t.Helper()
	n, err := testutils.NewNS()
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { _ = n.Close(); _ = testutils.UnmountNS(n) })
	if err := n.Do(func(ns.NetNS) error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(lo)
	}); err != nil {
		return nil, err
	}
	return n, nil
}

// WaitOperUp waits, in the caller's network namespace, until link name is oper-up (a veth
// whose peer just came up takes a moment), for at most timeout.
func WaitOperUp(name string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		l, err := netlink.LinkByName(name)
		if err != nil {
			return err
		}
		if l.Attrs().OperState == netlink.OperUp {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("uplink %s never became oper-up", name)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
