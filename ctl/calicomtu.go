package ctl

// Calico's pod MTU: which knob decides it in this cluster, what it is set to, setting it
// (mtu --apply) and the pods that predate a change. The facts behind it (docs/mtu.md,
// "Calico's MTU knobs", with sources):
//
//   - Operator install (an Installation "default" of operator.tigera.io/v1 exists): the
//     operator renders spec.calicoNetwork.mtu into the CNI config and into calico-node's
//     environment (FELIX_IPINIPMTU, FELIX_VXLANMTU, FELIX_WIREGUARDMTU) and rolls
//     calico-node. Without it, felix takes FelixConfiguration spec.ipipMTU, else detects.
//   - Manifest install (ConfigMap kube-system/calico-config with veth_mtu): install-cni
//     renders veth_mtu into the conflist's "mtu" and calico-node gets it as
//     FELIX_IPINIPMTU. Felix ignores only empty values, and its environment outranks every
//     FelixConfiguration, so even veth_mtu "0" (auto) makes spec.ipipMTU inert. Both are
//     read when calico-node starts: a change needs a calico-node restart.
//   - "0"/unset is auto: felix writes the smallest MTU of the up links matching its
//     MTUIfacePattern minus 20 (IPIP) to /var/lib/calico/mtu, which the CNI plugin uses
//     when the conflist's "mtu" is 0 (1480 on a 1500-byte link).
//   - Docker UCP/MKE keeps calico_mtu/ipip_mtu in its own configuration file, which the
//     Kubernetes API does not show; its nodes carry com.docker.ucp.* labels.

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
)

// The kinds of Calico installation mtu tells apart.
const (
	InstallOperator = "operator"
	InstallManifest = "manifest"
	InstallUCP      = "ucp"
	InstallUnknown  = "unknown"
)

// Where Calico keeps its pod MTU.
var installationGVR = schema.GroupVersionResource{Group: "operator.tigera.io", Version: "v1", Resource: "installations"}

const (
	installationName      = "default"
	calicoConfigNamespace = "kube-system"
	calicoConfigName      = "calico-config"
	vethMTUKey            = "veth_mtu"
	// ucpLabelPrefix is the prefix of the labels Docker UCP/MKE puts on its Kubernetes
	// nodes (com.docker.ucp.collection, com.docker.ucp.collection.swarm, …).
	ucpLabelPrefix = "com.docker.ucp."
	// ipipOverhead is what Calico's auto-detection takes off the host MTU for IPIP.
	ipipOverhead = 20
	// fieldManager names the CLI's writes in managedFields.
	fieldManager = "secureoverlayctl"
	// calicoNodeSelector selects calico-node pods in manifest and operator installs.
	calicoNodeSelector = "k8s-app=calico-node"
)

// MTUCalico is how Calico was installed, the knob that decides its pod MTU and its value.
type MTUCalico struct {
	// Install is operator, manifest, ucp or unknown; Evidence what it was recognised by.
	Install  string `json:"install"`
	Evidence string `json:"evidence"`
	// Knob names the setting that decides Calico's pod MTU here.
	Knob string `json:"knob"`
	// Known is false when the knob cannot be read through the Kubernetes API (UCP).
	Known bool `json:"known"`
	// Auto: the knob is unset or 0, Calico detects the MTU (host MTU - 20 with IPIP).
	Auto bool `json:"auto"`
	// MTU is the knob's value (0 with Auto or !Known).
	MTU int `json:"mtu,omitempty"`
	// Value is the knob as written (veth_mtu is a string).
	Value string `json:"value,omitempty"`
	// FelixIPIPMTU is FelixConfiguration default's spec.ipipMTU (0: unset); FelixApplies
	// says whether felix uses it in this install; FelixSource names what was read.
	FelixIPIPMTU int    `json:"felixIPIPMTU,omitempty"`
	FelixApplies bool   `json:"felixApplies"`
	FelixSource  string `json:"felixSource"`
	// ChangedAt is when the knob's field was last written (its managedFields entry),
	// ChangedBy by which field manager; nil when unknown.
	ChangedAt *metav1.Time `json:"changedAt,omitempty"`
	ChangedBy string       `json:"changedBy,omitempty"`
	// Notes say what could not be read.
	Notes []string `json:"notes,omitempty"`
}

// calicoState is the detection with the objects it read.
type calicoState struct {
	MTUCalico
	felixChangedAt *metav1.Time
	felixChangedBy string
}

// mtuFor is Calico's pod MTU on a node with external MTU ext (0: unknown), and how it
// came about; 0 when it cannot be known.
func (c *MTUCalico) mtuFor(ext int) (int, string) {
	switch {
	case !c.Known:
		return 0, "unknown"
	case !c.Auto:
		return c.MTU, ""
	case ext == 0:
		return 0, "auto, no external MTU reported"
	}
	return ext - ipipOverhead, fmt.Sprintf("auto: %d - %d", ext, ipipOverhead)
}

// knobOf names the knob of each install.
func knobOf(install string) string {
	switch install {
	case InstallOperator:
		return `Installation default spec.calicoNetwork.mtu (operator.tigera.io/v1)`
	case InstallManifest:
		return `veth_mtu in ConfigMap kube-system/calico-config`
	case InstallUCP:
		return `calico_mtu and ipip_mtu in [cluster_config] of the UCP configuration file`
	}
	return `FelixConfiguration default spec.ipipMTU (if calico-node's environment does not set FELIX_IPINIPMTU) and the CNI config's "mtu"`
}

// shortKnob names the knob of an install in a few words.
func shortKnob(install string) string {
	switch install {
	case InstallOperator:
		return "Installation default spec.calicoNetwork.mtu"
	case InstallManifest:
		return "veth_mtu in kube-system/calico-config"
	case InstallUCP:
		return "UCP's calico_mtu and ipip_mtu"
	}
	return "FelixConfiguration default spec.ipipMTU"
}

// setCommands are the commands that set Calico's pod MTU to mtu in an install (Calico's
// "Configure MTU" page for the operator and the manifest).
func setCommands(install string, mtu int) []string {
	switch install {
	case InstallOperator:
		return []string{fmt.Sprintf(`kubectl patch installation.operator.tigera.io default --type merge -p '{"spec":{"calicoNetwork":{"mtu":%d}}}'`, mtu)}
	case InstallManifest:
		return []string{
			fmt.Sprintf(`kubectl -n kube-system patch configmap calico-config --type merge -p '{"data":{"veth_mtu":"%d"}}'`, mtu),
			"kubectl -n kube-system rollout restart daemonset/calico-node",
		}
	case InstallUCP:
		return []string{fmt.Sprintf(`in the UCP configuration file, [cluster_config]: calico_mtu = "%d" and ipip_mtu = "%d" (UCP applies it)`, mtu, mtu)}
	}
	return []string{fmt.Sprintf(`set Calico's pod MTU to %d the way Calico was installed (operator: Installation spec.calicoNetwork.mtu; manifest: veth_mtu; FelixConfiguration spec.ipipMTU applies only where calico-node's environment does not set FELIX_IPINIPMTU)`, mtu)}
}

// MTUKnob is one kind of installation's knob and how to set it (mtu without a cluster).
type MTUKnob struct {
	Install string   `json:"install"`
	Knob    string   `json:"knob"`
	Set     []string `json:"set"`
}

func allKnobs(mtu int) []MTUKnob {
	var out []MTUKnob
	for _, i := range []string{InstallOperator, InstallManifest, InstallUCP} {
		out = append(out, MTUKnob{Install: i, Knob: knobOf(i), Set: setCommands(i, mtu)})
	}
	return out
}

// detectCalico tells how Calico was installed (operator, UCP, manifest, in that order: an
// operator-managed or UCP-managed Calico may carry a calico-config too, which its manager
// would overwrite) and reads its pod MTU knob. What cannot be read becomes a note.
func (c *clients) detectCalico(ctx context.Context, v *view) (*calicoState, error) {
	st := &calicoState{}
	felix, felixSrc, felixObj, err := c.felixConfiguration(ctx)
	switch {
	case err != nil:
		st.Notes = append(st.Notes, oneLine(err.Error()))
		st.FelixSource = "not read"
	default:
		st.FelixIPIPMTU, st.FelixSource = felix, felixSrc
		if felixObj != nil {
			st.felixChangedAt, st.felixChangedBy = fieldWrittenAt(felixObj.GetManagedFields(), "spec", "ipipMTU")
		}
	}

	inst, err := c.dyn.Resource(installationGVR).Get(ctx, installationName, metav1.GetOptions{})
	switch {
	case err == nil:
		st.Install, st.Evidence, st.Known = InstallOperator, "Installation default (operator.tigera.io/v1) exists", true
		mtu, found, _ := unstructured.NestedFieldNoCopy(inst.Object, "spec", "calicoNetwork", "mtu")
		n, ok := asInt(mtu)
		if found && ok && n > 0 {
			st.MTU, st.Value = n, strconv.Itoa(n)
			st.ChangedAt, st.ChangedBy = fieldWrittenAt(inst.GetManagedFields(), "spec", "calicoNetwork", "mtu")
		} else {
			// Unset: the operator sets no FELIX_IPINIPMTU, so felix takes
			// FelixConfiguration's ipipMTU, else detects.
			st.FelixApplies = true
			st.useFelix()
		}
		st.Knob = knobOf(InstallOperator)
		return st, nil
	case apierrors.IsNotFound(err): // no Installation, or the operator's CRD is not served
	default:
		st.Notes = append(st.Notes, oneLine(c.apiError("get installation.operator.tigera.io default", err).Error()))
	}

	if node, label := ucpNode(v); node != "" {
		st.Install, st.Evidence = InstallUCP, fmt.Sprintf("node %s has UCP's label %s", node, label)
		st.Knob = knobOf(InstallUCP)
		return st, nil
	}

	cm, err := c.cs.CoreV1().ConfigMaps(calicoConfigNamespace).Get(ctx, calicoConfigName, metav1.GetOptions{})
	switch {
	case err == nil:
		st.Install, st.Knob = InstallManifest, knobOf(InstallManifest)
		val, ok := cm.Data[vethMTUKey]
		if !ok {
			// calico-node's FELIX_IPINIPMTU references the key; without it Calico's
			// manifest does not start. Report what is there.
			st.Evidence = "ConfigMap kube-system/calico-config exists (without veth_mtu)"
			st.Known, st.Auto = true, true
			st.Notes = append(st.Notes, "ConfigMap kube-system/calico-config has no veth_mtu: Calico's manifest reads it at calico-node start")
			return st, nil
		}
		st.Evidence, st.Value = "ConfigMap kube-system/calico-config has veth_mtu", val
		st.ChangedAt, st.ChangedBy = fieldWrittenAt(cm.GetManagedFields(), "data", vethMTUKey)
		n, err := strconv.Atoi(strings.TrimSpace(val))
		switch {
		case err != nil || n < 0:
			st.Notes = append(st.Notes, fmt.Sprintf("veth_mtu %q is not a number", val))
		case n == 0:
			st.Known, st.Auto = true, true
		default:
			st.Known, st.MTU = true, n
		}
		return st, nil
	case apierrors.IsNotFound(err):
	default:
		st.Notes = append(st.Notes, oneLine(c.apiError("get configmap kube-system/calico-config", err).Error()))
	}

	st.Install, st.Knob = InstallUnknown, knobOf(InstallUnknown)
	st.Evidence = "no Installation default (operator.tigera.io), no ConfigMap kube-system/calico-config, no node with com.docker.ucp.* labels"
	st.FelixApplies = true
	st.useFelix()
	return st, nil
}

// useFelix makes FelixConfiguration's ipipMTU the value (auto when unset).
func (st *calicoState) useFelix() {
	if st.FelixSource == "not read" {
		return
	}
	st.Known = true
	if st.FelixIPIPMTU > 0 {
		st.MTU, st.Value = st.FelixIPIPMTU, strconv.Itoa(st.FelixIPIPMTU)
		st.ChangedAt, st.ChangedBy = st.felixChangedAt, st.felixChangedBy
		return
	}
	st.Auto = true
}

// ucpNode returns a node with a Docker UCP/MKE label, and the label.
func ucpNode(v *view) (string, string) {
	names := make([]string, 0, len(v.raw))
	for n := range v.raw {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		var keys []string
		for k := range v.raw[n].Labels {
			if strings.HasPrefix(k, ucpLabelPrefix) {
				keys = append(keys, k)
			}
		}
		if len(keys) > 0 {
			sort.Strings(keys)
			return n, keys[0]
		}
	}
	return "", ""
}

func asInt(x any) (int, bool) {
	switch n := x.(type) {
	case int64:
		return int(n), true
	case float64:
		return int(n), true
	case int32:
		return int(n), true
	case int:
		return n, true
	}
	return 0, false
}

// felixConfiguration reads FelixConfiguration default's spec.ipipMTU from the API group
// Calico uses (clients.calico), with the object (nil when absent).
func (c *clients) felixConfiguration(ctx context.Context) (int, string, *unstructured.Unstructured, error) {
	capi, err := c.calico(ctx)
	if err != nil {
		return 0, "", nil, err
	}
	gvr := capi.FelixConfigurations
	if gvr.Resource == "" {
		return 0, "no felixconfigurations in " + capi.GroupVersion, nil, nil
	}
	u, err := c.dyn.Resource(gvr).Get(ctx, "default", metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return 0, "no felixconfiguration default", nil, nil
	}
	if err != nil {
		return 0, "", nil, c.apiError("get felixconfiguration default ("+gvr.GroupVersion().String()+")", err)
	}
	mtu, _, _ := unstructured.NestedFieldNoCopy(u.Object, "spec", "ipipMTU")
	src := "felixconfiguration default (" + gvr.GroupVersion().String() + ")"
	if mtu == nil {
		return 0, src, u, nil
	}
	n, ok := asInt(mtu)
	if !ok {
		return 0, src, u, withCode(ExitNotOK, fmt.Errorf("%s: spec.ipipMTU is %T, not a number", src, mtu))
	}
	return n, src, u, nil
}

// fieldWrittenAt returns the latest time a field manager that owns path wrote the object,
// and that manager: when the knob was last set (an upper bound: a manager's time moves
// with any write of it).
func fieldWrittenAt(mf []metav1.ManagedFieldsEntry, path ...string) (*metav1.Time, string) {
	var at *metav1.Time
	by := ""
	for _, e := range mf {
		if e.FieldsV1 == nil || e.Time == nil {
			continue
		}
		var fields map[string]any
		if json.Unmarshal(e.FieldsV1.Raw, &fields) != nil {
			continue
		}
		m, owns := fields, true
		for _, p := range path {
			next, ok := m["f:"+p].(map[string]any)
			if !ok {
				owns = false
				break
			}
			m = next
		}
		if owns && (at == nil || e.Time.After(at.Time)) {
			t := *e.Time
			at, by = &t, e.Manager
		}
	}
	return at, by
}

// MTUApplied is what mtu --apply changed.
type MTUApplied struct {
	// Object and Field are what was written ("" when nothing was).
	Object string `json:"object,omitempty"`
	Field  string `json:"field,omitempty"`
	From   string `json:"from,omitempty"`
	To     string `json:"to,omitempty"`
	// Changed is false when Calico's MTU already fitted.
	Changed bool   `json:"changed"`
	Detail  string `json:"detail"`
}

// applyCalicoMTU writes mtu into the install's knob (merge patch, field manager
// secureoverlayctl). Only the operator's Installation and the manifest's ConfigMap are
// written: UCP's file is not a Kubernetes object, and FelixConfiguration is inert where
// calico-node's environment sets FELIX_IPINIPMTU (every manifest and every operator
// install with an MTU).
func (c *clients) applyCalicoMTU(ctx context.Context, st *calicoState, mtu int) (MTUApplied, error) {
	from := st.Value
	if st.Auto {
		from = "auto"
		if st.Value != "" {
			from = strconv.Quote(st.Value) + " (auto)"
		}
	}
	switch st.Install {
	case InstallOperator:
		patch := fmt.Sprintf(`{"spec":{"calicoNetwork":{"mtu":%d}}}`, mtu)
		u, err := c.dyn.Resource(installationGVR).Patch(ctx, installationName, types.MergePatchType, []byte(patch), metav1.PatchOptions{FieldManager: fieldManager})
		if err != nil {
			return MTUApplied{}, c.apiError("patch installation.operator.tigera.io default", err)
		}
		st.Auto, st.Known, st.MTU, st.Value, st.FelixApplies = false, true, mtu, strconv.Itoa(mtu), false
		st.ChangedAt, st.ChangedBy = fieldWrittenAt(u.GetManagedFields(), "spec", "calicoNetwork", "mtu")
		return MTUApplied{Object: "installation.operator.tigera.io/default", Field: "spec.calicoNetwork.mtu", From: from, To: strconv.Itoa(mtu), Changed: true,
			Detail: "the operator renders it into calico-node and the CNI config and restarts calico-node itself"}, nil
	case InstallManifest:
		patch := fmt.Sprintf(`{"data":{%q:"%d"}}`, vethMTUKey, mtu)
		cm, err := c.cs.CoreV1().ConfigMaps(calicoConfigNamespace).Patch(ctx, calicoConfigName, types.MergePatchType, []byte(patch), metav1.PatchOptions{FieldManager: fieldManager})
		if err != nil {
			return MTUApplied{}, c.apiError("patch configmap kube-system/calico-config", err)
		}
		st.Auto, st.Known, st.MTU, st.Value = false, true, mtu, strconv.Itoa(mtu)
		st.ChangedAt, st.ChangedBy = fieldWrittenAt(cm.GetManagedFields(), "data", vethMTUKey)
		return MTUApplied{Object: "configmap kube-system/calico-config", Field: "data.veth_mtu", From: from, To: strconv.Quote(strconv.Itoa(mtu)), Changed: true,
			Detail: "calico-node reads veth_mtu when it starts: kubectl -n kube-system rollout restart daemonset/calico-node"}, nil
	case InstallUCP:
		return MTUApplied{}, withCode(ExitNotOK, fmt.Errorf("mtu --apply: Calico is managed by Docker UCP/MKE (%s), whose calico_mtu/ipip_mtu live in the UCP configuration file, not in a Kubernetes object: %s",
			st.Evidence, setCommands(InstallUCP, mtu)[0]))
	}
	return MTUApplied{}, withCode(ExitNotOK, fmt.Errorf("mtu --apply: cannot tell how Calico was installed (%s): %s",
		st.Evidence, setCommands(InstallUnknown, mtu)[0]))
}

// MTURestart lists what still runs with the MTU from before the knob's last change.
type MTURestart struct {
	// Since is the knob's last change: pods created before it keep the old MTU.
	Since metav1.Time `json:"since"`
	// CalicoNodes counts the calico-node pods; CalicoNodesBefore those created before
	// Since (they have not read the new value: new pods on their nodes still get the old
	// MTU until they restart).
	CalicoNodes       int    `json:"calicoNodes"`
	CalicoNodesBefore int    `json:"calicoNodesBefore"`
	CalicoNodeRestart string `json:"calicoNodeRestart,omitempty"`
	// Pods counts the pods on the pod network (not hostNetwork, not finished) created
	// before Since, grouped into Workloads (every one; the text output shows the first).
	Pods      int           `json:"pods"`
	Workloads []MTUWorkload `json:"workloads"`
	// Err says why the pods could not be listed.
	Err string `json:"error,omitempty"`
}

// MTUWorkload is a workload with pods to recreate.
type MTUWorkload struct {
	Namespace string `json:"namespace"`
	// Kind/Name of the owner (a ReplicaSet's Deployment), or Pod/name for a bare pod.
	Kind    string `json:"kind"`
	Name    string `json:"name"`
	Pods    int    `json:"pods"`
	Restart string `json:"restart"`
}

var podsGVR = corev1.SchemeGroupVersion.WithResource("pods")

// podsBefore lists (metadata only, paged) the pods on the pod network created before since,
// and the calico-node pods. Forbidden is reported in Err, not as a failure.
func (c *clients) podsBefore(ctx context.Context, since metav1.Time, install string) *MTURestart {
	r := &MTURestart{Since: since, Workloads: []MTUWorkload{}}
	before := func(m metav1.ObjectMeta) bool { return !m.CreationTimestamp.After(since.Time) }

	nodeNS := ""
	err := c.eachPodMeta(ctx, metav1.ListOptions{LabelSelector: calicoNodeSelector}, func(m metav1.ObjectMeta) {
		r.CalicoNodes++
		nodeNS = m.Namespace
		if before(m) {
			r.CalicoNodesBefore++
		}
	})
	if err != nil {
		r.Err = oneLine(err.Error())
		return r
	}
	if r.CalicoNodesBefore > 0 {
		if install == InstallOperator {
			r.CalicoNodeRestart = "the operator is rolling calico-node; wait for: kubectl -n " + nodeNS + " rollout status daemonset/calico-node"
		} else {
			r.CalicoNodeRestart = "kubectl -n " + nodeNS + " rollout restart daemonset/calico-node"
		}
	}

	type key struct{ ns, kind, name string }
	counts := map[key]int{}
	opts := metav1.ListOptions{FieldSelector: "spec.hostNetwork=false,status.phase!=Succeeded,status.phase!=Failed"}
	err = c.eachPodMeta(ctx, opts, func(m metav1.ObjectMeta) {
		if !before(m) {
			return
		}
		r.Pods++
		kind, name := podOwner(m)
		counts[key{m.Namespace, kind, name}]++
	})
	if err != nil {
		r.Err = oneLine(err.Error())
		return r
	}
	for k, n := range counts {
		w := MTUWorkload{Namespace: k.ns, Kind: k.kind, Name: k.name, Pods: n}
		switch k.kind {
		case "Deployment", "DaemonSet", "StatefulSet":
			w.Restart = fmt.Sprintf("kubectl -n %s rollout restart %s/%s", k.ns, strings.ToLower(k.kind), k.name)
		case "Pod":
			w.Restart = fmt.Sprintf("recreate it (kubectl -n %s delete pod %s, then create it again)", k.ns, k.name)
		default:
			w.Restart = fmt.Sprintf("delete its pods (kubectl -n %s delete pod ...): %s/%s recreates them", k.ns, k.kind, k.name)
		}
		r.Workloads = append(r.Workloads, w)
	}
	sort.Slice(r.Workloads, func(i, j int) bool {
		a, b := r.Workloads[i], r.Workloads[j]
		if a.Namespace != b.Namespace {
			return a.Namespace < b.Namespace
		}
		if a.Kind != b.Kind {
			return a.Kind < b.Kind
		}
		return a.Name < b.Name
	})
	return r
}

// eachPodMeta pages through the pods of every namespace, metadata only.
func (c *clients) eachPodMeta(ctx context.Context, opts metav1.ListOptions, f func(metav1.ObjectMeta)) error {
	opts.Limit = 500
	for {
		l, err := c.meta.Resource(podsGVR).List(ctx, opts)
		if err != nil {
			return c.apiError("list pods (all namespaces)", err)
		}
		for i := range l.Items {
			f(l.Items[i].ObjectMeta)
		}
		if l.Continue == "" {
			return nil
		}
		opts.Continue = l.Continue
	}
}

// podOwner is the workload a pod belongs to: its controller, with a ReplicaSet named
// after its Deployment and pod-template-hash resolved to the Deployment (without reading
// the ReplicaSet); Pod/name for a pod without a controller.
func podOwner(m metav1.ObjectMeta) (string, string) {
	for _, o := range m.OwnerReferences {
		if o.Controller == nil || !*o.Controller {
			continue
		}
		if o.Kind == "ReplicaSet" {
			if h := m.Labels["pod-template-hash"]; h != "" && strings.HasSuffix(o.Name, "-"+h) {
				return "Deployment", strings.TrimSuffix(o.Name, "-"+h)
			}
		}
		return o.Kind, o.Name
	}
	return "Pod", m.Name
}

// changedAgo renders t for the text output.
func changedAgo(t *metav1.Time) string {
	if t == nil {
		return "unknown"
	}
	return t.UTC().Format(time.RFC3339)
}
