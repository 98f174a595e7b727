package manifests

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"

	"github.com/secureoverlay/secureoverlay/conformance/kube"
)

const envRequireAll = "SECUREOVERLAY_REQUIRE_ALL"

// repoRoot is the root module's directory (this package is conformance/manifests).
func repoRoot(t testing.TB) string {
	t.Helper()
	dir, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "go.mod")); err != nil {
		t.Fatalf("repo root %s: %v", dir, err)
	}
	return dir
}

func manifestPath(t testing.TB) string {
	return filepath.Join(repoRoot(t), "manifests", "secureoverlay.yaml")
}

// object is one document of a manifest, in file order.
type object struct {
	u *unstructured.Unstructured
}

func (o object) kind() string { return o.u.GetKind() }
func (o object) name() string { return o.u.GetName() }
func (o object) ns() string   { return o.u.GetNamespace() }
func (o object) String() string {
	if o.ns() != "" {
		return o.kind() + " " + o.ns() + "/" + o.name()
	}
	return o.kind() + " " + o.name()
}

// decodeObjects splits a multi-document YAML stream into objects (empty documents
// are skipped).
func decodeObjects(t testing.TB, data []byte) []object {
	t.Helper()
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var out []object
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatalf("read yaml document: %v", err)
		}
		if len(bytes.TrimSpace(stripComments(doc))) == 0 {
			continue
		}
		u := &unstructured.Unstructured{}
		if err := utilyaml.Unmarshal(doc, &u.Object); err != nil {
			t.Fatalf("decode yaml document: %v\n%s", err, doc)
		}
		if u.Object == nil {
			continue
		}
		out = append(out, object{u: u})
	}
}

func stripComments(doc []byte) []byte {
	var b bytes.Buffer
	for _, l := range strings.Split(string(doc), "\n") {
		if t := strings.TrimSpace(l); t == "" || strings.HasPrefix(t, "#") || t == "---" {
			continue
		}
		b.WriteString(l + "\n")
	}
	return b.Bytes()
}

func loadManifest(t testing.TB) []object {
	t.Helper()
	data, err := os.ReadFile(manifestPath(t))
	if err != nil {
		t.Fatal(err)
	}
	return decodeObjects(t, data)
}

func find(t testing.TB, objs []object, kind, name string) (object, int) {
	t.Helper()
	for i, o := range objs {
		if o.kind() == kind && o.name() == name {
			return o, i
		}
	}
	t.Fatalf("manifest has no %s %s", kind, name)
	return object{}, -1
}

func toTyped[T any](t testing.TB, o object) *T {
	t.Helper()
	out := new(T)
	if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(o.u.Object, out, true); err != nil {
		t.Fatalf("%s: %v", o, err)
	}
	return out
}

func daemonSet(t testing.TB, objs []object) *appsv1.DaemonSet {
	o, _ := find(t, objs, "DaemonSet", "secureoverlay-agent")
	return toTyped[appsv1.DaemonSet](t, o)
}

func deployment(t testing.TB, objs []object) *appsv1.Deployment {
	o, _ := find(t, objs, "Deployment", "secureoverlay-master")
	return toTyped[appsv1.Deployment](t, o)
}

func configMap(t testing.TB, objs []object) *corev1.ConfigMap {
	o, _ := find(t, objs, "ConfigMap", "secureoverlay-config")
	return toTyped[corev1.ConfigMap](t, o)
}

// allContainers returns the init containers and containers of a pod spec, each
// prefixed with its workload for messages.
func allContainers(spec *corev1.PodSpec) []corev1.Container {
	return append(append([]corev1.Container{}, spec.InitContainers...), spec.Containers...)
}

// requireOrSkip skips t with reason, or fails it when SECUREOVERLAY_REQUIRE_ALL=1.
func requireOrSkip(t testing.TB, reason string) {
	t.Helper()
	if os.Getenv(envRequireAll) == "1" {
		t.Fatalf("%s (%s=1, so this fails instead of skipping)", reason, envRequireAll)
	}
	t.Skip(reason)
}

// kubectlPath returns the kubectl built by hack/tools-kube.sh, next to kube-apiserver.
func kubectlPath(t testing.TB) string {
	t.Helper()
	apiserver, _, err := kube.FindBinaries()
	if err == nil {
		p := filepath.Join(filepath.Dir(apiserver), "kubectl")
		if st, err := os.Stat(p); err == nil && st.Mode()&0o111 != 0 {
			return p
		}
		requireOrSkip(t, fmt.Sprintf("kubectl not found at %s: run `make tools` (or hack/tools-kube.sh)", p))
	}
	requireOrSkip(t, fmt.Sprintf("kubectl: %v", err))
	return ""
}

// binPath returns bin/<name> from `make build`, or skips (fails under REQUIRE_ALL).
func binPath(t testing.TB, name string) string {
	t.Helper()
	dir := os.Getenv("SECUREOVERLAY_BIN_DIR")
	if dir == "" {
		dir = filepath.Join(repoRoot(t), "bin")
	}
	p := filepath.Join(dir, name)
	if st, err := os.Stat(p); err != nil || st.Mode()&0o111 == 0 {
		requireOrSkip(t, fmt.Sprintf("%s not built: run `make build`", p))
	}
	return p
}

// kubectl runs kubectl with the given kubeconfig and returns its combined output.
func kubectl(t testing.TB, bin, kubeconfig string, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(bin, append([]string{"--kubeconfig", kubeconfig}, args...)...)
	cmd.Env = append(os.Environ(), "KUBECTL_INTERACTIVE_DELETE=false", "HOME="+t.TempDir())
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func mustKubectl(t testing.TB, bin, kubeconfig string, args ...string) string {
	t.Helper()
	out, err := kubectl(t, bin, kubeconfig, args...)
	if err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}
