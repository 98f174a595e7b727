package ctl

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	v3 "github.com/projectcalico/api/pkg/apis/projectcalico/v3"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/budget"
)

// runBare runs the CLI without the test cluster's kubeconfig.
func runBare(t *testing.T, args ...string) result {
	t.Helper()
	var out, errb bytes.Buffer
	c := &CLI{Now: func() time.Time { return fixedNow }, Links: fakeLinks}
	code := c.Run(context.Background(), args, &out, &errb)
	return result{stdout: out.String(), stderr: errb.String(), code: code}
}

func fakeLinks() ([]budget.LinkInfo, error) {
	return []budget.LinkInfo{
		{Name: "lo", MTU: 65536, OperState: budget.OperUnknown, AdminUp: true, LowerUp: true},
		{Name: "eth0", MTU: 1500, OperState: budget.OperUp, AdminUp: true, LowerUp: true},
		{Name: "ens5", MTU: 1450, OperState: budget.OperUp, AdminUp: true, LowerUp: true},
		{Name: "tunl0", MTU: 1480, OperState: budget.OperUnknown, AdminUp: true, LowerUp: true},
		{Name: "eth9", MTU: 1280, OperState: "down"},
	}, nil
}

// oneErrorLine checks the bad-input contract: stdout empty, stderr exactly one line
// "error: …", no stack trace, and the documented exit code.
func oneErrorLine(t *testing.T, what string, r result, code int, says string) {
	t.Helper()
	if r.code != code {
		t.Errorf("%s: exit %d, want %d\n%s", what, r.code, code, r)
	}
	if r.stdout != "" {
		t.Errorf("%s: stdout not empty:\n%s", what, r)
	}
	if !strings.HasPrefix(r.stderr, "error: ") || strings.Count(r.stderr, "\n") != 1 || !strings.HasSuffix(r.stderr, "\n") {
		t.Errorf("%s: stderr is not one error line:\n%s", what, r)
	}
	for _, bad := range []string{"goroutine ", "panic", ".go:"} {
		if strings.Contains(r.stderr, bad) {
			t.Errorf("%s: stderr looks like a stack trace:\n%s", what, r)
		}
	}
	if !strings.Contains(r.stderr, says) {
		t.Errorf("%s: stderr does not say %q:\n%s", what, says, r)
	}
}

func writeKubeconfig(t *testing.T, server, caB64, token string) string {
	t.Helper()
	cluster := fmt.Sprintf("server: %q", server)
	if caB64 != "" {
		cluster += ", certificate-authority-data: " + caB64
	}
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {%s}
contexts:
- name: c
  context: {cluster: c, user: u}
current-context: c
users:
- name: u
  user: {token: %q}
`, cluster, token)
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(path, []byte(kc), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func closedPort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// TestBadInputOffline: usage errors and an unreachable API server, each one clear line
// and its documented exit code.
func TestBadInputOffline(t *testing.T) {
	t.Setenv("HOME", t.TempDir())
	t.Setenv("KUBECONFIG", "")
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	t.Setenv("KUBERNETES_SERVICE_PORT", "")
	usage := []struct {
		args []string
		says string
	}{
		{[]string{"--bogus"}, "unknown flag: --bogus (see 'secureoverlayctl --help')"},
		{[]string{"status", "--bogus"}, "unknown flag: --bogus"},
		{[]string{"status", "-x"}, "unknown shorthand flag: 'x' in -x"},
		{[]string{"stauts"}, `unknown command "stauts" for "secureoverlayctl" Did you mean this? status`},
		{[]string{"status", "extra"}, `unknown command "extra" for "secureoverlayctl status"`},
		{[]string{"status", "-o", "xml"}, `invalid output format "xml" (want table, wide, json, yaml)`},
		{[]string{"doctor", "-o", "wide"}, `invalid output format "wide" (want table, json, yaml)`},
		{[]string{"mtu", "--icv-bytes", "7"}, "invalid --icv-bytes 7 (want 8, 12 or 16)"},
		{[]string{"mtu", "--external-mtu", "abc"}, `invalid argument "abc" for "--external-mtu" flag`},
		{[]string{"mtu", "--external-mtu", "100", "--offline"}, "external mtu 100 out of range [576, 65535]"},
		{[]string{"mtu", "--interface-pattern", "(", "--offline"}, "invalid --interface-pattern"},
		{[]string{"enable", "--mode", "sideways"}, `invalid --mode "sideways" (want off, accept, encrypt or enforce)`},
		{[]string{"enable", "--timeout", "soon"}, `invalid argument "soon" for "--timeout" flag`},
		{[]string{"doctor", "--node-selector", "a b c"}, "invalid --node-selector"},
	}
	for _, u := range usage {
		oneErrorLine(t, strings.Join(u.args, " "), runBare(t, u.args...), ExitUsage, u.says)
	}

	for _, args := range [][]string{{"status"}, {"doctor"}, {"rotate"}, {"enable"}, {"disable"}} {
		oneErrorLine(t, "no kubeconfig: "+args[0], runBare(t, args...), ExitUnreachable, "no kubeconfig: use --kubeconfig or set KUBECONFIG")
	}
	oneErrorLine(t, "missing kubeconfig file", runBare(t, "--kubeconfig", "/nonexistent/kubeconfig", "status"), ExitUnreachable,
		"load kubeconfig: stat /nonexistent/kubeconfig: no such file or directory")
	addr := closedPort(t)
	kc := writeKubeconfig(t, "https://"+addr, "", "x")
	for _, args := range [][]string{{"status"}, {"status", "--node", "node-a"}, {"doctor"}, {"rotate"}, {"enable", "--wait"}, {"disable"}, {"mtu", "--external-mtu", "1500"}} {
		r := runBare(t, append([]string{"--kubeconfig", kc}, args...)...)
		if args[0] == "mtu" {
			// mtu prints the offline arithmetic first, then the one error line.
			if !strings.Contains(r.stdout, "enforced budget     1452") {
				t.Errorf("mtu with an unreachable cluster still computes offline:\n%s", r)
			}
			r.stdout = ""
		}
		oneErrorLine(t, "unreachable: "+strings.Join(args, " "), r, ExitUnreachable, "cannot reach the API server https://"+addr+": dial tcp "+addr+": connect: connection refused")
	}
	oneErrorLine(t, "unknown context", runBare(t, "--kubeconfig", kc, "--context", "prod", "status"), ExitUnreachable, `load kubeconfig: context "prod" does not exist`)
}

// TestBadInputCluster: missing RBAC and bad credentials against the real API server.
func TestBadInputCluster(t *testing.T) {
	e := newEnv(t)
	e.healthyCluster()
	for _, args := range [][]string{{"status"}, {"status", "--node", "node-a"}, {"doctor"}, {"rotate"}, {"enable"}, {"disable", "--wait"}, {"mtu", "--external-mtu", "1500"}} {
		r := e.run(append([]string{"--as", "nobody"}, args...)...)
		if args[0] == "mtu" {
			r.stdout = ""
		}
		oneErrorLine(t, "no RBAC: "+strings.Join(args, " "), r, ExitForbidden, `forbidden: User "nobody" cannot`)
		t.Logf("%v as nobody: %s", args, strings.TrimSpace(r.stderr))
	}
	// Read-only rights: status works, enable is refused naming what is missing.
	e.installOperatorRBAC("operator", true, false)
	if r := e.run("--as", "operator", "status"); r.code != ExitOK {
		t.Fatalf("status as operator:\n%s", r)
	}
	oneErrorLine(t, "enable as a viewer", e.run("--as", "viewer", "enable"), ExitForbidden, `User "viewer" cannot get resource "configmaps"`)

	ca := base64.StdEncoding.EncodeToString(e.cluster.CAData())
	bad := writeKubeconfig(t, e.cluster.Host(), ca, "not-a-token")
	r := e.runClock(time.Now, "--kubeconfig", bad, "status")
	oneErrorLine(t, "bad token", r, ExitForbidden, "unauthorized: the API server "+e.cluster.Host()+" rejected the credentials")

	// The API server goes away mid-session.
	e.cluster.StopAPIServer()
	r = e.run("status")
	oneErrorLine(t, "stopped API server", r, ExitUnreachable, "cannot reach the API server")
	t.Logf("stopped API server: %s", strings.TrimSpace(r.stderr))
}

// TestMTU: the arithmetic offline (flag and detection) and the comparison with Calico's
// FelixConfiguration and the agents' budgets against a real API server.
func TestMTU(t *testing.T) {
	r := runBare(t, "mtu", "--offline")
	if r.code != ExitOK {
		t.Fatalf("mtu --offline:\n%s", r)
	}
	goldenCheck(t, "mtu-detected.txt", r.stdout)
	for _, tc := range []struct {
		ext, icv                 string
		doc, exact, budgetWanted int
	}{
		{"1500", "8", 1452, 1454, 1452}, {"1450", "8", 1404, 1402, 1402}, {"1500", "16", 1452, 1446, 1446}, {"9001", "12", 8952, 8950, 8950},
	} {
		r := runBare(t, "mtu", "--offline", "--external-mtu", tc.ext, "--icv-bytes", tc.icv)
		want := fmt.Sprintf("documented rule     %d ", tc.doc)
		want2 := fmt.Sprintf("kernel-exact limit  %d ", tc.exact)
		// Offline, the knob of every kind of Calico installation, set to the budget.
		wants := []string{want, want2,
			fmt.Sprintf(`'{"spec":{"calicoNetwork":{"mtu":%d}}}'`, tc.budgetWanted),
			fmt.Sprintf(`'{"data":{"veth_mtu":"%d"}}'`, tc.budgetWanted),
			fmt.Sprintf(`calico_mtu = "%d" and ipip_mtu = "%d"`, tc.budgetWanted, tc.budgetWanted)}
		for _, w := range wants {
			if r.code != ExitOK || !strings.Contains(r.stdout, w) {
				t.Errorf("mtu %s/%s lacks %q:\n%s", tc.ext, tc.icv, w, r)
			}
		}
	}
	r = runBare(t, "mtu", "--offline", "--external-mtu", "1450", "-o", "json")
	goldenCheck(t, "mtu-1450.json", r.stdout)

	e := newEnv(t)
	e.healthyCluster()
	r = e.run("mtu", "--external-mtu", "1500")
	if r.code != ExitOK {
		t.Fatalf("mtu on a healthy cluster:\n%s", r)
	}
	goldenCheck(t, "mtu-cluster.txt", normTimes(r.stdout))

	rb := healthyReport("node-b")
	rb.ExternalMTU, rb.BudgetMTU = 1450, 1402
	e.setReport("node-b", rb, "")
	e.setReport("node-c", nil, "")
	r = e.run("mtu", "--external-mtu", "1500")
	if r.code != ExitNotOK {
		t.Fatalf("mtu with node-b on a 1450 link must exit 1:\n%s", r)
	}
	goldenCheck(t, "mtu-cluster-wrong.txt", normTimes(r.stdout))

	// The cluster's ICV (ConfigMap icv-bytes) is the default; the flag overrides it.
	e.setConfigMap(map[string]string{api.ConfigEnabledKey: "true", "icv-bytes": "16"})
	r = e.run("mtu", "--external-mtu", "1500", "-o", "json")
	var m MTUOutput
	if err := json.Unmarshal([]byte(r.stdout), &m); err != nil || r.code != ExitNotOK || m.ICVBytes != 16 ||
		m.ICVSource != "configmap secureoverlay/secureoverlay-config" || m.Budget != 1446 || len(m.Cluster.WrongNodes) != 2 ||
		!strings.Contains(m.Cluster.Nodes[0].Verdict, "reports budget 1452, the rule gives 1446 for external MTU 1500 and ICV 16") {
		t.Fatalf("mtu with icv-bytes 16 in the ConfigMap: %v\n%s", err, r)
	}
	r = e.run("mtu", "--external-mtu", "1500", "--icv-bytes", "8", "-o", "json")
	if err := json.Unmarshal([]byte(r.stdout), &m); err != nil || m.ICVBytes != 8 || m.ICVSource != "flag" || m.Budget != 1452 {
		t.Fatalf("mtu --icv-bytes 8 overrides the ConfigMap: %v\n%s", err, r)
	}
	e.setConfigMap(map[string]string{api.ConfigEnabledKey: "true"})

	e.applyCalico(felixDefault(v3.FelixConfigurationSpec{IPIPMTU: intp(1480)}))
	r = e.run("mtu", "--external-mtu", "1500", "-o", "json")
	if r.code != ExitNotOK || !strings.Contains(r.stdout, `"wrongNodes": [
      "node-a",
      "node-b"
    ]`) {
		t.Fatalf("mtu with ipipMTU 1480:\n%s", r)
	}
}
