package agent

import (
	"github.com/secureoverlay/secureoverlay/gate"
)

// recordGate keeps the boot gate's files (package gate) true to the kernel, which now
// holds a data plane in mode: the state file when the mode changes (so that after a
// reboot the plugin knows whether the node's pods must wait), then, once per process,
// the ready file of this boot (so that the pods of this boot may start). Only the sync
// worker and Uninstall (after Run) call it.
//
// A write that fails is logged and retried at the next sync; it does not fail the sync:
// the data plane is programmed either way. A state file that cannot be written leaves the
// next boot unprotected (or its pods held, if it last said enforce); a ready file that
// cannot be written holds this boot's new pods, which the plugin's refusals name.
func (a *Agent) recordGate(mode string) {
	if a.cfg.StateFile == "" {
		return
	}
	if mode != a.gateMode {
		if err := gate.WriteState(a.cfg.StateFile, gate.State{Mode: mode, Node: a.cfg.NodeName, Updated: a.d.Now()}); err != nil {
			a.d.Metrics.GateErrors.WithLabelValues("state").Inc()
			a.log.Error("boot gate: cannot record the data plane's mode; after a reboot this node's pods may not be held until it is programmed again",
				"file", a.cfg.StateFile, "mode", mode, "error", err)
		} else {
			a.log.Info("boot gate: data plane mode recorded", "file", a.cfg.StateFile, "mode", mode, "previous", a.gateMode)
			a.gateMode = mode
		}
	}
	if a.gateReady || a.cfg.ReadyFile == "" {
		return
	}
	boot, err := gate.BootID()
	if err != nil {
		a.d.Metrics.GateErrors.WithLabelValues("ready").Inc()
		a.log.Error("boot gate: cannot read the boot ID; new pods stay held", "file", gate.BootIDFile, "error", err)
		return
	}
	if err := gate.WriteReady(a.cfg.ReadyFile, gate.Ready{BootID: boot, Mode: mode, At: a.d.Now()}); err != nil {
		a.d.Metrics.GateErrors.WithLabelValues("ready").Inc()
		a.log.Error("boot gate: cannot mark this boot's data plane programmed; new pods stay held", "file", a.cfg.ReadyFile, "error", err)
		return
	}
	a.gateReady = true
	a.d.Metrics.GateReady.Set(1)
	a.log.Info("boot gate open: this boot's data plane is programmed; pods may start", "file", a.cfg.ReadyFile, "mode", mode, "boot", boot)
}

// forgetGate removes the state file: the uninstall left nothing of ours in the kernel, so
// there is nothing for a later boot to wait for.
func (a *Agent) forgetGate() {
	if a.cfg.StateFile == "" {
		return
	}
	if err := gate.RemoveState(a.cfg.StateFile); err != nil {
		a.log.Warn("uninstall: cannot remove the boot gate's state file; if the plugin is ever installed again without an agent, remove it by hand",
			"file", a.cfg.StateFile, "error", err)
		return
	}
	a.gateMode = ""
}
