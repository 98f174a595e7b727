//go:build linux

package kubeconfig

import (
	"context"
	"net/http"
	"sync"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/secureoverlay/secureoverlay/conformance/kube"
)

// TestTypedClientSpeaksProtobuf: a typed client of Protobuf's config (the agent's and
// the master's), against a real API server, gets Nodes (list, get) as protobuf, and a
// merge patch of a Node (how an agent writes its annotation) lands and is answered as
// protobuf.
func TestTypedClientSpeaksProtobuf(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a real API server")
	}
	c := kube.Start(t)
	kube.CreateNode(t, c.AdminConfig(), kube.Node{Name: "a", IPv4: "198.18.0.1", BootID: "boot-a"})
	cfg := Protobuf(c.AdminConfig())
	var mu sync.Mutex
	answered := map[string]string{}
	cfg.Wrap(func(rt http.RoundTripper) http.RoundTripper {
		return roundTripper(func(r *http.Request) (*http.Response, error) {
			resp, err := rt.RoundTrip(r)
			if err == nil {
				mu.Lock()
				answered[r.Method+" "+r.URL.Path] = resp.Header.Get("Content-Type")
				mu.Unlock()
			}
			return resp, err
		})
	})
	cs := kubernetes.NewForConfigOrDie(cfg)
	ctx := context.Background()
	if _, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := cs.CoreV1().Nodes().Patch(ctx, "a", types.MergePatchType, []byte(`{"metadata":{"annotations":{"x":"y"}}}`), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	n, err := cs.CoreV1().Nodes().Get(ctx, "a", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if n.Annotations["x"] != "y" || n.Name != "a" {
		t.Errorf("node after the patch, read as protobuf: %s %v", n.Name, n.Annotations)
	}
	mu.Lock()
	defer mu.Unlock()
	for _, k := range []string{"GET /api/v1/nodes", "PATCH /api/v1/nodes/a", "GET /api/v1/nodes/a"} {
		if answered[k] != runtime.ContentTypeProtobuf {
			t.Errorf("%s answered as %q, want %s", k, answered[k], runtime.ContentTypeProtobuf)
		}
	}
	// The dynamic client's config (custom resources: JSON only) is left as it was.
	base := &rest.Config{Host: "https://198.18.0.1"}
	if Protobuf(base); base.ContentType != "" || base.AcceptContentTypes != "" {
		t.Errorf("Protobuf changed its argument: %q %q", base.ContentType, base.AcceptContentTypes)
	}
}

type roundTripper func(*http.Request) (*http.Response, error)

func (f roundTripper) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
