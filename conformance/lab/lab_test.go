package lab

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Fast tier: the pure parts (QEMU command line, cluster script, xfrm parser).

func fakeImage(t *testing.T) Image {
	dir := t.TempDir()
	return Image{Kernel: filepath.Join(dir, "vmlinuz"), Initrd: filepath.Join(dir, "initrd.img")}
}

func argValue(t *testing.T, args []string, flag string) []string {
	t.Helper()
	var vals []string
	for i := 0; i+1 < len(args); i++ {
		if args[i] == flag {
			vals = append(vals, args[i+1])
		}
	}
	return vals
}

func TestQemuArgsIsolateTheGuest(t *testing.T) {
	ro, rw := t.TempDir(), t.TempDir()
	opts := Options{
		MemoryMiB:     768,
		CPUs:          2,
		HostForwards:  []HostForward{{HostPort: 18080, GuestPort: 8080}},
		GuestForwards: []GuestForward{{GuestPort: 6443, HostPort: 36443}},
		Shares: []Share{
			{Tag: "bin", HostPath: ro, GuestPath: "/opt/bin"},
			{Tag: "out", HostPath: rw, GuestPath: "/mnt/out", Writable: true},
		},
	}
	args, err := qemuArgs(opts, fakeImage(t), "tcg", "/state", 40000, "/usr/bin/busybox")
	if err != nil {
		t.Fatal(err)
	}
	netdev := argValue(t, args, "-netdev")
	if len(netdev) != 1 {
		t.Fatalf("want one -netdev, got %q", netdev)
	}
	for _, want := range []string{
		"user,", ",restrict=on,",
		",hostfwd=tcp:127.0.0.1:40000-:7000",
		",hostfwd=tcp:127.0.0.1:18080-:8080",
		",guestfwd=tcp:10.0.2.100:6443-cmd:/usr/bin/busybox nc 127.0.0.1 36443",
	} {
		if !strings.Contains(netdev[0], want) {
			t.Errorf("netdev %q lacks %q", netdev[0], want)
		}
	}
	// Every host forward binds loopback only.
	for _, part := range strings.Split(netdev[0], ",") {
		if strings.HasPrefix(part, "hostfwd=") && !strings.HasPrefix(part, "hostfwd=tcp:127.0.0.1:") {
			t.Errorf("host forward %q is not bound to loopback", part)
		}
	}
	virtfs := argValue(t, args, "-virtfs")
	if len(virtfs) != 2 || !strings.HasSuffix(virtfs[0], ",readonly=on") || strings.Contains(virtfs[1], "readonly") {
		t.Errorf("virtfs = %q, want the first share read-only and the second writable", virtfs)
	}
	appendArg := strings.Join(argValue(t, args, "-append"), " ")
	for _, want := range []string{"console=ttyS0", "lab.share=bin:/opt/bin:ro", "lab.share=out:/mnt/out:rw"} {
		if !strings.Contains(appendArg, want) {
			t.Errorf("kernel command line %q lacks %q", appendArg, want)
		}
	}
	if got := argValue(t, args, "-m"); len(got) != 1 || got[0] != "768" {
		t.Errorf("-m = %q", got)
	}
	if got := argValue(t, args, "-machine"); len(got) != 1 || got[0] != "q35" {
		t.Errorf("-machine = %q", got)
	}
	if got := argValue(t, args, "-accel"); len(got) != 1 || got[0] != "tcg,thread=single" {
		t.Errorf("-accel = %q, want single-threaded TCG", got)
	}
	if got := argValue(t, args, "-serial"); len(got) != 1 || got[0] != "file:/state/console.log" {
		t.Errorf("-serial = %q", got)
	}
}

func TestQemuArgsRejectBadInput(t *testing.T) {
	dir := t.TempDir()
	cases := map[string]Options{
		"bad tag":          {Shares: []Share{{Tag: "Bad Tag", HostPath: dir, GuestPath: "/x"}}},
		"duplicate tag":    {Shares: []Share{{Tag: "a", HostPath: dir, GuestPath: "/x"}, {Tag: "a", HostPath: dir, GuestPath: "/y"}}},
		"relative path":    {Shares: []Share{{Tag: "a", HostPath: dir, GuestPath: "x"}}},
		"colon in path":    {Shares: []Share{{Tag: "a", HostPath: dir, GuestPath: "/x:rw"}}},
		"missing host dir": {Shares: []Share{{Tag: "a", HostPath: filepath.Join(dir, "nope"), GuestPath: "/x"}}},
		"port 0":           {HostForwards: []HostForward{{HostPort: 0, GuestPort: 80}}},
		"port too big":     {GuestForwards: []GuestForward{{GuestPort: 80, HostPort: 70000}}},
	}
	for name, opts := range cases {
		if _, err := qemuArgs(opts, fakeImage(t), "tcg", "/state", 40000, "/bin/busybox"); err == nil {
			t.Errorf("%s: qemuArgs accepted %+v", name, opts)
		}
	}
	if _, err := qemuArgs(Options{GuestForwards: []GuestForward{{GuestPort: 1, HostPort: 2}}}, fakeImage(t), "tcg", "/s", 1, ""); err == nil {
		t.Error("guest forward without a relay binary accepted")
	}
}

func TestFindImageReportsMissingImage(t *testing.T) {
	t.Setenv(KernelEnv, "") // bookworm's kernel, whatever the matrix run selected
	dir := t.TempDir()
	if _, err := FindImage(dir); err == nil || !strings.Contains(err.Error(), "make tools") {
		t.Fatalf("FindImage(empty) = %v, want ErrNoImage", err)
	}
	if err := os.MkdirAll(filepath.Join(dir, "lab"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"vmlinuz", "initrd.img"} {
		if err := os.WriteFile(filepath.Join(dir, "lab", f), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "lab", "kernel.release"), []byte("6.1.0-test\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	img, err := FindImage(dir)
	if err != nil || img.Release != "6.1.0-test" {
		t.Fatalf("FindImage = %+v, %v", img, err)
	}
	t.Setenv("SECUREOVERLAY_CACHE_DIR", dir)
	if CacheDir() != dir {
		t.Fatalf("CacheDir() = %s, want $SECUREOVERLAY_CACHE_DIR", CacheDir())
	}
}

// TestKernelSelection: SECUREOVERLAY_LAB_KERNEL picks the image directory of the kernel
// matrix; a bad value is an error naming the variable, a missing image names the command.
func TestKernelSelection(t *testing.T) {
	dir := t.TempDir()
	for _, k := range []string{"6.12", "7.3"} {
		if err := os.MkdirAll(filepath.Join(dir, "lab-"+k), 0o755); err != nil {
			t.Fatal(err)
		}
		for _, f := range []string{"vmlinuz", "initrd.img"} {
			if err := os.WriteFile(filepath.Join(dir, "lab-"+k, f), []byte("x"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.WriteFile(filepath.Join(dir, "lab-"+k, "kernel.release"), []byte(k+".0-test\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct{ env, release, err string }{
		{"6.12", "6.12.0-test", ""},
		{"7.3", "7.3.0-test", ""},
		{"6.18", "", "SECUREOVERLAY_LAB_KERNEL=6.18 hack/tools-lab.sh"},
		{"", "", "lab/vmlinuz missing"},
		{"6.1", "", "lab/vmlinuz missing"},
		{"../x", "", "want a kernel series"},
		{"trixie", "", "want a kernel series"},
	} {
		t.Setenv(KernelEnv, c.env)
		img, err := FindImage(dir)
		switch {
		case c.err == "" && (err != nil || img.Release != c.release):
			t.Errorf("%s=%q: FindImage = %+v, %v; want release %s", KernelEnv, c.env, img, err, c.release)
		case c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)):
			t.Errorf("%s=%q: FindImage error %v, want one containing %q", KernelEnv, c.env, err, c.err)
		}
	}
}

func TestClusterSetupScript(t *testing.T) {
	for _, bad := range []Cluster{
		{Nodes: 0, UnderlayMTU: 1450, TunnelMTU: 1402},
		{Nodes: 3, UnderlayMTU: 1450, TunnelMTU: 1440},
		{Nodes: 3, UnderlayMTU: 100, TunnelMTU: 80},
	} {
		if _, err := bad.SetupScript(); err == nil {
			t.Errorf("SetupScript accepted %+v", bad)
		}
	}
	s, err := Cluster{Nodes: 3, UnderlayMTU: 1450, TunnelMTU: 1402, Pods: true}.SetupScript()
	if err != nil {
		t.Fatal(err)
	}
	onlink := 0
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, "dev tunl0 onlink") {
			onlink++
		}
	}
	if onlink != 6 {
		t.Errorf("3 nodes need 6 onlink routes to remote blocks, script has %d", onlink)
	}
	for _, want := range []string{
		"ip -n node2 route add 10.244.1.0/26 via 198.18.0.1 dev tunl0 onlink",
		"ip -n node3 route add blackhole 10.244.3.0/26",
		"ip -n node1 link set tunl0 mtu 1402 up",
		"ip -n node1 link add eth0 mtu 1450 type veth peer name ul1 netns ul mtu 1450",
		"ip -n pod2 addr add 10.244.2.5/32 dev eth0",
		"ip -n pod2 route add default via 169.254.1.1 dev eth0",
	} {
		if !strings.Contains(s, want+"\n") {
			t.Errorf("script lacks %q", want)
		}
	}
	if strings.Contains(s, "default via 10.0.2") {
		t.Error("a namespace got a route out of the guest")
	}
	if strings.Contains(s, ControlBridge) {
		t.Error("control plane built without ControlPlane")
	}
	s, err = Cluster{Nodes: 2, UnderlayMTU: 1450, TunnelMTU: 1402, ControlPlane: true}.SetupScript()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"ip -n node2 addr add 198.19.0.2/24 dev mgmt0",
		"ip -n node1 route add 10.0.2.100/32 via 198.19.0.254 dev mgmt0",
		"iptables -w -t nat -A POSTROUTING -s 198.19.0.0/24 -d 10.0.2.100/32 -m comment --comment lab-control-plane -j MASQUERADE",
	} {
		if !strings.Contains(s, want+"\n") {
			t.Errorf("control-plane script lacks %q", want)
		}
	}
}

// Real `ip -s xfrm state` output from the lab (iproute2 6.1, kernel 6.1), with
// the key replaced by zeros.
const xfrmFixture = `src 198.18.0.2 dst 198.18.0.1
	proto esp spi 0x00001021(4129) reqid 1(0x00000001) mode transport
	replay-window 0 seq 0x00000000 flag esn (0x10000000)
	aead rfc4106(gcm(aes)) 0x0000000000000000000000000000000000000000 64
	anti-replay esn context:
	 seq-hi 0x0, seq 0x3, oseq-hi 0x0, oseq 0x0
	 replay_window 1024, bitmap-length 32
	 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000007 
	sel src 0.0.0.0/0 dst 0.0.0.0/0 uid 0
	lifetime config:
	  limit: soft (INF)(bytes), hard (INF)(bytes)
	  limit: soft (INF)(packets), hard (INF)(packets)
	  expire add: soft 0(sec), hard 0(sec)
	  expire use: soft 0(sec), hard 0(sec)
	lifetime current:
	  252(bytes), 3(packets)
	  add 2026-11-22 10:47:51 use 2026-11-22 10:47:53
	stats:
	  replay-window 0 replay 2 failed 1
src 198.18.0.1 dst 198.18.0.2
	proto esp spi 0x00001012(4114) reqid 7(0x00000007) mode transport
	replay-window 0 seq 0x00000000 flag esn (0x10000000)
	anti-replay esn context:
	 seq-hi 0x0, seq 0x0, oseq-hi 0x1, oseq 0x5
	 replay_window 1024, bitmap-length 32
	lifetime current:
	  420(bytes), 5(packets)
	stats:
	  replay-window 0 replay 0 failed 0
`

func TestParseXfrmStates(t *testing.T) {
	sas, err := ParseXfrmStates(xfrmFixture)
	if err != nil {
		t.Fatal(err)
	}
	want := []SA{
		{Src: "198.18.0.2", Dst: "198.18.0.1", Proto: "esp", SPI: 0x1021, ReqID: 1, Mode: "transport", ESN: true,
			ReplayWindow: 1024, Seq: 3, Bytes: 252, Packets: 3, ReplayDrops: 2, IntegrityFailed: 1},
		{Src: "198.18.0.1", Dst: "198.18.0.2", Proto: "esp", SPI: 0x1012, ReqID: 7, Mode: "transport", ESN: true,
			ReplayWindow: 1024, OSeq: 1<<32 | 5, Bytes: 420, Packets: 5},
	}
	if len(sas) != len(want) {
		t.Fatalf("got %d states, want %d: %+v", len(sas), len(want), sas)
	}
	for i := range want {
		if sas[i] != want[i] {
			t.Errorf("state %d:\n got %+v\nwant %+v", i, sas[i], want[i])
		}
	}
	if _, err := ParseXfrmStates("garbage before any state\n"); err == nil {
		t.Error("parser accepted text before the first state")
	}
	if _, err := ParseXfrmStates("src 1.1.1.1 dst 2.2.2.2\n\taead rfc4106(gcm(aes)) 0xdeadbeef 64\n"); err == nil {
		t.Error("parser accepted a state without its proto line")
	} else if strings.Contains(err.Error(), "deadbeef") {
		t.Errorf("parse error quotes key material: %v", err)
	}
}

// A kernel QEMU cannot load makes Boot fail fast with QEMU's own words, and
// leave no process or state behind.
func TestBootFailsCleanly(t *testing.T) {
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		if RequireAll() {
			t.Fatal("SECUREOVERLAY_REQUIRE_ALL=1 but qemu-system-x86_64 is not installed")
		}
		t.Skip("qemu-system-x86_64 not installed (run hack/install-deps.sh)")
	}
	cache := placeholderImage(t)
	state := filepath.Join(t.TempDir(), "state")
	// This guest dies at once; measure Boot's failure path, not the wait for the
	// machine-wide VM slot that another package's guest may hold.
	t.Setenv("SECUREOVERLAY_LAB_LOCK", filepath.Join(t.TempDir(), "vm.lock"))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	start := time.Now()
	vm, err := Boot(ctx, Options{CacheDir: cache, StateDir: state, Accel: "tcg", BootTimeout: 30 * time.Second})
	if err == nil {
		vm.Close()
		t.Fatal("booted a garbage kernel")
	}
	if !strings.Contains(err.Error(), "qemu exited during boot") {
		t.Errorf("error does not say QEMU exited: %v", err)
	}
	if d := time.Since(start); d > 20*time.Second {
		t.Errorf("failure took %s", d)
	}
	if _, err := os.Stat(filepath.Join(state, "qemu.log")); err != nil {
		t.Errorf("caller's state dir lost qemu.log: %v", err)
	}
}

// fakeQEMU puts a qemu-system-x86_64 on PATH that runs script (sh) and returns a cache
// with a placeholder image, so Boot's handling of how QEMU ends can be tested without an
// emulator.
func fakeQEMU(t *testing.T, script string) (cache string) {
	t.Helper()
	bin := t.TempDir()
	if err := os.WriteFile(filepath.Join(bin, "qemu-system-x86_64"), []byte("#!/bin/sh\n"+script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin+string(os.PathListSeparator)+os.Getenv("PATH"))
	t.Setenv("SECUREOVERLAY_LAB_LOCK", filepath.Join(t.TempDir(), "vm.lock"))
	return placeholderImage(t)
}

// placeholderImage returns a cache holding a lab image of placeholder files for the
// default kernel (whatever SECUREOVERLAY_LAB_KERNEL the matrix run selected).
func placeholderImage(t *testing.T) string {
	t.Helper()
	t.Setenv(KernelEnv, "")
	cache := t.TempDir()
	if err := os.MkdirAll(filepath.Join(cache, "lab"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"vmlinuz", "initrd.img"} {
		if err := os.WriteFile(filepath.Join(cache, "lab", f), []byte("not a kernel"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return cache
}

// An emulator that dies by a signal while the guest boots is started again once, the
// crash is reported in BootCrashes with its console kept, and the second QEMU's own
// outcome is what Boot returns.
func TestBootReplacesAnEmulatorThatCrashedOnce(t *testing.T) {
	runs := filepath.Join(t.TempDir(), "runs")
	// First run: print to the console as a booting guest would, then die by SIGSEGV.
	// Second run: exit 3 with a message (a stand-in for any ordinary QEMU failure).
	cache := fakeQEMU(t, `echo x >> `+runs+`
if [ "$(wc -l < `+runs+`)" -eq 1 ]; then
  for a in "$@"; do case "$a" in file:*) echo "Probing EDD" > "${a#file:}";; esac; done
  kill -SEGV $$
fi
echo "second qemu: no kernel" >&2
exit 3
`)
	state := filepath.Join(t.TempDir(), "state")
	vm, err := Boot(context.Background(), Options{CacheDir: cache, StateDir: state, Accel: "tcg", BootTimeout: 30 * time.Second})
	if err == nil {
		vm.Close()
		t.Fatal("booted with a fake emulator")
	}
	b, _ := os.ReadFile(runs)
	if n := strings.Count(string(b), "x"); n != 2 {
		t.Fatalf("QEMU started %d times, want 2 (one crash, one replacement)", n)
	}
	if !strings.Contains(err.Error(), "exit status 3") || !strings.Contains(err.Error(), "second qemu: no kernel") {
		t.Errorf("Boot's error is not the second QEMU's outcome: %v", err)
	}
	var crash *EmulatorCrashError
	if errors.As(err, &crash) {
		t.Errorf("the replaced crash leaked into the error: %v", err)
	}
	kept, rerr := os.ReadFile(filepath.Join(state, "console.crash1.log"))
	if rerr != nil || !strings.Contains(string(kept), "Probing EDD") {
		t.Errorf("the crashed guest's console was not kept (%v): %q", rerr, kept)
	}
}

// Two crashes in one Boot fail it, naming the signal.
func TestBootFailsOnASecondEmulatorCrash(t *testing.T) {
	runs := filepath.Join(t.TempDir(), "runs")
	cache := fakeQEMU(t, "echo x >> "+runs+"\nkill -SEGV $$\n")
	vm, err := Boot(context.Background(), Options{CacheDir: cache, Accel: "tcg", BootTimeout: 30 * time.Second})
	if err == nil {
		vm.Close()
		t.Fatal("booted with a fake emulator")
	}
	b, _ := os.ReadFile(runs)
	if n := strings.Count(string(b), "x"); n != 1+maxBootCrashes {
		t.Errorf("QEMU started %d times, want %d", n, 1+maxBootCrashes)
	}
	var crash *EmulatorCrashError
	if !errors.As(err, &crash) || crash.Signal != syscall.SIGSEGV {
		t.Errorf("error does not say the emulator crashed by SIGSEGV: %v", err)
	}
	if !strings.Contains(err.Error(), "qemu exited during boot (signal: segmentation fault)") {
		t.Errorf("error does not name the signal: %v", err)
	}
}
