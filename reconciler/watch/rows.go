package watch

import (
	"sync/atomic"

	"github.com/secureoverlay/secureoverlay/noderow"
	"github.com/secureoverlay/secureoverlay/readiness"
)

// The peers' readiness rows (NodeRows, docs/keys.md §12): read only by the agent's
// readiness shadow, so, like this node's NodeView, not part of HasSynced: an older manifest
// without the CRD costs one warning, not a sync.

// newRows builds the rows' informer; onChange runs after every change.
func (w *Watcher) newRows(onChange func()) *noderow.Cache {
	c := noderow.NewCache(w.cfg.Dynamic, w.cfg.Namespace, func(string) { onChange() })
	var warned atomic.Bool
	c.OnMissing(func(err error) {
		if !warned.Swap(true) {
			w.cfg.Logger.Warn("the peers' NodeRows cannot be read (the manifest predates them: apply the manifest); protocol v2's readiness shadow goes without them",
				"error", err)
		}
	})
	return c
}

// ReadinessRows calls f with every peer's row that parses, by node name, as last seen
// (none before the informer listed them, or with an older manifest).
func (w *Watcher) ReadinessRows(f func(node string, row readiness.Status)) {
	if w.rows != nil {
		w.rows.Each(f)
	}
}
