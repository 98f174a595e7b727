// Command kubelet is the upstream Kubernetes node agent, built from the pinned
// k8s.io/kubernetes module for the real-node tier of the VM lab (docs/lab.md,
// "Real nodes"). It does exactly what upstream's cmd/kubelet/kubelet.go does.
package main

import (
	"context"
	"os"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // for JSON log format registration
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // for client metric registration
	_ "k8s.io/component-base/metrics/prometheus/version"  // for version metric registration
	"k8s.io/kubernetes/cmd/kubelet/app"
)

func main() {
	command := app.NewKubeletCommand(context.Background())
	code := cli.Run(command)
	os.Exit(code)
}
