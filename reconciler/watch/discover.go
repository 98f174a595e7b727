package watch

import (
	"errors"
	"fmt"
	"slices"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/discovery"
)

// CalicoAPI names where the Calico kinds are served. A zero GVR means the kind is not
// served (BlockAffinity and BGPPeer are optional; IPAMBlock and IPPool are required).
type CalicoAPI struct {
	GroupVersion    string
	IPAMBlocks      schema.GroupVersionResource
	BlockAffinities schema.GroupVersionResource
	IPPools         schema.GroupVersionResource
	BGPPeers        schema.GroupVersionResource
}

// CalicoGroupVersions are tried in this order: the KDD CRDs every Calico release
// installs, then the projectcalico.org/v3 CRDs newer releases may serve instead.
var CalicoGroupVersions = []schema.GroupVersion{
	{Group: "crd.projectcalico.org", Version: "v1"},
	{Group: "projectcalico.org", Version: "v3"},
}

// ErrNoCalico is wrapped when no group serves the Calico kinds the agent needs.
var ErrNoCalico = errors.New("no calico ipamblocks and ippools resources served")

// DiscoverCalico finds the first of CalicoGroupVersions that serves both ipamblocks and
// ippools (the aggregated calico-apiserver's projectcalico.org/v3 does not serve
// ipamblocks, so a cluster with both prefers the CRDs the datastore actually uses).
func DiscoverCalico(d discovery.DiscoveryInterface) (CalicoAPI, error) {
	var tried []string
	for _, gv := range CalicoGroupVersions {
		list, err := d.ServerResourcesForGroupVersion(gv.String())
		if err != nil {
			if apierrors.IsNotFound(err) {
				tried = append(tried, gv.String()+": not served")
				continue
			}
			return CalicoAPI{}, fmt.Errorf("discover %s: %w", gv, err)
		}
		var names []string
		for _, r := range list.APIResources {
			names = append(names, r.Name)
		}
		if !slices.Contains(names, "ipamblocks") || !slices.Contains(names, "ippools") {
			tried = append(tried, gv.String()+": no ipamblocks/ippools")
			continue
		}
		api := CalicoAPI{GroupVersion: gv.String(),
			IPAMBlocks: gv.WithResource("ipamblocks"), IPPools: gv.WithResource("ippools")}
		if slices.Contains(names, "blockaffinities") {
			api.BlockAffinities = gv.WithResource("blockaffinities")
		}
		if slices.Contains(names, "bgppeers") {
			api.BGPPeers = gv.WithResource("bgppeers")
		}
		return api, nil
	}
	return CalicoAPI{}, fmt.Errorf("%w (is Calico installed with the Kubernetes datastore?): %v", ErrNoCalico, tried)
}
