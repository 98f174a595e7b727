package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net/netip"
	"slices"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/readiness"
	"github.com/secureoverlay/secureoverlay/reconciler/desired"
	"github.com/secureoverlay/secureoverlay/reconciler/watch"
	"github.com/secureoverlay/secureoverlay/reconciler/xfrm"
)

// Budget is the MTU budget the agent reports.
type Budget struct {
	ExternalMTU int
	BudgetMTU   int
	// Interface is the external link ExternalMTU was detected on ("" when configured).
	Interface string
}

// SeqUse is the highest outbound sequence number of our SAs as a fraction of limit.
type SeqUse struct {
	Fraction   float64
	Generation uint32
}

// MaxSeq finds the outbound SA (src = selfIP) with the highest sequence number among the
// observed ones and returns it as a fraction of limit (the soft packet limit), with its
// generation recovered from the SPI's generation field and the live generations.
func MaxSeq(observed []xfrm.KernelSA, selfIP netip.Addr, limit uint64, live []uint32) SeqUse {
	return maxSeq(observed, limit, live, func(s xfrm.KernelSA) (uint64, bool) { return s.OutSeq, s.SA.Src == selfIP })
}

// MaxInSeq is MaxSeq for the inbound SAs (dst = selfIP) and their highest received
// sequence number: what this node's kernel has received and authenticated, which
// corroborates its peers' outbound claims (docs/keys.md §5).
func MaxInSeq(observed []xfrm.KernelSA, selfIP netip.Addr, limit uint64, live []uint32) SeqUse {
	return maxSeq(observed, limit, live, func(s xfrm.KernelSA) (uint64, bool) { return s.InSeq, s.SA.Dst == selfIP })
}

// maxSeq is the SA with the highest seq(s) among those seq selects, as a fraction of limit
// with its generation.
func maxSeq(observed []xfrm.KernelSA, limit uint64, live []uint32, seq func(xfrm.KernelSA) (uint64, bool)) SeqUse {
	var best SeqUse
	var bestSeq uint64
	for _, s := range observed {
		n, ok := seq(s)
		if !ok || n < bestSeq {
			continue
		}
		bestSeq = n
		best.Generation = 0
		// Any kind and lane: a tunnel SA (CrossSubnet) carries its generation as a
		// transport SA does (keys.ParseSPI is transport's lane 0 only).
		if _, _, gm4, _, ok := keys.ParseLaneSPI(s.SA.SPI); ok {
			for _, g := range live {
				if g%4 == gm4 {
					best.Generation = g
				}
			}
		}
	}
	if limit > 0 {
		best.Fraction = float64(bestSeq) / float64(limit)
	}
	return best
}

// BuildReport is the report for state st once the kernel holds it (program before
// advertise: only call it after both appliers succeeded). It claims only what st holds.
// The caller sets UID and Epoch (this node's key incarnation).
func BuildReport(st desired.State, snap *watch.Snapshot, incarnation string, b Budget, seq, inSeq SeqUse, now time.Time) watch.Report {
	in := reportedFraction(inSeq.Fraction)
	r := watch.Report{NodeReport: api.NodeReport{
		Mode: st.Mode, Generations: append([]uint32(nil), st.Generations...), Sending: st.SendingGenerations(),
		Incarnation: incarnation,
		BudgetMTU:   b.BudgetMTU, ExternalMTU: b.ExternalMTU,
		MaxSeqFraction: reportedFraction(seq.Fraction), SeqGeneration: seq.Generation,
		MaxInSeqFraction: &in, InSeqGeneration: inSeq.Generation,
		PeersEncrypted: len(st.EncryptingPeers()), PeersExpected: len(st.Peers),
		LastSync:   now.UTC().Truncate(time.Second),
		CalicoAPI:  snap.Calico.GroupVersion,
		Neighbours: append([]string(nil), st.Neighbours...),
	}}
	if snap.CalicoSwitching != "" {
		r.CalicoAPI += "→" + snap.CalicoSwitching
	}
	for _, s := range st.Skipped {
		if strings.HasPrefix(s.Object, "node/") {
			r.PeersExpected++
		}
	}
	for _, p := range st.Peers {
		n := snap.Node(p.Name)
		if n == nil {
			continue
		}
		// The peer's key incarnation, as Inputs derived its SAs with.
		tag := watch.IncarnationTag(n.KeyIncarnation())
		if p.Inbound {
			if r.InboundFrom == nil {
				r.InboundFrom = map[string]string{}
			}
			r.InboundFrom[p.Name] = tag
		}
		if p.SendGeneration != 0 {
			if r.EncryptingTo == nil {
				r.EncryptingTo = map[string]string{}
			}
			r.EncryptingTo[p.Name] = tag
		}
	}
	return r
}

// ReadinessOf is the report's per-pair claims for state st as protocol v2's digests
// (docs/protocol-v2.md §6, §9 step 1): the peers st holds inbound SAs from and sends ESP
// to, each with the digest of the key incarnation its SAs were derived with (the same
// claims BuildReport lists), the peers st skips as refused, and selfKeyInc (this node's
// key incarnation) as the node's own digest. Nil while this node has no ID in the ring
// or no key incarnation.
func ReadinessOf(st desired.State, snap *watch.Snapshot, self, selfKeyInc string) *api.ReadinessStatus {
	if snap.Ring == nil || selfKeyInc == "" {
		return nil
	}
	ids := watch.NodeIDs(snap.Ring)
	id, ok := ids[self]
	if !ok {
		return nil
	}
	in, out := readiness.Keys{}, readiness.Keys{}
	for _, p := range st.Peers {
		n := snap.Node(p.Name)
		pid, ok := ids[p.Name]
		if n == nil || !ok {
			continue
		}
		k := readiness.KeyDigest(n.KeyIncarnation())
		if p.Inbound {
			in[pid] = k
		}
		if p.SendGeneration != 0 {
			out[pid] = k
		}
	}
	var refused []uint32
	for _, s := range st.Skipped {
		if name, ok := strings.CutPrefix(s.Object, "node/"); ok {
			if pid, ok := ids[name]; ok && pid != id {
				refused = append(refused, pid)
			}
		}
	}
	slices.Sort(refused)
	refused = slices.Compact(refused)
	return readiness.Encode(readiness.NewStatus(id, readiness.KeyDigest(selfKeyInc), in, out, refused, readiness.DefaultBuckets))
}

// reportedFraction rounds a sequence fraction UP to a hundredth, so the report changes at
// most a hundred times over an SA's life instead of on every resync (the exact value is in
// the max_sequence_fraction metric) and never under-states how close rotation is.
func reportedFraction(f float64) float64 {
	if f <= 0 {
		return 0
	}
	return math.Ceil(f*100) / 100
}

// sameClaims reports whether two reports differ only in LastSync (a heartbeat).
func sameClaims(a, b watch.Report) bool {
	a.LastSync, b.LastSync = time.Time{}, time.Time{}
	x, err1 := json.Marshal(a)
	y, err2 := json.Marshal(b)
	return err1 == nil && err2 == nil && string(x) == string(y)
}

// patchTimeout bounds one report write, and the writer's last writes after Run's context
// ends. The writer is not stopped with the agent's context: a sync that changed the kernel
// finishes advertising it even during shutdown, so the published claims match what the
// kernel is left holding.
const patchTimeout = 10 * time.Second

// removeReportAnnotation removes the report annotation from node name (a JSON merge
// patch setting it to null; nothing else of the Node changes).
func removeReportAnnotation(ctx context.Context, c kubernetes.Interface, name string) error {
	ctx, cancel := context.WithTimeout(ctx, patchTimeout)
	defer cancel()
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]any{api.ReportAnnotation: nil}}})
	if err != nil {
		return fmt.Errorf("encode report removal of node %q: %w", name, err)
	}
	if _, err := c.CoreV1().Nodes().Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: "secureoverlay-agent"}); err != nil {
		return fmt.Errorf("remove report annotation of node %q: %w", name, err)
	}
	return nil
}

// patchReport writes only the report annotation of node name (a JSON merge patch), within
// patchTimeout.
func patchReport(ctx context.Context, c kubernetes.Interface, name string, r watch.Report) error {
	ctx, cancel := context.WithTimeout(ctx, patchTimeout)
	defer cancel()
	v, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("encode report of node %q: %w", name, err)
	}
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]string{api.ReportAnnotation: string(v)}}})
	if err != nil {
		return fmt.Errorf("encode report patch of node %q: %w", name, err)
	}
	if _, err := c.CoreV1().Nodes().Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: "secureoverlay-agent"}); err != nil {
		return fmt.Errorf("patch report annotation of node %q: %w", name, err)
	}
	return nil
}
