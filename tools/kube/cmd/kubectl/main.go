// Command kubectl is the upstream kubectl, built from the pinned k8s.io/kubectl
// module (the staging release matching k8s.io/kubernetes) for the manifest tests
// in conformance/manifests. It does exactly what upstream's cmd/kubectl/kubectl.go
// does.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	"k8s.io/kubectl/pkg/cmd"
	"k8s.io/kubectl/pkg/cmd/util"

	// Import to initialize client auth plugins, as upstream.
	_ "k8s.io/client-go/plugin/pkg/client/auth"
)

func main() {
	// As upstream: set the verbosity before the command is built, so klog output
	// during construction (plugins, .kuberc) honours -v.
	logs.GlogSetter(cmd.GetLogVerbosity(os.Args)) // nolint:errcheck
	command := cmd.NewDefaultKubectlCommand()
	if err := cli.RunNoErrOutput(command); err != nil {
		util.CheckErr(err)
	}
}
