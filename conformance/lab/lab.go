// Package lab boots the VM lab: Debian's own kernel under qemu-system-x86_64
// with the initramfs hack/tools-lab.sh builds, so that tests get a kernel with
// ESP, IPIP, AES-GCM, xfrm and netfilter even where the host kernel lacks them.
// See docs/lab.md.
//
// Invariants:
//   - The guest's only network is QEMU user networking with restrict=on: the
//     guest reaches nothing outside except the explicit GuestForwards, which lead
//     to host loopback, and the host reaches the guest only through HostForwards
//     bound to 127.0.0.1. The guest has no default route.
//   - Commands run in the guest through labd (conformance/lab/guest/labd) over a
//     forwarded loopback port; errors never quote the command text, because
//     tests may pass key material in it.
//   - VM.Close always kills QEMU; a VM left running by a crashed test process
//     dies with it (Pdeathsig).
//   - Accel is TCG unless /dev/kvm can actually create a VM and a vCPU.
package lab

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/secureoverlay/secureoverlay/conformance/lab/wire"
	"github.com/secureoverlay/secureoverlay/conformance/spawn"
)

// GuestForwardAddr is the address inside the guest at which GuestForwards
// appear (QEMU's user network is 10.0.2.0/24; the guest is 10.0.2.15).
const GuestForwardAddr = "10.0.2.100"

// ErrNoImage means hack/tools-lab.sh has not built the lab image yet.
var ErrNoImage = errors.New("lab image not built (run `make tools`)")

// Share exposes a host directory to the guest over 9p.
type Share struct {
	// Tag names the share ([a-z0-9_], at most 31 characters).
	Tag string
	// HostPath is the directory on the host.
	HostPath string
	// GuestPath is where the guest mounts it (absolute, no spaces or colons).
	GuestPath string
	// Writable allows the guest to write; shares are read-only by default.
	Writable bool
}

// HostForward makes guest TCP port GuestPort reachable at 127.0.0.1:HostPort.
type HostForward struct {
	HostPort, GuestPort int
}

// GuestForward makes the host's 127.0.0.1:HostPort reachable from the guest at
// GuestForwardAddr:GuestPort. Each guest connection spawns one relay
// (`busybox nc`) on the host, so any number of connections work.
type GuestForward struct {
	GuestPort, HostPort int
}

// Options configure Boot. The zero value boots a 1-CPU, 512 MiB VM.
type Options struct {
	MemoryMiB int
	CPUs      int
	// Shares are mounted before labd starts, e.g. $SECUREOVERLAY_BIN_DIR.
	Shares        []Share
	HostForwards  []HostForward
	GuestForwards []GuestForward
	// CacheDir holds lab/vmlinuz and lab/initrd.img; default CacheDir().
	CacheDir string
	// StateDir receives console.log and qemu.log; default a temporary
	// directory that Close removes.
	StateDir string
	// BootTimeout bounds the wait for labd; default 4 minutes (TCG on a
	// loaded 2-core machine has been seen to need ~50 s).
	BootTimeout time.Duration
	// Accel is "tcg" or "kvm"; default $SECUREOVERLAY_LAB_ACCEL, else the probe.
	Accel string
	// KernelArgs are appended to the kernel command line.
	KernelArgs []string
}

// VM is a running lab guest.
type VM struct {
	// Accel is the accelerator QEMU runs with ("tcg" or "kvm").
	Accel string
	// BootDuration is the time from starting QEMU until labd answered.
	BootDuration time.Duration
	// KernelRelease is the guest kernel's release (from the image).
	KernelRelease string
	// BootCrashes describes each QEMU process that died by a signal before the guest's
	// command channel answered and was replaced (see EmulatorCrashError); BootForTest
	// logs them. Empty on an ordinary boot.
	BootCrashes []string

	stateDir   string
	ownState   bool
	chanPort   int
	cmd        *exec.Cmd
	exited     chan struct{}
	exitErr    error
	closeOnce  sync.Once
	closeError error
	slot       *slotHandle // machine-wide VM slot (see SlotLockPath), held until Close
}

// CacheDir is $SECUREOVERLAY_CACHE_DIR, or .cache at the root of the
// repository containing the working directory.
func CacheDir() string {
	if d := os.Getenv("SECUREOVERLAY_CACHE_DIR"); d != "" {
		return d
	}
	return filepath.Join(repoRoot(), ".cache")
}

// RepoRoot is the directory of our go.mod above the working directory, or the working
// directory itself.
func RepoRoot() string { return repoRoot() }

// repoRoot is the directory of our go.mod above the working directory, or the
// working directory itself.
func repoRoot() string {
	dir, err := os.Getwd()
	if err != nil {
		return "."
	}
	for d := dir; ; d = filepath.Dir(d) {
		if b, err := os.ReadFile(filepath.Join(d, "go.mod")); err == nil &&
			bytes.Contains(b, []byte("module github.com/secureoverlay/secureoverlay\n")) {
			return d
		}
		if filepath.Dir(d) == d {
			return dir
		}
	}
}

// Where StandardShares mounts things in the guest.
const (
	GuestBinDir = "/opt/secureoverlay/bin"
	GuestCNIDir = "/opt/cni/bin"
)

// StandardShares shares, read-only, our static binaries ($SECUREOVERLAY_BIN_DIR,
// else <repo>/bin) at GuestBinDir and the host's CNI plugins ($CNI_PLUGIN_DIR,
// else /usr/lib/cni; Debian's need only libc, which the image has) at
// GuestCNIDir, each only if the host directory exists.
func StandardShares() []Share {
	var shares []Share
	bin := os.Getenv("SECUREOVERLAY_BIN_DIR")
	if bin == "" {
		bin = filepath.Join(repoRoot(), "bin")
	}
	cni := os.Getenv("CNI_PLUGIN_DIR")
	if cni == "" {
		cni = "/usr/lib/cni"
	}
	for _, s := range []Share{
		{Tag: "sobin", HostPath: bin, GuestPath: GuestBinDir},
		{Tag: "cnibin", HostPath: cni, GuestPath: GuestCNIDir},
	} {
		if fi, err := os.Stat(s.HostPath); err == nil && fi.IsDir() {
			shares = append(shares, s)
		}
	}
	return shares
}

// Image is the boot image hack/tools-lab.sh builds.
type Image struct {
	Kernel, Initrd, Release string
}

// KernelEnv selects the lab's kernel series (the kernel matrix, docs/lab.md): unset or
// "6.1" is bookworm's kernel, any other series ("6.12", "6.18", "7.3") the image
// `SECUREOVERLAY_LAB_KERNEL=<series> hack/tools-lab.sh` built from trixie or
// trixie-backports.
const KernelEnv = "SECUREOVERLAY_LAB_KERNEL"

var seriesRE = regexp.MustCompile(`^[0-9]{1,2}\.[0-9]{1,3}$`)

// ImageDir is the cache subdirectory of the selected kernel's image: "lab" for 6.1,
// "lab-<series>" for the others.
func ImageDir() (string, error) {
	k := os.Getenv(KernelEnv)
	switch {
	case k == "" || k == "6.1":
		return "lab", nil
	case seriesRE.MatchString(k):
		return "lab-" + k, nil
	}
	return "", fmt.Errorf("%s=%q: want a kernel series such as 6.1, 6.12 or 7.3", KernelEnv, k)
}

// FindImage locates the selected kernel's lab image under cacheDir (default CacheDir()).
func FindImage(cacheDir string) (Image, error) {
	if cacheDir == "" {
		cacheDir = CacheDir()
	}
	sub, err := ImageDir()
	if err != nil {
		return Image{}, err
	}
	dir := filepath.Join(cacheDir, sub)
	img := Image{Kernel: filepath.Join(dir, "vmlinuz"), Initrd: filepath.Join(dir, "initrd.img")}
	for _, p := range []string{img.Kernel, img.Initrd} {
		if fi, err := os.Stat(p); err != nil || fi.Size() == 0 {
			if sub != "lab" {
				return Image{}, fmt.Errorf("%w: %s missing (for %s=%s: `%s=%s hack/tools-lab.sh`, or `make conformance-matrix`)",
					ErrNoImage, p, KernelEnv, os.Getenv(KernelEnv), KernelEnv, os.Getenv(KernelEnv))
			}
			return Image{}, fmt.Errorf("%w: %s missing", ErrNoImage, p)
		}
	}
	if b, err := os.ReadFile(filepath.Join(dir, "kernel.release")); err == nil {
		img.Release = strings.TrimSpace(string(b))
	}
	return img, nil
}

var (
	tagRE       = regexp.MustCompile(`^[a-z0-9_]{1,31}$`)
	guestPathRE = regexp.MustCompile(`^/[A-Za-z0-9_./+-]*$`)
)

// qemuArgs is the pure part of Boot: the QEMU command line for opts.
func qemuArgs(opts Options, img Image, accel, stateDir string, chanPort int, relay string) ([]string, error) {
	netdev := []string{"user", "id=n0", "restrict=on", "net=10.0.2.0/24", "host=10.0.2.2",
		fmt.Sprintf("hostfwd=tcp:127.0.0.1:%d-:%d", chanPort, wire.GuestPort)}
	for _, f := range opts.HostForwards {
		if !validPort(f.HostPort) || !validPort(f.GuestPort) {
			return nil, fmt.Errorf("host forward %d->%d: port out of range", f.HostPort, f.GuestPort)
		}
		netdev = append(netdev, fmt.Sprintf("hostfwd=tcp:127.0.0.1:%d-:%d", f.HostPort, f.GuestPort))
	}
	for _, f := range opts.GuestForwards {
		if !validPort(f.HostPort) || !validPort(f.GuestPort) {
			return nil, fmt.Errorf("guest forward %d->%d: port out of range", f.GuestPort, f.HostPort)
		}
		if relay == "" {
			return nil, fmt.Errorf("guest forward %d->%d: busybox not found on the host", f.GuestPort, f.HostPort)
		}
		netdev = append(netdev, fmt.Sprintf("guestfwd=tcp:%s:%d-cmd:%s nc 127.0.0.1 %d",
			GuestForwardAddr, f.GuestPort, relay, f.HostPort))
	}
	cmdline := []string{"console=ttyS0", "panic=-1", "loglevel=4", "mitigations=off"}
	var shareArgs []string
	tags := map[string]bool{}
	for _, s := range opts.Shares {
		if !tagRE.MatchString(s.Tag) || tags[s.Tag] {
			return nil, fmt.Errorf("share %q: tag must be unique and match %s", s.Tag, tagRE)
		}
		tags[s.Tag] = true
		if !guestPathRE.MatchString(s.GuestPath) {
			return nil, fmt.Errorf("share %q: guest path %q must be absolute without spaces or colons", s.Tag, s.GuestPath)
		}
		if strings.ContainsAny(s.HostPath, ",") {
			return nil, fmt.Errorf("share %q: host path %q must not contain a comma", s.Tag, s.HostPath)
		}
		if fi, err := os.Stat(s.HostPath); err != nil || !fi.IsDir() {
			return nil, fmt.Errorf("share %q: host path %q is not a directory", s.Tag, s.HostPath)
		}
		mode, ro := "ro", ",readonly=on"
		if s.Writable {
			mode, ro = "rw", ""
		}
		cmdline = append(cmdline, fmt.Sprintf("lab.share=%s:%s:%s", s.Tag, s.GuestPath, mode))
		shareArgs = append(shareArgs, "-virtfs",
			fmt.Sprintf("local,path=%s,mount_tag=%s,security_model=none%s", s.HostPath, s.Tag, ro))
	}
	cmdline = append(cmdline, opts.KernelArgs...)
	cpu, accelArg := "max", "tcg,thread=single"
	if accel == "kvm" {
		cpu, accelArg = "host", "kvm"
	}
	args := []string{
		// TCG runs single-threaded (one host thread for all vCPUs, round robin): QEMU 7.2's
		// multi-threaded TCG broke the guest in ≈1 of 4 full runs here — a SIGSEGV in
		// memory_region_dispatch_write (a stale memory map across vCPUs, run 24) and guests
		// whose two vCPUs both locked up (RCU stalls, soft lockups in iptables and kubelet,
		// runs 45 and 47), the cross-vCPU races single-threaded TCG cannot have
		// (docs/lab.md, "Emulator crashes").
		"-machine", "q35",
		"-accel", accelArg,
		"-cpu", cpu,
		"-m", strconv.Itoa(opts.MemoryMiB),
		"-smp", strconv.Itoa(opts.CPUs),
		"-nographic", "-monitor", "none", "-no-reboot",
		"-serial", "file:" + filepath.Join(stateDir, "console.log"),
		"-kernel", img.Kernel,
		"-initrd", img.Initrd,
		"-append", strings.Join(cmdline, " "),
		"-netdev", strings.Join(netdev, ","),
		"-device", "virtio-net-pci,netdev=n0",
		"-device", "virtio-rng-pci",
	}
	return append(args, shareArgs...), nil
}

func validPort(p int) bool { return p > 0 && p < 65536 }

// Boot starts a VM and waits until its command channel answers. On error no
// QEMU process is left running.
func Boot(ctx context.Context, opts Options) (*VM, error) {
	img, err := FindImage(opts.CacheDir)
	if err != nil {
		return nil, err
	}
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return nil, fmt.Errorf("boot lab vm: qemu-system-x86_64 not found (run hack/install-deps.sh): %w", err)
	}
	relay, _ := exec.LookPath("busybox")
	if opts.MemoryMiB == 0 {
		opts.MemoryMiB = 512
	}
	if opts.CPUs == 0 {
		opts.CPUs = 1
	}
	if opts.BootTimeout == 0 {
		opts.BootTimeout = 4 * time.Minute
	}
	accel := opts.Accel
	if accel == "" {
		accel = os.Getenv("SECUREOVERLAY_LAB_ACCEL")
	}
	if accel == "" {
		accel = "tcg"
		if KVMUsable() {
			accel = "kvm"
		}
	}
	if accel != "tcg" && accel != "kvm" {
		return nil, fmt.Errorf("boot lab vm: accel %q is neither tcg nor kvm", accel)
	}

	waitStart := time.Now()
	slot, err := acquireSlot()
	if err != nil {
		return nil, fmt.Errorf("boot lab vm: %w", err)
	}
	// The caller's deadline was set for our boot, not for the wait for another process's
	// VM (see SlotWait): move it out by the time spent waiting. Cancellation still stops
	// the boot at once.
	if dl, ok := ctx.Deadline(); ok {
		if waited := time.Since(waitStart); waited > time.Second {
			parent := ctx
			var cancel context.CancelFunc
			ctx, cancel = context.WithDeadline(context.WithoutCancel(parent), dl.Add(waited))
			defer cancel()
			stop := context.AfterFunc(parent, func() {
				if errors.Is(parent.Err(), context.Canceled) {
					cancel()
				}
			})
			defer stop()
		}
	}
	vm := &VM{Accel: accel, KernelRelease: img.Release, stateDir: opts.StateDir, slot: slot}
	if vm.stateDir == "" {
		if vm.stateDir, err = os.MkdirTemp("", "secureoverlay-lab-"); err != nil {
			return nil, fmt.Errorf("boot lab vm: state dir: %w", err)
		}
		vm.ownState = true
	} else if err := os.MkdirAll(vm.stateDir, 0o755); err != nil {
		vm.releaseSlot()
		return nil, fmt.Errorf("boot lab vm: state dir %s: %w", vm.stateDir, err)
	}

	// The command-channel port is picked free and may be taken by someone
	// else before QEMU binds it; QEMU then exits at once and we try again.
	// An emulator that dies by a signal while the guest boots is replaced once
	// (see EmulatorCrashError); a second crash fails the boot.
	var lastErr error
	crashes := 0
	for attempt := 0; attempt < 3+maxBootCrashes; attempt++ {
		if vm.chanPort, err = freePort(); err != nil {
			lastErr = err
			continue
		}
		args, err := qemuArgs(opts, img, accel, vm.stateDir, vm.chanPort, relay)
		if err != nil {
			vm.removeState()
			vm.releaseSlot()
			return nil, fmt.Errorf("boot lab vm: %w", err)
		}
		lastErr = vm.start(ctx, qemu, args, opts.BootTimeout)
		if lastErr == nil {
			return vm, nil
		}
		vm.kill()
		var crash *EmulatorCrashError
		if errors.As(lastErr, &crash) && crashes < maxBootCrashes {
			crashes++
			kept := filepath.Join(vm.stateDir, fmt.Sprintf("console.crash%d.log", crashes))
			_ = os.Rename(vm.ConsoleLog(), kept)
			vm.BootCrashes = append(vm.BootCrashes, fmt.Sprintf("%v after %s; its console is in %s; booting again",
				crash, crash.After.Round(time.Millisecond), kept))
			continue
		}
		if !strings.Contains(lastErr.Error(), "host forwarding") {
			break
		}
	}
	err = fmt.Errorf("boot lab vm (%s): %w%s", accel, lastErr, vm.diagnostics())
	vm.removeState()
	vm.releaseSlot()
	return nil, err
}

// SlotLockPath is the file whose exclusive flock is held by every running lab VM.
//
// Lab VMs run one at a time on a machine: under TCG a guest saturates a core, and the
// data-plane tests measure packet loss and timing, so two guests competing for the CI
// machine's two cores would turn CPU starvation into spurious failures. `go test ./...`
// runs packages in parallel; Boot waits here (up to SlotWait) and Close frees the slot.
// Set SECUREOVERLAY_LAB_LOCK to use another path.
func SlotLockPath() string {
	if p := os.Getenv("SECUREOVERLAY_LAB_LOCK"); p != "" {
		return p
	}
	return filepath.Join(os.TempDir(), "secureoverlay-lab.lock")
}

// The slot is per process: the first VM of a process takes the flock, later VMs of the same
// process (a test package that deliberately runs two guests) share it, and the last Close
// frees it. So packages are serialised, a package never waits for itself.
var slotState struct {
	sync.Mutex
	f     *os.File
	users int
}

// slotHandle is one VM's share of the process's slot.
type slotHandle struct{ once sync.Once }

// ForbiddenEnv, when set, forbids booting a lab VM in this process; its value says why.
const ForbiddenEnv = "SECUREOVERLAY_LAB_FORBIDDEN"

// SlotWait bounds the wait for another process's VM. It is deliberately independent of the
// caller's context: a boot timeout measures our guest, not how long another test package
// keeps its own (go test's -timeout is the overall guard).
const SlotWait = 30 * time.Minute

func acquireSlot() (*slotHandle, error) {
	// hack/test.sh runs make test's host stream with this set: a test there that boots the
	// VM would hold the slot out of turn and starve the VM stream's emulator of its core.
	if why := os.Getenv(ForbiddenEnv); why != "" {
		return nil, fmt.Errorf("boot lab vm: forbidden here (%s=%q)", ForbiddenEnv, why)
	}
	slotState.Lock()
	defer slotState.Unlock()
	if slotState.users > 0 {
		slotState.users++
		return &slotHandle{}, nil
	}
	path := SlotLockPath()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open vm slot lock %s: %w", path, err)
	}
	deadline := time.After(SlotWait)
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			slotState.f, slotState.users = f, 1
			return &slotHandle{}, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			f.Close()
			return nil, fmt.Errorf("lock vm slot %s: %w", path, err)
		}
		select {
		case <-deadline:
			f.Close()
			return nil, fmt.Errorf("wait for the vm slot %s: another process ran a lab vm for over %v", path, SlotWait)
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// release gives this VM's share back; the last one closes the file, dropping the flock.
func (h *slotHandle) release() {
	h.once.Do(func() {
		slotState.Lock()
		defer slotState.Unlock()
		slotState.users--
		if slotState.users == 0 && slotState.f != nil {
			slotState.f.Close()
			slotState.f = nil
		}
	})
}

// releaseSlot frees the machine-wide VM slot (closing the file drops the flock).
func (vm *VM) releaseSlot() {
	if vm.slot != nil {
		vm.slot.release()
	}
}

func (vm *VM) start(ctx context.Context, qemu string, args []string, timeout time.Duration) error {
	qlog, err := os.Create(filepath.Join(vm.stateDir, "qemu.log"))
	if err != nil {
		return err
	}
	defer qlog.Close()
	vm.cmd = exec.Command(qemu, args...)
	vm.cmd.Stdin = nil
	vm.cmd.Stdout, vm.cmd.Stderr = qlog, qlog
	vm.exited = make(chan struct{})
	begin := time.Now()
	if err := spawn.Start(vm.cmd); err != nil { // own process group, dies with us (Pdeathsig)
		return fmt.Errorf("start qemu: %w", err)
	}
	go func() {
		vm.exitErr = vm.cmd.Wait()
		close(vm.exited)
	}()

	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	// Each probe is short: a connection made before the guest's network is
	// up is accepted by QEMU on the host side and then hangs while slirp
	// retransmits its SYN to the guest with backoff.
	probe := 2 * time.Second
	for {
		pctx, cancel := context.WithTimeout(ctx, probe)
		_, err := vm.Exec(pctx, wire.Request{Argv: []string{"true"}, TimeoutMillis: probe.Milliseconds()})
		cancel()
		if err == nil {
			vm.BootDuration = time.Since(begin)
			return nil
		}
		select {
		case <-vm.exited:
			q, _ := os.ReadFile(filepath.Join(vm.stateDir, "qemu.log"))
			var ee *exec.ExitError
			if errors.As(vm.exitErr, &ee) {
				if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
					return &EmulatorCrashError{Signal: ws.Signal(), After: time.Since(begin), QEMULog: strings.TrimSpace(string(q))}
				}
			}
			return fmt.Errorf("qemu exited during boot (%v): %s", vm.exitErr, strings.TrimSpace(string(q)))
		case <-deadline.C:
			return fmt.Errorf("command channel not up after %s: %w", timeout, err)
		case <-ctx.Done():
			return fmt.Errorf("waiting for command channel: %w", ctx.Err())
		case <-time.After(250 * time.Millisecond):
		}
		// Under heavy load a live labd may need longer than a short probe.
		if time.Since(begin) > 45*time.Second {
			probe = 6 * time.Second
		}
	}
}

// maxBootCrashes is how many emulator crashes during one Boot are answered by starting
// QEMU again.
const maxBootCrashes = 1

// EmulatorCrashError is QEMU killed by a signal (not by us) before the guest's command
// channel answered: the emulator itself faulted while the guest kernel was still booting,
// before any of the project's code ran in it. Seen once in several hundred TCG boots with Debian
// bookworm's QEMU 7.2 (2 vCPUs, multi-threaded TCG): SIGSEGV in
// memory_region_dispatch_write with a NULL MemoryRegion while the guest kernel set up its
// devices, the kind of cross-vCPU memory-map race QEMU has fixed and refound in several
// releases (docs/lab.md, "Emulator crashes"). Boot starts QEMU again once; a crash after
// boot, or a second one, is a failure like any other.
type EmulatorCrashError struct {
	Signal  syscall.Signal
	After   time.Duration
	QEMULog string
}

func (e *EmulatorCrashError) Error() string {
	msg := fmt.Sprintf("qemu exited during boot (signal: %v): the emulator crashed", e.Signal)
	if e.QEMULog != "" {
		msg += ": " + e.QEMULog
	}
	return msg
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("pick a loopback port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// ConsoleLog is the path of the guest's serial console log.
func (vm *VM) ConsoleLog() string { return filepath.Join(vm.stateDir, "console.log") }

// StateDir holds console.log and qemu.log.
func (vm *VM) StateDir() string { return vm.stateDir }

// PID is the QEMU process's ID on the host (0 before Boot started it), e.g. to read the
// emulator's CPU time from /proc/PID/stat.
func (vm *VM) PID() int {
	if vm.cmd == nil || vm.cmd.Process == nil {
		return 0
	}
	return vm.cmd.Process.Pid
}

// ConsoleTail returns the last n lines of the console log.
func (vm *VM) ConsoleTail(n int) string {
	b, err := os.ReadFile(vm.ConsoleLog())
	if err != nil {
		return ""
	}
	var lines []string
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		lines = append(lines, sc.Text())
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func (vm *VM) diagnostics() string {
	if t := vm.ConsoleTail(30); t != "" {
		return "\nconsole tail:\n" + t
	}
	return ""
}

// Alive reports whether QEMU is still running.
func (vm *VM) Alive() bool {
	select {
	case <-vm.exited:
		return false
	default:
		return true
	}
}

// Close kills QEMU and removes the state directory if Boot created it. It is
// safe to call more than once.
func (vm *VM) Close() error {
	vm.closeOnce.Do(func() {
		vm.kill()
		vm.removeState()
		vm.releaseSlot()
	})
	return vm.closeError
}

func (vm *VM) kill() {
	if vm.cmd == nil || vm.cmd.Process == nil {
		return
	}
	_ = syscall.Kill(-vm.cmd.Process.Pid, syscall.SIGKILL)
	<-vm.exited
	vm.cmd = nil
}

func (vm *VM) removeState() {
	if vm.ownState {
		if err := os.RemoveAll(vm.stateDir); err != nil {
			vm.closeError = fmt.Errorf("remove lab state %s: %w", vm.stateDir, err)
		}
	}
}

// ExitError is a guest command that ran and exited non-zero (or was killed).
type ExitError struct {
	Code   int
	Reason string // set when the guest killed or could not start the program
	Stderr string
}

func (e *ExitError) Error() string {
	msg := fmt.Sprintf("guest command exited with status %d", e.Code)
	if e.Reason != "" {
		msg += " (" + e.Reason + ")"
	}
	if s := strings.TrimSpace(e.Stderr); s != "" {
		if len(s) > 2000 {
			s = "…" + s[len(s)-2000:]
		}
		msg += ": " + s
	}
	return msg
}

// Run runs cmd with /bin/sh -c in the guest (as root, cwd /root, PATH with the
// image's real iproute2/iptables/tcpdump before busybox). err is an
// *ExitError when the command ran but failed. A command that starts a
// background process must redirect that process's output, or its answer is
// held back by up to a second.
func (vm *VM) Run(ctx context.Context, cmd string) (stdout, stderr string, err error) {
	return vm.RunInput(ctx, cmd, nil)
}

// RunInput is Run with stdin fed to the command.
func (vm *VM) RunInput(ctx context.Context, cmd string, stdin []byte) (stdout, stderr string, err error) {
	req := wire.Request{Argv: []string{"/bin/sh", "-c", cmd}, Stdin: stdin}
	if dl, ok := ctx.Deadline(); ok {
		req.TimeoutMillis = max(time.Until(dl).Milliseconds(), 1)
	}
	resp, err := vm.Exec(ctx, req)
	if err != nil {
		return "", "", err
	}
	stdout, stderr = string(resp.Stdout), string(resp.Stderr)
	if resp.Exit != 0 || resp.Error != "" {
		return stdout, stderr, &ExitError{Code: resp.Exit, Reason: resp.Error, Stderr: stderr}
	}
	return stdout, stderr, nil
}

// Exec sends one raw request over the command channel.
func (vm *VM) Exec(ctx context.Context, req wire.Request) (wire.Response, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", fmt.Sprintf("127.0.0.1:%d", vm.chanPort))
	if err != nil {
		return wire.Response{}, fmt.Errorf("lab command channel: %w", err)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Now()) })
	defer stop()
	if err := json.NewEncoder(conn).Encode(req); err != nil {
		return wire.Response{}, fmt.Errorf("lab command channel: send: %w", err)
	}
	var resp wire.Response
	if err := json.NewDecoder(bufio.NewReader(conn)).Decode(&resp); err != nil {
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return wire.Response{}, fmt.Errorf("lab command channel: receive: %w", err)
	}
	return resp, nil
}
