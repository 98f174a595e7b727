// Command secureoverlay is the chained CNI plugin (conflist "type": "secureoverlay"); it is
// installed into the CNI bin dir and run by the container runtime after calico. See
// package plugin and docs/plugin.md.
package main

import (
	"github.com/containernetworking/cni/pkg/skel"

	"github.com/secureoverlay/secureoverlay/plugin"
)

func main() {
	skel.PluginMainFuncs(plugin.Funcs(), plugin.Versions, plugin.About)
}
