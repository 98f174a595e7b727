package master

// The NodeIDs (docs/keys.md §13; docs/protocol-v2.md §9 step 6): one per live entry of the
// Secret's node table, written only by the master. Agents do not read them yet (the public
// ring still carries the table), so a write that fails is logged and retried at the next
// reconcile and holds nothing.

import (
	"context"
	"fmt"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/secureoverlay/secureoverlay/internal/upsert"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/nodeid"
)

const (
	// nodeIDBatch bounds the NodeID writes of one reconcile: a master upgraded in a
	// 5,000-node cluster creates them all, which must not hold a step for minutes.
	nodeIDBatch = 100
	// nodeIDBatchPause is how soon the next batch follows.
	nodeIDBatchPause = 200 * time.Millisecond
	// nodeIDFieldManager names the master's writes.
	nodeIDFieldManager = "secureoverlay-master"
	nodeIDWriteTimeout = 10 * time.Second
)

// writeNodeIDs makes the NodeIDs equal to the live entries of ring's table (nodeid.Plan:
// creates and updates ascending, then deletes), at most nodeIDBatch writes; it reports
// whether writes remain. Nothing is written before the NodeID cache has synced (an older
// manifest without the CRD: never).
func (c *Controller) writeNodeIDs(ctx context.Context, ring *keys.Ring) (more bool) {
	if c.ids == nil || !c.ids.HasSynced() {
		return false
	}
	have := map[uint32]nodeid.Entry{}
	c.ids.Each(func(_ string, e nodeid.Entry) { have[e.ID] = e })
	put, del := nodeid.Plan(ring, have)
	writes := 0
	var failed error
	for _, e := range put {
		if writes == nodeIDBatch {
			return true
		}
		writes++
		if err := upsert.WriteNodeObject(ctx, c.opts.Dynamic, nodeid.GVR, nodeid.Object(c.opts.Namespace, e), nodeIDFieldManager, nodeIDWriteTimeout); err != nil {
			failed = err
			break
		}
	}
	for _, id := range del {
		if failed != nil {
			break
		}
		if writes == nodeIDBatch {
			return true
		}
		writes++
		wctx, cancel := context.WithTimeout(ctx, nodeIDWriteTimeout)
		err := c.opts.Dynamic.Resource(nodeid.GVR).Namespace(c.opts.Namespace).Delete(wctx, nodeid.Name(id), metav1.DeleteOptions{})
		cancel()
		if err != nil && !apierrors.IsNotFound(err) {
			failed = fmt.Errorf("delete %s %s/%s: %w", nodeid.Kind, c.opts.Namespace, nodeid.Name(id), err)
		}
	}
	switch {
	case failed != nil && failed.Error() != c.idsErr:
		c.log.Warn("cannot keep the NodeIDs equal to the key ring's node table; retrying at the next reconcile (nothing reads them yet)", "error", failed)
		c.idsErr = failed.Error()
	case failed == nil && c.idsErr != "":
		c.log.Info("the NodeIDs equal the key ring's node table again")
		c.idsErr = ""
	}
	if writes > 0 && failed == nil {
		c.log.Debug("NodeIDs written", "put", len(put), "deleted", len(del))
	}
	return false
}
