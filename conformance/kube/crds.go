package kube

import (
	"context"
	"embed"
	"fmt"
	"io/fs"
	"path"
	"sort"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"
)

// CalicoGroup is the API group of the Calico CRDs that the KDD datastore uses.
const CalicoGroup = "crd.projectcalico.org"

// Calico resources served by the CRDs in crds/ (all cluster-scoped, version v1).
var (
	IPAMBlocks          = schema.GroupVersionResource{Group: CalicoGroup, Version: "v1", Resource: "ipamblocks"}
	BlockAffinities     = schema.GroupVersionResource{Group: CalicoGroup, Version: "v1", Resource: "blockaffinities"}
	IPPools             = schema.GroupVersionResource{Group: CalicoGroup, Version: "v1", Resource: "ippools"}
	BGPPeers            = schema.GroupVersionResource{Group: CalicoGroup, Version: "v1", Resource: "bgppeers"}
	FelixConfigurations = schema.GroupVersionResource{Group: CalicoGroup, Version: "v1", Resource: "felixconfigurations"}
)

// crdFiles holds our own minimal structural CRDs for the Calico kinds we read.
//
//go:embed crds/*.yaml
var crdFiles embed.FS

var crdGVR = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

// CalicoCRDs returns the CRD manifests (YAML), keyed by file name.
func CalicoCRDs() map[string][]byte {
	out := map[string][]byte{}
	_ = fs.WalkDir(crdFiles, "crds", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := crdFiles.ReadFile(p)
		if err != nil {
			return err
		}
		out[path.Base(p)] = b
		return nil
	})
	return out
}

// InstallCalicoCRDs creates (or updates) the Calico CRDs and waits until every
// one is established and its resource can be listed. Fails t on error.
func InstallCalicoCRDs(t testing.TB, cfg *rest.Config) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := InstallCalicoCRDsContext(ctx, cfg); err != nil {
		t.Fatalf("install Calico CRDs: %v", err)
	}
}

// InstallCalicoCRDsContext is InstallCalicoCRDs for use outside tests.
func InstallCalicoCRDsContext(ctx context.Context, cfg *rest.Config) error {
	dc, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("dynamic client: %w", err)
	}
	files := CalicoCRDs()
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)

	var installed []*unstructured.Unstructured
	for _, n := range names {
		obj := &unstructured.Unstructured{}
		if err := yaml.Unmarshal(files[n], &obj.Object); err != nil {
			return fmt.Errorf("parse CRD file %s: %w", n, err)
		}
		if err := applyCRD(ctx, dc, obj); err != nil {
			return err
		}
		installed = append(installed, obj)
	}
	for _, obj := range installed {
		if err := waitCRD(ctx, dc, obj); err != nil {
			return err
		}
	}
	return nil
}

func applyCRD(ctx context.Context, dc dynamic.Interface, obj *unstructured.Unstructured) error {
	crds := dc.Resource(crdGVR)
	_, err := crds.Create(ctx, obj, metav1.CreateOptions{})
	if err == nil {
		return nil
	}
	if !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create CRD %s: %w", obj.GetName(), err)
	}
	cur, err := crds.Get(ctx, obj.GetName(), metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("get CRD %s: %w", obj.GetName(), err)
	}
	obj.SetResourceVersion(cur.GetResourceVersion())
	if _, err := crds.Update(ctx, obj, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("update CRD %s: %w", obj.GetName(), err)
	}
	return nil
}

// waitCRD waits until the CRD reports Established and its resource lists.
func waitCRD(ctx context.Context, dc dynamic.Interface, obj *unstructured.Unstructured) error {
	group, _, _ := unstructured.NestedString(obj.Object, "spec", "group")
	plural, _, _ := unstructured.NestedString(obj.Object, "spec", "names", "plural")
	versions, _, _ := unstructured.NestedSlice(obj.Object, "spec", "versions")
	if group == "" || plural == "" || len(versions) == 0 {
		return fmt.Errorf("CRD %s: spec.group, spec.names.plural and spec.versions are required", obj.GetName())
	}
	version, _ := versions[0].(map[string]any)["name"].(string)
	gvr := schema.GroupVersionResource{Group: group, Version: version, Resource: plural}

	var last error
	for {
		cur, err := dc.Resource(crdGVR).Get(ctx, obj.GetName(), metav1.GetOptions{})
		if err == nil && established(cur) {
			_, err = dc.Resource(gvr).List(ctx, metav1.ListOptions{Limit: 1})
			if err == nil {
				return nil
			}
		}
		if err != nil {
			last = err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for CRD %s to be established: %w (last error: %v)", obj.GetName(), ctx.Err(), last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func established(crd *unstructured.Unstructured) bool {
	conds, _, _ := unstructured.NestedSlice(crd.Object, "status", "conditions")
	for _, c := range conds {
		m, ok := c.(map[string]any)
		if ok && m["type"] == "Established" && m["status"] == "True" {
			return true
		}
	}
	return false
}
