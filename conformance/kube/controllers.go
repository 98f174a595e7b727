package kube

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// WithControllers also starts a real kube-controller-manager and kube-scheduler (built
// by hack/tools-kube.sh next to kube-apiserver) against the cluster, for tests in which
// workload objects must turn into pods bound to nodes: DaemonSets, Deployments and
// ReplicaSets, the namespace controller (so a deleted Namespace really goes), garbage
// collection, and the kube-root-ca.crt ConfigMap that projected service-account tokens
// need. Both run without leader election and without their own serving port.
func WithControllers() Option {
	return func(o *options) { o.controllers = true }
}

// ControllerBinaries returns the paths of kube-controller-manager and kube-scheduler
// next to kube-apiserver, or an error that says how to build them.
func ControllerBinaries(apiserverBin string) (cm, sched string, err error) {
	dir := filepath.Dir(apiserverBin)
	cm, sched = filepath.Join(dir, "kube-controller-manager"), filepath.Join(dir, "kube-scheduler")
	for _, b := range []string{cm, sched} {
		if !isExecutable(b) {
			return "", "", fmt.Errorf("%s not found: run `make tools` (or hack/tools-kube.sh)", b)
		}
	}
	return cm, sched, nil
}

// controllerArgs are the flags both controllers take: the admin kubeconfig for their
// API calls and their delegated authn/authz, no leader election, no serving port.
func (c *Cluster) controllerArgs(extra ...string) []string {
	return append([]string{
		"--kubeconfig=" + c.kubeconfig,
		"--authentication-kubeconfig=" + c.kubeconfig,
		"--authorization-kubeconfig=" + c.kubeconfig,
		"--leader-elect=false",
		"--secure-port=0",
		"--v=1",
	}, extra...)
}

func (c *Cluster) controllerManagerArgs() []string {
	return c.controllerArgs(
		"--root-ca-file="+c.pki.caCert,
		"--service-account-private-key-file="+c.pki.saKey,
		"--use-service-account-credentials=false",
		"--cluster-name=secureoverlay-test",
		"--controllers=*,-nodeipam,-cloud-node-lifecycle",
		"--concurrent-gc-syncs=2",
		// The harness's Nodes have no kubelet to heartbeat: do not let the node lifecycle
		// controller declare them Unknown and taint them during a test.
		"--node-monitor-grace-period=24h",
	)
}

// startControllers starts both and waits for the controller manager to publish
// kube-root-ca.crt in the default namespace (its first visible work).
func (c *Cluster) startControllers(ctx context.Context) error {
	cmBin, schedBin, err := ControllerBinaries(c.apiserverBin)
	if err != nil {
		return err
	}
	c.controllerManager = &process{name: "kube-controller-manager", logPath: filepath.Join(c.dir, "kube-controller-manager.log")}
	c.scheduler = &process{name: "kube-scheduler", logPath: filepath.Join(c.dir, "kube-scheduler.log")}
	if err := c.controllerManager.start(cmBin, c.controllerManagerArgs()); err != nil {
		return err
	}
	if err := c.scheduler.start(schedBin, c.controllerArgs()); err != nil {
		return err
	}
	cs, err := kubernetes.NewForConfig(c.admin)
	if err != nil {
		return err
	}
	return poll(ctx, c.opts.startTimeout, 200*time.Millisecond, c.controllerManager, func() (bool, error) {
		if done, err := c.scheduler.exited(); done {
			return false, fmt.Errorf("kube-scheduler exited: %v\n%s", err, c.scheduler.tail(20))
		}
		_, err := cs.CoreV1().ConfigMaps(metav1.NamespaceDefault).Get(ctx, "kube-root-ca.crt", metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return false, nil
		}
		return err == nil, err
	}, "kube-controller-manager to publish kube-root-ca.crt")
}

// controllerProcesses are the controller processes that were started (none without
// WithControllers).
func (c *Cluster) controllerProcesses() []*process {
	var ps []*process
	for _, p := range []*process{c.scheduler, c.controllerManager} {
		if p != nil {
			ps = append(ps, p)
		}
	}
	return ps
}
