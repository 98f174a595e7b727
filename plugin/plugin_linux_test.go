package plugin

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"

	"github.com/secureoverlay/secureoverlay/gate"
)

var allVersions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}

// requireRoot skips (or, under SECUREOVERLAY_REQUIRE_ALL=1, fails) when the test cannot
// create network namespaces.
func requireRoot(t *testing.T) {
	t.Helper()
	reason := ""
	if os.Geteuid() != 0 {
		reason = "needs root to create network namespaces"
	} else if n, err := testutils.NewNS(); err != nil {
		reason = "cannot create a network namespace: " + err.Error()
	} else {
		_ = n.Close()
		_ = testutils.UnmountNS(n)
	}
	if reason == "" {
		return
	}
	if os.Getenv("SECUREOVERLAY_REQUIRE_ALL") == "1" {
		t.Fatalf("SECUREOVERLAY_REQUIRE_ALL=1 but %s", reason)
	}
	t.Skip(reason)
}

func newNS(t *testing.T) ns.NetNS {
	t.Helper()
	n, err := testutils.NewNS()
	if err != nil {
		t.Fatalf("new netns: %v", err)
	}
	t.Cleanup(func() {
		_ = n.Close()
		_ = testutils.UnmountNS(n)
	})
	return n
}

// pod is a pod network namespace with a veth "eth0" (peer "host0" in the same namespace
// unless the test moves things around), routes with and without an MTU.
type pod struct {
	ns ns.NetNS
}

const podIf = "eth0"

// newPod creates the pod namespace with eth0 at mtu, a route with an explicit MTU of
// routeMTU (when > 0) and one without.
func newPod(t *testing.T, mtu, routeMTU int) *pod {
	t.Helper()
	p := &pod{ns: newNS(t)}
	err := p.ns.Do(func(ns.NetNS) error {
		la := netlink.NewLinkAttrs()
		la.Name, la.MTU = podIf, mtu
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: "host0"}); err != nil {
			return fmt.Errorf("add veth: %w", err)
		}
		for _, n := range []string{podIf, "host0"} {
			l, err := netlink.LinkByName(n)
			if err != nil {
				return err
			}
			if err := netlink.LinkSetUp(l); err != nil {
				return err
			}
		}
		l, err := netlink.LinkByName(podIf)
		if err != nil {
			return err
		}
		addr, _ := netlink.ParseAddr("198.18.1.2/24")
		if err := netlink.AddrAdd(l, addr); err != nil {
			return fmt.Errorf("add addr: %w", err)
		}
		for _, r := range []struct {
			dst   string
			mtu   int
			table int
		}{{"198.18.2.0/24", routeMTU, 0}, {"198.18.3.0/24", 0, 0}, {"198.18.4.0/24", 1280, 0}, {"198.18.5.0/24", routeMTU, 100}} {
			_, dst, _ := net.ParseCIDR(r.dst)
			if err := netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: dst, Scope: netlink.SCOPE_LINK, MTU: r.mtu, Table: r.table}); err != nil {
				return fmt.Errorf("add route %s: %w", r.dst, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("set up pod netns: %v", err)
	}
	return p
}

// mtus returns the MTU of eth0 and of its IPv4 routes in every table, by destination.
func (p *pod) mtus(t *testing.T) (int, map[string]int) {
	t.Helper()
	var mtu int
	routes := map[string]int{}
	err := p.ns.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(podIf)
		if err != nil {
			return err
		}
		mtu = l.Attrs().MTU
		rs, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{LinkIndex: l.Attrs().Index},
			netlink.RT_FILTER_OIF|netlink.RT_FILTER_TABLE)
		if err != nil {
			return err
		}
		for _, r := range rs {
			if r.Dst != nil {
				routes[r.Dst.String()] = r.MTU
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("read pod mtu: %v", err)
	}
	return mtu, routes
}

// prevResult is what a primary plugin reports for the pod, rendered in version v.
func (p *pod) prevResult(t *testing.T, v string, withIfaces bool) map[string]any {
	t.Helper()
	res := &current.Result{CNIVersion: "1.1.0"}
	if withIfaces {
		res.Interfaces = []*current.Interface{
			{Name: "host0"},
			{Name: podIf, Sandbox: p.ns.Path(), Mac: "02:00:00:00:00:01"},
		}
	}
	ip, ipn, _ := net.ParseCIDR("198.18.1.2/24")
	ipn.IP = ip
	idx := 1
	ipc := &current.IPConfig{Address: *ipn, Gateway: net.ParseIP("198.18.1.1")}
	if withIfaces {
		ipc.Interface = &idx
	}
	res.IPs = []*current.IPConfig{ipc}
	conv, err := res.GetAsVersion(v)
	if err != nil {
		t.Fatalf("convert result to %s: %v", v, err)
	}
	b, err := json.Marshal(conv)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

func config(t *testing.T, v string, extra map[string]any, prev map[string]any) []byte {
	t.Helper()
	// The boot gate's files of this host are none of a test's business: unless a test
	// sets them, they are missing files of its own (gate open).
	m := map[string]any{"cniVersion": v, "name": "k8s-pod-network", "type": "secureoverlay",
		"stateFile": filepath.Join(t.TempDir(), "dataplane.json"), "readyFile": filepath.Join(t.TempDir(), "ready.json")}
	for k, x := range extra {
		m[k] = x
	}
	if prev != nil {
		m["prevResult"] = prev
	}
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// dispatch runs the plugin in-process through skel's dispatcher (as the binary's main
// does), with conf on stdin; the CNI_* environment is set by the testutils caller.
func dispatch(conf []byte) error {
	f, err := os.CreateTemp("", "secureoverlay-stdin-")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	if _, err := f.Write(conf); err != nil {
		return err
	}
	if _, err := f.Seek(0, 0); err != nil {
		return err
	}
	old := os.Stdin
	os.Stdin = f
	defer func() { os.Stdin = old }()
	if e := skel.PluginMainFuncsWithError(Funcs(), Versions, About); e != nil {
		return e
	}
	return nil
}

func add(p *pod, conf []byte) (types.Result, []byte, error) {
	return testutils.CmdAdd(p.ns.Path(), "c0ffee", podIf, conf, func() error { return dispatch(conf) })
}

func check(p *pod, conf []byte) error {
	return testutils.CmdCheck(p.ns.Path(), "c0ffee", podIf, func() error { return dispatch(conf) })
}

func del(netns string, conf []byte) error {
	return testutils.CmdDel(netns, "c0ffee", podIf, func() error { return dispatch(conf) })
}

func status(conf []byte) error {
	return testutils.CmdStatus(func() error { return dispatch(conf) })
}

// gc runs GC; testutils has no helper for it.
func gc(t *testing.T, conf []byte) error {
	t.Setenv("CNI_COMMAND", "GC")
	t.Setenv("CNI_PATH", os.Getenv("PATH"))
	defer os.Unsetenv("CNI_COMMAND")
	return dispatch(conf)
}

func wantCode(t *testing.T, what string, err error, code uint, contains ...string) {
	t.Helper()
	var e *types.Error
	if !errors.As(err, &e) {
		t.Errorf("%s: error %v; want CNI error %d", what, err, code)
		return
	}
	if e.Code != code {
		t.Errorf("%s: error code %d (%s); want %d", what, e.Code, e.Msg, code)
	}
	for _, c := range contains {
		if !strings.Contains(e.Msg, c) {
			t.Errorf("%s: message %q lacks %q", what, e.Msg, c)
		}
	}
}

func atLeast(v, min string) bool {
	idx := func(s string) int {
		for i, x := range allVersions {
			if x == s {
				return i
			}
		}
		return -1
	}
	return idx(v) >= idx(min)
}

// TestVerbsEveryVersion runs every verb under every spec version in real namespaces:
// pod MTU equal to the budget (passes), one above (enforce fails, clamp lowers, warn logs).
func TestVerbsEveryVersion(t *testing.T) {
	requireRoot(t)
	const ext, bud = 1500, 1452
	for _, v := range allVersions {
		t.Run(v, func(t *testing.T) {
			// At the budget: ADD passes prevResult through unchanged.
			p := newPod(t, bud, 1500)
			prev := p.prevResult(t, v, true)
			conf := config(t, v, map[string]any{"externalMTU": ext}, prev)
			res, out, err := add(p, conf)
			if err != nil {
				t.Fatalf("ADD at budget: %v", err)
			}
			if res.Version() != v {
				t.Errorf("ADD result version %s, want %s", res.Version(), v)
			}
			var got, want map[string]any
			_ = json.Unmarshal(out, &got)
			wantB, _ := json.Marshal(prev)
			_ = json.Unmarshal(wantB, &want)
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("ADD changed the result:\n got %v\nwant %v", got, want)
			}
			if mtu, _ := p.mtus(t); mtu != bud {
				t.Errorf("ADD changed the mtu to %d", mtu)
			}

			err = check(p, conf)
			if atLeast(v, "0.4.0") {
				if err != nil {
					t.Errorf("CHECK at budget: %v", err)
				}
			} else {
				wantCode(t, "CHECK "+v, err, types.ErrIncompatibleCNIVersion)
			}
			for i := 0; i < 2; i++ { // DEL is idempotent
				if err := del(p.ns.Path(), conf); err != nil {
					t.Errorf("DEL #%d: %v", i+1, err)
				}
			}
			if err := status(conf); atLeast(v, "1.1.0") {
				if err != nil {
					t.Errorf("STATUS: %v", err)
				}
			} else {
				wantCode(t, "STATUS "+v, err, types.ErrIncompatibleCNIVersion)
			}
			if err := gc(t, config(t, v, map[string]any{"externalMTU": ext, "cni.dev/valid-attachments": []any{}}, nil)); atLeast(v, "1.1.0") {
				if err != nil {
					t.Errorf("GC: %v", err)
				}
			} else {
				wantCode(t, "GC "+v, err, types.ErrIncompatibleCNIVersion)
			}

			// One above the budget, enforce: ADD fails with the full explanation, naming
			// Calico's knobs (not UCP's as if they were Calico's).
			over := newPod(t, bud+1, 1500)
			confOver := config(t, v, map[string]any{"externalMTU": ext, "mode": "enforce"}, over.prevResult(t, v, true))
			_, _, err = add(over, confOver)
			wantCode(t, "ADD enforce over budget", err, ErrMTUOverBudget,
				"eth0", "mtu 1453", "budget 1452", "external mtu 1500", "icv 8", "spec.calicoNetwork.mtu",
				"veth_mtu in ConfigMap kube-system/calico-config", "Docker UCP/MKE: calico_mtu and ipip_mtu", "secureoverlayctl mtu")
			if mtu, _ := over.mtus(t); mtu != bud+1 {
				t.Errorf("enforce changed the mtu to %d", mtu)
			}
			if atLeast(v, "0.4.0") {
				wantCode(t, "CHECK enforce over budget", check(over, confOver), ErrMTUOverBudget, "mtu 1453", "secureoverlayctl mtu")
			}
			if err := del(over.ns.Path(), confOver); err != nil {
				t.Errorf("DEL after failed ADD: %v", err)
			}

			// Clamp (the default: no "mode"): the netns shows the budget afterwards;
			// routes above it are lowered.
			confClamp := config(t, v, map[string]any{"externalMTU": ext}, over.prevResult(t, v, true))
			res, out, err = add(over, confClamp)
			if err != nil {
				t.Fatalf("ADD clamp: %v", err)
			}
			mtu, routes := over.mtus(t)
			if mtu != bud {
				t.Errorf("clamp: pod mtu %d, want %d", mtu, bud)
			}
			if routes["198.18.2.0/24"] != bud || routes["198.18.3.0/24"] != 0 || routes["198.18.4.0/24"] != 1280 || routes["198.18.5.0/24"] != bud {
				t.Errorf("clamp: route mtus %v; want 198.18.2.0/24=%d, .3=0 (unset), .4=1280, .5 (table 100)=%d", routes, bud, bud)
			}
			r100, err := current.NewResultFromResult(res)
			if err != nil {
				t.Fatal(err)
			}
			wantMTU := 0
			if v == "1.1.0" {
				wantMTU = bud
			}
			if len(r100.Interfaces) != 2 || r100.Interfaces[1].Mtu != wantMTU {
				t.Errorf("clamp result %s: interfaces %v; want eth0 mtu %d", out, r100.Interfaces, wantMTU)
			}
			if atLeast(v, "0.4.0") {
				if err := check(over, confClamp); err != nil {
					t.Errorf("CHECK after clamp: %v", err)
				}
			}
		})
	}
}

func TestWarnLogs(t *testing.T) {
	requireRoot(t)
	p := newPod(t, 1500, 0)
	logFile := filepath.Join(t.TempDir(), "so.log")
	conf := config(t, "1.0.0", map[string]any{"externalMTU": 1500, "mode": "warn", "logFile": logFile}, p.prevResult(t, "1.0.0", true))
	if _, _, err := add(p, conf); err != nil {
		t.Fatalf("ADD warn: %v", err)
	}
	if err := check(p, conf); err != nil {
		t.Fatalf("CHECK warn: %v", err)
	}
	if mtu, _ := p.mtus(t); mtu != 1500 {
		t.Errorf("warn changed the mtu to %d", mtu)
	}
	b, err := os.ReadFile(logFile)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"warn: container c0ffee", "mtu 1500", "budget 1452", "warn: check container c0ffee"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("log lacks %q:\n%s", want, b)
		}
	}
}

// TestLogsNameCalicosKnobs: in every mode, what the plugin logs about a pod of a default
// Calico install (eth0 at 1480, budget 1452) names Calico's real knobs and
// `secureoverlayctl mtu`; clamp (the default) starts the pod at 1452, enforce refuses it,
// warn leaves it at 1480.
func TestLogsNameCalicosKnobs(t *testing.T) {
	requireRoot(t)
	for _, tc := range []struct {
		mode    string
		wantMTU int
		line    string
	}{
		{"", 1452, "clamp: container c0ffee"},
		{"clamp", 1452, "clamp: container c0ffee"},
		{"enforce", 1480, "enforce: container c0ffee"},
		{"warn", 1480, "warn: container c0ffee"},
	} {
		t.Run("mode="+tc.mode, func(t *testing.T) {
			p := newPod(t, 1480, 0)
			logFile := filepath.Join(t.TempDir(), "so.log")
			conf := config(t, "1.0.0", map[string]any{"externalMTU": 1500, "mode": tc.mode, "logFile": logFile}, p.prevResult(t, "1.0.0", true))
			_, _, err := add(p, conf)
			if tc.mode == "enforce" {
				wantCode(t, "ADD enforce", err, ErrMTUOverBudget, knobWords...)
			} else if err != nil {
				t.Fatalf("ADD %s: %v", tc.mode, err)
			}
			if mtu, _ := p.mtus(t); mtu != tc.wantMTU {
				t.Errorf("pod mtu %d, want %d", mtu, tc.wantMTU)
			}
			b, err := os.ReadFile(logFile)
			if err != nil {
				t.Fatal(err)
			}
			var line string
			for _, l := range strings.Split(string(b), "\n") {
				if strings.Contains(l, tc.line) {
					line = l
				}
			}
			if line == "" {
				t.Fatalf("log lacks %q:\n%s", tc.line, b)
			}
			checkMessage(t, "log of mode "+tc.mode, line)
		})
	}
}

func TestICV16AndNoInterfacesInResult(t *testing.T) {
	requireRoot(t)
	// Budget at 1500 with a 16-byte ICV is 1446; the result names no interfaces, so the
	// plugin falls back to CNI_IFNAME.
	p := newPod(t, 1447, 0)
	conf := config(t, "1.0.0", map[string]any{"externalMTU": 1500, "icvBytes": 16, "mode": "enforce"}, p.prevResult(t, "1.0.0", false))
	_, _, err := add(p, conf)
	wantCode(t, "ADD icv16", err, ErrMTUOverBudget, "budget 1446", "icv 16")

	p2 := newPod(t, 1446, 0)
	conf2 := config(t, "1.0.0", map[string]any{"externalMTU": 1500, "icvBytes": 16}, p2.prevResult(t, "1.0.0", false))
	if _, _, err := add(p2, conf2); err != nil {
		t.Errorf("ADD icv16 at budget: %v", err)
	}
}

func TestBadConfigAndMissingPrevResult(t *testing.T) {
	requireRoot(t)
	p := newPod(t, 1400, 0)
	prev := p.prevResult(t, "1.0.0", true)
	cases := []struct {
		extra map[string]any
		code  uint
		want  []string
	}{
		{map[string]any{"mtu": 1400}, types.ErrUnsupportedField, []string{`"mtu"`, "1400"}},
		{map[string]any{"icvBytes": 10}, types.ErrInvalidNetworkConfig, []string{"icvBytes"}},
		{map[string]any{"mode": "block"}, types.ErrInvalidNetworkConfig, []string{"mode", "block"}},
		{map[string]any{"externalMTU": 100}, types.ErrInvalidNetworkConfig, []string{"externalMTU"}},
		{map[string]any{"interfacePattern": "("}, types.ErrInvalidNetworkConfig, []string{"interfacePattern"}},
	}
	for _, c := range cases {
		conf := config(t, "1.1.0", c.extra, prev)
		_, _, err := add(p, conf)
		wantCode(t, fmt.Sprintf("ADD %v", c.extra), err, c.code, c.want...)
		wantCode(t, fmt.Sprintf("CHECK %v", c.extra), check(p, conf), c.code, c.want...)
		wantCode(t, fmt.Sprintf("STATUS %v", c.extra), status(conf), c.code, c.want...)
		wantCode(t, fmt.Sprintf("GC %v", c.extra), gc(t, conf), c.code, c.want...)
		if err := del(p.ns.Path(), conf); err != nil {
			t.Errorf("DEL %v: %v", c.extra, err)
		}
	}

	noPrev := config(t, "1.0.0", map[string]any{"externalMTU": 1500}, nil)
	_, _, err := add(p, noPrev)
	wantCode(t, "ADD without prevResult", err, types.ErrInvalidNetworkConfig, "prevResult", "chained")
	wantCode(t, "CHECK without prevResult", check(p, noPrev), types.ErrInvalidNetworkConfig, "prevResult")

	// The result names an interface the pod does not have.
	res := p.prevResult(t, "1.0.0", true)
	res["interfaces"].([]any)[1].(map[string]any)["name"] = "nope0"
	_, _, err = add(p, config(t, "1.0.0", map[string]any{"externalMTU": 1500}, res))
	wantCode(t, "ADD with missing interface", err, ErrPodInterface, "nope0")
}

func TestDelAlwaysSucceeds(t *testing.T) {
	requireRoot(t)
	conf := config(t, "1.0.0", map[string]any{"externalMTU": 1500}, nil)
	// No netns at all, no prevResult, ADD never ran.
	if err := del("", conf); err != nil {
		t.Errorf("DEL without netns: %v", err)
	}
	// A netns path that is gone.
	if err := del("/var/run/netns/secureoverlay-gone", conf); err != nil {
		t.Errorf("DEL with a vanished netns: %v", err)
	}
	// A pod whose namespace still exists, repeated.
	p := newPod(t, 1400, 0)
	for i := 0; i < 3; i++ {
		if err := del(p.ns.Path(), config(t, "1.1.0", map[string]any{"externalMTU": 1500}, p.prevResult(t, "1.1.0", true))); err != nil {
			t.Errorf("DEL #%d: %v", i+1, err)
		}
	}
}

// TestDetectInHostNamespace runs the plugin inside a test-made "host" namespace whose
// external link has MTU 1450 (budget 1402), with a pod veth whose host end lives there:
// clamp lowers both ends.
func TestDetectInHostNamespace(t *testing.T) {
	requireRoot(t)
	host := newNS(t)
	podNS := newNS(t)
	err := host.Do(func(ns.NetNS) error {
		la := netlink.NewLinkAttrs()
		la.Name, la.MTU = "eth0", 1450
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: "uplink"}); err != nil {
			return err
		}
		la = netlink.NewLinkAttrs()
		la.Name, la.MTU = "cali1", 1440
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: podIf, PeerNamespace: netlink.NsFd(int(podNS.Fd()))}); err != nil {
			return err
		}
		for _, n := range []string{"eth0", "uplink", "cali1"} {
			l, err := netlink.LinkByName(n)
			if err != nil {
				return err
			}
			if err := netlink.LinkSetUp(l); err != nil {
				return err
			}
		}
		return podNS.Do(func(ns.NetNS) error {
			l, err := netlink.LinkByName(podIf)
			if err != nil {
				return err
			}
			return netlink.LinkSetUp(l)
		})
	})
	if err != nil {
		t.Fatalf("set up namespaces: %v", err)
	}
	p := &pod{ns: podNS}
	res := &current.Result{CNIVersion: "1.1.0", Interfaces: []*current.Interface{{Name: "cali1"}, {Name: podIf, Sandbox: podNS.Path()}}}
	b, _ := json.Marshal(res)
	var prev map[string]any
	_ = json.Unmarshal(b, &prev)

	var addErr, enforceErr, statusErr error
	err = host.Do(func(ns.NetNS) error {
		// The veth to the uplink reaches oper-up asynchronously; wait for detection.
		enforce := config(t, "1.1.0", map[string]any{"interfacePattern": "^eth0$", "mode": "enforce"}, prev)
		for i := 0; i < 100; i++ {
			_, _, enforceErr = add(p, enforce)
			var e *types.Error
			if !errors.As(enforceErr, &e) || e.Code != ErrExternalMTU {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		statusErr = status(enforce)
		_, _, addErr = add(p, config(t, "1.1.0", map[string]any{"mode": "clamp"}, prev))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	wantCode(t, "ADD enforce with detected external mtu", enforceErr, ErrMTUOverBudget, "budget 1402", "external mtu 1450 from link eth0")
	if statusErr != nil {
		t.Errorf("STATUS with detectable external mtu: %v", statusErr)
	}
	if addErr != nil {
		t.Fatalf("ADD clamp: %v", addErr)
	}
	if mtu, _ := p.mtus(t); mtu != 1402 {
		t.Errorf("pod mtu %d after clamp, want 1402", mtu)
	}
	_ = host.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName("cali1")
		if err != nil || l.Attrs().MTU != 1402 {
			t.Errorf("host end cali1: %v mtu %d, want 1402", err, l.Attrs().MTU)
		}
		return nil
	})

	// With no matching up link, STATUS says the plugin cannot serve ADD, and ADD fails.
	var st, ad error
	_ = host.Do(func(ns.NetNS) error {
		c := config(t, "1.1.0", map[string]any{"interfacePattern": "^wlan"}, prev)
		st = status(c)
		_, _, ad = add(p, c)
		return nil
	})
	wantCode(t, "STATUS without external link", st, errPluginNotAvailable, "^wlan")
	wantCode(t, "ADD without external link", ad, ErrExternalMTU, "externalMTU")

	// In warn mode the same situation only logs: STATUS and ADD succeed.
	_ = host.Do(func(ns.NetNS) error {
		c := config(t, "1.1.0", map[string]any{"interfacePattern": "^wlan", "mode": "warn"}, prev)
		st = status(c)
		_, _, ad = add(p, c)
		return nil
	})
	if st != nil || ad != nil {
		t.Errorf("warn mode without external link: STATUS %v, ADD %v; want both to succeed", st, ad)
	}
}

// TestBootGate: on a node whose data plane was last in enforce, ADD holds the pod until
// the agent's ready file of this boot exists — waiting for it up to gateWait, then
// refusing with 11 ("try again later") and words that say why — and it sets the pod's
// interface up untouched once the gate opens. A node never encrypted, or last off, is
// not gated; CHECK and DEL never are.
func TestBootGate(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	stateFile, readyFile := filepath.Join(dir, "lib", "dataplane.json"), filepath.Join(dir, "run", "ready.json")
	oldWait, oldPoll, oldBoot := gateWait, gatePoll, bootID
	gateWait, gatePoll = 600*time.Millisecond, 20*time.Millisecond
	bootID = func() (string, error) { return "boot-2", nil }
	t.Cleanup(func() { gateWait, gatePoll, bootID = oldWait, oldPoll, oldBoot })

	p := newPod(t, 1400, 0)
	logFile := filepath.Join(dir, "so.log")
	conf := config(t, "1.0.0", map[string]any{"externalMTU": 1500, "stateFile": stateFile, "readyFile": readyFile, "logFile": logFile},
		p.prevResult(t, "1.0.0", true))

	// Never encrypted: open.
	if _, _, err := add(p, conf); err != nil {
		t.Fatalf("ADD on a node that never encrypted: %v", err)
	}
	// Last in enforce, agent not back in this boot: closed after the wait.
	if err := gate.WriteState(stateFile, gate.State{Mode: "enforce", Node: "n1"}); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	_, _, err := add(p, conf)
	wantCode(t, "ADD while the agent is not back", err, types.ErrTryAgainLater,
		"sends no plaintext", "mode enforce", "has not programmed it in this boot", readyFile, stateFile)
	if d := time.Since(t0); d < gateWait {
		t.Errorf("refused after %s, before the %s wait", d, gateWait)
	}
	// CHECK and DEL are not gated.
	if err := check(p, conf); err != nil {
		t.Errorf("CHECK gated: %v", err)
	}
	// A ready file of the previous boot (a /run that is not tmpfs) does not open it.
	if err := gate.WriteReady(readyFile, gate.Ready{BootID: "boot-1", Mode: "enforce"}); err != nil {
		t.Fatal(err)
	}
	_, _, err = add(p, conf)
	wantCode(t, "ADD with a ready file of another boot", err, types.ErrTryAgainLater, "another boot (boot-1, this is boot-2)")
	// The agent programs the node while an ADD waits: that ADD goes through. The wait is
	// long for this ADD (it returns as soon as the file appears): a loaded machine may
	// run the writer late, and the ADD must not give up first.
	short := gateWait
	gateWait = 30 * time.Second
	go func() {
		time.Sleep(200 * time.Millisecond)
		_ = gate.WriteReady(readyFile, gate.Ready{BootID: "boot-2", Mode: "enforce", At: time.Now()})
	}()
	t0 = time.Now()
	_, _, err = add(p, conf)
	gateWait = short
	if err != nil {
		t.Fatalf("ADD while the agent came back: %v", err)
	}
	if d := time.Since(t0); d < 200*time.Millisecond {
		t.Errorf("ADD went through after %s, before the ready file was written", d)
	}
	if mtu, _ := p.mtus(t); mtu != 1400 {
		t.Errorf("pod mtu %d after a gated ADD; want 1400 untouched", mtu)
	}
	// A state file that cannot be parsed closes the gate even with a ready file.
	if err := os.WriteFile(stateFile, []byte("{"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, _, err = add(p, conf)
	wantCode(t, "ADD with a corrupt state file", err, types.ErrTryAgainLater, "cannot tell whether this node encrypted")
	// Last off: open.
	if err := gate.WriteState(stateFile, gate.State{Mode: "off"}); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(readyFile); err != nil {
		t.Fatal(err)
	}
	if _, _, err := add(p, conf); err != nil {
		t.Errorf("ADD on a node last off: %v", err)
	}
	if err := del(p.ns.Path(), conf); err != nil {
		t.Errorf("DEL: %v", err)
	}
	b, _ := os.ReadFile(logFile)
	if !strings.Contains(string(b), "gate closed: container c0ffee") {
		t.Errorf("the log does not record the held pod:\n%s", b)
	}
}
