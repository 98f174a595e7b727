package watch

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
)

// Which Calico API group the agent reads: the one Calico itself uses.
//
// Calico ≤ 3.31 keeps its Kubernetes-datastore objects in crd.projectcalico.org/v1 CRDs
// (the aggregated calico-apiserver serves projectcalico.org/v3 from them). Calico 3.32 can
// run on native projectcalico.org/v3 CRDs, and kube-controllers migrate a cluster from v1:
// a DatastoreMigration object (group migration.projectcalico.org, name v1-to-v3) moves
// through the phases Pending → Migrating (v1 locked, objects copied to v3) → Converged
// (v3 complete and unlocked; v1 stays locked: frozen) → Complete (every calico-node runs
// with CALICO_API_GROUP=projectcalico.org/v3); deleting a Complete migration deletes the
// v1 CRDs. Until then both groups are served and the v1 copy is frozen: new blocks and
// pools exist only in v3. Calico's components choose (libcalico-go UsingV3CRDs, the
// operator's UseV3CRDS):
//
//  1. an explicit CALICO_API_GROUP: "projectcalico.org/v3" means v3; Calico reads any
//     other non-empty value as v1 — we accept only its two values (case-insensitively)
//     and refuse anything else, so a typo cannot silently select the frozen copy;
//  2. a DatastoreMigration in phase Converged or Complete means v3;
//  3. otherwise v3 only if projectcalico.org is served and crd.projectcalico.org is not
//     (both served without a converged migration: v1, which then backs the aggregated v3).
//
// DecideCalico implements exactly that, with one refusal Calico does not make: when both
// groups are served and the DatastoreMigration objects cannot be read, it fails instead of
// assuming v1 (it might be the frozen copy). And one memory Calico's components get from
// their restart with CALICO_API_GROUP=projectcalico.org/v3: once a running agent has seen
// the migration converge it stays on v3 while v3 is served, also after the migration object
// is gone and until the v1 CRDs are (a migration never goes back from Converged).

// EnvCalicoAPIGroup is Calico's own setting (calico-node and kube-controllers take it as
// an environment variable; install-cni passes it to the CNI plugin as calico_api_group).
const EnvCalicoAPIGroup = "CALICO_API_GROUP"

// Calico's group-versions and the migration's group.
var (
	CalicoV1 = schema.GroupVersion{Group: "crd.projectcalico.org", Version: "v1"}
	CalicoV3 = schema.GroupVersion{Group: "projectcalico.org", Version: "v3"}
)

// MigrationGroup is the group of Calico's DatastoreMigration (v1beta1 in Calico 3.32, v1
// and v1beta1 in 3.33).
const MigrationGroup = "migration.projectcalico.org"

// DatastoreMigration phases that mean Calico uses projectcalico.org/v3.
const (
	PhaseConverged = "Converged"
	PhaseComplete  = "Complete"
)

// ParseAPIGroup validates an explicit CALICO_API_GROUP: "" (detect), or one of Calico's
// two values, "crd.projectcalico.org/v1" and "projectcalico.org/v3" (case-insensitive, as
// Calico compares them).
func ParseAPIGroup(s string) (schema.GroupVersion, error) {
	s = strings.TrimSpace(s)
	switch {
	case s == "":
		return schema.GroupVersion{}, nil
	case strings.EqualFold(s, CalicoV3.String()):
		return CalicoV3, nil
	case strings.EqualFold(s, CalicoV1.String()):
		return CalicoV1, nil
	}
	return schema.GroupVersion{}, fmt.Errorf("%s %q: want %q or %q (Calico's values) or empty to follow Calico's own choice",
		EnvCalicoAPIGroup, s, CalicoV1, CalicoV3)
}

// Served is what discovery says about Calico's groups.
type Served struct {
	V1, V3 bool
	// Migration is the served version of the DatastoreMigration kind (zero if none).
	Migration schema.GroupVersion
}

// Migration is one DatastoreMigration's name and status.phase.
type Migration struct {
	Name, Phase string
}

// Decision is the group Calico uses and why.
type Decision struct {
	GV     schema.GroupVersion
	Reason string
	// FrozenV1: crd.projectcalico.org/v1 is served but is a frozen copy (the migration
	// converged): it must not be read.
	FrozenV1 bool
	// Migration summarises the DatastoreMigration objects ("" when there are none), e.g.
	// "v1-to-v3 Migrating".
	Migration string
	// Converged: a DatastoreMigration is (or was) Converged or Complete.
	Converged bool
}

// ErrNoCalico is wrapped when no group serves the Calico kinds the agent needs.
var ErrNoCalico = errors.New("no calico ipamblocks and ippools resources served")

// DecideCalico is Calico's own group choice (see the top of this file). migrations is nil
// when they could not be read (migErr says why); sawConverged says a migration was seen
// Converged or Complete before.
func DecideCalico(explicit schema.GroupVersion, s Served, migrations []Migration, migErr error, sawConverged bool) (Decision, error) {
	var d Decision
	var parts []string
	converged := ""
	for _, m := range migrations {
		parts = append(parts, m.Name+" "+orUnset(m.Phase))
		if m.Phase == PhaseConverged || m.Phase == PhaseComplete {
			converged = m.Name + " " + m.Phase
		}
	}
	d.Migration = strings.Join(parts, ", ")
	served := func(gv schema.GroupVersion) bool { return (gv == CalicoV1 && s.V1) || (gv == CalicoV3 && s.V3) }
	switch {
	case !explicit.Empty():
		d.GV, d.Reason = explicit, EnvCalicoAPIGroup+"="+explicit.String()
		if !served(explicit) {
			return d, fmt.Errorf("%w: %s=%s but %s is not served", ErrNoCalico, EnvCalicoAPIGroup, explicit, explicit.Group)
		}
	case converged != "":
		d.GV, d.Reason = CalicoV3, "DatastoreMigration "+converged+": Calico uses "+CalicoV3.String()
		if !s.V3 {
			return d, fmt.Errorf("%w: DatastoreMigration %s but %s is not served", ErrNoCalico, converged, CalicoV3.Group)
		}
	case s.V3 && !s.V1:
		d.GV, d.Reason = CalicoV3, "only "+CalicoV3.Group+" is served"
	case s.V3 && sawConverged:
		d.GV, d.Reason = CalicoV3, "a DatastoreMigration converged earlier: Calico stays on "+CalicoV3.String()
		converged = "earlier"
	case s.V1 && s.V3 && migErr != nil:
		return d, fmt.Errorf("both %s and %s are served and the DatastoreMigration objects cannot be read (%v): cannot tell which one Calico uses; grant list/watch on datastoremigrations.%s or set %s",
			CalicoV1.Group, CalicoV3.Group, migErr, MigrationGroup, EnvCalicoAPIGroup)
	case s.V1:
		d.GV, d.Reason = CalicoV1, CalicoV1.Group+" is served"
		if s.V3 {
			d.Reason += " (" + CalicoV3.Group + " too, without a converged migration)"
		}
		if d.Migration != "" {
			d.Reason += "; DatastoreMigration " + d.Migration + ": Calico still uses " + CalicoV1.String()
		}
	default:
		return d, fmt.Errorf("%w (is Calico installed with the Kubernetes datastore?): neither %s nor %s is served", ErrNoCalico, CalicoV1.Group, CalicoV3.Group)
	}
	d.FrozenV1 = d.GV == CalicoV3 && s.V1 && converged != ""
	d.Converged = converged != ""
	return d, nil
}

func orUnset(s string) string {
	if s == "" {
		return "(no phase yet)"
	}
	return s
}

// CalicoAPI names where the Calico kinds are read from and why. A zero GVR means the kind
// is not served (BlockAffinity, BGPPeer and FelixConfiguration are optional; IPAMBlock and
// IPPool are required).
type CalicoAPI struct {
	GroupVersion        string
	IPAMBlocks          schema.GroupVersionResource
	BlockAffinities     schema.GroupVersionResource
	IPPools             schema.GroupVersionResource
	BGPPeers            schema.GroupVersionResource
	FelixConfigurations schema.GroupVersionResource
	// Decision is why this group (DecideCalico).
	Decision Decision
	// Migration is the DatastoreMigration resource to watch (zero if not served).
	Migration schema.GroupVersionResource
}

// Served reads which Calico groups the API server serves (one discovery request).
func ServedGroups(d discovery.DiscoveryInterface) (Served, error) {
	groups, err := d.ServerGroups()
	if err != nil {
		return Served{}, fmt.Errorf("discover api groups: %w", err)
	}
	var s Served
	for _, g := range groups.Groups {
		switch g.Name {
		case CalicoV1.Group:
			s.V1 = slices.ContainsFunc(g.Versions, func(v metav1.GroupVersionForDiscovery) bool { return v.Version == CalicoV1.Version })
		case CalicoV3.Group:
			s.V3 = slices.ContainsFunc(g.Versions, func(v metav1.GroupVersionForDiscovery) bool { return v.Version == CalicoV3.Version })
		case MigrationGroup:
			for _, want := range []string{"v1", "v1beta1"} {
				if s.Migration.Empty() && slices.ContainsFunc(g.Versions, func(v metav1.GroupVersionForDiscovery) bool { return v.Version == want }) {
					s.Migration = schema.GroupVersion{Group: MigrationGroup, Version: want}
				}
			}
		}
	}
	return s, nil
}

// ListMigrations reads the DatastoreMigration objects' names and phases.
func ListMigrations(ctx context.Context, dyn dynamic.Interface, gv schema.GroupVersion) ([]Migration, error) {
	list, err := dyn.Resource(gv.WithResource("datastoremigrations")).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("list datastoremigrations.%s: %w", gv.Group, err)
	}
	out := make([]Migration, 0, len(list.Items))
	for _, it := range list.Items {
		status, _ := it.Object["status"].(map[string]any)
		phase, _ := status["phase"].(string)
		out = append(out, Migration{Name: it.GetName(), Phase: phase})
	}
	slices.SortFunc(out, func(a, b Migration) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// SelectCalico decides which group Calico uses (DecideCalico, from discovery and the
// DatastoreMigration objects) and finds its resources. dyn may be nil only when the
// migration group is not served.
func SelectCalico(ctx context.Context, d discovery.DiscoveryInterface, dyn dynamic.Interface, explicit schema.GroupVersion) (CalicoAPI, error) {
	return selectCalico(ctx, d, dyn, explicit, false)
}

func selectCalico(ctx context.Context, d discovery.DiscoveryInterface, dyn dynamic.Interface, explicit schema.GroupVersion, sawConverged bool) (CalicoAPI, error) {
	s, err := ServedGroups(d)
	if err != nil {
		return CalicoAPI{}, err
	}
	var migs []Migration
	var migErr error
	if !s.Migration.Empty() {
		if dyn == nil {
			migErr = errors.New("no dynamic client")
		} else {
			migs, migErr = ListMigrations(ctx, dyn, s.Migration)
		}
		if migErr != nil && apierrors.IsNotFound(migErr) {
			migs, migErr = nil, nil // the CRD went away between discovery and the list
		}
	}
	dec, err := DecideCalico(explicit, s, migs, migErr, sawConverged)
	if err != nil {
		return CalicoAPI{Decision: dec}, err
	}
	list, err := d.ServerResourcesForGroupVersion(dec.GV.String())
	if err != nil {
		return CalicoAPI{Decision: dec}, fmt.Errorf("discover %s: %w", dec.GV, err)
	}
	var names []string
	for _, r := range list.APIResources {
		names = append(names, r.Name)
	}
	if !slices.Contains(names, "ipamblocks") || !slices.Contains(names, "ippools") {
		return CalicoAPI{Decision: dec}, fmt.Errorf("%w: %s (%s) serves no ipamblocks/ippools", ErrNoCalico, dec.GV, dec.Reason)
	}
	api := CalicoAPI{GroupVersion: dec.GV.String(), Decision: dec,
		IPAMBlocks: dec.GV.WithResource("ipamblocks"), IPPools: dec.GV.WithResource("ippools")}
	for _, r := range []struct {
		name string
		dst  *schema.GroupVersionResource
	}{{"blockaffinities", &api.BlockAffinities}, {"bgppeers", &api.BGPPeers}, {"felixconfigurations", &api.FelixConfigurations}} {
		if slices.Contains(names, r.name) {
			*r.dst = dec.GV.WithResource(r.name)
		}
	}
	if !s.Migration.Empty() && migErr == nil {
		api.Migration = s.Migration.WithResource("datastoremigrations")
	}
	return api, nil
}

// DiscoverCalico is SelectCalico without an explicit setting and without reading
// DatastoreMigration objects (nil dynamic client): for callers that only need the
// resources of an unambiguous cluster.
func DiscoverCalico(d discovery.DiscoveryInterface) (CalicoAPI, error) {
	return SelectCalico(context.Background(), d, nil, schema.GroupVersion{})
}
