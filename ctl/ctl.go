// Package ctl implements secureoverlayctl (also installed as the kubectl plugin
// kubectl-secureoverlay): the operator's one command for status, MTU arithmetic, key
// rotation, enable/disable cutover and health checks.
//
// Inputs: a kubeconfig loaded like kubectl's (--kubeconfig, $KUBECONFIG, ~/.kube/config,
// --context, --as), the objects the master and the agents publish (api.MasterStatus in the
// status ConfigMap, api.NodeReport on every Node), Calico's CRDs and the key Secret (which
// doctor parses but never prints). Outputs: text for people (table, wide), JSON/YAML for
// scripts, and exit codes scripts can branch on (ExitOK … ExitTimeout).
//
// Invariants:
//   - Every failure is one line on stderr ("error: …") and a documented exit code; no
//     stack traces, no multi-line client-go dumps.
//   - Key bytes never reach the output: doctor reports only keys.Parse's verdict, whose
//     errors name fields and positions and never any content of the Secret.
//   - The CLI writes only the operator's ConfigMap (enabled/mode data keys and the
//     rotate-request annotation) and, on `mtu --apply` only, Calico's own pod MTU knob
//     (the operator's Installation "default" spec.calicoNetwork.mtu, or veth_mtu in the
//     manifest's ConfigMap kube-system/calico-config), with a merge patch under the field
//     manager "secureoverlayctl"; everything else it only reads.
//   - Output is deterministic for a given cluster state and clock (rows sorted by name,
//     ages computed from the injected clock), so it can be golden-tested.
package ctl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/metadata"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/secureoverlay/secureoverlay/reconciler/watch"
	"k8s.io/klog/v2"

	"github.com/secureoverlay/secureoverlay/api"
	"github.com/secureoverlay/secureoverlay/budget"
)

// Exit codes (documented in --help and docs/cli.md).
const (
	ExitOK          = 0 // success; status healthy; every doctor check passed
	ExitNotOK       = 1 // a doctor check failed, status not healthy, mtu found wrong nodes, or an operation was refused
	ExitUsage       = 2 // bad command line: unknown command or flag, invalid value
	ExitUnreachable = 3 // no usable kubeconfig, or the API server cannot be reached
	ExitForbidden   = 4 // the API server refused the credentials (401) or RBAC denied a request (403)
	ExitTimeout     = 5 // --wait did not finish within --timeout
)

const exitCodesHelp = `Exit codes:
  0  success (status healthy, every doctor check passed)
  1  not healthy / a check failed / mtu found wrong nodes / operation refused
  2  usage error (unknown command or flag, invalid value)
  3  no usable kubeconfig, or the API server is unreachable
  4  unauthorized or forbidden (RBAC)
  5  --wait timed out`

// CLI is one invocation's environment. The zero value is usable; tests inject a clock,
// a host link source and an agent metrics fetcher.
type CLI struct {
	// Name is the command name shown in help (default "secureoverlayctl"; main passes
	// "kubectl secureoverlay" when run as the kubectl plugin).
	Name string
	// Now is the clock (default time.Now). Ages in text output are relative to it.
	Now func() time.Time
	// Links lists this host's links for mtu's detection (default budget.Links).
	Links func() ([]budget.LinkInfo, error)
	// FetchMetrics returns an agent pod's Prometheus text (default: through the API
	// server's pod proxy).
	FetchMetrics MetricsFetcher
	// PollInterval is how often --wait polls (default 500ms).
	PollInterval time.Duration
}

// Run runs secureoverlayctl with args (without the program name) and returns its exit
// code. It is what main calls.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	return (&CLI{}).Run(ctx, args, stdout, stderr)
}

// NameFor is the command name to show for a program invoked as argv0: the kubectl
// plugin binary kubectl-secureoverlay is "kubectl secureoverlay".
func NameFor(argv0 string) string {
	if strings.TrimSuffix(filepath.Base(argv0), ".exe") == "kubectl-secureoverlay" {
		return "kubectl secureoverlay"
	}
	return "secureoverlayctl"
}

// exitError carries an exit code with the one-line message.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

func withCode(code int, err error) error {
	if err == nil {
		return nil
	}
	var x *exitError
	if errors.As(err, &x) {
		return err
	}
	return &exitError{code: code, err: err}
}

// silentExit is returned when the command already printed its verdict and only the
// exit code remains.
type silentExit struct{ code int }

func (s silentExit) Error() string { return fmt.Sprintf("exit %d", s.code) }

// globals are the kubectl-like flags every command shares.
type globals struct {
	kubeconfig     string
	context        string
	namespace      string
	as             string
	asGroups       []string
	requestTimeout time.Duration
	output         string
	nodeSelector   string
	// nodeSelectorSet: --node-selector was given (even empty).
	nodeSelectorSet bool
	// calicoAPIGroup is --calico-api-group (Calico's CALICO_API_GROUP).
	calicoAPIGroup string
}

// Run is Run with this CLI's injected dependencies.
func (c *CLI) Run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Name == "" {
		c.Name = "secureoverlayctl"
	}
	if c.Links == nil {
		c.Links = hostLinks
	}
	if c.PollInterval == 0 {
		c.PollInterval = 500 * time.Millisecond
	}
	quietKlog()
	root := c.newRoot(stdout, stderr)
	root.SetArgs(args)
	err := root.ExecuteContext(ctx)
	if err == nil {
		return ExitOK
	}
	var s silentExit
	if errors.As(err, &s) {
		return s.code
	}
	code := ExitUsage // cobra's own errors (unknown command/flag, bad arguments)
	var x *exitError
	if errors.As(err, &x) {
		code = x.code
	}
	msg := oneLine(err.Error())
	if code == ExitUsage {
		msg += " (see '" + c.Name + " --help')"
	}
	fmt.Fprintln(stderr, "error: "+msg)
	return code
}

// oneLine folds a possibly multi-line message into one line.
func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}

func quietKlog() {
	// client-go logs through klog (throttling notices, retries); a CLI's stderr is for
	// its own one-line errors.
	klog.SetOutput(io.Discard)
	klog.LogToStderr(false)
}

const rootLong = `secureoverlayctl inspects and drives secureoverlay: IPsec (ESP transport,
AES-GCM) encryption of Calico IPIP pod traffic between Kubernetes nodes.

It reads the kubeconfig like kubectl (--kubeconfig, $KUBECONFIG, ~/.kube/config,
--context) and works in the namespace secureoverlay unless -n says otherwise.
Installed as kubectl-secureoverlay it also runs as "kubectl secureoverlay".`

func (c *CLI) newRoot(stdout, stderr io.Writer) *cobra.Command {
	g := &globals{}
	root := &cobra.Command{
		Use:   "secureoverlayctl",
		Short: "Operate secureoverlay (IPsec for Calico IPIP)",
		Long:  rootLong + "\n\n" + exitCodesHelp,
		Example: `  secureoverlayctl status
  secureoverlayctl status --node node-a
  secureoverlayctl mtu --external-mtu 1450
  secureoverlayctl enable --wait --timeout 10m
  secureoverlayctl rotate --wait
  secureoverlayctl doctor -o json
  kubectl secureoverlay status --context prod -o wide`,
		SilenceErrors: true,
		SilenceUsage:  true,
	}
	root.PersistentPreRun = func(cmd *cobra.Command, _ []string) {
		g.nodeSelectorSet = cmd.Flags().Changed("node-selector")
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return withCode(ExitUsage, err) })
	root.CompletionOptions.DisableDefaultCmd = true
	pf := root.PersistentFlags()
	pf.StringVar(&g.kubeconfig, "kubeconfig", "", "path to the kubeconfig file (default $KUBECONFIG, else ~/.kube/config)")
	pf.StringVar(&g.context, "context", "", "the kubeconfig context to use")
	pf.StringVarP(&g.namespace, "namespace", "n", api.Namespace, "namespace of secureoverlay's objects")
	pf.StringVar(&g.as, "as", "", "username to impersonate for the operation")
	pf.StringArrayVar(&g.asGroups, "as-group", nil, "group to impersonate (repeatable)")
	pf.StringVarP(&g.nodeSelector, "node-selector", "l", "", "label selector of the nodes that run an agent (the agent DaemonSet's and the master's --node-selector); other nodes are ignored")
	pf.DurationVar(&g.requestTimeout, "request-timeout", 30*time.Second, "timeout of a single API request (0: none)")
	pf.StringVar(&g.calicoAPIGroup, "calico-api-group", os.Getenv(watch.EnvCalicoAPIGroup),
		"Calico's API group, as Calico's CALICO_API_GROUP (crd.projectcalico.org/v1 or projectcalico.org/v3; default $CALICO_API_GROUP, else the group Calico uses: a converged DatastoreMigration means v3, else discovery)")
	root.AddCommand(
		c.statusCmd(g),
		c.mtuCmd(g),
		c.rotateCmd(g),
		c.cutoverCmd(g, true),
		c.cutoverCmd(g, false),
		c.doctorCmd(g),
	)
	root.Use = strings.ReplaceAll(c.Name, " ", "-")
	root.Annotations = map[string]string{cobra.CommandDisplayNameAnnotation: c.Name}
	for _, cmd := range append(root.Commands(), root) {
		cmd.SilenceErrors, cmd.SilenceUsage = true, true
		cmd.Example = strings.ReplaceAll(cmd.Example, "secureoverlayctl ", c.Name+" ")
	}
	return root
}

// outputFlag adds -o with the given formats.
func outputFlag(cmd *cobra.Command, g *globals, formats ...string) {
	cmd.Flags().StringVarP(&g.output, "output", "o", formats[0], "output format: "+strings.Join(formats, ", "))
}

func checkOutput(g *globals, formats ...string) error {
	for _, f := range formats {
		if g.output == f {
			return nil
		}
	}
	return withCode(ExitUsage, fmt.Errorf("invalid output format %q (want %s)", g.output, strings.Join(formats, ", ")))
}

// errNoKubeconfig is wrapped when no kubeconfig is found anywhere.
var errNoKubeconfig = errors.New("no kubeconfig")

// clients are the API clients of one invocation.
type clients struct {
	cs   kubernetes.Interface
	dyn  dynamic.Interface
	meta metadata.Interface // metadata-only lists (mtu's pods to recreate)
	host string
	// nodeSelector limits the nodes read (--node-selector); when the flag is not given
	// (nodeSelectorSet false) the ConfigMap's node-selector applies.
	nodeSelector    string
	nodeSelectorSet bool
	// calicoGroup is an explicit Calico API group (zero: follow Calico's own choice).
	calicoGroup schema.GroupVersion
}

// loadConfig loads the kubeconfig like kubectl. It never contacts the server.
func (g *globals) loadConfig() (*rest.Config, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = g.kubeconfig
	overrides := &clientcmd.ConfigOverrides{CurrentContext: g.context}
	overrides.AuthInfo.Impersonate = g.as
	overrides.AuthInfo.ImpersonateGroups = g.asGroups
	cc := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, overrides)
	cfg, err := cc.ClientConfig()
	if err != nil {
		if clientcmd.IsEmptyConfig(err) {
			return nil, withCode(ExitUnreachable, fmt.Errorf("%w: use --kubeconfig or set KUBECONFIG", errNoKubeconfig))
		}
		return nil, withCode(ExitUnreachable, fmt.Errorf("load kubeconfig: %w", err))
	}
	cfg.Timeout = g.requestTimeout
	cfg.QPS, cfg.Burst = 50, 100 // kubectl's; --wait polls a few objects twice a second
	cfg.WarningHandler = rest.NoWarnings{}
	cfg.UserAgent = "secureoverlayctl"
	return cfg, nil
}

func (g *globals) clients() (*clients, error) {
	if _, err := labels.Parse(g.nodeSelector); err != nil {
		return nil, withCode(ExitUsage, fmt.Errorf("invalid --node-selector %q: %w", g.nodeSelector, err))
	}
	calicoGroup, err := watch.ParseAPIGroup(g.calicoAPIGroup)
	if err != nil {
		return nil, withCode(ExitUsage, fmt.Errorf("invalid --calico-api-group: %w", err))
	}
	cfg, err := g.loadConfig()
	if err != nil {
		return nil, err
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, withCode(ExitUnreachable, fmt.Errorf("client for %s: %w", cfg.Host, err))
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, withCode(ExitUnreachable, fmt.Errorf("client for %s: %w", cfg.Host, err))
	}
	md, err := metadata.NewForConfig(cfg)
	if err != nil {
		return nil, withCode(ExitUnreachable, fmt.Errorf("client for %s: %w", cfg.Host, err))
	}
	return &clients{cs: cs, dyn: dyn, meta: md, host: cfg.Host, nodeSelector: g.nodeSelector, nodeSelectorSet: g.nodeSelectorSet, calicoGroup: calicoGroup}, nil
}

// calico selects the Calico API group the way the agents do (watch.SelectCalico): never a
// frozen v1 copy after a migration.
func (c *clients) calico(ctx context.Context) (watch.CalicoAPI, error) {
	api, err := watch.SelectCalico(ctx, c.cs.Discovery(), c.dyn, c.calicoGroup)
	if err != nil {
		return api, c.apiError("select calico api group", err)
	}
	return api, nil
}

// apiError classifies an API error: unreachable (3), forbidden/unauthorized (4), else 1.
// what names the object ("get configmap secureoverlay/secureoverlay-status").
func (c *clients) apiError(what string, err error) error {
	if err == nil {
		return nil
	}
	switch {
	case apierrors.IsForbidden(err):
		return withCode(ExitForbidden, fmt.Errorf("%s: forbidden: %s", what, forbiddenReason(err)))
	case apierrors.IsUnauthorized(err):
		return withCode(ExitForbidden, fmt.Errorf("%s: unauthorized: the API server %s rejected the credentials", what, c.host))
	case unreachable(err):
		return withCode(ExitUnreachable, fmt.Errorf("%s: cannot reach the API server %s: %w", what, c.host, rootCause(err)))
	}
	return withCode(ExitNotOK, fmt.Errorf("%s: %w", what, err))
}

func forbiddenReason(err error) string {
	var st apierrors.APIStatus
	if errors.As(err, &st) {
		msg := st.Status().Message
		// "configmaps \"x\" is forbidden: User \"u\" cannot get resource ..." → keep the why.
		if i := strings.Index(msg, "forbidden: "); i >= 0 {
			return msg[i+len("forbidden: "):]
		}
		return msg
	}
	return err.Error()
}

// unreachable reports whether err means the request never got an HTTP answer.
func unreachable(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, syscall.ECONNREFUSED) ||
		errors.Is(err, syscall.EHOSTUNREACH) || errors.Is(err, syscall.ENETUNREACH) {
		return true
	}
	var ne net.Error
	if errors.As(err, &ne) {
		return true
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		return true
	}
	var de *net.DNSError
	if errors.As(err, &de) {
		return true
	}
	return apierrors.IsTimeout(err) || apierrors.IsServerTimeout(err)
}

// rootCause strips url.Error's repetition of method and URL.
func rootCause(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}
