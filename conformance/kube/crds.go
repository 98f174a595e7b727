package kube

import (
	"bufio"
	"bytes"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"

	"github.com/secureoverlay/secureoverlay/manifests"
)

// Calico's real CRDs. Tests meet Calico through its own CustomResourceDefinitions (Calico
// v3.32.1's, from the project's shared/calico directory, see its README), never through
// look-alikes: the real ones prune unknown fields and are strict (IPAMBlock requires
// allocations, attributes, strictAffinity and unallocated; BlockAffinity spec.deleted is
// a string in v1 and a boolean in v3).
//
// Where they are read from: $SECUREOVERLAY_CALICO_DIR, else <repo>/../shared/calico
// (the repository root is found from the working directory, so the default works from
// any package's tests). The directory must hold crds/v1-crd.projectcalico.org.yaml and
// crds/v3-projectcalico.org.yaml. When it does not, RequireCalico skips the test with the
// reason (what is missing, where it looked), or fails it under SECUREOVERLAY_REQUIRE_ALL=1.

// EnvCalicoDir names a directory of Calico release files (crds/ within) to use instead of
// <repo>/../shared/calico.
const EnvCalicoDir = "SECUREOVERLAY_CALICO_DIR"

// Calico's API groups.
const (
	// CalicoGroup is the group of the CRDs Calico's Kubernetes datastore has always used
	// (crd.projectcalico.org, version v1).
	CalicoGroup = "crd.projectcalico.org"
	// CalicoGroupV3 is the group of the native projectcalico.org/v3 CRDs Calico 3.32+ can
	// run on (and that the aggregated calico-apiserver serves otherwise).
	CalicoGroupV3 = "projectcalico.org"
	// MigrationGroup is the group of Calico's DatastoreMigration (kube-controllers' v1→v3
	// migration).
	MigrationGroup = "migration.projectcalico.org"
)

// The Calico group-versions.
var (
	CalicoV1GV = schema.GroupVersion{Group: CalicoGroup, Version: "v1"}
	CalicoV3GV = schema.GroupVersion{Group: CalicoGroupV3, Version: "v3"}
)

// Calico resources of crd.projectcalico.org/v1 (all cluster-scoped).
var (
	IPAMBlocks          = CalicoV1GV.WithResource("ipamblocks")
	BlockAffinities     = CalicoV1GV.WithResource("blockaffinities")
	IPPools             = CalicoV1GV.WithResource("ippools")
	BGPPeers            = CalicoV1GV.WithResource("bgppeers")
	FelixConfigurations = CalicoV1GV.WithResource("felixconfigurations")
)

// CalicoAPI says which of Calico's CRD groups to install.
type CalicoAPI int

const (
	// CalicoV1 installs the crd.projectcalico.org/v1 CRDs (Calico ≤ 3.31, and 3.32 before
	// a migration).
	CalicoV1 CalicoAPI = 1 << iota
	// CalicoV3 installs the native projectcalico.org/v3 CRDs (Calico 3.32+ on v3).
	CalicoV3
	// CalicoBoth installs both: the state of a cluster during and after a v1→v3
	// migration, until the v1 CRDs are removed.
	CalicoBoth = CalicoV1 | CalicoV3
)

func (a CalicoAPI) String() string {
	switch a {
	case CalicoV1:
		return CalicoV1GV.String()
	case CalicoV3:
		return CalicoV3GV.String()
	case CalicoBoth:
		return CalicoV1GV.String() + "+" + CalicoV3GV.String()
	}
	return fmt.Sprintf("CalicoAPI(%d)", int(a))
}

// groups lists the API groups a selects.
func (a CalicoAPI) groups() []string {
	var out []string
	if a&CalicoV1 != 0 {
		out = append(out, CalicoGroup)
	}
	if a&CalicoV3 != 0 {
		out = append(out, CalicoGroupV3)
	}
	return out
}

// The files of a Calico release directory that the harness uses.
const (
	crdFileV1        = "crds/v1-crd.projectcalico.org.yaml"
	crdFileV3        = "crds/v3-projectcalico.org.yaml"
	crdFileMigration = "crds/migration.projectcalico.org_datastoremigrations.yaml"
)

// migrationCRD is Calico's DatastoreMigration CRD (see the file's header for provenance),
// used when the Calico directory does not carry one.
//
//go:embed calico/migration.projectcalico.org_datastoremigrations.yaml
var migrationCRD []byte

// CalicoDir returns the directory of Calico's release files, or an error that names
// what is missing and where it looked.
func CalicoDir() (string, error) {
	var dir, how string
	if d := os.Getenv(EnvCalicoDir); d != "" {
		dir, how = d, "$"+EnvCalicoDir
	} else {
		root, err := repoRoot()
		if err != nil {
			return "", fmt.Errorf("calico release files: %w (set %s to a directory holding %s and %s)", err, EnvCalicoDir, crdFileV1, crdFileV3)
		}
		dir, how = filepath.Clean(filepath.Join(root, "..", "shared", "calico")), "<repo>/../shared/calico"
	}
	var missing []string
	for _, f := range []string{crdFileV1, crdFileV3} {
		if st, err := os.Stat(filepath.Join(dir, f)); err != nil || !st.Mode().IsRegular() {
			missing = append(missing, f)
		}
	}
	if len(missing) > 0 {
		return "", fmt.Errorf("calico's real CRDs not found: %s missing in %s (%s); put Calico v3.32.1's manifests/crds.yaml and manifests/calico-v3-crds.yaml there (see shared/calico/README.md) or set %s",
			strings.Join(missing, " and "), dir, how, EnvCalicoDir)
	}
	return dir, nil
}

// RequireCalico returns the Calico directory, or skips t saying what is missing and where
// the harness looked (fails t when SECUREOVERLAY_REQUIRE_ALL=1). Tests never fall back to
// CRDs of their own.
func RequireCalico(t testing.TB) string {
	t.Helper()
	dir, err := CalicoDir()
	if err != nil {
		if os.Getenv(EnvRequireAll) == "1" {
			t.Fatalf("kube harness: %v (%s=1, so this fails instead of skipping)", err, EnvRequireAll)
		}
		t.Skipf("kube harness: %v", err)
	}
	return dir
}

var crdCache struct {
	mu    sync.Mutex
	files map[string][]*unstructured.Unstructured // by path
}

// CalicoCRDs returns the CustomResourceDefinitions of the groups a selects from Calico's
// release files in dir, sorted by name. Other objects in the files (the v3 manifest also
// carries Calico's DaemonSet, RBAC and admission policies) and CRDs of other groups are
// left out.
func CalicoCRDs(dir string, a CalicoAPI) ([]*unstructured.Unstructured, error) {
	var out []*unstructured.Unstructured
	for _, f := range []string{crdFileV1, crdFileV3} {
		docs, err := readCRDFile(filepath.Join(dir, f))
		if err != nil {
			return nil, err
		}
		for _, d := range docs {
			group, _, _ := unstructured.NestedString(d.Object, "spec", "group")
			if slices.Contains(a.groups(), group) {
				out = append(out, d.DeepCopy())
			}
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no CRDs of %s in %s", a, dir)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].GetName() < out[j].GetName() })
	return slices.CompactFunc(out, func(x, y *unstructured.Unstructured) bool { return x.GetName() == y.GetName() }), nil
}

// MigrationCRD returns Calico's DatastoreMigration CRD: dir's copy if it has one, else the
// one kept in this package (the source says which).
func MigrationCRD(dir string) (crd *unstructured.Unstructured, source string, err error) {
	p := filepath.Join(dir, crdFileMigration)
	if _, err := os.Stat(p); err == nil {
		docs, err := readCRDFile(p)
		if err != nil {
			return nil, "", err
		}
		if len(docs) != 1 {
			return nil, "", fmt.Errorf("%s: %d CRDs, want 1", p, len(docs))
		}
		return docs[0].DeepCopy(), p, nil
	}
	docs, err := parseCRDs(migrationCRD, "embedded "+crdFileMigration)
	if err != nil {
		return nil, "", err
	}
	return docs[0], "conformance/kube/calico/" + filepath.Base(crdFileMigration) + " (Calico source, commit ff7a50e8)", nil
}

func readCRDFile(path string) ([]*unstructured.Unstructured, error) {
	crdCache.mu.Lock()
	defer crdCache.mu.Unlock()
	if docs, ok := crdCache.files[path]; ok {
		return docs, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read calico CRDs: %w", err)
	}
	docs, err := parseCRDs(b, path)
	if err != nil {
		return nil, err
	}
	if crdCache.files == nil {
		crdCache.files = map[string][]*unstructured.Unstructured{}
	}
	crdCache.files[path] = docs
	return docs, nil
}

// OurCRDs returns the CustomResourceDefinitions of manifests/secureoverlay.yaml (the
// NodeReport CRD).
func OurCRDs() ([]*unstructured.Unstructured, error) {
	return parseCRDs(manifests.Bundle, "manifests/secureoverlay.yaml")
}

// parseCRDs returns the CustomResourceDefinitions of a multi-document YAML stream.
func parseCRDs(b []byte, name string) ([]*unstructured.Unstructured, error) {
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(b)))
	var out []*unstructured.Unstructured
	for i := 0; ; i++ {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%s: document %d: %w", name, i, err)
		}
		obj := map[string]any{}
		if err := yaml.Unmarshal(doc, &obj); err != nil {
			return nil, fmt.Errorf("%s: document %d: %w", name, i, err)
		}
		if obj["kind"] != "CustomResourceDefinition" {
			continue
		}
		out = append(out, &unstructured.Unstructured{Object: obj})
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: no CustomResourceDefinition", name)
	}
	return out, nil
}

var crdGVR = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

// InstallCalicoCRDs installs Calico's real CRDs of the groups asked (default CalicoV1)
// and waits until every one is established and its resource lists. It skips t when the
// Calico files are missing (fails it under SECUREOVERLAY_REQUIRE_ALL=1) and fails t on
// any other error.
func InstallCalicoCRDs(t testing.TB, cfg *rest.Config, which ...CalicoAPI) {
	t.Helper()
	dir := RequireCalico(t)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	if err := installCalicoCRDs(ctx, cfg, dir, which); err != nil {
		t.Fatalf("install Calico CRDs: %v", err)
	}
}

// InstallCalicoCRDsContext is InstallCalicoCRDs for use outside tests (it returns
// CalicoDir's error when the files are missing).
func InstallCalicoCRDsContext(ctx context.Context, cfg *rest.Config, which ...CalicoAPI) error {
	dir, err := CalicoDir()
	if err != nil {
		return err
	}
	return installCalicoCRDs(ctx, cfg, dir, which)
}

func installCalicoCRDs(ctx context.Context, cfg *rest.Config, dir string, which []CalicoAPI) error {
	a := CalicoAPI(0)
	for _, w := range which {
		a |= w
	}
	if a == 0 {
		a = CalicoV1
	}
	crds, err := CalicoCRDs(dir, a)
	if err != nil {
		return err
	}
	return InstallCRDs(ctx, cfg, crds...)
}

// InstallMigrationCRD installs Calico's DatastoreMigration CRD (MigrationCRD) and
// returns where it came from. Fails t on error.
func InstallMigrationCRD(t testing.TB, cfg *rest.Config) string {
	t.Helper()
	dir := RequireCalico(t)
	crd, source, err := MigrationCRD(dir)
	if err != nil {
		t.Fatalf("DatastoreMigration CRD: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := InstallCRDs(ctx, cfg, crd); err != nil {
		t.Fatalf("install DatastoreMigration CRD: %v", err)
	}
	return source
}

// InstallCRDs creates (or updates) the CRDs and waits until each is established and its
// resource lists.
func InstallCRDs(ctx context.Context, cfg *rest.Config, crds ...*unstructured.Unstructured) error {
	dc, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("dynamic client: %w", err)
	}
	for _, obj := range crds {
		if err := applyCRD(ctx, dc, obj.DeepCopy()); err != nil {
			return err
		}
	}
	for _, obj := range crds {
		if err := waitCRD(ctx, dc, obj); err != nil {
			return err
		}
	}
	return nil
}

// RemoveCalicoCRDs deletes every CRD of the groups a selects (as Calico's migration
// controller deletes the v1 CRDs once a finished migration's object is deleted) and waits
// until they are gone. Fails t on error.
func RemoveCalicoCRDs(t testing.TB, cfg *rest.Config, a CalicoAPI) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	dc := dynamic.NewForConfigOrDie(cfg)
	list, err := dc.Resource(crdGVR).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatalf("list CRDs: %v", err)
	}
	var names []string
	for _, crd := range list.Items {
		group, _, _ := unstructured.NestedString(crd.Object, "spec", "group")
		if slices.Contains(a.groups(), group) {
			names = append(names, crd.GetName())
			if err := dc.Resource(crdGVR).Delete(ctx, crd.GetName(), metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
				t.Fatalf("delete CRD %s: %v", crd.GetName(), err)
			}
		}
	}
	for _, n := range names {
		for {
			_, err := dc.Resource(crdGVR).Get(ctx, n, metav1.GetOptions{})
			if apierrors.IsNotFound(err) {
				break
			}
			if ctx.Err() != nil {
				t.Fatalf("CRD %s not gone: %v", n, ctx.Err())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
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
