package ctl

import (
	"context"
	"encoding/json"
	v3 "github.com/projectcalico/api/pkg/apis/projectcalico/v3"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/yaml"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/conformance/kube"
)

// installationCRD is a minimal stand-in for the Tigera operator's Installation CRD
// (operator.tigera.io/v1, cluster-scoped), hand-written because the operator's CRDs are
// not among the Calico v3.32.1 files in ../shared/calico (they ship with the
// tigera/operator release). Only spec.calicoNetwork.mtu matters to secureoverlayctl; it
// is typed as in the operator's CRD (integer, int32). spec.variant is kept so the test
// can show that a patch leaves the rest of the spec alone. Everything else is pruned, as
// a structural schema does: keep this minimal, do not grow it into a look-alike.
const installationCRD = `
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: installations.operator.tigera.io
spec:
  group: operator.tigera.io
  scope: Cluster
  names: {kind: Installation, listKind: InstallationList, plural: installations, singular: installation}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          apiVersion: {type: string}
          kind: {type: string}
          metadata: {type: object}
          spec:
            type: object
            properties:
              variant: {type: string}
              calicoNetwork:
                type: object
                properties:
                  mtu: {type: integer, format: int32}
          status: {type: object, x-kubernetes-preserve-unknown-fields: true}
`

// createCalicoConfig creates kube-system/calico-config from Calico v3.32.1's own
// manifest (../shared/calico/calico-config.yaml: veth_mtu "0", the conflist template).
func (e *env) createCalicoConfig() *corev1.ConfigMap {
	e.t.Helper()
	b, err := os.ReadFile(filepath.Join(kube.RequireCalico(e.t), "calico-config.yaml"))
	if err != nil {
		e.t.Fatal(err)
	}
	var cm corev1.ConfigMap
	if err := yaml.UnmarshalStrict(b, &cm); err != nil {
		e.t.Fatal(err)
	}
	if cm.Namespace != "kube-system" || cm.Data["veth_mtu"] != "0" {
		e.t.Fatalf("calico-config.yaml is not Calico's default: %s/%s veth_mtu %q", cm.Namespace, cm.Name, cm.Data["veth_mtu"])
	}
	got, err := e.cs.CoreV1().ConfigMaps("kube-system").Create(e.ctx, &cm, metav1.CreateOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	return got
}

// createPod creates a pod (no kubelet: it stays Pending, which counts as running here).
func (e *env) createPod(ns, name string, hostNetwork bool, labels map[string]string, owner *metav1.OwnerReference) {
	e.t.Helper()
	if _, err := e.cs.CoreV1().Namespaces().Create(e.ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		e.t.Fatal(err)
	}
	// No controller-manager: the namespace's default ServiceAccount is ours to create.
	if _, err := e.cs.CoreV1().ServiceAccounts(ns).Create(e.ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		e.t.Fatal(err)
	}
	no := false
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
		Spec: corev1.PodSpec{HostNetwork: hostNetwork, AutomountServiceAccountToken: &no,
			Containers: []corev1.Container{{Name: "c", Image: "registry.example/app:1"}}}}
	if owner != nil {
		p.OwnerReferences = []metav1.OwnerReference{*owner}
	}
	if _, err := e.cs.CoreV1().Pods(ns).Create(e.ctx, p, metav1.CreateOptions{}); err != nil {
		e.t.Fatal(err)
	}
}

func controller(kind, name string) *metav1.OwnerReference {
	yes := true
	api := "apps/v1"
	if kind == "Job" {
		api = "batch/v1"
	}
	return &metav1.OwnerReference{APIVersion: api, Kind: kind, Name: name, UID: types.UID("uid-" + name), Controller: &yes}
}

// mtuJSON runs mtu -o json with --external-mtu 1500 (the nodes' uplink, and no
// dependence on this host's links).
func (e *env) mtuJSON(args ...string) (MTUOutput, result) {
	e.t.Helper()
	r := e.run(append(append([]string{"mtu"}, args...), "-o", "json", "--external-mtu", "1500")...)
	var m MTUOutput
	if err := json.Unmarshal([]byte(r.stdout), &m); err != nil {
		e.t.Fatalf("mtu %v -o json: %v\n%s", args, err, r)
	}
	return m, r
}

// TestMTUCalicoInstalls: mtu tells the kinds of Calico installation apart on Calico's
// real CRDs and a real API server, names each one's own knob, and --apply sets it (as an
// operator bound to the manifest's rules), idempotently, then lists what predates the
// change. Default Calico throughout: veth_mtu "0" / no Installation MTU, so the pod MTU
// is auto, 1480 on the nodes' 1500-byte links, over the 1452 budget.
func TestMTUCalicoInstalls(t *testing.T) {
	e := newEnv(t)
	e.healthyCluster() // 3 nodes, external 1500, budget 1452; FelixConfiguration ipipMTU 1452
	e.installOperatorRBAC("op", true, false)

	// No budget reported anywhere yet (before secureoverlay runs): --apply needs a target.
	for _, n := range testNodes {
		e.setReport(n.name, nil, "")
	}
	r := e.run("--as", "op", "mtu", "--apply", "--icv-bytes", "8")
	oneErrorLine(t, "apply without budgets", result{stderr: r.stderr, code: r.code}, ExitNotOK, "no node reports a budget yet")
	for _, n := range testNodes {
		e.setReport(n.name, healthyReport(n.name), "")
	}

	t.Run("manifest install", func(t *testing.T) {
		cm := e.createCalicoConfig()
		// Checked before secureoverlay runs (no node reports a budget): against the budget
		// for --external-mtu, auto does not fit (exit 1) and the fix says so.
		for _, n := range testNodes {
			e.setReport(n.name, nil, "")
		}
		m, r := e.mtuJSON()
		if r.code != ExitNotOK || m.Cluster.Fits || m.Cluster.Fix == nil || m.Cluster.Fix.MTU != 1452 ||
			m.Cluster.Fix.Why != "the budget for --external-mtu" || len(m.Cluster.WrongNodes) != 0 {
			t.Fatalf("before any node reports:\n%s", r)
		}
		for _, n := range testNodes {
			e.setReport(n.name, healthyReport(n.name), "")
		}
		m, r = e.mtuJSON()
		c := m.Cluster.Calico
		if r.code != ExitNotOK || c.Install != InstallManifest || !c.Known || !c.Auto || c.Value != "0" || c.FelixApplies ||
			c.FelixIPIPMTU != 1452 || len(m.Cluster.WrongNodes) != 3 || m.Cluster.Nodes[0].CalicoMTU != 1480 ||
			m.Cluster.Fix == nil || m.Cluster.Fix.MTU != 1452 || !m.Cluster.Fix.Apply || m.Cluster.Restart != nil {
			t.Fatalf("manifest install, veth_mtu \"0\" (FelixConfiguration 1452 is inert there):\n%s", r)
		}
		r = e.run("mtu", "--external-mtu", "1500")
		goldenCheck(t, "mtu-manifest.txt", normTimes(r.stdout))

		// What runs now: a Deployment's pods, a bare pod, a Job's pod, host-network pods
		// (never on the pod network) and calico-node, all created before the change.
		e.createPod("shop", "web-5d8f7c9b6-aaaaa", false, map[string]string{"pod-template-hash": "5d8f7c9b6"}, controller("ReplicaSet", "web-5d8f7c9b6"))
		e.createPod("shop", "web-5d8f7c9b6-bbbbb", false, map[string]string{"pod-template-hash": "5d8f7c9b6"}, controller("ReplicaSet", "web-5d8f7c9b6"))
		e.createPod("shop", "db-0", false, nil, controller("StatefulSet", "db"))
		e.createPod("shop", "debug", false, nil, nil)
		e.createPod("batch", "report-x1", false, nil, controller("Job", "report"))
		e.createPod("shop", "node-exporter-zz", true, nil, controller("DaemonSet", "node-exporter"))
		e.createPod("kube-system", "calico-node-abcde", true, map[string]string{"k8s-app": "calico-node"}, controller("DaemonSet", "calico-node"))
		time.Sleep(1100 * time.Millisecond) // managedFields and creation times have 1 s resolution

		r = e.run("--as", "op", "mtu", "--apply", "--external-mtu", "1500")
		if r.code != ExitOK {
			t.Fatalf("mtu --apply as the operator role:\n%s", r)
		}
		goldenCheck(t, "mtu-manifest-apply.txt", normTimes(r.stdout))
		got, err := e.cs.CoreV1().ConfigMaps("kube-system").Get(e.ctx, "calico-config", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if got.Data["veth_mtu"] != "1452" || got.Data["cni_network_config"] != cm.Data["cni_network_config"] || len(got.Data) != len(cm.Data) {
			t.Fatalf("calico-config after --apply: %v", got.Data)
		}
		if at, by := fieldWrittenAt(got.ManagedFields, "data", "veth_mtu"); at == nil || by != fieldManager {
			t.Errorf("veth_mtu written by %q at %v, want %s", by, at, fieldManager)
		}

		// Idempotent: nothing to write, the same pods listed.
		m, r = e.mtuJSON("--as", "op", "--apply")
		again, _ := e.cs.CoreV1().ConfigMaps("kube-system").Get(e.ctx, "calico-config", metav1.GetOptions{})
		rs := m.Cluster.Restart
		if r.code != ExitOK || m.Cluster.Applied == nil || m.Cluster.Applied.Changed || again.ResourceVersion != got.ResourceVersion || !m.Cluster.Fits ||
			m.Cluster.Calico.MTU != 1452 || m.Cluster.Calico.Auto || len(m.Cluster.WrongNodes) != 0 || m.Cluster.Fix != nil ||
			rs == nil || rs.Pods != 5 || rs.CalicoNodes != 1 || rs.CalicoNodesBefore != 1 || len(rs.Workloads) != 4 ||
			!strings.Contains(rs.CalicoNodeRestart, "kubectl -n kube-system rollout restart daemonset/calico-node") {
			t.Fatalf("second --apply (rv %s → %s):\n%s", got.ResourceVersion, again.ResourceVersion, r)
		}
		if w := rs.Workloads[1]; w.Namespace != "shop" || w.Kind != "Deployment" || w.Name != "web" || w.Pods != 2 ||
			w.Restart != "kubectl -n shop rollout restart deployment/web" {
			t.Errorf("the ReplicaSet's pods are the Deployment's: %+v", rs.Workloads)
		}

		// Pods and calico-node started after the change are not listed.
		time.Sleep(1100 * time.Millisecond)
		e.createPod("shop", "web-7c9d-ccccc", false, map[string]string{"pod-template-hash": "7c9d"}, controller("ReplicaSet", "web-7c9d"))
		if err := e.cs.CoreV1().Pods("kube-system").Delete(e.ctx, "calico-node-abcde", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		e.createPod("kube-system", "calico-node-fghij", true, map[string]string{"k8s-app": "calico-node"}, controller("DaemonSet", "calico-node"))
		m, r = e.mtuJSON()
		if rs := m.Cluster.Restart; r.code != ExitOK || rs == nil || rs.Pods != 5 || rs.CalicoNodes != 1 || rs.CalicoNodesBefore != 0 {
			t.Fatalf("after new pods and a restarted calico-node:\n%s", r)
		}

		// doctor's mtu check sees the manifest's knob.
		failed, out, _ := e.doctor("--as", "op")
		if d := detail(out, "mtu"); len(failed) != 0 || d != "Calico's pod MTU 1452 (manifest install, veth_mtu in kube-system/calico-config) <= smallest node budget 1452" {
			t.Errorf("doctor after --apply: failed %v, mtu %q", failed, d)
		}
	})

	t.Run("operator install", func(t *testing.T) {
		// An operator install: the Installation wins over a calico-config left behind
		// (the operator's migration from a manifest install leaves one). FelixConfiguration
		// without ipipMTU: the Installation sets no MTU, so felix detects (1480).
		e.applyCalico(felixDefault(v3.FelixConfigurationSpec{LogSeverityScreen: "Info"}))
		ctx, cancel := context.WithTimeout(e.ctx, 60*time.Second)
		defer cancel()
		var crd unstructured.Unstructured
		if err := yaml.Unmarshal([]byte(installationCRD), &crd.Object); err != nil {
			t.Fatal(err)
		}
		if err := kube.InstallCRDs(ctx, e.cluster.AdminConfig(), &crd); err != nil {
			t.Fatal(err)
		}
		inst := &unstructured.Unstructured{Object: map[string]any{"apiVersion": "operator.tigera.io/v1", "kind": "Installation",
			"metadata": map[string]any{"name": "default"}, "spec": map[string]any{"variant": "Calico", "calicoNetwork": map[string]any{}}}}
		if _, err := e.dyn.Resource(installationGVR).Create(e.ctx, inst, kube.StrictCreate); err != nil {
			t.Fatal(err)
		}
		m, r := e.mtuJSON("--as", "op")
		c := m.Cluster.Calico
		if r.code != ExitNotOK || c.Install != InstallOperator || !c.Auto || !c.FelixApplies || len(m.Cluster.WrongNodes) != 3 ||
			m.Cluster.Fix == nil || !strings.Contains(m.Cluster.Fix.Commands[0], `kubectl patch installation.operator.tigera.io default --type merge -p '{"spec":{"calicoNetwork":{"mtu":1452}}}'`) {
			t.Fatalf("operator install without an MTU:\n%s", r)
		}
		r = e.run("mtu", "--external-mtu", "1500")
		goldenCheck(t, "mtu-operator.txt", normTimes(r.stdout))

		time.Sleep(1100 * time.Millisecond)
		m, r = e.mtuJSON("--as", "op", "--apply")
		if r.code != ExitOK || m.Cluster.Applied == nil || !m.Cluster.Applied.Changed || m.Cluster.Applied.Object != "installation.operator.tigera.io/default" ||
			m.Cluster.Calico.MTU != 1452 || m.Cluster.Calico.FelixApplies || m.Cluster.Restart == nil || m.Cluster.Restart.Pods != 6 ||
			!strings.Contains(m.Cluster.Restart.CalicoNodeRestart, "the operator is rolling calico-node") {
			t.Fatalf("mtu --apply on an operator install:\n%s", r)
		}
		got, err := e.dyn.Resource(installationGVR).Get(e.ctx, "default", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		mtu, _, _ := unstructured.NestedInt64(got.Object, "spec", "calicoNetwork", "mtu")
		variant, _, _ := unstructured.NestedString(got.Object, "spec", "variant")
		if mtu != 1452 || variant != "Calico" {
			t.Fatalf("Installation after --apply: %v", got.Object["spec"])
		}
		m, r = e.mtuJSON("--as", "op", "--apply")
		again, _ := e.dyn.Resource(installationGVR).Get(e.ctx, "default", metav1.GetOptions{})
		if r.code != ExitOK || m.Cluster.Applied.Changed || again.GetResourceVersion() != got.GetResourceVersion() {
			t.Fatalf("second --apply on an operator install changed something:\n%s", r)
		}
		if cm, _ := e.cs.CoreV1().ConfigMaps("kube-system").Get(e.ctx, "calico-config", metav1.GetOptions{}); cm.Data["veth_mtu"] != "1452" {
			t.Errorf("the operator install's --apply touched calico-config: %v", cm.Data["veth_mtu"])
		}
		if err := e.dyn.Resource(installationGVR).Delete(e.ctx, "default", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("docker ucp", func(t *testing.T) {
		// UCP's nodes carry com.docker.ucp.* labels; its calico_mtu/ipip_mtu are in UCP's
		// configuration file, which UCP would re-apply over a calico-config edit.
		patch := []byte(`{"metadata":{"labels":{"com.docker.ucp.collection":"system","com.docker.ucp.collection.swarm":"true"}}}`)
		if _, err := e.cs.CoreV1().Nodes().Patch(e.ctx, "node-b", types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
		m, r := e.mtuJSON()
		c := m.Cluster.Calico
		if r.code != ExitOK || c.Install != InstallUCP || c.Known || c.Evidence != "node node-b has UCP's label com.docker.ucp.collection" ||
			m.Cluster.Fix == nil || m.Cluster.Fix.Apply || !strings.Contains(m.Cluster.Fix.Commands[0], `calico_mtu = "1452" and ipip_mtu = "1452"`) {
			t.Fatalf("UCP:\n%s", r)
		}
		r = e.run("mtu", "--apply", "--external-mtu", "1500")
		oneErrorLine(t, "apply on UCP", result{stderr: r.stderr, code: r.code}, ExitNotOK, "Docker UCP/MKE")
		if !strings.Contains(r.stderr, `calico_mtu = "1452" and ipip_mtu = "1452"`) {
			t.Errorf("apply on UCP does not say what to set: %s", r.stderr)
		}
		failed, out, _ := e.doctor()
		if d := detail(out, "mtu"); len(failed) != 0 || !strings.Contains(d, "cannot be read (Docker UCP/MKE, UCP's calico_mtu and ipip_mtu)") {
			t.Errorf("doctor on UCP: failed %v, mtu %q", failed, d)
		}
		patch = []byte(`{"metadata":{"labels":{"com.docker.ucp.collection":null,"com.docker.ucp.collection.swarm":null}}}`)
		if _, err := e.cs.CoreV1().Nodes().Patch(e.ctx, "node-b", types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("not recognised", func(t *testing.T) {
		if err := e.cs.CoreV1().ConfigMaps("kube-system").Delete(e.ctx, "calico-config", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		m, r := e.mtuJSON()
		if r.code != ExitNotOK || m.Cluster.Calico.Install != InstallUnknown || !m.Cluster.Calico.FelixApplies || !m.Cluster.Calico.Auto {
			t.Fatalf("no Installation, no calico-config, no UCP:\n%s", r)
		}
		r = e.run("mtu", "--apply", "--external-mtu", "1500")
		oneErrorLine(t, "apply when the install is not recognised", result{stderr: r.stderr, code: r.code}, ExitNotOK, "cannot tell how Calico was installed")
	})

	// The CLI's own writes stay within what its package comment promises.
	if cm, err := e.cs.CoreV1().ConfigMaps(api.Namespace).Get(e.ctx, api.ConfigMapName, metav1.GetOptions{}); err != nil || cm.Data["plugin-mode"] != "" {
		t.Errorf("mtu wrote the operator ConfigMap: %v %v", err, cm.Data)
	}
}
