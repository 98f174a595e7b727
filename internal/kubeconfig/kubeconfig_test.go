package kubeconfig

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const minimal = `apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {server: "https://127.0.0.1:6443"}
users:
- name: u
  user: {token: "x"}
contexts:
- name: ctx
  context: {cluster: c, user: u}
current-context: ctx
`

func TestLoadOrder(t *testing.T) {
	dir := t.TempDir()
	a := filepath.Join(dir, "a")
	if err := os.WriteFile(a, []byte(minimal), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	t.Setenv("KUBECONFIG", a+":"+filepath.Join(dir, "missing"))
	cfg, err := Load("")
	if err != nil || cfg.Host != "https://127.0.0.1:6443" {
		t.Fatalf("from $KUBECONFIG: %v %v", cfg, err)
	}
	if _, err := Load(filepath.Join(dir, "missing")); err == nil || !strings.Contains(err.Error(), "kubeconfig ") {
		t.Fatalf("missing flag path: %v", err)
	}
	t.Setenv("KUBECONFIG", "")
	if _, err := Load(""); err == nil || !strings.Contains(err.Error(), "in-cluster config") {
		t.Fatalf("outside a cluster: %v", err)
	}
}
