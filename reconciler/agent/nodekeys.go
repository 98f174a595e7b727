package agent

// The keys writer (docs/keys.md §10, "Published keys"): the agent keeps an X25519 key pair
// per published generation in its ledger and publishes the public halves in its NodeKeys.
// The sync worker decides what to publish (publishKeys: the private keys are in the ledger
// before their public halves are handed over) and one writer goroutine writes the newest
// decision, retrying with backoff, off the sync path: a failed write delays the
// publication, never the kernel or the report. Nothing reads the keys yet (protocol v1
// derives every SA); docs/protocol-v2.md §8 is where they are going.

import (
	"context"
	"crypto/rand"
	"fmt"
	"slices"
	"time"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/nodekeys"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
)

// publishKeys makes the ledger hold this node's key pairs for the generations it
// publishes (keys.PublishedGenerations of the ring) and hands their public halves to the
// keys writer when they differ from what was handed over last. Sync worker only (it owns
// the ledger); a nil ring (no Secret yet, or one that does not parse) changes nothing.
func (a *Agent) publishKeys(snap *watch.Snapshot) error {
	me := snap.Node(a.cfg.NodeName)
	if snap.Ring == nil || a.led == nil || me == nil {
		return nil
	}
	gens := keys.PublishedGenerations(snap.Ring)
	if _, err := a.led.KeepPrivateKeys(gens, rand.Reader); err != nil {
		return fmt.Errorf("keep this node's x25519 key pairs in the ledger: %w", err)
	}
	k := nodekeys.Keys{Incarnation: nodekeys.Incarnation{BootID: me.Incarnation, UID: me.UID, Epoch: a.led.Epoch()},
		Capabilities: []string{api.CapabilityRingConfigMap, api.CapabilityReadinessRows, api.CapabilityReadinessDecide, api.CapabilityInstalled,
			api.CapabilityNodeStatus, api.CapabilityLanes}}
	k.Lanes = a.epochLanes(me.Keys, k.Incarnation)
	if r, ok := a.d.Source.(NodeIDReader); ok && r.ReadsNodeIDs() {
		// Declared only once the NodeIDs' list is in: an agent whose RBAC or CRD predates
		// them keeps the table in the public ring (docs/keys.md §13).
		k.Capabilities = append(k.Capabilities, api.CapabilityNodeIDs)
	}
	for _, g := range a.led.PrivateKeyGenerations() {
		p, _ := a.led.PrivateKey(g)
		k.Keys = append(k.Keys, nodekeys.Key{Generation: g, X25519: p.Public()})
	}
	a.mu.Lock()
	// Installed (docs/keys.md §10): the generations of the last state this process
	// programmed; before its first sync, what was published for this incarnation — by this
	// process, or by the agent before it, whose SAs the kernel kept (the ledger was
	// adopted with its epoch); under a new epoch nothing until a sync programs it.
	switch {
	case a.lastState != nil:
		k.Installed = slices.Clone(a.lastState.Generations)
	case a.keysWant != nil && a.keysWant.Incarnation == k.Incarnation:
		k.Installed = a.keysWant.Installed
	case me.Keys != nil && me.Keys.Incarnation == k.Incarnation:
		k.Installed = slices.Clone(me.Keys.Installed)
	}
	if len(k.Installed) == 0 && (shadowsInstalled(me.Keys, k) || shadowsInstalled(a.keysWant, k)) {
		// A new epoch is published only once installed (docs/keys.md §3): peers keep
		// the incarnation they send under until a sync has programmed this one.
		a.mu.Unlock()
		if !a.keysHeld {
			a.keysHeld = true
			a.log.Info("this node's keys of its new SA epoch wait until a sync has programmed it; peers keep the old epoch's until then",
				"epoch", k.Incarnation.Epoch)
		}
		return nil
	}
	a.keysHeld = false
	changed := a.keysWant == nil || !a.keysWant.Equal(k)
	if changed {
		a.keysWant, a.keysUID = &k, me.UID
	}
	a.mu.Unlock()
	if changed {
		a.log.Info("publishing this node's x25519 public keys", "generations", gens, "epoch", k.Incarnation.Epoch)
		select {
		case a.keysWake <- struct{}{}:
		default:
		}
	}
	return nil
}

// epochLanes is the lane count this node publishes for incarnation inc (sync worker): fixed
// for the epoch when first decided — Config.Lanes, or less when keys of the same
// incarnation were published before (by this process or the agent before it, whose
// peers installed inbound states for that count and readiness covers no more; an agent
// before lanes published none) — and 0 from the moment lanes are turned off.
func (a *Agent) epochLanes(pub *nodekeys.Keys, inc nodekeys.Incarnation) uint16 {
	if a.cfg.Dataplane.LanesOff {
		a.d.Metrics.Lanes.Set(0)
		return 0
	}
	if a.lanesEpoch == inc.Epoch {
		return a.lanes
	}
	n := a.cfg.Lanes
	for _, k := range []*nodekeys.Keys{a.keysWantCopy(), pub} {
		if k != nil && k.Incarnation == inc {
			was := uint16(0)
			if k.Has(api.CapabilityLanes) {
				was = k.Lanes
			}
			n = min(n, was)
		}
	}
	a.lanes, a.lanesEpoch = n, inc.Epoch
	a.d.Metrics.Lanes.Set(float64(n))
	if a.cfg.Lanes > 0 || n > 0 {
		a.log.Info("per-CPU lanes for this SA epoch", "epoch", inc.Epoch, "lanes", n, "configured", a.cfg.Lanes)
	}
	return n
}

func (a *Agent) keysWantCopy() *nodekeys.Keys {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.keysWant
}

// shadowsInstalled reports whether publishing k would replace published keys pub of the
// same boot and Node object, another epoch and generations installed: peers would take
// k's incarnation, under which nothing is installed yet, instead of pub's, and neither
// send ESP nor hold plaintext toward this node until it is (docs/keys.md §3).
func shadowsInstalled(pub *nodekeys.Keys, k nodekeys.Keys) bool {
	return pub != nil && pub.Incarnation.BootID == k.Incarnation.BootID && pub.Incarnation.UID == k.Incarnation.UID &&
		pub.Incarnation.Epoch != k.Incarnation.Epoch && pub.Has(api.CapabilityInstalled) && len(pub.Installed) > 0
}

// writeKeys is the keys writer: it writes the newest keys handed over until stopped is
// closed, backing off after a failed write (RetryMin doubling to RetryMax), then makes
// one last attempt (ctx bounds it, as the report writer's). A restart writes them once
// more (idempotent).
func (a *Agent) writeKeys(ctx context.Context, stopped <-chan struct{}) {
	a.writeLoop(ctx, stopped, a.keysWake, 0, a.writeKeysOnce)
}

// writeLoop runs once at start and whenever wake fires, until stopped is closed: after a
// failure it runs again after a backoff (RetryMin doubling to RetryMax) unless woken
// sooner, and it leaves at least gap between two runs (changes meanwhile coalesce: the
// writers write the newest). Once stopped is closed it runs once more (ctx bounds it).
func (a *Agent) writeLoop(ctx context.Context, stopped <-chan struct{}, wake <-chan struct{}, gap time.Duration, once func(context.Context) error) {
	failures := 0
	for {
		var retry <-chan time.Time
		var t *time.Timer
		if err := once(ctx); err != nil {
			failures++
			t = time.NewTimer(backoff(failures, a.cfg.RetryMin, a.cfg.RetryMax))
			retry = t.C
		} else {
			failures = 0
		}
		if gap > 0 {
			g := time.NewTimer(gap)
			select {
			case <-g.C:
			case <-stopped:
			}
			g.Stop()
		}
		select {
		case <-wake:
		case <-retry:
		case <-stopped:
		}
		if t != nil {
			t.Stop()
		}
		select {
		case <-stopped:
			// The sync worker has handed over its last decision: one bounded last attempt.
			_ = once(ctx)
			return
		default:
		}
	}
}

// writeKeysOnce writes the keys handed over if they are not written yet.
func (a *Agent) writeKeysOnce(ctx context.Context) error {
	if a.d.Dynamic == nil {
		return nil // no NodeKeys API client (unit tests of v1 behaviour)
	}
	a.kmu.Lock()
	defer a.kmu.Unlock()
	a.mu.Lock()
	want, have, uid := a.keysWant, a.keysHave, a.keysUID
	a.mu.Unlock()
	if want == nil || (have != nil && have.Equal(*want)) {
		return nil
	}
	err := nodekeys.Write(ctx, a.d.Dynamic, a.cfg.Namespace, a.cfg.NodeName, uid, *want)
	a.mu.Lock()
	if err == nil {
		a.keysHave, a.keysErr = want, ""
	} else {
		a.keysErr = err.Error()
	}
	a.mu.Unlock()
	if err != nil {
		a.d.Metrics.ReportWrites.WithLabelValues("keys", "error").Inc()
		a.log.Warn("cannot publish this node's x25519 public keys (nothing uses them yet: protocol v1 derives every SA)", "error", err)
		return err
	}
	a.d.Metrics.ReportWrites.WithLabelValues("keys", "ok").Inc()
	return nil
}

// PublishedKeys returns the keys last written to this node's NodeKeys in this process
// (nil if none).
func (a *Agent) PublishedKeys() *nodekeys.Keys {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.keysHave
}
