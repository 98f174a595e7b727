package agent

import (
	"context"
	"time"

	"k8s.io/client-go/kubernetes"

	"github.com/secureoverlay/secureoverlay/install/owner"
)

// DefaultDecisionTimeout bounds the SIGTERM decision (API retries every second).
const DefaultDecisionTimeout = 5 * time.Second

// UninstallDecision makes the agent's SIGTERM decision the way the installer sidecar
// does (install/owner): uninstall only when the pod's controlling DaemonSet is gone or
// being deleted. tr (may be nil) is the owner.Tracker that has watched the DaemonSet since
// start; it settles the question when the API refuses at SIGTERM because `kubectl delete
// -f` removed our RBAC first. When the API cannot answer within timeout and the tracker
// saw nothing, the decision is "keep" with the last error: an agent restart, upgrade or
// reboot must never touch the kernel, and a kernel left as it is keeps working.
func UninstallDecision(ctx context.Context, c kubernetes.Interface, tr *owner.Tracker, namespace, pod string, timeout time.Duration) (owner.Decision, error) {
	if timeout <= 0 {
		timeout = DefaultDecisionTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	return owner.Decide(ctx, c, tr, namespace, pod, time.Second)
}
