package ctl

import (
	rbacv1 "k8s.io/api/rbac/v1"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/nodereport"
)

// operatorClusterRules are the cluster-wide reads of every command (docs/cli.md, RBAC).
func operatorClusterRules(withCalico bool) []rbacv1.PolicyRule {
	r := []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"nodes"}, Verbs: []string{"get", "list"}}}
	if withCalico {
		r = append(r, rbacv1.PolicyRule{APIGroups: []string{"crd.projectcalico.org", "projectcalico.org"},
			Resources: []string{"ippools", "ipamblocks", "blockaffinities", "bgppeers", "felixconfigurations"}, Verbs: []string{"get", "list"}},
			rbacv1.PolicyRule{APIGroups: []string{"migration.projectcalico.org"}, Resources: []string{"datastoremigrations"}, Verbs: []string{"get", "list"}},
			// mtu: Calico's own MTU knob (read by mtu and doctor, patched by mtu --apply)
			// and the pods that predate a change.
			rbacv1.PolicyRule{APIGroups: []string{"operator.tigera.io"}, Resources: []string{"installations"}, ResourceNames: []string{"default"}, Verbs: []string{"get", "patch"}},
			rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"configmaps"}, ResourceNames: []string{"calico-config"}, Verbs: []string{"get", "patch"}},
			rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"list"}})
	}
	return r
}

// operatorNamespaceRules are the operator's rights in the secureoverlay namespace;
// withSecret adds get on the key Secret (the manifest's secureoverlay-operator Role does
// not have it).
func operatorNamespaceRules(withSecret bool) []rbacv1.PolicyRule {
	r := []rbacv1.PolicyRule{
		{APIGroups: []string{""}, Resources: []string{"configmaps"}, Verbs: []string{"create"}},
		{APIGroups: []string{""}, Resources: []string{"configmaps"}, ResourceNames: []string{api.ConfigMapName}, Verbs: []string{"get", "update", "patch"}},
		{APIGroups: []string{""}, Resources: []string{"configmaps"}, ResourceNames: []string{api.StatusConfigMapName}, Verbs: []string{"get"}},
		{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"list"}},
		{APIGroups: []string{""}, Resources: []string{"pods/proxy"}, Verbs: []string{"get"}},
		{APIGroups: []string{nodereport.Group}, Resources: []string{nodereport.Resource, nodereport.StatusResource}, Verbs: []string{"get", "list"}},
	}
	if withSecret {
		r = append(r, rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"secrets"}, ResourceNames: []string{api.SecretName}, Verbs: []string{"get"}})
	}
	return r
}
