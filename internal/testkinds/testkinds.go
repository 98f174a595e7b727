// Package testkinds lists the list kinds of secureoverlay's own resources, for the fake
// dynamic clients of unit tests (dynamicfake.NewSimpleDynamicClientWithCustomListKinds
// must be told every resource an informer lists): a new kind is added here once.
package testkinds

import (
	"maps"

	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/secureoverlay/secureoverlay/nodeid"
	"github.com/secureoverlay/secureoverlay/nodekeys"
	"github.com/secureoverlay/secureoverlay/nodereport"
	"github.com/secureoverlay/secureoverlay/noderow"
	"github.com/secureoverlay/secureoverlay/nodeview"
)

// With is the list kinds of our resources and those of extra (Calico's, in most tests).
func With(extra map[schema.GroupVersionResource]string) map[schema.GroupVersionResource]string {
	out := map[schema.GroupVersionResource]string{
		nodereport.GVR: nodereport.ListKind,
		nodekeys.GVR:   nodekeys.ListKind,
		nodeview.GVR:   nodeview.ListKind,
		noderow.GVR:    noderow.ListKind,
		nodeid.GVR:     nodeid.ListKind,
	}
	maps.Copy(out, extra)
	return out
}
