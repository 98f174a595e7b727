package plugin

import (
	"errors"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
)

// calicoDefault is the verdict on a pod of a default Calico install: IPIP pod MTU 1480
// (felix: 1500-byte uplink minus 20) against the budget 1452 (external 1500, ICV 8).
var calicoDefault = verdict{Iface: "eth0", MTU: 1480, Budget: 1452, External: 1500, Source: "link eth0", ICV: 8}

// knobWords must appear in every message about a pod over the budget: the real knob of
// each kind of Calico installation, and the command that tells which one this cluster has.
var knobWords = []string{
	"1452",
	"Installation default spec.calicoNetwork.mtu",      // operator
	"veth_mtu in ConfigMap kube-system/calico-config",  // manifest
	"restart calico-node",                              // manifest: read at calico-node start
	"Docker UCP/MKE: calico_mtu and ipip_mtu",          // UCP, named as UCP's
	`"secureoverlayctl mtu" names this cluster's knob`, // detection
	`"secureoverlayctl mtu --apply" sets it`,           // the fix path
}

func checkMessage(t *testing.T, what, msg string, extra ...string) {
	t.Helper()
	for _, w := range append(append([]string{}, knobWords...), extra...) {
		if !strings.Contains(msg, w) {
			t.Errorf("%s: message lacks %q:\n%s", what, w, msg)
		}
	}
	// UCP's names are never presented as the fix for plain Calico (issue 14: the old
	// message said `fix: set calico_mtu = "1452" and ipip_mtu = "1452"`).
	if strings.Contains(msg, "set calico_mtu") || strings.Contains(msg, `calico_mtu = "`) {
		t.Errorf("%s: message still tells plain Calico users to set UCP's calico_mtu:\n%s", what, msg)
	}
	if strings.ContainsAny(msg, "\n\r") {
		t.Errorf("%s: message spans lines:\n%s", what, msg)
	}
}

// TestDefaultModeIsClamp: an entry without "mode" clamps. Enforce refused every new pod of
// a default Calico cluster (issue 14/15), the master's own included.
func TestDefaultModeIsClamp(t *testing.T) {
	for _, in := range []string{
		`{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"secureoverlay"}`,
		`{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"secureoverlay","mode":""}`,
	} {
		conf, err := ParseConfig([]byte(in))
		if err != nil {
			t.Fatal(err)
		}
		if conf.Mode != ModeClamp || DefaultMode != ModeClamp {
			t.Errorf("%s: mode %q, want clamp", in, conf.Mode)
		}
	}
}

// TestMessagesNameCalicosKnobs: the refusal (enforce ADD), the CHECK failure (enforce and
// clamp), the warn line and the clamp line each name the knob of every kind of Calico
// installation and `secureoverlayctl mtu`, on one line.
func TestMessagesNameCalicosKnobs(t *testing.T) {
	var e *types.Error
	if err := refusal(calicoDefault); !errors.As(err, &e) || e.Code != ErrMTUOverBudget {
		t.Fatalf("refusal: %v, want CNI error %d", err, ErrMTUOverBudget)
	}
	checkMessage(t, "enforce ADD", e.Msg, "pod interface eth0 has mtu 1480, ipsec budget 1452",
		"exceeds the budget by 28 bytes", `plugin mode "enforce" refuses the pod`, `plugin-mode "clamp" (the default)`)

	if err := checkFailure(calicoDefault); !errors.As(err, &e) || e.Code != ErrMTUOverBudget {
		t.Fatalf("check failure: %v, want CNI error %d", err, ErrMTUOverBudget)
	}
	checkMessage(t, "CHECK", e.Msg, "mtu 1480", "started before secureoverlay", "recreate it")
	if strings.Contains(e.Msg, "refuses") {
		t.Errorf("CHECK (enforce and clamp) must not say the pod is refused: %s", e.Msg)
	}

	checkMessage(t, "warn ADD", warnLine("container", "c0ffee", calicoDefault),
		"warn: container c0ffee", "keeps mtu 1480", "path-MTU discovery")
	checkMessage(t, "warn CHECK", warnLine("check container", "c0ffee", calicoDefault), "warn: check container c0ffee")
	checkMessage(t, "clamp", clampLine("c0ffee", calicoDefault),
		"clamp: container c0ffee", "lowered to 1452", "host end of its veth", "Calico's own MTU is unchanged")
}
