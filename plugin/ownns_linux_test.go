package plugin

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// netState is what the plugin could change in a namespace: every link's MTU and the MTU
// of every route (all tables, both families), by a key that names the route.
type netState struct {
	links  map[string]int
	routes map[string]int
}

func snapshot(t *testing.T, n ns.NetNS) netState {
	t.Helper()
	s := netState{links: map[string]int{}, routes: map[string]int{}}
	err := n.Do(func(ns.NetNS) error {
		links, err := netlink.LinkList()
		if err != nil {
			return err
		}
		for _, l := range links {
			s.links[l.Attrs().Name] = l.Attrs().MTU
		}
		routes, err := netlink.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return err
		}
		for _, r := range routes {
			s.routes[fmt.Sprintf("family %d dst %v table %d dev %d prio %d", r.Family, r.Dst, r.Table, r.LinkIndex, r.Priority)] = r.MTU
		}
		return nil
	})
	if err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	return s
}

// unchanged fails when a link's MTU differs from before, or a route that existed before
// is gone or has another MTU. (Routes the kernel adds by itself later, such as IPv6
// link-local ones, are not the plugin's doing and are ignored.)
func unchanged(t *testing.T, what string, before, after netState) {
	t.Helper()
	if !maps.Equal(before.links, after.links) {
		t.Errorf("%s changed link MTUs: before %v, after %v", what, before.links, after.links)
	}
	for _, k := range slices.Sorted(maps.Keys(before.routes)) {
		if mtu, ok := after.routes[k]; !ok || mtu != before.routes[k] {
			t.Errorf("%s changed the route %s: mtu %d before, %d after (present: %v)", what, k, before.routes[k], mtu, ok)
		}
	}
}

// TestOwnNetNSRefused runs ADD (and CHECK) with CNI_NETNS naming the plugin's own network
// namespace: a runtime bug or a hostile caller pointing the plugin at the host, where
// "eth0" is the node's uplink. The test's namespace plays the host: a veth eth0 at 1500
// (over the 1452 budget) with routes over it that carry an MTU, in the main table and in
// table 100; the plugin runs inside it, in-process (every mode, every CNI version) and as
// the real binary. Every run must fail with CNI error 8 (invalid netns) naming CNI_NETNS,
// and no link or route MTU may change — in clamp mode the plugin used to lower eth0 and
// its routes before skel's own same-netns check (which runs after ADD returns) failed.
func TestOwnNetNSRefused(t *testing.T) {
	requireRoot(t)
	host := newPod(t, 1500, 1500) // eth0 (peer host0), routes with mtu 1500 in main and table 100
	before := snapshot(t, host.ns)
	withMTU := 0
	for _, mtu := range before.routes {
		if mtu == 1500 {
			withMTU++
		}
	}
	if before.links[podIf] != 1500 || withMTU != 2 {
		t.Fatalf("unexpected test namespace (want eth0 at 1500 and two routes with mtu 1500): %+v", before)
	}
	want := []string{"CNI_NETNS", host.ns.Path(), "plugin's own network namespace"}

	for _, v := range allVersions {
		for _, mode := range []Mode{ModeEnforce, ModeClamp, ModeWarn} {
			t.Run(v+"/"+string(mode), func(t *testing.T) {
				conf := config(t, v, map[string]any{"externalMTU": 1500, "mode": mode}, host.prevResult(t, v, true))
				var addErr, checkErr error
				if err := host.ns.Do(func(ns.NetNS) error {
					_, _, addErr = add(host, conf)
					if atLeast(v, "0.4.0") {
						checkErr = check(host, conf)
					}
					return nil
				}); err != nil {
					t.Fatal(err)
				}
				wantCode(t, "ADD", addErr, types.ErrInvalidNetNS, want...)
				if atLeast(v, "0.4.0") {
					wantCode(t, "CHECK", checkErr, types.ErrInvalidNetNS, want...)
				}
				unchanged(t, "ADD "+string(mode), before, snapshot(t, host.ns))
			})
		}
	}

	t.Run("binary", func(t *testing.T) {
		bin := filepath.Join(pluginBinary(t), "secureoverlay")
		for _, mode := range []Mode{ModeEnforce, ModeClamp, ModeWarn} {
			conf := config(t, "1.1.0", map[string]any{"externalMTU": 1500, "mode": mode}, host.prevResult(t, "1.1.0", true))
			var out, stderr bytes.Buffer
			var runErr error
			if err := host.ns.Do(func(ns.NetNS) error {
				cmd := exec.Command(bin)
				cmd.Env = []string{"CNI_COMMAND=ADD", "CNI_CONTAINERID=c0ffee", "CNI_NETNS=" + host.ns.Path(),
					"CNI_IFNAME=" + podIf, "CNI_PATH=" + filepath.Dir(bin), "PATH=" + os.Getenv("PATH")}
				cmd.Stdin, cmd.Stdout, cmd.Stderr = bytes.NewReader(conf), &out, &stderr
				runErr = cmd.Run() // forked from this thread: the plugin process lives in the test's namespace
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			if runErr == nil {
				t.Errorf("%s: the binary succeeded with its own netns as CNI_NETNS:\n%s", mode, out.String())
			}
			var e types.Error
			if err := json.Unmarshal(out.Bytes(), &e); err != nil {
				t.Fatalf("%s: no CNI error on stdout: %v\n%s\nstderr: %s", mode, err, out.String(), stderr.String())
			}
			wantCode(t, "binary ADD "+string(mode), &e, types.ErrInvalidNetNS, want...)
			unchanged(t, "binary ADD "+string(mode), before, snapshot(t, host.ns))
		}
	})

	// The check is about the namespace, not the path: another path to the same
	// namespace (its /proc entry) is refused too.
	t.Run("other path to the same namespace", func(t *testing.T) {
		var procPath string
		var addErr error
		conf := config(t, "1.0.0", map[string]any{"externalMTU": 1500, "mode": ModeClamp}, host.prevResult(t, "1.0.0", true))
		if err := host.ns.Do(func(ns.NetNS) error {
			procPath = fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid())
			_, _, addErr = testutils.CmdAdd(procPath, "c0ffee", podIf, conf, func() error { return dispatch(conf) })
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		wantCode(t, "ADD via "+procPath, addErr, types.ErrInvalidNetNS, "CNI_NETNS", "plugin's own network namespace")
		unchanged(t, "ADD via /proc", before, snapshot(t, host.ns))
	})

	if t.Failed() {
		return
	}
	// And a pod namespace next to it still works: the refusal is only for the own one.
	// (The result names no host interfaces: the pod's veth peer is in the pod namespace
	// here, and its index must not be matched against the links of the test's host.)
	pod := newPod(t, 1500, 0)
	var err error
	conf := config(t, "1.0.0", map[string]any{"externalMTU": 1500, "mode": ModeClamp}, pod.prevResult(t, "1.0.0", false))
	if e := host.ns.Do(func(ns.NetNS) error { _, _, err = add(pod, conf); return nil }); e != nil {
		t.Fatal(e)
	}
	if err != nil {
		t.Fatalf("ADD clamp into a pod namespace from the test's host namespace: %v", err)
	}
	if mtu, _ := pod.mtus(t); mtu != 1452 {
		t.Fatalf("pod mtu %d after clamp, want 1452", mtu)
	}
	unchanged(t, "ADD into another namespace", before, snapshot(t, host.ns))
}
