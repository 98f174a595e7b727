package e2e

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	authorizationv1 "k8s.io/api/authorization/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/conformance/lab"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/nodereport"
)

// Scenario 0 (first in file order: it starts the shared lab from the previous release):
// a running, enforcing cluster of release 0.1 — reports in the Node annotation, every
// generation's root in the Secret, agents reading the Secret — is upgraded to this tree
// as `kubectl apply` of the new manifest does it, under continuous traffic in both
// directions of every pair (docs/protocol-v2.md §8):
//
//  1. one agent first (the DaemonSet's rolling update may start before the master's
//     Deployment): a new agent beside 0.1 masters and 0.1 peers;
//  2. both master replicas, one after the other: a new master with 0.1 agents, which
//     must keep the agents' Secret access granted and the ring v1;
//  3. the other agents, one at a time (maxUnavailable 1);
//  4. every report drops its per-pair lists, since every agent now decides from views
//     and rows (docs/protocol-v2.md §9 step 4; while a 0.1 agent was live they stayed);
//  5. a rotation, which makes the next generation protocol v2 since every agent now
//     publishes its keys; the v1 generation is retired — on views and rows alone.
//
// Zero echo requests lost from start to end, no plaintext IPIP on the underlay,
// make-before-break for the v1 → v2 switch of every pair, and at the end: no Node carries
// our annotation, the public ring withholds nothing, and the agents can no longer read
// the Secret (a SubjectAccessReview as their ServiceAccount is denied).
//
// It once failed one run in six (`make test` run 60 of session 16): when node3's 0.1
// agent was replaced, node1 saw node3 for a moment without a report (the annotation's
// removal arrived before the new NodeReport, through another watch), removed its SAs
// toward node3 and had to start a new SA epoch: 547 of 3,471 requests lost, 58 plaintext
// IPIP packets. Readers now keep a removed annotation's report until a NodeReport at
// least as recent arrives (watch.TestAnnotationReportKeptUntilNodeReport).
func TestScenario0UpgradeFrom01(t *testing.T) {
	release, why := ReleaseBinDir()
	if why != "" {
		if lab.RequireAll() {
			t.Fatalf("SECUREOVERLAY_REQUIRE_ALL=1 but %s", why)
		}
		t.Skip(why)
	}
	l := sharedLabFrom(t, release)
	defer diagnose(t, l)
	ctx := ctxFor(t, 25*time.Minute+l.Config().Grace)

	ensureMode(ctx, t, l, api.ModeEnforce)
	nodes := l.RegisteredNodes()
	released := func() []string {
		var out []string
		for m := 1; m <= l.Config().Masters; m++ {
			out = append(out, fmt.Sprintf("master-%d", m))
		}
		for _, i := range nodes {
			out = append(out, lab.NodeNS(i))
		}
		return slices.DeleteFunc(out, func(w string) bool { return !l.Released(w) })
	}
	if r := released(); len(r) != l.Config().Masters+len(nodes) {
		t.Fatalf("only %v run release %s's binaries", r, PreviousRelease)
	}
	// What 0.1 leaves: a v1 ring (roots in the Secret), reports only as annotations, no
	// public ring.
	st, err := l.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	prev := st.ActiveGeneration
	r, err := l.Ring(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range r.Generations {
		if g.V2() || len(g.Root) == 0 {
			t.Fatalf("release %s wrote a ring that is not v1: %s", PreviousRelease, keys.Summary(r))
		}
	}
	for _, i := range nodes {
		if ann, rep := reportPlaces(ctx, t, l, i); !ann || rep {
			t.Fatalf("release %s's node%d: annotation %v, NodeReport %v; want only the annotation", PreviousRelease, i, ann, rep)
		}
	}
	if _, err := l.Client.CoreV1().ConfigMaps(api.Namespace).Get(ctx, api.RingConfigMapName, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Fatalf("release %s: ConfigMap %s: %v, want not found", PreviousRelease, api.RingConfigMapName, err)
	}
	t.Logf("release %s enforcing: %s", PreviousRelease, keys.Summary(r))

	pods := standardPods(l)
	ev := startEvidence(ctx, t, l, pods, "streams starting")
	streams, err := l.StartStreamsAll(ctx, pods, streamInterval)
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	time.Sleep(2 * time.Second)

	// 1. The first agent, beside 0.1 masters and 0.1 peers: it reports in its NodeReport
	// and, since its peers read only annotations, in the annotation too.
	upgradeAgent(ctx, t, l, ev, nodes[0])
	if ann, rep := reportPlaces(ctx, t, l, nodes[0]); !ann || !rep {
		t.Errorf("node%d upgraded among %s peers: annotation %v, NodeReport %v; want both", nodes[0], PreviousRelease, ann, rep)
	}
	// Its peers read the per-pair lists only: it keeps writing them.
	if v, err := l.AgentMetric(ctx, nodes[0], "secureoverlay_agent_report_lists"); err != nil || v != 1 {
		t.Errorf("node%d upgraded among %s peers: report_lists %v (%v), want 1", nodes[0], PreviousRelease, v, err)
	}

	// 2. The masters, one replica after the other.
	for m := 1; m <= l.Config().Masters; m++ {
		mark(ctx, t, ev, fmt.Sprintf("master-%d upgrading", m))
		if err := l.KillMaster(m); err != nil {
			t.Fatal(err)
		}
		if err := l.StartMaster(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	// The new master leads once the status carries what only it writes; with agents of
	// 0.1 it keeps their Secret access and makes no v2 generation.
	waitFor(ctx, t, l, "the upgraded master's status", 3*time.Minute, func() (bool, string, error) {
		st, err := l.Status(ctx)
		if err != nil {
			return false, "", err
		}
		return st.AgentSecretAccess == "granted", fmt.Sprintf("leader %q agentSecretAccess %q (%s)", st.Leader, st.AgentSecretAccess, st.AgentSecretAccessWhy), nil
	})
	mark(ctx, t, ev, "masters upgraded")
	if pub := publicRing(ctx, t, l); !pub.Sealed() {
		t.Errorf("public ring beside %s agents withholds no root: %s", PreviousRelease, keys.Summary(pub))
	}

	// 3. The other agents, one at a time.
	for _, i := range nodes[1:] {
		upgradeAgent(ctx, t, l, ev, i)
	}
	// No 0.1 agent is left: every agent removes its annotation from its own Node.
	waitFor(ctx, t, l, "no report annotation left", 3*time.Minute, func() (bool, string, error) {
		for _, i := range nodes {
			if ann, rep := reportPlaces(ctx, t, l, i); ann || !rep {
				return false, fmt.Sprintf("node%d: annotation %v, NodeReport %v", i, ann, rep), nil
			}
		}
		return true, "", nil
	})
	mark(ctx, t, ev, "every agent upgraded")
	if r := released(); len(r) != 0 {
		t.Fatalf("%v still run release %s's binaries", r, PreviousRelease)
	}
	// Every live agent declares readiness-decide: the lists go from every report
	// (docs/protocol-v2.md §9 step 4), under the same traffic, and the rotation below
	// runs on views and rows alone.
	waitFor(ctx, t, l, "every report without lists", 2*time.Minute, func() (bool, string, error) {
		for _, i := range nodes {
			v, err := l.AgentMetric(ctx, i, "secureoverlay_agent_report_lists")
			if err != nil {
				return false, "", err
			}
			u, err := l.Dynamic.Resource(nodereport.GVR).Namespace(api.Namespace).Get(ctx, NodeName(i), metav1.GetOptions{})
			if err != nil {
				return false, "", err
			}
			if raw := nodereport.Raw(u); v != 0 || !strings.Contains(raw, `"listsOmitted":true`) || strings.Contains(raw, "encryptingTo") {
				return false, fmt.Sprintf("node%d: report_lists %v, report %d bytes", i, v, len(raw)), nil
			}
		}
		return true, "", nil
	})
	mark(ctx, t, ev, "lists omitted everywhere")

	// 5. A rotation: every agent publishes its keys, so the next generation is v2.
	gen, took, removed := rotate(ctx, t, l, ev, prev, 4*time.Minute, 3*time.Minute)
	if r, err := l.Ring(ctx); err != nil {
		t.Fatal(err)
	} else if g := r.Generation(gen); g == nil || !g.V2() || len(g.Root) != 0 {
		t.Errorf("generation %d after the upgrade is not protocol v2: %s", gen, keys.Summary(r))
	}
	waitFor(ctx, t, l, "the agents' Secret access revoked", 2*time.Minute, func() (bool, string, error) {
		st, err := l.Status(ctx)
		if err != nil {
			return false, "", err
		}
		return st.AgentSecretAccess == "revoked", fmt.Sprintf("agentSecretAccess %q (%s)", st.AgentSecretAccess, st.AgentSecretAccessWhy), nil
	})
	if pub := publicRing(ctx, t, l); pub.Sealed() {
		t.Errorf("public ring still withholds a root: %s", keys.Summary(pub))
	}
	if agentCanReadSecret(ctx, t, l) {
		t.Errorf("the agents' ServiceAccount may still get secrets/%s after the upgrade", api.SecretName)
	}
	time.Sleep(time.Second)
	mark(ctx, t, ev, "stopping streams")
	stats, sent, lost, err := StopStreams(ctx, streams)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("scenario 0: %s → this tree in %s; rotation %d (v1) → %d (v2) active everywhere %s after the request, %d gone %s later",
		PreviousRelease, time.Since(t0).Round(100*time.Millisecond), prev, gen, took.Round(100*time.Millisecond), prev, removed.Round(100*time.Millisecond))
	rep := lossOK(ctx, t, ev, "upgrade", stats, sent, lost)
	if w := lab.Total(rep.Wire); w.IPIP != 0 || w.ESP == 0 {
		t.Errorf("upgrade: %d plaintext IPIP and %d ESP packets on the underlay, want none and some", w.IPIP, w.ESP)
	}
	makeBeforeBreakOK(t, l, rep, prev, gen)
}

// upgradeAgent replaces node i's agent by this tree's and waits until it reports, in its
// NodeReport (which 0.1 never writes), the mode the cluster is in, and the cluster is
// settled again.
func upgradeAgent(ctx context.Context, t *testing.T, l *Lab, ev *LossEvidence, i int) {
	t.Helper()
	mark(ctx, t, ev, fmt.Sprintf("node%d's agent upgrading", i))
	t0 := time.Now()
	if err := l.UpgradeAgent(ctx, i); err != nil {
		t.Fatal(err)
	}
	waitFor(ctx, t, l, fmt.Sprintf("node%d's upgraded agent", i), 3*time.Minute, func() (bool, string, error) {
		if _, rep := reportPlaces(ctx, t, l, i); !rep {
			return false, fmt.Sprintf("node%d has no NodeReport yet", i), nil
		}
		return l.Settled(ctx, api.ModeEnforce)
	})
	mark(ctx, t, ev, fmt.Sprintf("node%d's agent upgraded", i))
	t.Logf("node%d's agent upgraded and settled in %s", i, time.Since(t0).Round(100*time.Millisecond))
}

// reportPlaces says where node i's report is: the Node annotation, its NodeReport.
func reportPlaces(ctx context.Context, t *testing.T, l *Lab, i int) (annotation, nodeReport bool) {
	t.Helper()
	n, err := l.Client.CoreV1().Nodes().Get(ctx, NodeName(i), metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	_, annotation = n.Annotations[api.ReportAnnotation]
	_, err = l.Dynamic.Resource(nodereport.GVR).Namespace(api.Namespace).Get(ctx, NodeName(i), metav1.GetOptions{})
	switch {
	case err == nil:
		nodeReport = true
	case !apierrors.IsNotFound(err):
		t.Fatal(err)
	}
	return annotation, nodeReport
}

// publicRing is the ring the master publishes to agents (docs/keys.md §11).
func publicRing(ctx context.Context, t *testing.T, l *Lab) *keys.Ring {
	t.Helper()
	cm, err := l.Client.CoreV1().ConfigMaps(api.Namespace).Get(ctx, api.RingConfigMapName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	r, err := keys.Parse([]byte(cm.Data[api.RingDataKey]))
	if err != nil {
		t.Fatalf("public ring: %v", err)
	}
	return r
}

// agentCanReadSecret asks the API server whether the agents' ServiceAccount may get the
// key Secret (kubectl auth can-i, as a SubjectAccessReview).
func agentCanReadSecret(ctx context.Context, t *testing.T, l *Lab) bool {
	t.Helper()
	sar, err := l.Client.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
		User:   "system:serviceaccount:" + api.Namespace + ":" + api.AgentServiceAccount,
		Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + api.Namespace, "system:authenticated"},
		ResourceAttributes: &authorizationv1.ResourceAttributes{
			Namespace: api.Namespace, Verb: "get", Resource: "secrets", Name: api.SecretName,
		},
	}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return sar.Status.Allowed
}

// waitFor polls f until it is done or timeout, failing t with f's last reason.
func waitFor(ctx context.Context, t *testing.T, l *Lab, what string, timeout time.Duration, f func() (bool, string, error)) {
	t.Helper()
	if why, err := l.poll(ctx, timeout, f); err != nil {
		t.Fatalf("%s: not in %s: %s", what, timeout, strings.TrimSpace(why))
	}
}
