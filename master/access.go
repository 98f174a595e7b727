package master

// The public ring and the agents' Secret access (docs/keys.md §11).

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/nodeid"
)

// recheck is how long a public ring or binding the controller wrote is trusted before it
// is read back (an operator may have edited or deleted it; every reconcile reading both
// would add two requests to each of a large cluster's frequent reconciles).
const recheck = 30 * time.Second

// writePublic makes the ConfigMap api.RingConfigMapName hold the public ring of ring:
// with its node table when digest is "", else without it and with the digest of that
// table (api.RingNodesDataKey; docs/keys.md §13). With keep (and digest ""), the ring
// leaves its table out if the ConfigMap already names this table's digest (publicTable).
// Beside it, api.RingMasterDataKey says what this master reads (masterReads).
func (c *Controller) writePublic(ctx context.Context, ring *keys.Ring, digest string, keep bool) error {
	ns := c.opts.Namespace
	reads := c.masterReads()
	form := func(digest string) (map[string]string, string, error) {
		pub := ring
		if digest != "" {
			pub, _ = nodeid.Strip(ring)
		}
		data, err := keys.MarshalPublic(pub)
		if err != nil {
			return nil, "", fmt.Errorf("encode the public ring for configmap %s/%s: %w", ns, api.RingConfigMapName, err)
		}
		want := map[string]string{api.RingDataKey: string(data)}
		if digest != "" {
			want[api.RingNodesDataKey] = digest
		}
		if reads != "" {
			want[api.RingMasterDataKey] = reads
		}
		return want, string(data) + "\x00" + digest + "\x00" + reads, nil
	}
	want, written, err := form(digest)
	if err != nil {
		return err
	}
	now := c.opts.Now()
	if written == c.pubWritten && now.Sub(c.pubChecked) < recheck {
		return nil
	}
	cms := c.client.CoreV1().ConfigMaps(ns)
	cm, err := cms.Get(ctx, api.RingConfigMapName, metav1.GetOptions{})
	switch {
	case apierrors.IsForbidden(err):
		// The master's RBAC predates the public ring (a newer image than the applied
		// manifest): agents without a ConfigMap read the Secret, so nothing is lost.
		if !c.pubForbidden {
			c.log.Warn("cannot read the public ring ConfigMap (the master's RBAC predates it: apply the manifest); agents keep reading the key Secret",
				"configmap", ns+"/"+api.RingConfigMapName, "err", err)
		}
		c.pubForbidden = true
		return nil
	case apierrors.IsNotFound(err):
		cm = &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: api.RingConfigMapName, Namespace: ns,
			Labels: map[string]string{"app.kubernetes.io/name": "secureoverlay", "app.kubernetes.io/component": "ring"}},
			Data: want}
		if _, err := cms.Create(ctx, cm, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("create configmap %s/%s: %w", ns, api.RingConfigMapName, err)
		}
		c.log.Info("public key ring written", "configmap", ns+"/"+api.RingConfigMapName, "ring", keys.Summary(ring))
	case err != nil:
		return fmt.Errorf("get configmap %s/%s: %w", ns, api.RingConfigMapName, err)
	default:
		if have := cm.Data[api.RingNodesDataKey]; keep && digest == "" && have != "" && have == c.table(ring).digest {
			if want, written, err = form(have); err != nil {
				return err
			}
		}
		if !maps.Equal(cm.Data, want) {
			cm = cm.DeepCopy()
			cm.Data = want
			if _, err := cms.Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
				return fmt.Errorf("update configmap %s/%s: %w", ns, api.RingConfigMapName, err)
			}
		}
	}
	c.pubWritten, c.pubChecked, c.pubForbidden = written, now, false
	return nil
}

// masterReads is what the public ring says this master reads (api.RingMasterDataKey):
// api.MasterReadsNodeStatuses once its NodeStatus cache has their list, else nothing
// (an older manifest without their CRD or RBAC) — the agents then keep writing their
// NodeReports, which it reads (docs/keys.md §6).
func (c *Controller) masterReads() string {
	if c.statuses == nil || !c.statuses.HasSynced() {
		return ""
	}
	return api.MasterReadsNodeStatuses
}

// olderAgents lists the nodes whose agent reports but does not declare that it reads the
// public ring (an agent that reads only the Secret, or one that has not written its
// NodeKeys yet: either keeps the access granted).
func (c *Controller) olderAgents(nodes []keys.NodeState) []string {
	return c.agentsLacking(nodes, api.CapabilityRingConfigMap)
}

// agentsLacking lists the nodes whose agent reports but does not declare capability cap in
// its NodeKeys (an older agent, or one that has not written its NodeKeys yet).
func (c *Controller) agentsLacking(nodes []keys.NodeState, cap string) []string {
	var out []string
	for _, n := range nodes {
		if n.Report == nil {
			continue
		}
		if c.pubKeys != nil {
			if k, ok, err := c.pubKeys.Get(n.Name); ok && err == nil && k.Has(cap) {
				continue
			}
		}
		out = append(out, n.Name)
	}
	return out
}

// agentKeyAccess sets the subjects of the RoleBinding api.AgentKeysAccess: the agents'
// ServiceAccount when grant, none otherwise (why is logged with a change). A missing
// binding is not an error: the operator manages the agents' RBAC (logged once).
func (c *Controller) agentKeyAccess(ctx context.Context, grant bool, why string) error {
	ns := c.opts.Namespace
	now := c.opts.Now()
	state := "revoked"
	if grant {
		state = "granted"
	}
	if c.access == state && now.Sub(c.accessChecked) < recheck {
		return nil
	}
	rbs := c.client.RbacV1().RoleBindings(ns)
	rb, err := rbs.Get(ctx, api.AgentKeysAccess, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err) || apierrors.IsForbidden(err):
		if c.access != "unmanaged" {
			c.log.Warn("the agents' Secret access is not managed: no RoleBinding (or the master may not read it); agents keep whatever access their RBAC gives (docs/keys.md §11)",
				"rolebinding", ns+"/"+api.AgentKeysAccess, "err", err)
		}
		c.access, c.accessWhy, c.accessChecked = "unmanaged", "no RoleBinding "+api.AgentKeysAccess+" the master may read", now
		return nil
	case err != nil:
		return fmt.Errorf("get rolebinding %s/%s: %w", ns, api.AgentKeysAccess, err)
	}
	want := []rbacv1.Subject{}
	if grant {
		want = []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: c.opts.AgentServiceAccount, Namespace: ns}}
	}
	if !slices.Equal(rb.Subjects, want) && !(len(rb.Subjects) == 0 && len(want) == 0) {
		rb = rb.DeepCopy()
		rb.Subjects = want
		if _, err := rbs.Update(ctx, rb, metav1.UpdateOptions{}); err != nil {
			return fmt.Errorf("update rolebinding %s/%s: %w", ns, api.AgentKeysAccess, err)
		}
		c.log.Info("agents' access to the key Secret "+state, "rolebinding", ns+"/"+api.AgentKeysAccess, "why", why)
	} else if c.access != state {
		c.log.Info("agents' access to the key Secret is "+state, "rolebinding", ns+"/"+api.AgentKeysAccess, "why", why)
	}
	c.access, c.accessWhy, c.accessChecked = state, why, now
	return nil
}
