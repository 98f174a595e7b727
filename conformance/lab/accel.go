package lab

import (
	"os"
	"regexp"

	"golang.org/x/sys/unix"
)

// KVM ioctls (linux/kvm.h).
const (
	kvmGetAPIVersion = 0xAE00
	kvmCreateVM      = 0xAE01
	kvmCreateVCPU    = 0xAE41
	kvmAPIVersion    = 12
)

var virtFlagsRE = regexp.MustCompile(`(?m)^flags\s*:.*\b(vmx|svm)\b`)

// KVMUsable reports whether /dev/kvm can really run a guest: the CPU must
// advertise VMX or SVM, and the device must answer the API version and create
// a VM with one vCPU. Both halves matter: on this project's 2-core machines
// /dev/kvm exists and creates vCPUs, but without VMX QEMU aborts setting MSRs
// (-cpu host/max) or hangs in the kernel (-cpu qemu64). The lab then uses TCG.
func KVMUsable() bool {
	cpuinfo, err := os.ReadFile("/proc/cpuinfo")
	if err != nil || !virtFlagsRE.Match(cpuinfo) {
		return false
	}
	fd, err := unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	v, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), kvmGetAPIVersion, 0)
	if errno != 0 || v != kvmAPIVersion {
		return false
	}
	vmfd, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), kvmCreateVM, 0)
	if errno != 0 {
		return false
	}
	defer unix.Close(int(vmfd))
	vcpu, _, errno := unix.Syscall(unix.SYS_IOCTL, vmfd, kvmCreateVCPU, 0)
	if errno != 0 {
		return false
	}
	unix.Close(int(vcpu))
	return true
}
