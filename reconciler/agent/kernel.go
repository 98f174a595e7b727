package agent

import (
	"github.com/secureoverlay/secureoverlay/reconciler/kernelinfo"
)

// readKernel is Deps.Kernel's default: the node's own /proc (the agent runs in the host's
// network namespace; /proc/modules and the kernel release are the node's).
func readKernel() kernelinfo.Info { return kernelinfo.Read("/") }

// noteKernel detects the kernel: the kernel_info metric (doctor's kernel check reads it)
// and a log line when what it found changed (at New, and at every full resync after it:
// an operator's `modprobe -r esp4_offload` shows without an agent restart), a warning
// when esp4_offload is in the kernel. New, then the sync worker only.
func (a *Agent) noteKernel() {
	i := a.d.Kernel()
	a.d.Metrics.SetKernel(i)
	seen := i.Release + "\x00" + string(i.ESP4Offload())
	if seen == a.kernelSeen {
		return
	}
	a.kernelSeen = seen
	if i.ESP4Offload().Active() {
		a.log.Warn("kernel: esp4_offload is "+string(i.ESP4Offload())+"; in our lab (QEMU) receivers then counted XfrmInStateProtoError on 10-20% of ESP packets: unload it (modprobe -r esp4_offload) and blacklist it (docs/dataplane.md §11)",
			i.LogAttrs()...)
		return
	}
	a.log.Info("kernel", i.LogAttrs()...)
}
