package ctl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/secureoverlay/secureoverlay/api"
)

// updateConfig applies mutate to the operator's ConfigMap, creating it when missing, and
// retries on conflicts.
func (c *clients) updateConfig(ctx context.Context, ns string, mutate func(*corev1.ConfigMap)) error {
	what := fmt.Sprintf("update configmap %s/%s", ns, api.ConfigMapName)
	for range 5 {
		cms := c.cs.CoreV1().ConfigMaps(ns)
		cm, err := cms.Get(ctx, api.ConfigMapName, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			cm = &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: api.ConfigMapName, Namespace: ns}}
			mutate(cm)
			_, err = cms.Create(ctx, cm, metav1.CreateOptions{})
			if apierrors.IsAlreadyExists(err) {
				continue
			}
			return c.apiError(fmt.Sprintf("create configmap %s/%s", ns, api.ConfigMapName), err)
		}
		if err != nil {
			return c.apiError(what, err)
		}
		if cm.Data == nil {
			cm.Data = map[string]string{}
		}
		if cm.Annotations == nil {
			cm.Annotations = map[string]string{}
		}
		mutate(cm)
		_, err = cms.Update(ctx, cm, metav1.UpdateOptions{})
		if apierrors.IsConflict(err) {
			continue
		}
		return c.apiError(what, err)
	}
	return withCode(ExitNotOK, fmt.Errorf("%s: conflicting writers, try again", what))
}

type waitFlags struct {
	wait    bool
	timeout time.Duration
}

func addWaitFlags(cmd *cobra.Command, w *waitFlags, what string) {
	cmd.Flags().BoolVar(&w.wait, "wait", false, "follow "+what+" until it is done, printing each step and each lagging node")
	cmd.Flags().DurationVar(&w.timeout, "timeout", 10*time.Minute, "with --wait: give up after this long (exit 5)")
}

// follow polls until done reports true, printing a line whenever the progress text
// changes. It returns ExitTimeout when timeout passes. An unreachable API server does
// not end the wait (it is reported and retried); other errors do.
func (c *CLI) follow(ctx context.Context, cl *clients, ns string, w io.Writer, timeout time.Duration,
	done func(v *view) (bool, string)) error {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	last := ""
	start := c.Now()
	tick := time.NewTicker(c.PollInterval)
	defer tick.Stop()
	for {
		line := ""
		v, err := cl.read(ctx, ns, c.Now())
		switch {
		case err == nil:
			var ok bool
			ok, line = done(v)
			if ok {
				fmt.Fprintf(w, "[%5.1fs] %s\n", c.Now().Sub(start).Seconds(), line)
				return nil
			}
		case ctx.Err() != nil:
		case exitCode(err) == ExitUnreachable:
			line = oneLine(err.Error()) + " (retrying)"
		default:
			return err
		}
		if line != "" && line != last {
			fmt.Fprintf(w, "[%5.1fs] %s\n", c.Now().Sub(start).Seconds(), line)
			last = line
		}
		select {
		case <-deadline.C:
			return withCode(ExitTimeout, fmt.Errorf("timed out after %s: %s", timeout, last))
		case <-ctx.Done():
			return withCode(ExitNotOK, fmt.Errorf("interrupted: %s", last))
		case <-tick.C:
		}
	}
}

func exitCode(err error) int {
	var x *exitError
	if errors.As(err, &x) {
		return x.code
	}
	return ExitNotOK
}

// lagging renders the master's lagging list or, when the master holds nothing, the
// nodes whose report disagrees with want (the master may step before the last agent
// reports); nodes the master excluded do not count.
func lagging(v *view, want api.Mode, wantGen uint32) string {
	var out []string
	if v.master != nil {
		for _, l := range v.master.Lagging {
			out = append(out, l.Node+" ("+l.Reason+")")
		}
	}
	excluded := map[string]bool{}
	if v.master != nil {
		for _, l := range v.master.Excluded {
			excluded[l.Node] = true // NotReady past the master's node timeout: holds nothing
		}
	}
	if len(out) == 0 {
		for _, n := range v.nodes {
			switch {
			case excluded[n.Name]:
			case n.Report == nil:
				out = append(out, n.Name+" (no report)")
			case n.Report.Mode != want:
				out = append(out, fmt.Sprintf("%s (at %s)", n.Name, n.Report.Mode))
			case wantGen != 0 && !slices.Contains(n.Report.Generations, wantGen):
				out = append(out, fmt.Sprintf("%s (generation %d not installed)", n.Name, wantGen))
			}
		}
	}
	if len(out) == 0 {
		return ""
	}
	return "; lagging: " + strings.Join(out, ", ")
}

func (c *CLI) cutoverCmd(g *globals, enable bool) *cobra.Command {
	var wf waitFlags
	var stopAt string
	name, target := "disable", api.ModeOff
	short := "Disable encryption: walk enforce → encrypt → accept → off without an outage"
	if enable {
		name, target = "enable", api.ModeEnforce
		short = "Enable encryption: walk off → accept → encrypt → enforce without an outage"
	}
	cmd := &cobra.Command{
		Use:   name,
		Short: short,
		Long: short + `.

The master moves one step at a time, each gated on every live node's agent
reporting the previous step. This command sets the operator's ConfigMap
(` + api.ConfigMapName + `: data "enabled", and "mode" for --mode) and returns; with
--wait it follows the master's status, printing each step and the nodes that hold
it, until the cluster and every node reach the target.

` + exitCodesHelp,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			want := target
			if stopAt != "" {
				want = api.Mode(stopAt)
				if !want.Valid() {
					return withCode(ExitUsage, fmt.Errorf("invalid --mode %q (want off, accept, encrypt or enforce)", stopAt))
				}
				if enable && want == api.ModeOff {
					return withCode(ExitUsage, errors.New("enable --mode off: use disable"))
				}
			}
			cl, err := g.clients()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			err = cl.updateConfig(ctx, g.namespace, func(cm *corev1.ConfigMap) {
				if cm.Data == nil {
					cm.Data = map[string]string{}
				}
				cm.Data[api.ConfigEnabledKey] = fmt.Sprint(enable)
				if stopAt != "" {
					cm.Data[api.ConfigModeKey] = stopAt
				} else {
					delete(cm.Data, api.ConfigModeKey)
				}
			})
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "requested target mode %s (configmap %s/%s)\n", want, g.namespace, api.ConfigMapName)
			if !wf.wait {
				return nil
			}
			err = c.follow(ctx, cl, g.namespace, out, wf.timeout, func(v *view) (bool, string) {
				ms := v.master
				if ms == nil {
					return false, "waiting for the master to publish its status"
				}
				if ms.Target != want {
					return false, fmt.Sprintf("mode %s, waiting for the master to take target %s", ms.Mode, want)
				}
				lag := lagging(v, ms.Mode, ms.ActiveGeneration)
				line := fmt.Sprintf("mode %s (target %s)", ms.Mode, ms.Target)
				if ms.Waiting != "" {
					line += ", waiting for " + ms.Waiting
				}
				if ms.LastError != "" {
					line += "; master error: " + ms.LastError
				}
				if ms.Mode == want && lag == "" {
					n := len(v.nodes)
					return true, fmt.Sprintf("done: mode %s on all %d nodes", want, n)
				}
				return false, line + lag
			})
			return err
		},
	}
	if enable {
		cmd.Example = `  secureoverlayctl enable
  secureoverlayctl enable --wait --timeout 15m
  secureoverlayctl enable --mode accept --wait   # stop the rollout at accept`
		cmd.Flags().StringVar(&stopAt, "mode", "", "stop at this mode (accept, encrypt) instead of enforce")
	} else {
		cmd.Example = `  secureoverlayctl disable --wait`
	}
	addWaitFlags(cmd, &wf, "the cutover")
	return cmd
}

func (c *CLI) rotateCmd(g *globals) *cobra.Command {
	var wf waitFlags
	cmd := &cobra.Command{
		Use:   "rotate",
		Short: "Request a key rotation now (make-before-break)",
		Long: `rotate asks the master for one rotation by writing a new request ID (an RFC 3339
time) to the annotation ` + api.RotateRequestAnnotation + ` of the ConfigMap
` + api.ConfigMapName + `. The master creates a pending generation, waits for every live
agent to install it inbound, then makes it active; the old generation retires
after the grace period. With --wait this command follows the rotation until the
new generation is active and installed on every node.

` + exitCodesHelp,
		Example: `  secureoverlayctl rotate
  secureoverlayctl rotate --wait --timeout 5m`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, err := g.clients()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			v, err := cl.read(ctx, g.namespace, c.Now())
			if err != nil {
				return err
			}
			var prev uint32
			if ms := v.master; ms != nil {
				if ms.Target == api.ModeOff && ms.Mode == api.ModeOff {
					return withCode(ExitNotOK, errors.New("encryption is off: there is no key to rotate (enable it first)"))
				}
				prev = ms.ActiveGeneration
			}
			id := c.Now().UTC().Format(time.RFC3339Nano)
			if err := cl.updateConfig(ctx, g.namespace, func(cm *corev1.ConfigMap) {
				if cm.Annotations == nil {
					cm.Annotations = map[string]string{}
				}
				cm.Annotations[api.RotateRequestAnnotation] = id
			}); err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "requested rotation %s (active generation %d)\n", id, prev)
			if !wf.wait {
				return nil
			}
			return c.follow(ctx, cl, g.namespace, out, wf.timeout, func(v *view) (bool, string) {
				ms := v.master
				if ms == nil {
					return false, "waiting for the master to publish its status"
				}
				if ms.LastRotateRequest != id {
					line := "waiting for the master to take the request"
					if ms.Deferred != "" {
						line += " (deferred: " + ms.Deferred + ")"
					}
					if ms.LastError != "" {
						line += "; master error: " + ms.LastError
					}
					return false, line
				}
				if ms.PendingGeneration != 0 {
					return false, fmt.Sprintf("generation %d pending: waiting for every node to install it inbound%s",
						ms.PendingGeneration, lagging(v, ms.Mode, ms.PendingGeneration))
				}
				if ms.ActiveGeneration <= prev {
					return false, fmt.Sprintf("request taken, active generation still %d", ms.ActiveGeneration)
				}
				if lag := lagging(v, ms.Mode, ms.ActiveGeneration); lag != "" {
					return false, fmt.Sprintf("generation %d active%s", ms.ActiveGeneration, lag)
				}
				done := fmt.Sprintf("done: generation %d active on all %d nodes", ms.ActiveGeneration, len(v.nodes))
				for _, gs := range ms.Generations {
					if gs.State == "retiring" {
						done += fmt.Sprintf("; generation %d retiring (removed after the grace period)", gs.Number)
					}
				}
				return true, done
			})
		},
	}
	addWaitFlags(cmd, &wf, "the rotation")
	return cmd
}
