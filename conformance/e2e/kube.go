package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	authorizationv1 "k8s.io/api/authorization/v1"
	"os"
	"path/filepath"
	"sort"
	"time"

	v3 "github.com/projectcalico/api/pkg/apis/projectcalico/v3"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	k8syaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/conformance/kube"
	"github.com/secureoverlay/secureoverlay/conformance/lab"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/nodereport"
)

// BGPPeerIP is the address of the BGP peer outside the cluster (a ToR); it is
// never encrypted to nor dropped.
const BGPPeerIP = "198.18.0.250"

// rbacKinds are the objects of manifests/secureoverlay.yaml the lab applies:
// identities and RBAC. (The DaemonSet and Deployment are replaced by the
// processes the lab runs itself; the admission policy needs pod-bound tokens
// with a node claim, which the lab's TokenRequest tokens do not carry.)
var rbacKinds = map[string]schema.GroupVersionResource{
	"ServiceAccount":     {Version: "v1", Resource: "serviceaccounts"},
	"ClusterRole":        {Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "clusterroles"},
	"ClusterRoleBinding": {Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "clusterrolebindings"},
	"Role":               {Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "roles"},
	"RoleBinding":        {Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "rolebindings"},
}

// repoRoot is the directory of our go.mod above the working directory.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := dir; ; d = filepath.Dir(d) {
		if b, err := os.ReadFile(filepath.Join(d, "go.mod")); err == nil &&
			bytes.Contains(b, []byte("module github.com/secureoverlay/secureoverlay\n")) {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", errors.New("not inside the secureoverlay repository (no go.mod found)")
		}
	}
}

func (l *Lab) installAPIObjects(ctx context.Context) error {
	if err := kube.InstallCalicoCRDsContext(ctx, l.Kube.AdminConfig()); err != nil {
		return err
	}
	root, err := repoRoot()
	if err != nil {
		return err
	}
	f, err := os.Open(filepath.Join(root, "manifests", "secureoverlay.yaml"))
	if err != nil {
		return err
	}
	defer f.Close()
	dec := k8syaml.NewYAMLOrJSONDecoder(f, 4096)
	n := 0
	for {
		var obj unstructured.Unstructured
		if err := dec.Decode(&obj.Object); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			return fmt.Errorf("manifests/secureoverlay.yaml: %w", err)
		}
		gvr, ok := rbacKinds[obj.GetKind()]
		if !ok {
			continue
		}
		var err error
		if obj.GetNamespace() != "" {
			_, err = l.Dynamic.Resource(gvr).Namespace(obj.GetNamespace()).Create(ctx, &obj, metav1.CreateOptions{})
		} else {
			_, err = l.Dynamic.Resource(gvr).Create(ctx, &obj, metav1.CreateOptions{})
		}
		if err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("apply %s %s: %w", obj.GetKind(), obj.GetName(), err)
		}
		n++
	}
	if n < 8 {
		return fmt.Errorf("manifests/secureoverlay.yaml: only %d RBAC objects found", n)
	}
	// The operator's ConfigMap, encryption off.
	if _, err := l.Client.CoreV1().ConfigMaps(api.Namespace).Create(ctx, &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: api.ConfigMapName, Namespace: api.Namespace},
		Data:       map[string]string{api.ConfigEnabledKey: "false"},
	}, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create configmap %s: %w", api.ConfigMapName, err)
	}
	// Calico: one IPIP pool, a BGP peer outside the cluster, and the ClusterInformation
	// calico-node marks ready (Calico's CNI plugin refuses to run before).
	for _, obj := range []runtime.Object{
		kube.NewIPPool("default-ipv4-ippool", "10.244.0.0/16", v3.IPIPModeAlways),
		kube.NewBGPPeer("tor", BGPPeerIP),
		kube.NewClusterInformation(l.calicoVersion),
	} {
		if _, err := kube.CreateCalico(ctx, l.Dynamic, kube.CalicoV1GV, obj); err != nil {
			return err
		}
	}
	if err := l.installCalicoCNIIdentity(ctx); err != nil {
		return err
	}
	// The master authenticates as its ServiceAccount.
	rc, err := l.Kube.ServiceAccountConfigErr(ctx, api.Namespace, "secureoverlay-master")
	if err != nil {
		return err
	}
	kc, err := kubeconfig(rc, rc.Host)
	if err != nil {
		return err
	}
	l.masterCfg = filepath.Join(l.stateDir, "master.kubeconfig")
	return os.WriteFile(l.masterCfg, kc, 0o600)
}

// installCalicoCNIIdentity gives Calico's CNI plugin what it has on a node: credentials
// (the lab binds its ServiceAccount to cluster-admin: Calico's own calico-cni-plugin role
// is not among the release files the lab uses) in a kubeconfig at calicoKubeconfig in the
// guest; and the namespace of the lab's pods with its default ServiceAccount (no
// controller-manager runs to create it).
func (l *Lab) installCalicoCNIIdentity(ctx context.Context) error {
	if _, err := l.Client.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "lab-calico-cni-plugin"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "cluster-admin"},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: "kube-system", Name: "calico-cni-plugin"}},
	}, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("bind calico-cni-plugin: %w", err)
	}
	if _, err := kube.WaitAuthorized(ctx, l.Client, kube.ServiceAccountUser("kube-system", "calico-cni-plugin"), kube.ServiceAccountGroups("kube-system"),
		authorizationv1.ResourceAttributes{Group: "crd.projectcalico.org", Resource: "ipamblocks", Verb: "create"}, time.Minute); err != nil {
		return err
	}
	rc, err := l.Kube.ServiceAccountConfigErr(ctx, "kube-system", "calico-cni-plugin")
	if err != nil {
		return err
	}
	kc, err := kubeconfig(rc, fmt.Sprintf("https://%s:%d", lab.GuestForwardAddr, APIServerGuestPort))
	if err != nil {
		return err
	}
	if err := l.VM.WriteFile(ctx, calicoKubeconfig, kc, 0o600); err != nil {
		return err
	}
	if _, err := l.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: PodNamespace}}, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create namespace %s: %w", PodNamespace, err)
	}
	if _, err := l.Client.CoreV1().ServiceAccounts(PodNamespace).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create service account %s/default: %w", PodNamespace, err)
	}
	return nil
}

func blockName(i int) string    { return kube.BlockName(lab.Block(i)) }
func affinityName(i int) string { return lab.NodeNS(i) + "-" + blockName(i) }

// RegisterNode writes node i as Calico and the kubelet would: the Node
// (address, tunnel address, boot ID, Ready), its IPAMBlock and BlockAffinity.
func (l *Lab) RegisterNode(ctx context.Context, i int) error {
	boot := newBootID()
	l.mu.Lock()
	l.bootIDs[i] = boot
	l.mu.Unlock()
	if _, err := kube.CreateNodeContext(ctx, l.Client, kube.Node{
		Name: lab.NodeNS(i), IPv4: lab.NodeIP(i), BootID: boot,
		Annotations: map[string]string{api.CalicoIPIPTunnelAnnotation: lab.TunnelIP(i)},
	}); err != nil {
		return err
	}
	// The node's block as calico-node leaves it after allocating the node's IPIP tunnel
	// address from IPAM (handle ipip-tunnel-addr-NODE): affine to the node, confirmed,
	// the affinity labelled as Calico labels it, so calico-ipam gives the node's pods
	// addresses from it, and the lab's routes (lab.Cluster) hold.
	node := lab.NodeNS(i)
	b := kube.NewIPAMBlock(lab.Block(i), "host:"+node)
	kube.Allocate(b, 1, "ipip-tunnel-addr-"+node, node, map[string]string{"type": "ipipTunnelAddress"})
	for _, obj := range []runtime.Object{b, kube.NewBlockAffinity(node, lab.Block(i))} {
		if _, err := kube.CreateCalico(ctx, l.Dynamic, kube.CalicoV1GV, obj); err != nil {
			return err
		}
	}
	return nil
}

// DeregisterNode deletes node i's Node, IPAMBlock and BlockAffinity, as
// `kubectl delete node` plus Calico's IPAM garbage collection would.
func (l *Lab) DeregisterNode(ctx context.Context, i int) error {
	errs := []error{
		l.Client.CoreV1().Nodes().Delete(ctx, lab.NodeNS(i), metav1.DeleteOptions{}),
		l.Dynamic.Resource(kube.IPAMBlocks).Delete(ctx, blockName(i), metav1.DeleteOptions{}),
		l.Dynamic.Resource(kube.BlockAffinities).Delete(ctx, affinityName(i), metav1.DeleteOptions{}),
	}
	l.forgetNode(i)
	return errors.Join(errs...)
}

func newBootID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// kubeconfig renders rc (CA + bearer token) as a kubeconfig for server.
func kubeconfig(rc *rest.Config, server string) ([]byte, error) {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["lab"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: rc.CAData}
	cfg.AuthInfos["sa"] = &clientcmdapi.AuthInfo{Token: rc.BearerToken}
	cfg.Contexts["lab"] = &clientcmdapi.Context{Cluster: "lab", AuthInfo: "sa"}
	cfg.CurrentContext = "lab"
	return clientcmd.Write(*cfg)
}

// SetTarget sets the operator's target: "true"/"false" for `enabled`, or an
// explicit mode in `mode` (empty mode clears it).
func (l *Lab) setConfig(ctx context.Context, data map[string]string) error {
	patch, _ := json.Marshal(map[string]any{"data": data})
	_, err := l.Client.CoreV1().ConfigMaps(api.Namespace).Patch(ctx, api.ConfigMapName, types.MergePatchType, patch, metav1.PatchOptions{})
	if err != nil {
		return fmt.Errorf("patch configmap %s: %w", api.ConfigMapName, err)
	}
	return nil
}

// Enable sets enabled=true (target enforce), as `secureoverlayctl enable` does.
func (l *Lab) Enable(ctx context.Context) error {
	return l.setConfig(ctx, map[string]string{api.ConfigEnabledKey: "true", api.ConfigModeKey: ""})
}

// Disable sets enabled=false (target off).
func (l *Lab) Disable(ctx context.Context) error {
	return l.setConfig(ctx, map[string]string{api.ConfigEnabledKey: "false", api.ConfigModeKey: ""})
}

// SetMode sets an explicit target mode.
func (l *Lab) SetMode(ctx context.Context, m api.Mode) error {
	return l.setConfig(ctx, map[string]string{api.ConfigModeKey: string(m)})
}

// RequestRotation writes a new rotate-request annotation, as `secureoverlayctl
// rotate` does, and returns its value.
func (l *Lab) RequestRotation(ctx context.Context) (string, error) {
	v := time.Now().UTC().Format(time.RFC3339Nano)
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]string{api.RotateRequestAnnotation: v}}})
	_, err := l.Client.CoreV1().ConfigMaps(api.Namespace).Patch(ctx, api.ConfigMapName, types.MergePatchType, patch, metav1.PatchOptions{})
	if err != nil {
		return "", fmt.Errorf("request rotation: %w", err)
	}
	return v, nil
}

// Ring is the key ring the master wrote (parsed: never print it whole; keys.Summary
// names no key).
func (l *Lab) Ring(ctx context.Context) (*keys.Ring, error) {
	sec, err := l.Client.CoreV1().Secrets(api.Namespace).Get(ctx, api.SecretName, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	return keys.Parse(sec.Data[api.SecretDataKey])
}

// Status is the master's published status (zero value if none yet).
func (l *Lab) Status(ctx context.Context) (api.MasterStatus, error) {
	var st api.MasterStatus
	cm, err := l.Client.CoreV1().ConfigMaps(api.Namespace).Get(ctx, api.StatusConfigMapName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return st, nil
	}
	if err != nil {
		return st, err
	}
	if s := cm.Data[api.StatusDataKey]; s != "" {
		if err := json.Unmarshal([]byte(s), &st); err != nil {
			return st, fmt.Errorf("parse master status: %w", err)
		}
	}
	return st, nil
}

// Reports returns every registered node's report, by node name (a node
// without a report maps to nil): its NodeReport's, or its annotation's, as the
// master reads them (nodereport.ReadAll).
func (l *Lab) Reports(ctx context.Context) (map[string]*api.NodeReport, error) {
	raws, err := nodereport.ReadAll(ctx, l.Client, l.Dynamic, api.Namespace)
	if err != nil {
		return nil, err
	}
	out := map[string]*api.NodeReport{}
	for name, s := range raws {
		out[name] = nil
		if s == "" {
			continue
		}
		var r api.NodeReport
		if err := json.Unmarshal([]byte(s), &r); err != nil {
			return nil, fmt.Errorf("node %s: report: %w", name, err)
		}
		out[name] = &r
	}
	return out, nil
}

// Settled reports whether the cluster has reached mode m everywhere: the
// master's mode and target are m, no generation is pending, and every node
// reports m with no error. why says what is missing.
func (l *Lab) Settled(ctx context.Context, m api.Mode) (ok bool, why string, err error) {
	st, err := l.Status(ctx)
	if err != nil {
		return false, "", err
	}
	if m != api.ModeOff || st.Leader != "" {
		if st.Mode != m || st.Target != m {
			return false, fmt.Sprintf("master mode %q target %q (waiting: %s)", st.Mode, st.Target, st.Waiting), nil
		}
		if st.PendingGeneration != 0 {
			return false, fmt.Sprintf("generation %d pending", st.PendingGeneration), nil
		}
	}
	reps, err := l.Reports(ctx)
	if err != nil {
		return false, "", err
	}
	names := make([]string, 0, len(reps))
	for n := range reps {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		r := reps[n]
		switch {
		case r == nil:
			return false, n + " has no report", nil
		case r.Error != "":
			return false, n + " reports error: " + r.Error, nil
		case r.Mode != m:
			return false, fmt.Sprintf("%s reports mode %s", n, r.Mode), nil
		}
		if m != api.ModeOff && st.ActiveGeneration != 0 && !containsGen(r.Generations, st.ActiveGeneration) {
			return false, fmt.Sprintf("%s lacks generation %d", n, st.ActiveGeneration), nil
		}
	}
	return true, "", nil
}

func containsGen(gs []uint32, g uint32) bool {
	for _, x := range gs {
		if x == g {
			return true
		}
	}
	return false
}

// WaitMode waits until Settled(m) and returns how long it took.
func (l *Lab) WaitMode(ctx context.Context, m string, timeout time.Duration) (time.Duration, error) {
	start := time.Now()
	why, err := l.poll(ctx, timeout, func() (bool, string, error) { return l.Settled(ctx, api.Mode(m)) })
	if err != nil {
		return time.Since(start), fmt.Errorf("mode %s not reached in %s: %s: %w", m, timeout, why, err)
	}
	return time.Since(start), nil
}

// poll calls f every 200 ms until it is done or timeout; the last reason is
// returned with the error.
func (l *Lab) poll(ctx context.Context, timeout time.Duration, f func() (bool, string, error)) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	why := ""
	for {
		ok, w, err := f()
		if err == nil && ok {
			return "", nil
		}
		if err != nil {
			w = err.Error()
		}
		if w != "" && w != why {
			why = w
		}
		select {
		case <-ctx.Done():
			return why, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// WaitRotation waits until a generation newer than prev is active everywhere
// (no pending one left) and returns it with the time taken.
func (l *Lab) WaitRotation(ctx context.Context, prev uint32, timeout time.Duration) (uint32, time.Duration, error) {
	start := time.Now()
	var gen uint32
	why, err := l.poll(ctx, timeout, func() (bool, string, error) {
		st, err := l.Status(ctx)
		if err != nil {
			return false, "", err
		}
		if st.ActiveGeneration <= prev || st.PendingGeneration != 0 {
			return false, fmt.Sprintf("active %d pending %d waiting %q", st.ActiveGeneration, st.PendingGeneration, st.Waiting), nil
		}
		gen = st.ActiveGeneration
		return l.Settled(ctx, st.Mode)
	})
	if err != nil {
		return 0, time.Since(start), fmt.Errorf("rotation past generation %d not finished in %s: %s: %w", prev, timeout, why, err)
	}
	return gen, time.Since(start), nil
}

// WaitGenerationRemoved waits until generation g is gone from the ring, from
// every report and from every registered node's kernel (no SA whose SPI
// carries g mod 4 besides a live generation sharing it).
func (l *Lab) WaitGenerationRemoved(ctx context.Context, g uint32, timeout time.Duration) (time.Duration, error) {
	start := time.Now()
	why, err := l.poll(ctx, timeout, func() (bool, string, error) {
		st, err := l.Status(ctx)
		if err != nil {
			return false, "", err
		}
		for _, x := range st.Generations {
			if x.Number == g {
				return false, fmt.Sprintf("generation %d still %s in the ring", g, x.State), nil
			}
		}
		reps, err := l.Reports(ctx)
		if err != nil {
			return false, "", err
		}
		for n, r := range reps {
			if r != nil && containsGen(r.Generations, g) {
				return false, fmt.Sprintf("%s still reports generation %d", n, g), nil
			}
		}
		for _, i := range l.RegisteredNodes() {
			sas, err := lab.XfrmStates(ctx, l.VM, lab.NodeNS(i))
			if err != nil {
				return false, "", err
			}
			for _, sa := range sas {
				if gm, _, ok := parseSPI(sa.SPI); ok && gm == g%4 {
					return false, fmt.Sprintf("node%d still holds SA spi 0x%08x", i, sa.SPI), nil
				}
			}
		}
		return true, "", nil
	})
	if err != nil {
		return time.Since(start), fmt.Errorf("generation %d not removed in %s: %s: %w", g, timeout, why, err)
	}
	return time.Since(start), nil
}

// RegisteredNodes are the node numbers currently registered in the API.
func (l *Lab) RegisteredNodes() []int {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []int
	for i := range l.bootIDs {
		out = append(out, i)
	}
	sort.Ints(out)
	return out
}

func (l *Lab) forgetNode(i int) {
	l.mu.Lock()
	delete(l.bootIDs, i)
	l.mu.Unlock()
}

// NodeName is node i's name in the API.
func NodeName(i int) string { return lab.NodeNS(i) }
