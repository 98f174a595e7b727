// Command kube-controller-manager is the upstream Kubernetes controller manager,
// built from the pinned k8s.io/kubernetes module for the real-node tier (the
// DaemonSet and ReplicaSet controllers, the kube-root-ca.crt ConfigMap that
// projected ServiceAccount tokens need). It does exactly what upstream's
// cmd/kube-controller-manager/controller-manager.go does.
package main

import (
	"os"
	_ "time/tzdata" // for CronJob Time Zone support, as upstream

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // for JSON log format registration
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // load all the prometheus client-go plugin
	_ "k8s.io/component-base/metrics/prometheus/version"  // for version metric registration
	"k8s.io/kubernetes/cmd/kube-controller-manager/app"
)

func main() {
	command := app.NewControllerManagerCommand()
	code := cli.Run(command)
	os.Exit(code)
}
