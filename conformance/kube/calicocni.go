package kube

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// Calico's CNI side, from the release files in CalicoDir(): its `calico` plugin binary and
// the calico-config ConfigMap whose conflist template Calico's install-cni renders on
// every node.

// CalicoCNI decompresses Calico's real CNI plugin from dir (calico-cni-VERSION-linux-amd64.zst,
// checked against its .sha256) into dest as "calico" and "calico-ipam": one binary that
// acts by the name it runs under, installed twice as Calico's install-cni does. It returns
// Calico's version (from the file name, e.g. "v3.32.1"). Needs zstd.
func CalicoCNI(dir, dest string) (version string, err error) {
	zsts, _ := filepath.Glob(filepath.Join(dir, "calico-cni-*-linux-amd64.zst"))
	if len(zsts) != 1 {
		return "", fmt.Errorf("calico CNI plugin: want one calico-cni-VERSION-linux-amd64.zst in %s, found %d (see shared/calico/README.md)", dir, len(zsts))
	}
	zst := zsts[0]
	version = strings.TrimSuffix(strings.TrimPrefix(filepath.Base(zst), "calico-cni-"), "-linux-amd64.zst")
	want, err := os.ReadFile(strings.TrimSuffix(zst, ".zst") + ".sha256")
	if err != nil {
		return "", fmt.Errorf("calico CNI plugin: %w", err)
	}
	if err := os.MkdirAll(dest, 0o755); err != nil {
		return "", err
	}
	bin := filepath.Join(dest, "calico")
	if out, err := exec.Command("zstd", "-q", "-d", "-f", zst, "-o", bin).CombinedOutput(); err != nil {
		return "", fmt.Errorf("calico CNI plugin: zstd -d %s: %v: %s", zst, err, strings.TrimSpace(string(out)))
	}
	f, err := os.Open(bin)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	_, err = io.Copy(h, f)
	_ = f.Close()
	if err != nil {
		return "", err
	}
	if got := hex.EncodeToString(h.Sum(nil)); !strings.HasPrefix(strings.TrimSpace(string(want)), got) {
		return "", fmt.Errorf("calico CNI plugin %s: sha256 %s, want %s", zst, got, strings.TrimSpace(string(want)))
	}
	if err := os.Chmod(bin, 0o755); err != nil {
		return "", err
	}
	ipam := filepath.Join(dest, "calico-ipam")
	_ = os.Remove(ipam)
	if err := os.Link(bin, ipam); err != nil {
		return "", err
	}
	return version, nil
}

// CalicoConfig reads Calico's calico-config ConfigMap from dir.
func CalicoConfig(dir string) (*corev1.ConfigMap, error) {
	b, err := os.ReadFile(filepath.Join(dir, "calico-config.yaml"))
	if err != nil {
		return nil, fmt.Errorf("calico-config: %w", err)
	}
	var cm corev1.ConfigMap
	if err := yaml.Unmarshal(b, &cm); err != nil {
		return nil, fmt.Errorf("calico-config: %w", err)
	}
	if !strings.Contains(cm.Data["cni_network_config"], "__CNI_MTU__") {
		return nil, fmt.Errorf("calico-config: cni_network_config is not Calico's template (no __CNI_MTU__)")
	}
	return &cm, nil
}

// RenderCalicoConflist renders cm's conflist template (cni_network_config) the way Calico's
// install-cni does on node: the node name, the CNI MTU (veth_mtu; "0" means felix's MTU
// file) and the path of the plugin's kubeconfig.
func RenderCalicoConflist(cm *corev1.ConfigMap, node, vethMTU, kubeconfig string) []byte {
	return []byte(strings.NewReplacer("__KUBERNETES_NODE_NAME__", node, "__CNI_MTU__", vethMTU,
		"__KUBECONFIG_FILEPATH__", kubeconfig).Replace(cm.Data["cni_network_config"]))
}
