package keys

import (
	"fmt"
	"io"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/secureoverlay/secureoverlay/api"
)

// Config are the master's policy knobs for Step.
type Config struct {
	// RotateInterval is the longest a generation stays the newest (from its creation);
	// 0 disables interval rotation.
	RotateInterval time.Duration
	// Grace is the longest a retiring generation stays installed after the switch.
	Grace time.Duration
	// Drain is the shortest: a retiring generation leaves once every live node reports it
	// no longer sends with it and Drain has passed since the switch (for packets still in
	// flight); a node that does not confirm keeps it until Grace is over.
	Drain time.Duration
	// NodeTimeout: a node NotReady for at least this long no longer blocks any step.
	NodeTimeout time.Duration
	// AckTimeout bounds what one Ready node can hold: a node that has lagged on the steps
	// the master waits for (reaching the current mode, installing the pending generation)
	// without a break for this long no longer holds them, until it catches up. It is listed
	// as excluded; its pairs stay on the safe side (docs/keys.md, "Bounded influence of one
	// node"). 0 disables the bound.
	AckTimeout time.Duration
	// SeqThreshold: rotate early when a report's MaxSeqFraction reaches it; 0 disables.
	SeqThreshold float64
	// SeqMinInterval bounds what one node's sequence claims can force: a sequence-triggered
	// rotation starts only once the active generation is at least this old, so reports
	// (honest or not) cause at most one early rotation per interval; 0 disables the bound.
	SeqMinInterval time.Duration
	// Cipher and ICVBytes of new generations.
	Cipher   Cipher
	ICVBytes int
	// ProtocolV2 lets a new generation be a protocol v2 generation (a public salt, pair
	// keys from the nodes' X25519 keys: docs/keys.md §10) — when every node that is not
	// excluded publishes its key for it (NodeState.Published); otherwise, or when false,
	// it is a v1 generation (a root every agent reads).
	ProtocolV2 bool
}

// DefaultConfig is the shipped policy.
func DefaultConfig() Config {
	return Config{RotateInterval: 12 * time.Hour, Grace: 5 * time.Minute, Drain: 10 * time.Second, NodeTimeout: 10 * time.Minute,
		AckTimeout: 10 * time.Minute, SeqThreshold: 0.5, SeqMinInterval: 10 * time.Minute, Cipher: AES128GCM, ICVBytes: 8,
		ProtocolV2: true}
}

// NodeState is what the master observed about one Node that exists in the API. Nodes that
// are gone are simply absent.
type NodeState struct {
	Name  string
	Ready bool
	// NotReadySince is when the Ready condition last turned false/unknown (zero: unknown).
	NotReadySince time.Time
	// BootID is status.nodeInfo.bootID; a report with another incarnation is stale.
	BootID string
	// Report is the agent's parsed report, nil if there is none; ReportError is set when
	// the annotation exists but does not parse.
	Report      *api.NodeReport
	ReportError string
	// Published lists the generations the node publishes an X25519 public key for, in a
	// NodeKeys of its current key incarnation (the report's boot ID, UID and epoch); nil
	// when it publishes none (an agent that predates them) or only for another incarnation.
	Published []uint32
}

// Input is everything one Step decides from.
type Input struct {
	// Ring is the ring read from the Secret; nil when the Secret does not exist.
	Ring  *Ring
	Nodes []NodeState
	// Target is the operator's desired mode (off when disabled, enforce when enabled).
	Target api.Mode
	// RotateRequest is the operator's current rotation request ID ("" for none).
	RotateRequest string
	Now           time.Time
	Config        Config
	// LagSince is, per node, since when the master has seen it lag without a break: the
	// previous Step's Result.LagSince (nil at start: every wait starts now).
	LagSince map[string]time.Time
	// Rand supplies root keys for new generations (crypto/rand.Reader in the master).
	Rand io.Reader
}

// ActionKind names a change Step made.
type ActionKind string

const (
	ActionTargetChanged      ActionKind = "target-changed"
	ActionModeChanged        ActionKind = "mode-changed"
	ActionGenerationCreated  ActionKind = "generation-created"
	ActionGenerationActive   ActionKind = "generation-activated"
	ActionGenerationRetiring ActionKind = "generation-retiring"
	ActionGenerationRemoved  ActionKind = "generation-removed"
	ActionNodeIDAssigned     ActionKind = "node-id-assigned"
	ActionNodeIDReleased     ActionKind = "node-id-released"
	ActionNodeIDFreed        ActionKind = "node-id-freed"
	ActionRequestHandled     ActionKind = "rotate-request-handled"
)

// Action is one change Step made to the ring. It never carries key material.
type Action struct {
	Kind       ActionKind
	Generation uint32
	Node       string
	NodeID     uint32
	From, To   api.Mode
	Reason     string
	// V2: the generation created is a protocol v2 generation.
	V2 bool
}

func (a Action) String() string {
	switch a.Kind {
	case ActionTargetChanged:
		return fmt.Sprintf("target mode %s -> %s", a.From, a.To)
	case ActionModeChanged:
		return fmt.Sprintf("cluster mode %s -> %s", a.From, a.To)
	case ActionGenerationCreated:
		why := a.Reason
		if a.Node != "" {
			why += ", reported by node " + a.Node
		}
		if a.V2 {
			why += ", protocol v2"
		}
		return fmt.Sprintf("generation %d created (%s)", a.Generation, why)
	case ActionGenerationActive:
		return fmt.Sprintf("generation %d active", a.Generation)
	case ActionGenerationRetiring:
		return fmt.Sprintf("generation %d retiring", a.Generation)
	case ActionGenerationRemoved:
		return fmt.Sprintf("generation %d removed (%s)", a.Generation, a.Reason)
	case ActionNodeIDAssigned:
		return fmt.Sprintf("node %s assigned id %d", a.Node, a.NodeID)
	case ActionNodeIDReleased:
		return fmt.Sprintf("node %s gone, id %d held until generation %d is removed", a.Node, a.NodeID, a.Generation)
	case ActionNodeIDFreed:
		return fmt.Sprintf("id %d of departed node %s freed", a.NodeID, a.Node)
	case ActionRequestHandled:
		return fmt.Sprintf("rotate request %q handled by generation %d", a.Reason, a.Generation)
	}
	return string(a.Kind)
}

// Lag is a node and why it holds (or, when excluded, no longer holds) a step.
type Lag struct {
	Node   string
	Reason string
}

// Result is the outcome of one Step.
type Result struct {
	// Ring is the next ring; Changed says whether it differs from Input.Ring (then the
	// master must write it; Actions lists the differences).
	Ring    *Ring
	Changed bool
	Actions []Action
	// Waiting describes the step the master waits for ("" when settled).
	Waiting string
	// Lagging are live nodes holding Waiting; Excluded are nodes that no longer block:
	// NotReady longer than the node timeout, or lagging on a step longer than the ack
	// timeout.
	Lagging  []Lag
	Excluded []Lag
	// LagSince is, for each node lagging in this Step, since when it has lagged without a
	// break; pass it to the next Step as Input.LagSince.
	LagSince map[string]time.Time
	// Deferred explains a rotation that is due but cannot start yet.
	Deferred string
	// RotationInProgress is true while a generation is pending or retiring.
	RotationInProgress bool
	// Wake is the earliest future time a timed transition may fire (zero: none).
	Wake time.Time
}

// nodeView is a node's report judged against the node.
type nodeView struct {
	NodeState
	excluded bool
	problem  string // why the report cannot be used, "" if it can
}

// SeqConfirmSlack is how far below a node's sequence claim a peer's inbound counters may
// stay and still confirm it: both are rounded up to a hundredth, and the highest received
// trails the highest sent by the packets in flight.
const SeqConfirmSlack = 0.02

// seqUnconfirmed says why claim's sequence claim is not confirmed by any other node's
// inbound counters ("" when one confirms it, or when no other usable node reports them —
// agents of 0.1 — so the claim is taken alone). docs/keys.md §5.
func seqUnconfirmed(nodes []nodeView, claim nodeView) string {
	c := claim.Report
	checkable := false
	best := 0.0
	for _, w := range nodes {
		if w.Name == claim.Name || w.excluded || w.problem != "" || w.Report.MaxInSeqFraction == nil {
			continue
		}
		checkable = true
		if c.SeqGeneration != 0 && w.Report.InSeqGeneration != c.SeqGeneration {
			continue
		}
		in := *w.Report.MaxInSeqFraction
		if in >= c.MaxSeqFraction-SeqConfirmSlack {
			return ""
		}
		best = max(best, in)
	}
	if !checkable {
		return ""
	}
	return fmt.Sprintf("rotation (sequence, reported by %s: %.2f of generation %d) waits for a peer's inbound counters to confirm it (highest: %.2f)",
		claim.Name, c.MaxSeqFraction, c.SeqGeneration, best)
}

// Step computes the next ring from the current one and the observed cluster. It is a pure
// function: the same input gives the same output (given the same Rand bytes).
func Step(in Input) (Result, error) {
	var res Result
	r := NewRing()
	if in.Ring != nil {
		if err := in.Ring.Validate(); err != nil {
			return res, err
		}
		r = in.Ring.Clone()
	}
	if !in.Target.Valid() {
		return res, fmt.Errorf("step: target mode (%d bytes) is not one of off, accept, encrypt, enforce", len(in.Target))
	}
	cfg := in.Config
	if cfg.Cipher.KeyBytes() == 0 || !ValidICV(cfg.ICVBytes) {
		return res, fmt.Errorf("step: invalid config cipher %q icvBytes %d", cfg.Cipher, cfg.ICVBytes)
	}
	now := in.Now
	wake := func(t time.Time) {
		if t.After(now) && (res.Wake.IsZero() || t.Before(res.Wake)) {
			res.Wake = t
		}
	}
	act := func(a Action) { res.Actions = append(res.Actions, a) }
	exclude := func(node, reason string) {
		for _, l := range res.Excluded {
			if l.Node == node {
				return
			}
		}
		res.Excluded = append(res.Excluded, Lag{node, reason})
	}

	nodes := make([]nodeView, 0, len(in.Nodes))
	for _, n := range in.Nodes {
		v := nodeView{NodeState: n}
		if !n.Ready && !n.NotReadySince.IsZero() {
			until := n.NotReadySince.Add(cfg.NodeTimeout)
			if !now.Before(until) {
				v.excluded = true
				exclude(n.Name, fmt.Sprintf("NotReady since %s (longer than node-timeout %s)", n.NotReadySince.UTC().Format(time.RFC3339), cfg.NodeTimeout))
			} else {
				wake(until)
			}
		}
		switch {
		case n.ReportError != "":
			v.problem = "unreadable report: " + n.ReportError
		case n.Report == nil:
			v.problem = "no report"
		case n.BootID != "" && n.Report.Incarnation != n.BootID:
			v.problem = "report is from a previous boot"
		}
		nodes = append(nodes, v)
	}
	sort.Slice(nodes, func(i, j int) bool { return nodes[i].Name < nodes[j].Name })

	// gate lists the live nodes whose usable report fails ok.
	gate := func(want string, ok func(*api.NodeReport) bool) []Lag {
		var lag []Lag
		for _, v := range nodes {
			switch {
			case v.excluded:
			case v.problem != "":
				lag = append(lag, Lag{v.Name, v.problem})
			case !ok(v.Report):
				lag = append(lag, Lag{v.Name, want})
			}
		}
		return lag
	}
	// ackGate is gate for a step a Ready node may hold for at most the ack timeout: a node
	// that has lagged without a break for AckTimeout is excluded (and named in Excluded)
	// instead of lagging.
	ready := map[string]bool{}
	for _, v := range nodes {
		ready[v.Name] = v.Ready
	}
	ackGate := func(want string, ok func(*api.NodeReport) bool) []Lag {
		var lag []Lag
		for _, l := range gate(want, ok) {
			first, seen := res.LagSince[l.Node]
			if !seen {
				if first, seen = in.LagSince[l.Node]; !seen || first.After(now) {
					first = now
				}
				if res.LagSince == nil {
					res.LagSince = map[string]time.Time{}
				}
				res.LagSince[l.Node] = first
			}
			if cfg.AckTimeout > 0 && ready[l.Node] {
				until := first.Add(cfg.AckTimeout)
				if !now.Before(until) {
					exclude(l.Node, fmt.Sprintf("Ready but lagging since %s, longer than ack-timeout %s (now: %s)",
						first.UTC().Format(time.RFC3339), cfg.AckTimeout, l.Reason))
					continue
				}
				wake(until)
			}
			lag = append(lag, l)
		}
		return lag
	}
	// stillSending lists the live nodes that may still send with retiring generation num: a
	// node confirms it does not once its report's sending lists the active generation and
	// not num, or it encrypts to no peer (a report without sending, from an agent that
	// predates it, confirms nothing).
	stillSending := func(num, active uint32) []Lag {
		return gate(fmt.Sprintf("still sends with generation %d", num), func(rep *api.NodeReport) bool {
			if slices.Contains(rep.Sending, num) {
				return false
			}
			return rep.PeersEncrypted == 0 || (active != 0 && slices.Contains(rep.Sending, active))
		})
	}
	// everyPublishes says whether every node that is not excluded publishes its key for
	// generation num (then num may be a v2 generation: every pair can derive it).
	everyPublishes := func(num uint32) bool {
		for _, v := range nodes {
			if !v.excluded && !slices.Contains(v.Published, num) {
				return false
			}
		}
		return true
	}
	newGen := func(reason, node string, state State) error {
		num := r.LastGeneration + 1
		g := Generation{Number: num, State: state, Cipher: cfg.Cipher, ICVBytes: cfg.ICVBytes, Reason: reason, Created: now}
		if cfg.ProtocolV2 && everyPublishes(num) {
			// A public salt: the master holds no key a node could use against others.
			g.Salt = make([]byte, GenerationSaltBytes)
			if _, err := io.ReadFull(in.Rand, g.Salt); err != nil {
				return fmt.Errorf("create generation %d: read its salt from entropy source: %w", num, err)
			}
		} else {
			g.Root = make(Key, RootKeyBytes)
			if _, err := io.ReadFull(in.Rand, g.Root); err != nil {
				return fmt.Errorf("create generation %d: read root key from entropy source: %w", num, err)
			}
		}
		r.LastGeneration = num
		if state == StateActive {
			g.Activated = now
		}
		r.Generations = append(r.Generations, g)
		act(Action{Kind: ActionGenerationCreated, Generation: g.Number, Reason: reason, Node: node, V2: g.V2()})
		if state == StateActive {
			act(Action{Kind: ActionGenerationActive, Generation: g.Number})
		}
		return nil
	}

	// 1. Target.
	if r.Target != in.Target {
		act(Action{Kind: ActionTargetChanged, From: r.Target, To: in.Target})
		r.Target = in.Target
	}

	// 2. Cutover: one step per call, gated on every live node reporting the current mode
	// (and, with keys in use, the active generation installed).
	modeGate := func() []Lag {
		cur := r.Mode
		act := r.Active()
		want := "report mode " + string(cur)
		if act != nil {
			want += fmt.Sprintf(" with generation %d installed", act.Number)
		}
		return ackGate(want, func(rep *api.NodeReport) bool {
			return rep.Mode == cur && (act == nil || slices.Contains(rep.Generations, act.Number))
		})
	}
	if r.Mode != r.Target && len(modeGate()) == 0 {
		from := r.Mode
		dir := -1
		if r.Target.Rank() > from.Rank() {
			dir = 1
		}
		next := api.Modes[from.Rank()+dir]
		if from == api.ModeOff {
			if err := newGen("initial", "", StateActive); err != nil {
				return res, err
			}
			if in.RotateRequest != "" && in.RotateRequest != r.LastRotateRequest {
				r.LastRotateRequest = in.RotateRequest
				act(Action{Kind: ActionRequestHandled, Generation: r.LastGeneration, Reason: in.RotateRequest})
			}
		}
		if next == api.ModeOff {
			for _, g := range r.Generations {
				act(Action{Kind: ActionGenerationRemoved, Generation: g.Number, Reason: "encryption disabled"})
			}
			r.Generations = []Generation{}
		}
		r.Mode = next
		r.ModeChanged = now
		act(Action{Kind: ActionModeChanged, From: from, To: next})
	}

	// 3. Rotation, while keys are in use.
	if r.Mode != api.ModeOff {
		// 3a. A retiring generation leaves once no live node sends with it (and the drain
		// time is over), at the latest when the grace period is over.
		var active uint32
		if a := r.Active(); a != nil {
			active = a.Number
		}
		kept := r.Generations[:0]
		for _, g := range r.Generations {
			if g.State == StateRetiring {
				until := g.Retiring.Add(cfg.Grace)
				if !now.Before(until) {
					act(Action{Kind: ActionGenerationRemoved, Generation: g.Number, Reason: "grace period over"})
					continue
				}
				wake(until)
				if len(stillSending(g.Number, active)) == 0 {
					drained := g.Retiring.Add(cfg.Drain)
					if !now.Before(drained) {
						act(Action{Kind: ActionGenerationRemoved, Generation: g.Number, Reason: "no live node sends with it"})
						continue
					}
					wake(drained)
				}
			}
			kept = append(kept, g)
		}
		r.Generations = kept

		// 3b. Pending becomes active once every live node has it installed inbound.
		if p := r.Pending(); p != nil {
			num := p.Number
			if len(ackGate(fmt.Sprintf("generation %d not installed", num), func(rep *api.NodeReport) bool { return slices.Contains(rep.Generations, num) })) == 0 {
				if a := r.Active(); a != nil {
					a.State, a.Retiring = StateRetiring, now
					act(Action{Kind: ActionGenerationRetiring, Generation: a.Number})
					wake(now.Add(cfg.Grace))
				}
				p = r.Generation(num)
				p.State, p.Activated = StateActive, now
				act(Action{Kind: ActionGenerationActive, Generation: num})
			}
		}

		// 3c. Start a rotation when one is due and none is pending.
		if a := r.Active(); a != nil && r.Target != api.ModeOff {
			reason, request, claimant := "", false, ""
			if in.RotateRequest != "" && in.RotateRequest != r.LastRotateRequest {
				reason, request = "request", true
			}
			if reason == "" && cfg.RotateInterval > 0 {
				due := a.Created.Add(cfg.RotateInterval)
				if !now.Before(due) {
					reason = "interval"
				} else {
					wake(due)
				}
			}
			unconfirmed := ""
			if reason == "" && cfg.SeqThreshold > 0 {
				hasRetiring := len(r.Generations) > 1
				for _, v := range nodes {
					if v.excluded || v.problem != "" || v.Report.MaxSeqFraction < cfg.SeqThreshold {
						continue
					}
					if v.Report.SeqGeneration == a.Number || (v.Report.SeqGeneration == 0 && !hasRetiring) {
						if why := seqUnconfirmed(nodes, v); why != "" {
							unconfirmed = why
							continue
						}
						reason, claimant = "sequence", v.Name
						break
					}
				}
			}
			if reason == "" && unconfirmed != "" {
				res.Deferred = unconfirmed
			}
			seqAllowed := a.Created.Add(cfg.SeqMinInterval)
			switch {
			case reason == "":
			case claimant != "" && cfg.SeqMinInterval > 0 && now.Before(seqAllowed):
				res.Deferred = fmt.Sprintf("rotation (sequence, reported by %s) waits until %s: generation %d is younger than seq-min-interval %s",
					claimant, seqAllowed.UTC().Format(time.RFC3339), a.Number, cfg.SeqMinInterval)
				wake(seqAllowed)
			case r.Pending() != nil:
				res.Deferred = fmt.Sprintf("rotation (%s) waits for pending generation %d", reason, r.Pending().Number)
			case len(r.Generations) >= MaxLiveGenerations:
				res.Deferred = fmt.Sprintf("rotation (%s) waits for a retiring generation to be removed", reason)
			default:
				if err := newGen(reason, claimant, StatePending); err != nil {
					return res, err
				}
				if request {
					r.LastRotateRequest = in.RotateRequest
					act(Action{Kind: ActionRequestHandled, Generation: r.LastGeneration, Reason: in.RotateRequest})
				}
			}
		}
	}

	// 4. Node IDs: assign to every present node, hold departed nodes' IDs while any
	// generation that saw them is live.
	assignNodeIDs(r, nodes, act)

	// 5. What we wait for now.
	switch {
	case r.Pending() != nil:
		num := r.Pending().Number
		res.Waiting = fmt.Sprintf("generation %d to be installed inbound on every live node", num)
		res.Lagging = ackGate(fmt.Sprintf("generation %d not installed", num), func(rep *api.NodeReport) bool {
			return slices.Contains(rep.Generations, num)
		})
	case r.Mode != r.Target:
		res.Waiting = fmt.Sprintf("every live node to report mode %s before stepping toward %s", r.Mode, r.Target)
		res.Lagging = modeGate()
	default:
		// Settled: nothing waits on the nodes, but a node that is still behind the
		// cluster's state (an excluded node that has not caught up, a node that joined)
		// keeps its lag clock, so it stays named in Excluded until it catches up.
		if r.Mode != api.ModeOff {
			_ = modeGate()
		}
		if a := r.Active(); a != nil {
			for _, g := range r.Generations {
				if g.State != StateRetiring {
					continue
				}
				if lag := stillSending(g.Number, a.Number); len(lag) > 0 {
					res.Waiting = fmt.Sprintf("every live node to stop sending with retiring generation %d (removed at the latest %s)",
						g.Number, g.Retiring.Add(cfg.Grace).UTC().Format(time.RFC3339))
					res.Lagging = lag
					break
				}
			}
		}
	}
	for _, g := range r.Generations {
		if g.State != StateActive {
			res.RotationInProgress = true
		}
	}
	if err := r.Validate(); err != nil {
		return res, fmt.Errorf("step produced an invalid ring (bug): %w", err)
	}
	res.Ring = r
	res.Changed = len(res.Actions) > 0
	return res, nil
}

func assignNodeIDs(r *Ring, nodes []nodeView, act func(Action)) {
	present := map[string]bool{}
	for _, v := range nodes {
		present[v.Name] = true
	}
	oldest := uint32(0)
	for _, g := range r.Generations {
		if oldest == 0 || g.Number < oldest {
			oldest = g.Number
		}
	}
	kept := r.Nodes[:0]
	for _, n := range r.Nodes {
		switch {
		case !n.Released && !present[n.Name]:
			n.Released, n.ReleasedAt = true, r.LastGeneration
			act(Action{Kind: ActionNodeIDReleased, Node: n.Name, NodeID: n.ID, Generation: n.ReleasedAt})
		case n.Released && present[n.Name]:
			n.Released, n.ReleasedAt = false, 0
			act(Action{Kind: ActionNodeIDAssigned, Node: n.Name, NodeID: n.ID})
		}
		if n.Released && (oldest == 0 || oldest > n.ReleasedAt) {
			act(Action{Kind: ActionNodeIDFreed, Node: n.Name, NodeID: n.ID})
			continue
		}
		kept = append(kept, n)
	}
	r.Nodes = kept
	used := map[uint32]bool{}
	has := map[string]bool{}
	for _, n := range r.Nodes {
		used[n.ID] = true
		if !n.Released {
			has[n.Name] = true
		}
	}
	next := uint32(1)
	for _, v := range nodes {
		if has[v.Name] {
			continue
		}
		for used[next] {
			next++
		}
		if next > MaxNodeID {
			return // validation of SPIs would fail; 4 million nodes is not a real cluster
		}
		used[next] = true
		r.Nodes = append(r.Nodes, NodeID{Name: v.Name, ID: next})
		has[v.Name] = true
		act(Action{Kind: ActionNodeIDAssigned, Node: v.Name, NodeID: next})
	}
}

// Summary is a one-line description of a ring for logs and status (no key material).
func Summary(r *Ring) string {
	if r == nil {
		return "no ring"
	}
	var gens []string
	for _, g := range r.Generations {
		v2 := ""
		if g.V2() {
			v2 = ":v2"
		}
		gens = append(gens, fmt.Sprintf("%d:%s%s", g.Number, g.State, v2))
	}
	return fmt.Sprintf("mode=%s target=%s generations=[%s] nodes=%d", r.Mode, r.Target, strings.Join(gens, " "), len(r.Nodes))
}
