package manifests

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/gate"
	"github.com/secureoverlay/secureoverlay/nodereport"
)

var varRef = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)

// readByAPI are ConfigMap keys the master reads through the API instead of flags.
var readByAPI = []string{api.ConfigEnabledKey, api.ConfigModeKey}

// TestManifestInvariants parses manifests/secureoverlay.yaml and checks what must
// hold for every container and object, without an API server.
func TestManifestInvariants(t *testing.T) {
	objs := loadManifest(t)
	checkInvariants(t, objs)
	if dep := deployment(t, objs); dep.Spec.Replicas == nil || *dep.Spec.Replicas != 2 {
		t.Errorf("master: replicas must be 2 in the manifest (overlays/single-node makes it 1)")
	}
	// Installing on a default Calico cluster (pod MTU 1480 > budget 1452) must not stop
	// pods from starting: the shipped plugin mode clamps instead of refusing.
	if m := configMap(t, objs).Data["plugin-mode"]; m != "clamp" {
		t.Errorf("ConfigMap plugin-mode %q, want clamp (enforce refuses every new pod of a default Calico cluster)", m)
	}
}

func checkInvariants(t *testing.T, objs []object) {
	t.Helper()
	ds, dep, cm := daemonSet(t, objs), deployment(t, objs), configMap(t, objs)

	// Names shared with the binaries.
	if cm.Name != api.ConfigMapName || cm.Namespace != api.Namespace {
		t.Errorf("ConfigMap %s/%s, want %s/%s", cm.Namespace, cm.Name, api.Namespace, api.ConfigMapName)
	}
	sec, _ := find(t, objs, "Secret", api.SecretName)
	if sec.ns() != api.Namespace {
		t.Errorf("Secret namespace %s", sec.ns())
	}
	if _, ok := sec.u.Object["data"]; ok {
		t.Errorf("the key Secret must be created without data (the master fills it)")
	}
	if _, ok := sec.u.Object["stringData"]; ok {
		t.Errorf("the key Secret must be created without stringData")
	}
	for _, o := range objs {
		if o.kind() != "Namespace" && o.ns() != "" && o.ns() != api.Namespace {
			t.Errorf("%s outside namespace %s", o, api.Namespace)
		}
		if o.u.GetLabels()["app.kubernetes.io/part-of"] != "secureoverlay" {
			t.Errorf("%s lacks label app.kubernetes.io/part-of=secureoverlay", o)
		}
	}

	type workload struct {
		name string
		spec *corev1.PodSpec
	}
	workloads := []workload{{"DaemonSet/" + ds.Name, &ds.Spec.Template.Spec}, {"Deployment/" + dep.Name, &dep.Spec.Template.Spec}}

	image := ""
	consumed := map[string]bool{}
	for _, w := range workloads {
		if w.spec.HostPID || w.spec.HostIPC {
			t.Errorf("%s: hostPID/hostIPC", w.name)
		}
		if w.spec.SecurityContext == nil || w.spec.SecurityContext.SeccompProfile == nil || w.spec.SecurityContext.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
			t.Errorf("%s: no RuntimeDefault seccomp profile", w.name)
		}
		for _, c := range allContainers(w.spec) {
			where := w.name + "/" + c.Name
			// Image: one image, one tag, everywhere.
			if image == "" {
				image = c.Image
			}
			if c.Image != image {
				t.Errorf("%s: image %s, others use %s", where, c.Image, image)
			}
			if i := strings.LastIndex(c.Image, ":"); i < 0 || strings.Contains(c.Image[i:], "/") || c.Image[i+1:] == "latest" {
				t.Errorf("%s: image %s has no fixed tag", where, c.Image)
			}
			// Resources.
			for _, r := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
				if _, ok := c.Resources.Requests[r]; !ok {
					t.Errorf("%s: no %s request", where, r)
				}
			}
			if _, ok := c.Resources.Limits[corev1.ResourceMemory]; !ok {
				t.Errorf("%s: no memory limit", where)
			}
			// Security.
			sc := c.SecurityContext
			if sc == nil {
				t.Errorf("%s: no securityContext", where)
				continue
			}
			if sc.Privileged == nil || *sc.Privileged {
				t.Errorf("%s: privileged must be set false", where)
			}
			if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
				t.Errorf("%s: allowPrivilegeEscalation must be false", where)
			}
			if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
				t.Errorf("%s: root filesystem must be read-only", where)
			}
			if sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
				t.Errorf("%s: must drop ALL capabilities", where)
			}
			wantAdd := []corev1.Capability(nil)
			if where == "DaemonSet/secureoverlay-agent/agent" {
				wantAdd = []corev1.Capability{"NET_ADMIN"}
			}
			if sc.Capabilities != nil && !slices.Equal(sc.Capabilities.Add, wantAdd) {
				t.Errorf("%s: adds capabilities %v, want %v", where, sc.Capabilities.Add, wantAdd)
			}
			// Command: one of our binaries in the image, every $(VAR) defined in
			// this container (the kubelet leaves an undefined reference verbatim).
			if len(c.Command) == 0 || !strings.HasPrefix(c.Command[0], "/usr/local/bin/secureoverlay") {
				t.Errorf("%s: command %v does not run one of our binaries", where, c.Command)
			}
			env := map[string]corev1.EnvVar{}
			for _, e := range c.Env {
				env[e.Name] = e
				if e.ValueFrom != nil && e.ValueFrom.ConfigMapKeyRef != nil {
					ref := e.ValueFrom.ConfigMapKeyRef
					if ref.Name != api.ConfigMapName {
						t.Errorf("%s: env %s from ConfigMap %s", where, e.Name, ref.Name)
					}
					if _, ok := cm.Data[ref.Key]; !ok {
						t.Errorf("%s: env %s names missing ConfigMap key %q", where, e.Name, ref.Key)
					}
				}
			}
			used := map[string]bool{}
			for _, arg := range append(slices.Clone(c.Command), c.Args...) {
				for _, m := range varRef.FindAllStringSubmatch(arg, -1) {
					if _, ok := env[m[1]]; !ok {
						t.Errorf("%s: argument %q references undefined $(%s)", where, arg, m[1])
					}
					used[m[1]] = true
				}
			}
			for _, e := range c.Env {
				if e.ValueFrom != nil && e.ValueFrom.ConfigMapKeyRef != nil && used[e.Name] {
					consumed[e.ValueFrom.ConfigMapKeyRef.Key] = true
				}
			}
		}
	}
	// Every ConfigMap key reaches a flag (or is read by the master through the API).
	for k := range cm.Data {
		if !consumed[k] && !slices.Contains(readByAPI, k) {
			t.Errorf("ConfigMap key %q is consumed by no container argument", k)
		}
	}
	for _, k := range readByAPI {
		if _, ok := cm.Data[k]; !ok {
			t.Errorf("ConfigMap lacks %q", k)
		}
	}

	// Metrics ports: the ConfigMap's values equal the declared ports the probes use.
	checkPort := func(spec *corev1.PodSpec, container, key string) {
		for _, c := range spec.Containers {
			if c.Name != container {
				continue
			}
			want, err := strconv.Atoi(cm.Data[key])
			if err != nil || len(c.Ports) != 1 || int(c.Ports[0].ContainerPort) != want {
				t.Errorf("%s: ports %v, ConfigMap %s=%q", container, c.Ports, key, cm.Data[key])
			}
			for _, p := range []*corev1.Probe{c.LivenessProbe, c.ReadinessProbe} {
				if p == nil || p.HTTPGet == nil || p.HTTPGet.Port.String() != c.Ports[0].Name {
					t.Errorf("%s: probe %+v does not use the metrics port", container, p)
				}
			}
			if c.LivenessProbe != nil && c.LivenessProbe.HTTPGet.Path != "/healthz" || c.ReadinessProbe != nil && c.ReadinessProbe.HTTPGet.Path != "/readyz" {
				t.Errorf("%s: probes must use /healthz and /readyz", container)
			}
		}
	}
	checkPort(&ds.Spec.Template.Spec, "agent", "agent-metrics-port")
	checkPort(&dep.Spec.Template.Spec, "master", "master-metrics-port")

	// Agent DaemonSet.
	p := &ds.Spec.Template.Spec
	if !p.HostNetwork || p.PriorityClassName != "system-node-critical" {
		t.Errorf("agent: hostNetwork=%v priorityClassName=%q", p.HostNetwork, p.PriorityClassName)
	}
	if !slices.ContainsFunc(p.Tolerations, func(t corev1.Toleration) bool {
		return t.Operator == corev1.TolerationOpExists && t.Key == "" && t.Effect == ""
	}) {
		t.Errorf("agent: does not tolerate every taint")
	}
	if ru := ds.Spec.UpdateStrategy.RollingUpdate; ru == nil || ru.MaxSurge == nil || ru.MaxSurge.IntValue() != 0 {
		t.Errorf("agent: rolling update maxSurge must be 0")
	}
	// Grace: the installer's check + uninstall (10 s + 15 s) and the agent's walk-down
	// (decision timeout + 2 steps + ~1 s) run in parallel; leave 5 s of margin.
	step, err1 := time.ParseDuration(cm.Data["agent-uninstall-step"])
	decision, err2 := time.ParseDuration(cm.Data["agent-uninstall-decision-timeout"])
	if err1 != nil || err2 != nil {
		t.Errorf("agent uninstall durations: %v %v", err1, err2)
	}
	need := max(25*time.Second, decision+2*step+time.Second) + 5*time.Second
	if g := p.TerminationGracePeriodSeconds; g == nil || time.Duration(*g)*time.Second < need {
		t.Errorf("agent: terminationGracePeriodSeconds %v, need at least %v", g, need)
	}
	if len(p.InitContainers) != 1 || !slices.Contains(p.InitContainers[0].Command, "--once") {
		t.Errorf("agent: the installer init container must run --once")
	}
	var sidecar, agent *corev1.Container
	for i := range p.Containers {
		switch {
		case strings.HasSuffix(p.Containers[i].Command[0], "/secureoverlay-install"):
			sidecar = &p.Containers[i]
		case strings.HasSuffix(p.Containers[i].Command[0], "/secureoverlay-agent"):
			agent = &p.Containers[i]
		}
	}
	if sidecar == nil || agent == nil || slices.Contains(sidecar.Command, "--once") {
		t.Fatalf("agent: need an agent container and an installer sidecar without --once")
	}
	fieldEnv := func(c *corev1.Container, name, path string) {
		for _, e := range c.Env {
			if e.Name == name && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == path {
				return
			}
		}
		t.Errorf("%s: env %s from %s missing", c.Name, name, path)
	}
	fieldEnv(agent, "NODE_NAME", "spec.nodeName")
	// GOMEMLIMIT from the agent's own memory limit, in bytes (what Go reads without a unit).
	memLimit := false
	for _, e := range agent.Env {
		if r := e.ValueFrom; e.Name == "GOMEMLIMIT" && r != nil && r.ResourceFieldRef != nil {
			f := r.ResourceFieldRef
			memLimit = f.ContainerName == agent.Name && f.Resource == "limits.memory" && (f.Divisor.IsZero() || f.Divisor.Value() == 1)
		}
	}
	if lim := agent.Resources.Limits.Memory(); !memLimit || lim.IsZero() {
		t.Errorf("%s: want env GOMEMLIMIT from resourceFieldRef limits.memory of this container (in bytes) and a memory limit (%v)", agent.Name, lim)
	}
	for _, c := range []*corev1.Container{agent, sidecar, &p.InitContainers[0]} {
		fieldEnv(c, "POD_NAME", "metadata.name")
		fieldEnv(c, "POD_NAMESPACE", "metadata.namespace")
	}
	// Volumes: CNI dirs as directories; xtables lock; Calico's dir read-only, never
	// a FileOrCreate file.
	vols := map[string]*corev1.HostPathVolumeSource{}
	for _, v := range p.Volumes {
		if v.HostPath == nil {
			t.Errorf("agent: volume %s is not a hostPath", v.Name)
			continue
		}
		vols[v.Name] = v.HostPath
	}
	for name, want := range map[string]corev1.HostPathType{"cni-bin": corev1.HostPathDirectoryOrCreate, "cni-net": corev1.HostPathDirectoryOrCreate,
		"xtables-lock": corev1.HostPathFileOrCreate, "var-lib-calico": corev1.HostPathDirectoryOrCreate, "ledger": corev1.HostPathDirectoryOrCreate,
		"state": corev1.HostPathDirectoryOrCreate} {
		if v := vols[name]; v == nil || v.Type == nil || *v.Type != want {
			t.Errorf("agent: hostPath %s must be %s", name, want)
		}
	}
	mounts := func(c *corev1.Container) map[string]corev1.VolumeMount {
		m := map[string]corev1.VolumeMount{}
		for _, vm := range c.VolumeMounts {
			m[vm.Name] = vm
		}
		return m
	}
	am := mounts(agent)
	if vm, ok := am["var-lib-calico"]; !ok || !vm.ReadOnly {
		t.Errorf("agent: /var/lib/calico must be mounted read-only")
	}
	if vm, ok := am["xtables-lock"]; !ok || vm.ReadOnly || vm.MountPath != "/run/xtables.lock" {
		t.Errorf("agent: /run/xtables.lock must be mounted writable")
	}
	// The SA key ledger must outlive the container (docs/keys.md, "No key twice"), on the
	// node's /run (gone at reboot), at the path the agent is told.
	if vm, ok := am["ledger"]; !ok || vm.ReadOnly || vm.MountPath != "/run/secureoverlay" || vols["ledger"] == nil || vols["ledger"].Path != "/run/secureoverlay" {
		t.Errorf("agent: the ledger hostPath /run/secureoverlay must be mounted writable at /run/secureoverlay")
	}
	if !slices.Contains(agent.Command, "--ledger-dir=/run/secureoverlay") {
		t.Errorf("agent: command must pass --ledger-dir=/run/secureoverlay")
	}
	// The boot gate (package gate): the state file on the node's disk (it must outlive the
	// boot), the ready file in the ledger directory (it must not), both where the CNI
	// plugin looks for them by default.
	if vm, ok := am["state"]; !ok || vm.ReadOnly || vm.MountPath != filepath.Dir(gate.DefaultStateFile) || vols["state"] == nil || vols["state"].Path != filepath.Dir(gate.DefaultStateFile) {
		t.Errorf("agent: the hostPath %s must be mounted writable at the same path", filepath.Dir(gate.DefaultStateFile))
	}
	if !slices.Contains(agent.Command, "--state-file="+gate.DefaultStateFile) || filepath.Join("/run/secureoverlay", "ready.json") != gate.DefaultReadyFile {
		t.Errorf("agent: command must pass --state-file=%s, and its ready file (ready.json in the ledger directory) must be %s", gate.DefaultStateFile, gate.DefaultReadyFile)
	}
	for _, c := range []*corev1.Container{sidecar, &p.InitContainers[0]} {
		m := mounts(c)
		for _, v := range []string{"cni-bin", "cni-net"} {
			if vm, ok := m[v]; !ok || vm.ReadOnly {
				t.Errorf("%s: must mount %s writable", c.Name, v)
			}
		}
		if len(m) != 2 {
			t.Errorf("%s: mounts %v, want only the CNI dirs", c.Name, c.VolumeMounts)
		}
	}
	if len(am) != 4 {
		t.Errorf("agent: mounts %v, want only the xtables lock, Calico's dir, the ledger and the boot gate's state", agent.VolumeMounts)
	}

	// Master Deployment.
	mp := &dep.Spec.Template.Spec
	if dep.Spec.Replicas == nil || (*dep.Spec.Replicas != 2 && *dep.Spec.Replicas != 1) {
		t.Errorf("master: replicas must be 2 (1 on a single node)")
	}
	// The master never depends on the pod network it protects: on the host network it
	// gets no pod IP, so no CNI ADD, so no MTU check can keep it from starting (issue 15:
	// enforce mode refused the master's own pods). It keeps the cluster DNS.
	if !mp.HostNetwork || mp.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
		t.Errorf("master: hostNetwork=%v dnsPolicy=%q, want true and ClusterFirstWithHostNet", mp.HostNetwork, mp.DNSPolicy)
	}
	if mp.SecurityContext.RunAsNonRoot == nil || !*mp.SecurityContext.RunAsNonRoot {
		t.Errorf("master: must run as non-root")
	}
	aff := mp.Affinity
	if aff == nil || aff.NodeAffinity == nil || len(aff.NodeAffinity.PreferredDuringSchedulingIgnoredDuringExecution) == 0 ||
		aff.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution != nil {
		t.Errorf("master: needs preferred (never required) control-plane affinity")
	}
	// Two replicas on one node would both bind the metrics port on the host network:
	// required anti-affinity on the hostname, selecting the master's own pods.
	if aff == nil || aff.PodAntiAffinity == nil || len(aff.PodAntiAffinity.RequiredDuringSchedulingIgnoredDuringExecution) != 1 {
		t.Errorf("master: needs one required pod anti-affinity term")
	} else {
		term := aff.PodAntiAffinity.RequiredDuringSchedulingIgnoredDuringExecution[0]
		if term.TopologyKey != "kubernetes.io/hostname" || term.LabelSelector == nil ||
			term.LabelSelector.MatchLabels["app.kubernetes.io/name"] != dep.Spec.Selector.MatchLabels["app.kubernetes.io/name"] {
			t.Errorf("master: anti-affinity term %+v must select the master's pods by kubernetes.io/hostname", term)
		}
	}
	// On the host network a non-root container without capabilities can bind only ports
	// above 1024 (no NET_BIND_SERVICE): every declared port of a host-network pod.
	for _, w := range workloads {
		if !w.spec.HostNetwork {
			continue
		}
		for _, c := range allContainers(w.spec) {
			for _, p := range c.Ports {
				if p.ContainerPort <= 1024 {
					t.Errorf("%s/%s: port %d on the host network needs NET_BIND_SERVICE", w.name, c.Name, p.ContainerPort)
				}
			}
		}
	}
	if !slices.ContainsFunc(mp.Tolerations, func(t corev1.Toleration) bool { return t.Key == "node-role.kubernetes.io/control-plane" }) {
		t.Errorf("master: does not tolerate the control-plane taint")
	}

	// Order: Namespace first; on `kubectl delete -f` (file order) the workloads go
	// before the Secret/ConfigMap they read and before their ServiceAccounts and
	// RBAC; RBAC goes before the admission policy that limits it.
	_, iDS := find(t, objs, "DaemonSet", ds.Name)
	_, iDep := find(t, objs, "Deployment", dep.Name)
	_, iVAP := find(t, objs, "ValidatingAdmissionPolicy", "secureoverlay-agent-node-report")
	if objs[0].kind() != "Namespace" {
		t.Errorf("the Namespace must come first")
	}
	for i, o := range objs {
		switch o.kind() {
		case "ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "Secret", "ConfigMap":
			if i < iDS || i < iDep {
				t.Errorf("%s comes before the workloads", o)
			}
			// The agent's RBAC (patch nodes) goes before the policy restricting it.
			if o.name() == "secureoverlay-agent" && o.kind() != "ServiceAccount" {
				if i > iVAP {
					t.Errorf("%s comes after the admission policy", o)
				}
			}
		}
	}

	// The NodeReport CRD right after the Namespace (the agents write their reports
	// there from their first sync); the agent's writes to it are limited by an admission
	// policy that comes after the agent's RBAC and matches every write it may make.
	if _, iCRD := find(t, objs, "CustomResourceDefinition", nodereport.Resource+"."+nodereport.Group); iCRD != 1 {
		t.Errorf("the NodeReport CRD is object %d, want 1 (right after the Namespace)", iCRD)
	}
	vapObj, iRepVAP := find(t, objs, "ValidatingAdmissionPolicy", "secureoverlay-agent-nodereport")
	if _, iRole := find(t, objs, "Role", "secureoverlay-agent"); iRole > iRepVAP {
		t.Errorf("the agent's Role comes after the NodeReport admission policy")
	}
	if _, iBind := find(t, objs, "ValidatingAdmissionPolicyBinding", "secureoverlay-agent-nodereport"); iBind < iRepVAP {
		t.Errorf("the NodeReport admission policy has no binding after it")
	}
	vapText := fmt.Sprint(vapObj.u.Object)
	for _, want := range []string{nodereport.Group, nodereport.Resource, "CREATE", "UPDATE", "authentication.kubernetes.io/node-name", "object.metadata.name", "ownerReferences"} {
		if !strings.Contains(vapText, want) {
			t.Errorf("the NodeReport admission policy does not mention %q", want)
		}
	}

	// RBAC: the key Secret only by name for the agent; NodeReports read, created and
	// patched (the policy limits which), never deleted or updated wholesale.
	role := toTyped[rbacv1.Role](t, mustFind(t, objs, "Role", "secureoverlay-agent"))
	sawReports := false
	for _, r := range role.Rules {
		if slices.Contains(r.Resources, nodereport.Resource) {
			sawReports = true
			if !slices.Equal(r.APIGroups, []string{nodereport.Group}) || !slices.Equal(r.Verbs, []string{"get", "list", "watch", "create", "patch"}) {
				t.Errorf("agent Role: nodereports rule %+v, want get, list, watch, create, patch in %s", r, nodereport.Group)
			}
		}
	}
	if !sawReports {
		t.Errorf("agent Role: no nodereports rule")
	}
	// The key Secret is not the agent Role's: it is the master-managed Role and binding
	// api.AgentKeysAccess (docs/keys.md §11), that Secret only, read only.
	keysRole := toTyped[rbacv1.Role](t, mustFind(t, objs, "Role", api.AgentKeysAccess))
	if len(keysRole.Rules) != 1 || !slices.Equal(keysRole.Rules[0].Resources, []string{"secrets"}) ||
		!slices.Equal(keysRole.Rules[0].ResourceNames, []string{api.SecretName}) || !slices.Equal(keysRole.Rules[0].Verbs, []string{"get", "list", "watch"}) {
		t.Errorf("Role %s: %+v, want only get, list, watch on secrets/%s", api.AgentKeysAccess, keysRole.Rules, api.SecretName)
	}
	for _, r := range role.Rules {
		if slices.Contains(r.Resources, "secrets") {
			t.Errorf("agent Role: a secrets rule (the key Secret's access is Role %s, managed by the master): %+v", api.AgentKeysAccess, r)
		}
		if slices.Contains(r.Verbs, "*") || slices.Contains(r.Resources, "*") {
			t.Errorf("agent Role: wildcard rule %+v", r)
		}
	}
	for _, o := range objs {
		if o.kind() == "ClusterRole" || o.kind() == "Role" {
			var rules []rbacv1.PolicyRule
			if o.kind() == "Role" {
				rules = toTyped[rbacv1.Role](t, o).Rules
			} else {
				rules = toTyped[rbacv1.ClusterRole](t, o).Rules
			}
			for _, r := range rules {
				if slices.Contains(r.Verbs, "*") || slices.Contains(r.Resources, "*") || slices.Contains(r.APIGroups, "*") {
					t.Errorf("%s: wildcard rule %+v", o, r)
				}
				if o.kind() == "ClusterRole" && slices.Contains(r.Resources, "secrets") {
					t.Errorf("%s: cluster-wide secrets rule", o)
				}
			}
		}
	}
}

func mustFind(t testing.TB, objs []object, kind, name string) object {
	o, _ := find(t, objs, kind, name)
	return o
}

// TestManifestFlagsExist runs each binary's -h and checks that every flag the
// manifest passes exists (a typo would crash-loop the pods).
func TestManifestFlagsExist(t *testing.T) {
	objs := loadManifest(t)
	ds, dep := daemonSet(t, objs), deployment(t, objs)
	flagName := regexp.MustCompile(`^--?([a-z0-9-]+)`)
	help := map[string]string{}
	for _, c := range append(allContainers(&ds.Spec.Template.Spec), allContainers(&dep.Spec.Template.Spec)...) {
		name := c.Command[0][strings.LastIndex(c.Command[0], "/")+1:]
		if _, ok := help[name]; !ok {
			out, _ := exec.Command(binPath(t, name), "-h").CombinedOutput() // exits 0 or 2
			help[name] = string(out)
		}
		for _, arg := range c.Command[1:] {
			m := flagName.FindStringSubmatch(arg)
			if m == nil {
				t.Errorf("%s: argument %q is not a flag", c.Name, arg)
				continue
			}
			if !strings.Contains(help[name], "  -"+m[1]+" ") && !strings.Contains(help[name], "  -"+m[1]+"\n") {
				t.Errorf("%s: %s has no flag -%s", c.Name, name, m[1])
			}
		}
	}
	if len(help) != 3 {
		t.Errorf("binaries run by the manifest: %v, want agent, master, install", len(help))
	}
}
