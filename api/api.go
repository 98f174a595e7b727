// Package api holds the names and wire formats shared by the master, the agents, the
// installer and the CLI: where the key ring lives, what each agent reports on its Node,
// and the cluster modes. It has no dependencies beyond the standard library so that every
// binary (including the CNI plugin) may import it.
//
// Ownership (one writer per object):
//   - Secret Namespace/SecretName, data key SecretDataKey: written only by the master; it
//     holds the key ring AND the cluster mode the master has set, so agents always see keys
//     and mode as one consistent snapshot. Agents read its public projection, the
//     ConfigMap RingConfigMapName, and the Secret only while that withholds a v1 root.
//   - Node annotation ReportAnnotation: written only by the agent on that Node, and only
//     after the kernel holds what the report claims (program before advertise).
//   - ConfigMap ConfigMapName: operator settings (written by kubectl/the CLI); the master
//     reads the desired state (enabled/disabled) and request annotations from it.
//   - ConfigMap StatusConfigMapName: written only by the master, its view for CLI/metrics.
package api

import (
	"encoding/json"
	"time"
)

const (
	// Namespace is the default namespace of every secureoverlay object.
	Namespace = "secureoverlay"
	// SecretName is the Secret that holds the key ring (like UCP's ucp-secureoverlay Secret).
	SecretName = "keys"
	// SecretDataKey is the single data key inside SecretName.
	SecretDataKey = "keys"
	// ConfigMapName holds the operator's settings.
	ConfigMapName = "secureoverlay-config"
	// StatusConfigMapName holds the master's published view.
	StatusConfigMapName = "secureoverlay-status"

	// RingConfigMapName holds the public ring (docs/keys.md §11): the Secret's ring with
	// every v1 root withheld ("sealed"). Written only by the master; agents read it.
	RingConfigMapName = "secureoverlay-ring"
	// RingDataKey is the data key inside RingConfigMapName that holds the public ring.
	RingDataKey = "ring"
	// RingNodesDataKey, beside it, names the node table a ring without one goes with: the
	// digest of the NodeIDs (nodeid.Digest; docs/keys.md §13), written only with a ring
	// that leaves its table out.
	RingNodesDataKey = "nodes"
	// RingMasterDataKey, beside the ring, lists what the master that wrote it reads of the
	// agents' objects, space-separated (docs/keys.md §6): agents leave the NodeReport to
	// their NodeStatus only under a master that names MasterReadsNodeStatuses. An older
	// master writes no such key (and removes it: it writes the whole data).
	RingMasterDataKey = "master"
	// MasterReadsNodeStatuses in RingMasterDataKey says the master takes each node's report
	// from its NodeStatus as well as its NodeReport (its NodeStatus cache lists them).
	MasterReadsNodeStatuses = "node-status"
	// AgentKeysAccess names the Role and RoleBinding that let agents read the Secret; the
	// master sets the binding's subjects (granted while a v1 generation or an agent that
	// reads only the Secret needs it, else none).
	AgentKeysAccess = "secureoverlay-agent-keys"
	// AgentServiceAccount is the agents' ServiceAccount in Namespace.
	AgentServiceAccount = "secureoverlay-agent"
	// CapabilityRingConfigMap in an agent's NodeKeys says it reads the public ring.
	CapabilityRingConfigMap = "ring-configmap"
	// CapabilityReadinessRows in an agent's NodeKeys says it publishes its readiness row
	// (NodeRow) and takes its peers' (docs/keys.md §12): once every agent does, the master
	// writes a node's NodeView only in its own re-key phase.
	CapabilityReadinessRows = "readiness-rows"
	// CapabilityReadinessDecide in an agent's NodeKeys says its kernel follows its NodeView
	// and its peers' rows as well as their reports' per-peer lists (docs/protocol-v2.md §9
	// step 3): once every agent does, the lists can go (step 4).
	CapabilityReadinessDecide = "readiness-decide"
	// CapabilityInstalled in an agent's NodeKeys says its field installed lists the
	// generations its kernel holds inbound SAs of (docs/keys.md §10; docs/protocol-v2.md
	// §9 step 5).
	CapabilityInstalled = "installed"
	// CapabilityNodeStatus in an agent's NodeKeys says it reads what an agent that writes
	// its report only as a NodeStatus leaves for the others (docs/keys.md §6): a
	// superseded NodeReport as none, such a peer's key incarnation, mode and generations
	// from its NodeKeys, and its own last report from its NodeStatus too. Once every live
	// agent declares it, agents may stop writing NodeReports (docs/protocol-v2.md §9
	// step 5).
	CapabilityNodeStatus = "node-status"
	// CapabilityNodeIDs in an agent's NodeKeys says it reads the node table from the
	// NodeIDs (their list is in): once every reporting agent declares it, the master writes
	// the public ring without its table (docs/keys.md §13).
	CapabilityNodeIDs = "node-ids"
	// CapabilityLanes in an agent's NodeKeys says it installs inbound states for its peers'
	// per-CPU lanes, and that its field lanes is the count it sends on in its incarnation
	// (docs/dataplane.md §10). The capabilities list is written whole, so an older agent
	// rolled back to drops it; the field alone would stay.
	CapabilityLanes = "lanes"
	// NodeTableIDs and NodeTableRing are MasterStatus.NodeTable's values.
	NodeTableIDs  = "nodeids"
	NodeTableRing = "ring"

	// ReportAnnotation is the agent's JSON NodeReport on its own Node.
	ReportAnnotation = "secureoverlay.io/report"
	// RotateRequestAnnotation on ConfigMapName asks the master for a rotation; its value is
	// an opaque request ID (the CLI uses an RFC 3339 timestamp). The master rotates once per
	// distinct value and records the value it handled in its status.
	RotateRequestAnnotation = "secureoverlay.io/rotate-request"

	// ConfigEnabledKey in ConfigMapName: "true" enables encryption (target mode enforce),
	// "false" disables it (target mode off).
	ConfigEnabledKey = "enabled"
	// ConfigModeKey in ConfigMapName, optional: an explicit target mode (off, accept,
	// encrypt, enforce) that overrides ConfigEnabledKey, e.g. to stop a rollout at accept.
	ConfigModeKey = "mode"
	// StatusDataKey in StatusConfigMapName holds the master's MasterStatus as JSON.
	StatusDataKey = "status"
	// ResetRingAnnotation on the Secret lets the master overwrite a key ring it cannot
	// parse (with its last good ring, or a new empty one). Without it the master refuses
	// to touch invalid data.
	ResetRingAnnotation = "secureoverlay.io/reset-ring"

	// Calico KDD node annotations the agent reads.
	CalicoIPv4AddressAnnotation = "projectcalico.org/IPv4Address"
	CalicoIPIPTunnelAnnotation  = "projectcalico.org/IPv4IPIPTunnelAddr"
)

// Mode is a cluster (or node) cutover mode. The order is the enable order; disable walks it
// backwards, and every step is gated on every live agent reporting the previous one.
type Mode string

const (
	ModeOff     Mode = "off"     // no SAs, no policies, plaintext IPIP
	ModeAccept  Mode = "accept"  // inbound SAs installed; plaintext still accepted and sent
	ModeEncrypt Mode = "encrypt" // outbound ESP to peers that report ready; plaintext accepted
	ModeEnforce Mode = "enforce" // plaintext IPIP to/from encrypting peers dropped both ways
)

// Modes lists the modes in enable order.
var Modes = []Mode{ModeOff, ModeAccept, ModeEncrypt, ModeEnforce}

// Rank is the position of m in Modes, or -1 if m is not a mode.
func (m Mode) Rank() int {
	for i, x := range Modes {
		if x == m {
			return i
		}
	}
	return -1
}

// Valid reports whether m is one of Modes.
func (m Mode) Valid() bool { return m.Rank() >= 0 }

// NodeReport is what an agent publishes in ReportAnnotation on its own Node. It must never
// contain key material.
type NodeReport struct {
	// Mode is the cutover mode this node's kernel state implements.
	Mode Mode `json:"mode"`
	// Generations are the key generations whose inbound SAs are installed for every peer.
	Generations []uint32 `json:"generations,omitempty"`
	// Sending are the key generations this node's outbound SAs use (as applied). The master
	// removes a retiring generation before --grace is over once no live node sends with it.
	Sending []uint32 `json:"sending,omitempty"`
	// Incarnation is the boot ID of the node when the report was made (a report whose
	// Incarnation differs from status.nodeInfo.bootID is stale).
	Incarnation string `json:"incarnation,omitempty"`
	// UID is the Node object's metadata.uid the report was made for: a Node deleted and
	// re-created (same name, same boot) has another UID, so its old report is stale.
	UID string `json:"uid,omitempty"`
	// Epoch is the agent's current SA epoch (random hex, never key material). The node's
	// key-derivation incarnation is Incarnation, UID and Epoch together (docs/keys.md,
	// "Incarnations and epochs"); the agent picks a new epoch whenever an SA it installed
	// is lost, so no SA is ever re-created under a key it used before. A report without
	// an epoch (an agent predating epochs) is not used for key derivation.
	Epoch string `json:"epoch,omitempty"`
	// BudgetMTU is the largest pod/tunnel MTU that fits this node's encryption budget, and
	// ExternalMTU the external MTU it was computed from.
	BudgetMTU   int `json:"budgetMTU,omitempty"`
	ExternalMTU int `json:"externalMTU,omitempty"`
	// MaxSeqFraction is the highest outbound ESP sequence number of any SA as a fraction of
	// the rotation threshold (0..1); the master rotates early when it nears 1.
	MaxSeqFraction float64 `json:"maxSeqFraction,omitempty"`
	// SeqGeneration is the key generation of the SA MaxSeqFraction was measured on (0 if
	// unknown). The master only rotates early for the active generation's SAs, so a high
	// count on a retiring SA after a rotation does not trigger another one.
	SeqGeneration uint32 `json:"seqGeneration,omitempty"`
	// MaxInSeqFraction is the highest inbound ESP sequence number this node's kernel has
	// received and authenticated on any inbound SA, as the same fraction; InSeqGeneration
	// that SA's generation. The master takes a peer's MaxSeqFraction only when another
	// node's inbound counters confirm it (docs/keys.md §5). A pointer: always present in a
	// current agent's report (0 included), absent in 0.1's.
	MaxInSeqFraction *float64 `json:"maxInSeqFraction,omitempty"`
	InSeqGeneration  uint32   `json:"inSeqGeneration,omitempty"`
	// Peers counts peers with outbound encryption programmed and peers expected.
	PeersEncrypted int `json:"peersEncrypted"`
	PeersExpected  int `json:"peersExpected"`
	// LastSync is when the kernel last matched the desired state; Error is the last sync error.
	LastSync time.Time `json:"lastSync,omitempty"`
	Error    string    `json:"error,omitempty"`
	// CalicoAPI is the Calico group-version the agent read ("crd.projectcalico.org/v1" or
	// "projectcalico.org/v3"; "A→B" while it switches and still serves A's last data).
	CalicoAPI string `json:"calicoAPI,omitempty"`
	// Neighbours lists, as short codes from a fixed set (desired.Neighbour*), the Calico
	// modes found that the agent does not cover or that change what it covers: vxlan-pool,
	// unencapsulated, ipv6, virtual-affinity, wireguard, ebpf, nftables.
	Neighbours []string `json:"neighbours,omitempty"`
	// Readiness is protocol v2's per-pair readiness in constant size (docs/protocol-v2.md
	// §6, §9 step 1): digests of the same claims InboundFrom and EncryptingTo list. The
	// summary annotation keeps it; for now the master only checks it (shadow).
	Readiness *ReadinessStatus `json:"readiness,omitempty"`
	// ListsOmitted: the agent writes neither per-peer list (inboundFrom, encryptingTo; the
	// agent's extension of this report, watch.Report): docs/protocol-v2.md §9 step 4 —
	// every live peer decides from NodeViews and NodeRows — so their absence says nothing
	// about its pairs. An older agent reading such a report sees empty lists: the gate
	// keeps them while any live agent may read them. Here rather than in watch.Report
	// because the rule for key incarnations (watch.NodeKeyIncarnation), which the master
	// applies too, asks whether a report lists.
	ListsOmitted bool `json:"listsOmitted,omitempty"`
	// Superseded marks a NodeReport that is not its agent's report any more: the agent
	// writes its report as a NodeStatus, which only the master and the CLI read, and left
	// this one behind when no live peer read NodeReports (docs/keys.md §6;
	// docs/protocol-v2.md §9 step 5). Every reader takes such a report as none: not for
	// the node's key incarnation, mode or generations, and not as a sign that an agent
	// runs there (an agent declaring api.CapabilityNodeStatus in its NodeKeys is). Written
	// with ListsOmitted, so a reader that predates the field reads no stale list.
	Superseded bool `json:"superseded,omitempty"`
}

// ReadinessStatus is a node's per-pair readiness as digests (package readiness). It holds
// no key material: key digests are hashes of key incarnations, which are public.
type ReadinessStatus struct {
	// ID is the node's ID in the ring the claims were made with.
	ID uint32 `json:"id"`
	// Self is the digest of the node's own key incarnation (16 hex digits).
	Self string `json:"self"`
	// In and Out are the bucket digests (6 bytes each, base64) of the peers the node holds
	// inbound SAs from, and sends ESP to, each with the digest of the key incarnation the
	// SAs were derived with.
	In  string `json:"in"`
	Out string `json:"out"`
	// Refused are the IDs of peers the node knows but does not program (at most
	// readiness.MaxRefused; RefusedMore counts the rest).
	Refused     []uint32 `json:"refused,omitempty"`
	RefusedMore int      `json:"refusedMore,omitempty"`
	// Used, in a report only (never in a NodeRow), is the digest (16 hex digits;
	// readiness.View.Digest: its key digest and lists) of the last NodeView the agent used,
	// or UsedNone: the master weighs the view it holds for the node by it (docs/keys.md
	// §12). Absent from an older agent's report.
	Used string `json:"used,omitempty"`
}

// UsedNone in ReadinessStatus.Used: the agent has used no NodeView since it started.
const UsedNone = "none"

// ReadinessView is what the master tells one node about its pairs (protocol v2's
// NodeView, docs/protocol-v2.md §6, §9 step 2; package readiness): the peers not yet
// confirmed to hold inbound SAs from it, and to send it ESP, relative to the master's key
// view whose digest is Keys. Node IDs and digests of public key incarnations only.
type ReadinessView struct {
	// Keys is the digest of the master's key view (16 hex digits).
	Keys string `json:"keys"`
	// NotIn and NotOut are node IDs, ascending, as base64 of unsigned varints, each the
	// difference to the previous ID (the first from 0).
	NotIn  string `json:"notIn,omitempty"`
	NotOut string `json:"notOut,omitempty"`
}

// MasterStatus is the master's published view (StatusConfigMapName, key StatusDataKey).
// It never contains key material.
type MasterStatus struct {
	// Leader is the identity of the master replica that wrote this status.
	Leader string `json:"leader"`
	// Mode is the cutover step the master has set; Target is where it is heading.
	Mode   Mode `json:"mode"`
	Target Mode `json:"target"`
	// ActiveGeneration and PendingGeneration are 0 when there is none.
	ActiveGeneration  uint32             `json:"activeGeneration"`
	PendingGeneration uint32             `json:"pendingGeneration,omitempty"`
	Generations       []GenerationStatus `json:"generations"`
	// RotationInProgress is true while a generation is pending or retiring.
	RotationInProgress bool `json:"rotationInProgress"`
	// Waiting says which step the master waits for; Lagging lists the live nodes holding
	// it; Excluded lists nodes NotReady longer than the node timeout, which do not block.
	Waiting  string        `json:"waiting,omitempty"`
	Lagging  []NodeLagging `json:"lagging,omitempty"`
	Excluded []NodeLagging `json:"excluded,omitempty"`
	// Deferred explains a rotation that is due but waits for another to finish.
	Deferred string `json:"deferred,omitempty"`
	// LastRotateRequest is the last RotateRequestAnnotation value the master acted on.
	LastRotateRequest string `json:"lastRotateRequest,omitempty"`
	// LastGeneration and GenerationFloor are the key ring history the master has seen
	// (keys.History): a Secret whose lastGeneration is below LastGeneration, or that holds
	// a generation below GenerationFloor, went backwards (restored from an old copy) and
	// is refused. A master that starts reads them back.
	LastGeneration  uint32 `json:"lastGeneration,omitempty"`
	GenerationFloor uint32 `json:"generationFloor,omitempty"`
	// Nodes is how many node IDs the ring assigns.
	Nodes int `json:"nodes"`
	// AgentSecretAccess is the agents' read access to the key Secret as the master last
	// set it (docs/keys.md §11): granted, revoked or unmanaged (no RoleBinding
	// AgentKeysAccess); AgentSecretAccessWhy says why ("" before the first reconcile).
	AgentSecretAccess    string `json:"agentSecretAccess,omitempty"`
	AgentSecretAccessWhy string `json:"agentSecretAccessWhy,omitempty"`
	// NodeTable is where the public ring's node table is (docs/keys.md §13): NodeTableIDs
	// (the ring leaves it to the NodeID objects) or NodeTableRing (the ring carries it);
	// NodeTableWhy says why it is in the ring ("" before the first decision).
	NodeTable    string `json:"nodeTable,omitempty"`
	NodeTableWhy string `json:"nodeTableWhy,omitempty"`
	// LastError is the last reconcile error (e.g. a key ring the master refuses), "" if
	// the last reconcile succeeded.
	LastError string `json:"lastError,omitempty"`
}

// GenerationStatus describes one live key generation (never its key).
type GenerationStatus struct {
	Number    uint32    `json:"number"`
	State     string    `json:"state"`
	Cipher    string    `json:"cipher"`
	Reason    string    `json:"reason,omitempty"`
	Created   time.Time `json:"created"`
	Activated time.Time `json:"activated,omitzero"`
	Retiring  time.Time `json:"retiring,omitzero"`
}

// NodeLagging is a node and why it holds (or no longer holds) a step.
type NodeLagging struct {
	Node   string `json:"node"`
	Reason string `json:"reason"`
}

// TrimReport returns the report annotation raw with its per-peer claims (the
// "inboundFrom" and "encryptingTo" objects, peer name → incarnation tag) cut down to
// the entry of peer keep, or removed when keep is "". Every other field is kept verbatim.
// An agent reads only what a peer's report says about itself and the master reads none
// of the per-peer claims, while each report lists every peer: trimmed in the informers'
// caches, a cluster's reports cost each agent O(nodes) memory instead of O(nodes²).
// With keep set (a reader that needs one peer's claims: an agent about itself, `status
// --node`) the readiness digests go too: they are for the master, and an agent keeping
// every peer's would hold ≈ 600 bytes per peer for nothing.
// raw is returned unchanged when it is not a JSON object (whoever parses it reports why).
func TrimReport(raw, keep string) string {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal([]byte(raw), &fields); err != nil || fields == nil {
		return raw
	}
	if keep != "" {
		delete(fields, "readiness")
	}
	for _, name := range []string{"inboundFrom", "encryptingTo"} {
		claims, ok := fields[name]
		if !ok {
			continue
		}
		var m map[string]json.RawMessage
		if err := json.Unmarshal(claims, &m); err != nil {
			return raw
		}
		tag, found := m[keep]
		if keep == "" || !found {
			delete(fields, name)
			continue
		}
		b, err := json.Marshal(map[string]json.RawMessage{keep: tag})
		if err != nil {
			return raw
		}
		fields[name] = b
	}
	b, err := json.Marshal(fields)
	if err != nil {
		return raw
	}
	return string(b)
}
