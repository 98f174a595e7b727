package manifests

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	rbacv1 "k8s.io/api/rbac/v1"
)

// overlays are the kustomizations operators apply with -k, relative to manifests/.
var overlays = []string{".", "overlays/gke", "overlays/openshift", "overlays/example", "overlays/single-node"}

// TestKustomizeBaseIsTheManifest: kustomize cannot load ../secureoverlay.yaml (nor a
// symlink to it), so the base holds a copy that must stay identical.
func TestKustomizeBaseIsTheManifest(t *testing.T) {
	root := repoRoot(t)
	a, err := os.ReadFile(filepath.Join(root, "manifests", "secureoverlay.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(root, "manifests", "base", "secureoverlay.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a, b) {
		t.Fatalf("manifests/base/secureoverlay.yaml differs from manifests/secureoverlay.yaml: run\n  cp manifests/secureoverlay.yaml manifests/base/secureoverlay.yaml")
	}
}

func kustomize(t *testing.T, kc, dir string) []object {
	t.Helper()
	out := mustKubectl(t, kc, "/dev/null", "kustomize", dir)
	return decodeObjects(t, []byte(out))
}

func ids(objs []object) []string {
	var s []string
	for _, o := range objs {
		s = append(s, o.String())
	}
	return s
}

func hostPaths(t *testing.T, objs []object) map[string]string {
	ds := daemonSet(t, objs)
	m := map[string]string{}
	for _, v := range ds.Spec.Template.Spec.Volumes {
		m[v.Name] = v.HostPath.Path
	}
	return m
}

// TestKustomizeOverlays builds every overlay with kubectl's kustomize, checks that
// the file's order survives (kubectl deletes in it), that each overlay changes what
// it says and nothing that breaks the invariants.
func TestKustomizeOverlays(t *testing.T) {
	kc := kubectlPath(t)
	file := loadManifest(t)
	mdir := filepath.Join(repoRoot(t), "manifests")
	for _, o := range overlays {
		t.Run(o, func(t *testing.T) {
			objs := kustomize(t, kc, filepath.Join(mdir, o))
			got := ids(objs)
			if len(got) < len(file) || !slices.Equal(got[:len(file)], ids(file)) {
				t.Fatalf("order changed:\n got %v\nwant %v", got, ids(file))
			}
			checkInvariants(t, objs)
			hp := hostPaths(t, objs)
			cm := configMap(t, objs)
			switch o {
			case ".":
				if len(objs) != len(file) {
					t.Errorf("base adds objects: %v", got[len(file):])
				}
				if hp["cni-bin"] != "/opt/cni/bin" || hp["cni-net"] != "/etc/cni/net.d" {
					t.Errorf("base CNI dirs %v", hp)
				}
			case "overlays/gke":
				if hp["cni-bin"] != "/home/kubernetes/bin" || hp["cni-net"] != "/etc/cni/net.d" {
					t.Errorf("gke CNI dirs %v", hp)
				}
			case "overlays/openshift":
				if hp["cni-bin"] != "/var/lib/cni/bin" || hp["cni-net"] != "/var/run/multus/cni/net.d" {
					t.Errorf("openshift CNI dirs %v", hp)
				}
				dep := deployment(t, objs)
				if sc := dep.Spec.Template.Spec.SecurityContext; sc.RunAsUser != nil || sc.RunAsGroup != nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot {
					t.Errorf("openshift master pod securityContext %+v: want runAsNonRoot without a fixed UID", sc)
				}
				if sc := dep.Spec.Template.Spec.Containers[0].SecurityContext; sc.RunAsUser != nil || sc.RunAsGroup != nil {
					t.Errorf("openshift master container keeps a fixed UID")
				}
				crb := toTyped[rbacv1.ClusterRoleBinding](t, mustFind(t, objs, "ClusterRoleBinding", "secureoverlay-agent-scc"))
				if crb.Subjects[0].Name != "secureoverlay-agent" {
					t.Errorf("SCC binding subjects %v", crb.Subjects)
				}
				// The master is on the host network: restricted-v2 does not allow it.
				mcr := toTyped[rbacv1.ClusterRole](t, mustFind(t, objs, "ClusterRole", "secureoverlay-master-scc"))
				mcrb := toTyped[rbacv1.ClusterRoleBinding](t, mustFind(t, objs, "ClusterRoleBinding", "secureoverlay-master-scc"))
				if len(mcr.Rules) != 1 || !slices.Equal(mcr.Rules[0].ResourceNames, []string{"hostnetwork-v2"}) ||
					mcrb.Subjects[0].Name != "secureoverlay-master" || mcrb.RoleRef.Name != mcr.Name {
					t.Errorf("master SCC: %+v bound by %+v, want use of hostnetwork-v2 by secureoverlay-master", mcr.Rules, mcrb)
				}
			case "overlays/example":
				ds := daemonSet(t, objs)
				if img := ds.Spec.Template.Spec.Containers[0].Image; img != "registry.example.com/secureoverlay:0.1.0" {
					t.Errorf("example image %s", img)
				}
				if cm.Data["icv-bytes"] != "16" || cm.Data["rotate-interval"] != "6h" || cm.Data["plugin-mode"] != "enforce" || cm.Data["mode"] != "accept" {
					t.Errorf("example settings %v", cm.Data)
				}
			case "overlays/single-node":
				if dep := deployment(t, objs); *dep.Spec.Replicas != 1 || len(objs) != len(file) {
					t.Errorf("single-node: master replicas %d, %d objects (base %d)", *dep.Spec.Replicas, len(objs), len(file))
				}
			}
		})
	}
}

// TestKustomizeNamespace: a namespace overlay moves every namespaced object and the
// ServiceAccount subjects, and the binaries follow through $(POD_NAMESPACE).
func TestKustomizeNamespace(t *testing.T) {
	kc := kubectlPath(t)
	dir := t.TempDir()
	base := filepath.Join(repoRoot(t), "manifests", "base")
	rel, err := filepath.Rel(dir, base)
	if err != nil {
		t.Fatal(err)
	}
	k := fmt.Sprintf("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: network-encryption\nsortOptions: {order: fifo}\nresources:\n- %s\n", rel)
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(k), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := kubectl(t, kc, "/dev/null", "kustomize", "--load-restrictor=LoadRestrictionsNone", dir)
	if err != nil {
		t.Fatalf("kustomize: %v\n%s", err, out)
	}
	objs := decodeObjects(t, []byte(out))
	for _, o := range objs {
		switch {
		case o.kind() == "Namespace":
			if o.name() != "network-encryption" {
				t.Errorf("Namespace %s not renamed", o.name())
			}
		case o.ns() != "" && o.ns() != "network-encryption":
			t.Errorf("%s not moved", o)
		}
		switch o.kind() {
		case "RoleBinding", "ClusterRoleBinding":
			var subj []rbacv1.Subject
			if o.kind() == "RoleBinding" {
				subj = toTyped[rbacv1.RoleBinding](t, o).Subjects
			} else {
				subj = toTyped[rbacv1.ClusterRoleBinding](t, o).Subjects
			}
			for _, s := range subj {
				if s.Kind == "ServiceAccount" && s.Namespace != "network-encryption" {
					t.Errorf("%s: subject %s/%s not moved", o, s.Namespace, s.Name)
				}
			}
		}
	}
	for _, c := range append(allContainers(&daemonSet(t, objs).Spec.Template.Spec), deployment(t, objs).Spec.Template.Spec.Containers...) {
		if strings.HasSuffix(c.Command[0], "-install") {
			continue // uses $POD_NAMESPACE from the environment
		}
		if !slices.Contains(c.Command, "--namespace=$(POD_NAMESPACE)") {
			t.Errorf("%s: does not follow the pod's namespace: %v", c.Name, c.Command)
		}
	}
}
