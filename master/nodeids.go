package master

// The NodeIDs (docs/keys.md §13; docs/protocol-v2.md §9 step 6): one per live entry of the
// Secret's node table, written only by the master. Once every reporting agent reads them
// and they equal the table, the public ring leaves its table out and names its digest; a
// write that fails is logged and retried at the next reconcile, and until it succeeds the
// public ring carries its table.

import (
	"context"
	"fmt"
	"slices"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/internal/upsert"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/nodeid"
	"github.com/secureoverlay/secureoverlay/nodekeys"
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
	// nodeIDsGrace is how long, while the public ring leaves its table out, a reporting
	// node whose NodeKeys are not of its current boot (an agent that has just started,
	// whose keys are on their way) counts as reading the NodeIDs: a join must not put the
	// table back into every agent's ring for a moment. After it, the node counts as an
	// agent that does not (one that writes no NodeKeys). While the ring carries its table,
	// such a node counts so at once: the table leaves only once every agent declares.
	nodeIDsGrace = 30 * time.Second
)

// writeNodeIDs makes the NodeIDs equal to the live entries of ring's table (nodeid.Plan:
// creates and updates ascending, then deletes), at most nodeIDBatch writes; it reports
// whether writes remain, and whether the NodeIDs are the table now (every write planned
// succeeded). Nothing is written before the NodeID cache has synced (an older manifest
// without the CRD: never).
func (c *Controller) writeNodeIDs(ctx context.Context, ring *keys.Ring) (more, equal bool) {
	if c.ids == nil || !c.ids.HasSynced() {
		return false, false
	}
	ver := c.ids.Version() // before the objects are read: a change after it is seen again
	table := c.table(ring)
	if c.idsSettled == table && ver == c.idsVer {
		// Neither the table nor the objects changed since they were found equal: no plan
		// (a map and a sort of N IDs at every reconcile of a large cluster).
		return false, true
	}
	c.idsSettled = nil
	have := map[uint32]nodeid.Entry{}
	c.ids.Each(func(_ string, e nodeid.Entry) { have[e.ID] = e })
	put, del := nodeid.Plan(ring, have)
	writes := 0
	var failed error
	for _, e := range put {
		if writes == nodeIDBatch {
			return true, false
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
			return true, false
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
		c.log.Warn("cannot keep the NodeIDs equal to the key ring's node table; retrying at the next reconcile (the public ring carries the table until then)", "error", failed)
		c.idsErr = failed.Error()
	case failed == nil && c.idsErr != "":
		c.log.Info("the NodeIDs equal the key ring's node table again")
		c.idsErr = ""
	}
	if writes > 0 && failed == nil {
		c.log.Debug("NodeIDs written", "put", len(put), "deleted", len(del))
	}
	if failed == nil && writes == 0 {
		c.idsSettled, c.idsVer = table, ver
	}
	return false, failed == nil
}

// nodeTable is a node table and its digest (nodeid.TableDigest).
type nodeTable struct {
	nodes  []keys.NodeID
	digest string
}

// table is ring's node table with its digest: the last one again (the same pointer) while
// the table has not changed, so that its digest is computed once per table.
func (c *Controller) table(ring *keys.Ring) *nodeTable {
	if c.lastTable == nil || !slices.Equal(ring.Nodes, c.lastTable.nodes) {
		c.lastTable = &nodeTable{nodes: slices.Clone(ring.Nodes), digest: nodeid.TableDigest(ring)}
	}
	return c.lastTable
}

// nodeIDsLacking lists the reporting nodes whose agents do not read the NodeIDs: their
// NodeKeys (keysOf) of the node's current boot do not declare api.CapabilityNodeIDs, or
// they have had none of that boot for grace since unknown first saw them so (an older
// agent that writes no NodeKeys). unknown is kept by the caller across calls (node and
// boot → first seen); wait is how soon the first grace still running ends (0: none).
// A rolled-back agent on the same boot rewrites its NodeKeys at its first sync, before it
// computes anything (docs/keys.md §13): the newer agent's declaration does not outlive it.
func nodeIDsLacking(nodes []keys.NodeState, keysOf func(string) (nodekeys.Keys, bool), unknown map[string]time.Time, now time.Time, grace time.Duration) (lacking []string, wait time.Duration) {
	seen := make(map[string]bool, len(unknown))
	for _, n := range nodes {
		if n.Report == nil {
			continue
		}
		k, ok := keysOf(n.Name)
		if ok && n.BootID != "" && k.Incarnation.BootID == n.BootID {
			if !k.Has(api.CapabilityNodeIDs) {
				lacking = append(lacking, n.Name)
			}
			continue
		}
		key := n.Name + "/" + n.BootID
		seen[key] = true
		first, ok := unknown[key]
		if !ok {
			first, unknown[key] = now, now
		}
		switch left := first.Add(grace).Sub(now); {
		case left <= 0:
			lacking = append(lacking, n.Name)
		case wait == 0 || left < wait:
			wait = left
		}
	}
	for key := range unknown {
		if !seen[key] {
			delete(unknown, key)
		}
	}
	return lacking, wait
}

// publicTable decides whether the public ring leaves its table out: the digest to name
// beside it, or "" (it carries the table) while the NodeIDs are not the table (equal) or
// a reporting agent does not read them. keep is set while the master's caches of NodeIDs
// and NodeKeys are still on their first list (a master that has just started): the
// public ring then keeps the form it has if it names this table — a previous master wrote
// that only with the NodeIDs equal to it — so that a master's restart does not send
// every agent the table. A change is logged, with the first node that holds it back.
func (c *Controller) publicTable(ring *keys.Ring, nodes []keys.NodeState, equal bool) (digest string, keep bool) {
	now := c.opts.Now()
	why := ""
	switch {
	case c.ids == nil || c.pubKeys == nil:
		why = "the NodeIDs or the agents' NodeKeys are not read"
	case c.ids.Err() != nil || c.pubKeys.Err() != nil:
		why = "the NodeIDs or the agents' NodeKeys cannot be listed"
	case !c.ids.HasSynced() || !c.pubKeys.HasSynced():
		return "", true
	case !equal:
		why = "the NodeIDs are not the key ring's node table yet"
	default:
		grace := time.Duration(0)
		if c.tableWhy == "" {
			grace = nodeIDsGrace
		}
		lacking, wait := nodeIDsLacking(nodes, func(name string) (nodekeys.Keys, bool) {
			k, ok, err := c.pubKeys.Get(name)
			return k, ok && err == nil
		}, c.idsUnknown, now, grace)
		if wait > 0 {
			c.queue.AddAfter(queueKey, wait)
		}
		if len(lacking) > 0 {
			why = fmt.Sprintf("agents that do not read the NodeIDs: %d (node %s first)", len(lacking), lacking[0])
		} else {
			digest = c.table(ring).digest
		}
	}
	if why != c.tableWhy {
		switch {
		case why == "":
			c.log.Info("the public ring leaves its node table to the NodeIDs: every reporting agent reads them (docs/keys.md §13)", "nodes", digest)
		case c.tableWhy == "" || c.tableWhy == "unset":
			c.log.Info("the public ring carries its node table", "why", why)
		}
		c.tableWhy = why
	}
	return digest, false
}
