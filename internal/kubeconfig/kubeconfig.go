// Package kubeconfig loads the REST config the in-cluster binaries (agent, master) use:
// --kubeconfig, else $KUBECONFIG (its first path), else the pod's in-cluster config.
package kubeconfig

import (
	"fmt"
	"os"
	"strings"

	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// Load returns the REST config for path, $KUBECONFIG or the in-cluster config, in that order.
func Load(path string) (*rest.Config, error) {
	if path == "" {
		path = os.Getenv("KUBECONFIG")
	}
	if path == "" {
		cfg, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("in-cluster config (pass --kubeconfig outside a cluster): %w", err)
		}
		return cfg, nil
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", strings.Split(path, ":")[0])
	if err != nil {
		return nil, fmt.Errorf("kubeconfig %s: %w", path, err)
	}
	return cfg, nil
}

// Protobuf returns a copy of cfg for a typed clientset: built-in kinds (Nodes above all,
// which the agents and the master list at start and watch for every status change) as
// protobuf, JSON as the fallback, as kubelet and kube-proxy do; the API server encodes
// and the client decodes them faster and smaller than JSON. Custom resources have no
// protobuf form: a dynamic client keeps cfg (JSON).
func Protobuf(cfg *rest.Config) *rest.Config {
	pc := rest.CopyConfig(cfg)
	pc.ContentType = runtime.ContentTypeProtobuf
	pc.AcceptContentTypes = runtime.ContentTypeProtobuf + "," + runtime.ContentTypeJSON
	return pc
}
