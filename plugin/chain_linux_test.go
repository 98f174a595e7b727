package plugin

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/secureoverlay/secureoverlay/internal/testutil"
)

// chainEnv is a primary plugin (Debian's ptp + host-local, standing in for calico) and our
// binary, driven through libcni the way a container runtime drives them.
type chainEnv struct {
	cni     *libcni.CNIConfig
	host    ns.NetNS // the "node": the plugins run here and detect its uplink
	dataDir string
}

func skipOrFail(t *testing.T, reason string) {
	t.Helper()
	if os.Getenv("SECUREOVERLAY_REQUIRE_ALL") == "1" {
		t.Fatalf("SECUREOVERLAY_REQUIRE_ALL=1 but %s", reason)
	}
	t.Skip(reason)
}

// pluginBinary returns $SECUREOVERLAY_BIN_DIR/secureoverlay when it exists, else builds
// the plugin into a temporary directory.
func pluginBinary(t *testing.T) string {
	t.Helper()
	if dir := os.Getenv("SECUREOVERLAY_BIN_DIR"); dir != "" {
		if p := filepath.Join(dir, "secureoverlay"); fileExists(p) {
			return dir
		}
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	dir := t.TempDir()
	cmd := exec.Command(goBin, "build", "-o", filepath.Join(dir, "secureoverlay"), "github.com/secureoverlay/secureoverlay/cmd/secureoverlay")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build the plugin: %v\n%s", err, out)
	}
	return dir
}

func fileExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && !st.IsDir()
}

func newChainEnv(t *testing.T, uplinkMTU int) *chainEnv {
	t.Helper()
	requireRoot(t)
	cniDir := os.Getenv("CNI_PLUGIN_DIR")
	if cniDir == "" {
		cniDir = "/usr/lib/cni"
	}
	for _, p := range []string{"ptp", "host-local"} {
		if !fileExists(filepath.Join(cniDir, p)) {
			skipOrFail(t, fmt.Sprintf("CNI plugin %s not found in %s (run hack/install-deps.sh or set CNI_PLUGIN_DIR)", p, cniDir))
		}
	}
	e := &chainEnv{host: newNS(t), dataDir: t.TempDir()}
	e.cni = libcni.NewCNIConfigWithCacheDir([]string{pluginBinary(t), cniDir}, filepath.Join(e.dataDir, "cache"), nil)

	// The node's uplink: a veth "eth0" whose peer is up, so it becomes oper-up.
	err := e.host.Do(func(ns.NetNS) error {
		la := netlink.NewLinkAttrs()
		la.Name, la.MTU = "eth0", uplinkMTU
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: "uplink-peer"}); err != nil {
			return err
		}
		for _, n := range []string{"lo", "eth0", "uplink-peer"} {
			l, err := netlink.LinkByName(n)
			if err != nil {
				return err
			}
			if err := netlink.LinkSetUp(l); err != nil {
				return err
			}
		}
		return testutil.WaitOperUp("eth0", 5*time.Second)
	})
	if err != nil {
		t.Fatalf("set up host netns: %v", err)
	}
	return e
}

// conflist renders a calico-like chain: ptp with the pod MTU, then secureoverlay.
func (e *chainEnv) conflist(t *testing.T, cniVersion string, podMTU int, ours string) *libcni.NetworkConfigList {
	t.Helper()
	s := fmt.Sprintf(`{
  "cniVersion": %q,
  "name": "k8s-pod-network",
  "plugins": [
    {"type": "ptp", "mtu": %d, "ipMasq": false,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "198.19.7.0/24"}]], "dataDir": %q}},
    {"type": "secureoverlay", "logFile": %q%s}
  ]
}`, cniVersion, podMTU, filepath.Join(e.dataDir, "ipam"), filepath.Join(e.dataDir, "secureoverlay.log"), ours)
	list, err := libcni.ConfListFromBytes([]byte(s))
	if err != nil {
		t.Fatalf("parse conflist: %v\n%s", err, s)
	}
	return list
}

// run calls f inside the host namespace, where libcni executes the plugins.
func (e *chainEnv) run(t *testing.T, f func() error) error {
	t.Helper()
	var inner error
	if err := e.host.Do(func(ns.NetNS) error { inner = f(); return nil }); err != nil {
		t.Fatalf("enter host netns: %v", err)
	}
	return inner
}

func podLinkMTU(t *testing.T, pod ns.NetNS, name string) int {
	t.Helper()
	mtu := -1
	err := pod.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(name)
		if err != nil {
			return err
		}
		mtu = l.Attrs().MTU
		return nil
	})
	if err != nil {
		t.Fatalf("read %s mtu: %v", name, err)
	}
	return mtu
}

func TestChainThroughLibcni(t *testing.T) {
	e := newChainEnv(t, 1500) // budget 1452
	ctx := context.Background()

	cases := []struct {
		name    string
		podMTU  int
		ours    string
		wantErr uint // 0: success
		wantMTU int  // pod eth0 MTU after ADD
	}{
		{"under budget, enforce, configured external mtu", 1400, `, "mode": "enforce", "externalMTU": 1500`, 0, 1400},
		{"at budget, enforce, detected external mtu", 1452, `, "mode": "enforce"`, 0, 1452},
		{"over budget, enforce", 1453, `, "mode": "enforce", "externalMTU": 1500`, ErrMTUOverBudget, 0},
		{"over budget, enforce, detected", 1500, `, "mode": "enforce"`, ErrMTUOverBudget, 0},
		{"over budget, enforce, icv 16", 1450, `, "mode": "enforce", "icvBytes": 16`, ErrMTUOverBudget, 0},
		{"over budget, clamp", 1500, `, "mode": "clamp"`, 0, 1452},
		{"over budget, default mode clamps", 1480, ``, 0, 1452},
		{"over budget, warn", 1500, `, "mode": "warn"`, 0, 1500},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			list := e.conflist(t, "1.0.0", c.podMTU, c.ours)
			if _, err := e.cni.ValidateNetworkList(ctx, list); err != nil {
				t.Fatalf("validate conflist: %v", err)
			}
			pod := newNS(t)
			rt := &libcni.RuntimeConf{ContainerID: fmt.Sprintf("chain%d", i), NetNS: pod.Path(), IfName: "eth0"}

			var res types.Result
			err := e.run(t, func() error {
				var err error
				res, err = e.cni.AddNetworkList(ctx, list, rt)
				return err
			})
			if c.wantErr != 0 {
				wantCode(t, "ADD", err, c.wantErr, "eth0", "budget", "spec.calicoNetwork.mtu", "veth_mtu", "secureoverlayctl mtu")
				// The runtime cleans up a failed ADD with DEL: it must succeed.
				if err := e.run(t, func() error { return e.cni.DelNetworkList(ctx, list, rt) }); err != nil {
					t.Errorf("DEL after failed ADD: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("ADD: %v", err)
			}
			if got := podLinkMTU(t, pod, "eth0"); got != c.wantMTU {
				t.Errorf("pod eth0 mtu %d, want %d", got, c.wantMTU)
			}
			r, err := current.NewResultFromResult(res)
			if err != nil {
				t.Fatal(err)
			}
			if res.Version() != "1.0.0" || len(r.IPs) != 1 || !strings.HasPrefix(r.IPs[0].Address.String(), "198.19.7.") {
				t.Errorf("result not passed through: %+v", r)
			}
			if err := e.run(t, func() error { return e.cni.CheckNetworkList(ctx, list, rt) }); err != nil {
				t.Errorf("CHECK: %v", err)
			}
			if c.wantMTU == 1452 && c.podMTU > 1452 {
				// The host end of the ptp veth (in the result, no sandbox) is clamped too.
				for _, iface := range r.Interfaces {
					if iface.Sandbox != "" {
						continue
					}
					if got := podLinkMTU(t, e.host, iface.Name); got != 1452 {
						t.Errorf("host veth %s mtu %d, want 1452", iface.Name, got)
					}
				}
			}
			for n := 0; n < 2; n++ {
				if err := e.run(t, func() error { return e.cni.DelNetworkList(ctx, list, rt) }); err != nil {
					t.Errorf("DEL #%d: %v", n+1, err)
				}
			}
		})
	}

	// A CHECK after the pod MTU was raised behind our back fails in clamp mode (the
	// default) as in enforce mode.
	t.Run("check catches drift", func(t *testing.T) {
		list := e.conflist(t, "1.0.0", 1400, `, "externalMTU": 1500`)
		pod := newNS(t)
		rt := &libcni.RuntimeConf{ContainerID: "drift", NetNS: pod.Path(), IfName: "eth0"}
		if err := e.run(t, func() error { _, err := e.cni.AddNetworkList(ctx, list, rt); return err }); err != nil {
			t.Fatalf("ADD: %v", err)
		}
		_ = pod.Do(func(ns.NetNS) error {
			l, err := netlink.LinkByName("eth0")
			if err == nil {
				err = netlink.LinkSetMTU(l, 1460)
			}
			if err != nil {
				t.Errorf("raise mtu: %v", err)
			}
			return nil
		})
		err := e.run(t, func() error { return e.cni.CheckNetworkList(ctx, list, rt) })
		wantCode(t, "CHECK after drift", err, ErrMTUOverBudget, "mtu 1460")
		if err := e.run(t, func() error { return e.cni.DelNetworkList(ctx, list, rt) }); err != nil {
			t.Errorf("DEL: %v", err)
		}
	})

	logData, err := os.ReadFile(filepath.Join(e.dataDir, "secureoverlay.log"))
	if err != nil {
		t.Fatalf("plugin log: %v", err)
	}
	for _, want := range []string{"enforce: container chain2", "clamp: container chain5", "clamp: container chain6", "warn: container chain7"} {
		if !strings.Contains(string(logData), want) {
			t.Errorf("plugin log lacks %q:\n%s", want, logData)
		}
	}
}

// TestStatusAndGCThroughLibcni exercises the CNI 1.1 verbs against the binary. Debian's
// ptp speaks at most 1.0.0, so the list holds our plugin alone.
func TestStatusAndGCThroughLibcni(t *testing.T) {
	e := newChainEnv(t, 1500)
	ctx := context.Background()
	mk := func(ours string) *libcni.NetworkConfigList {
		list, err := libcni.ConfListFromBytes([]byte(`{"cniVersion":"1.1.0","name":"k8s-pod-network","plugins":[{"type":"secureoverlay"` + ours + `}]}`))
		if err != nil {
			t.Fatal(err)
		}
		return list
	}
	if err := e.run(t, func() error { return e.cni.GetStatusNetworkList(ctx, mk(``)) }); err != nil {
		t.Errorf("STATUS with a detectable uplink: %v", err)
	}
	err := e.run(t, func() error { return e.cni.GetStatusNetworkList(ctx, mk(`, "interfacePattern": "^wlan"`)) })
	wantCode(t, "STATUS without an uplink", err, errPluginNotAvailable, "^wlan")
	err = e.run(t, func() error { return e.cni.GetStatusNetworkList(ctx, mk(`, "mode": "strict"`)) })
	wantCode(t, "STATUS with a bad mode", err, types.ErrInvalidNetworkConfig, "mode")
	if err := e.run(t, func() error {
		return e.cni.GCNetworkList(ctx, mk(``), &libcni.GCArgs{ValidAttachments: []types.GCAttachment{{ContainerID: "x", IfName: "eth0"}}})
	}); err != nil {
		t.Errorf("GC: %v", err)
	}
	// ADD alone (no primary plugin, so no prevResult) is refused.
	pod := newNS(t)
	_, err = func() (types.Result, error) {
		var res types.Result
		err := e.run(t, func() error {
			var err error
			res, err = e.cni.AddNetworkList(ctx, mk(`, "externalMTU": 1500`), &libcni.RuntimeConf{ContainerID: "alone", NetNS: pod.Path(), IfName: "eth0"})
			return err
		})
		return res, err
	}()
	wantCode(t, "ADD without a primary plugin", err, types.ErrInvalidNetworkConfig, "prevResult")
	var te *types.Error
	if !errors.As(err, &te) {
		t.Errorf("libcni did not surface the plugin's CNI error: %v", err)
	}
}
