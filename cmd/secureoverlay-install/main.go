// Command secureoverlay-install puts the secureoverlay CNI plugin into the node's Calico
// CNI chain and keeps it there (see package install and docs/install.md).
//
//	secureoverlay-install --once        init container: install, then exit
//	secureoverlay-install               sidecar: install, watch, re-insert; on SIGTERM
//	                                    uninstall only if the owning DaemonSet is being deleted
//	secureoverlay-install --uninstall   remove the entry, then the binary, then exit
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"k8s.io/client-go/kubernetes"

	"github.com/secureoverlay/secureoverlay/budget"
	"github.com/secureoverlay/secureoverlay/install"
	"github.com/secureoverlay/secureoverlay/install/owner"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "secureoverlay-install:", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		once       = flag.Bool("once", false, "install, then exit (init container)")
		uninstall  = flag.Bool("uninstall", false, "remove our conflist entry, then the plugin binary, then exit")
		binDir     = flag.String("cni-bin-dir", "/opt/cni/bin", "host CNI bin dir (as mounted)")
		confDir    = flag.String("cni-conf-dir", "/etc/cni/net.d", "host CNI config dir (as mounted)")
		pluginBin  = flag.String("plugin-binary", "/usr/local/bin/secureoverlay", "plugin binary to install (path in the image)")
		mode       = flag.String("mode", install.PluginModes[0], "plugin mode: clamp (lower a pod's MTU to the budget), enforce (refuse the pod) or warn")
		icv        = flag.Int("icv-bytes", budget.DefaultICV, "AES-GCM ICV length: 8, 12 or 16")
		extMTU     = flag.Int("external-mtu", 0, "external MTU to write into the entry; 0 = detect on this host now (falls back to detection by the plugin at ADD time)")
		detectMTU  = flag.Bool("detect-external-mtu", true, "with --external-mtu 0: detect now; false writes 0 so the plugin detects at ADD time")
		pattern    = flag.String("interface-pattern", "", "external interface regexp (default Calico's: "+budget.DefaultInterfacePattern+")")
		logFile    = flag.String("log-file", "", "absolute path the plugin appends its log to (default: stderr)")
		podName    = flag.String("pod-name", os.Getenv("POD_NAME"), "this pod's name (downward API; env POD_NAME)")
		podNS      = flag.String("pod-namespace", os.Getenv("POD_NAMESPACE"), "this pod's namespace (downward API; env POD_NAMESPACE)")
		kubeconfig = flag.String("kubeconfig", "", "kubeconfig for the DaemonSet check (default: in-cluster service account)")
		onDelete   = flag.Bool("uninstall-on-delete", true, "sidecar: on SIGTERM, uninstall when the owning DaemonSet is being deleted")
		burst      = flag.Int("write-burst", install.DefaultWriteBurst, "config writes allowed at once before throttling")
		every      = flag.Duration("write-interval", install.DefaultWriteEvery, "one more config write allowed per interval once throttled")
		resync     = flag.Duration("resync", install.DefaultResync, "full check period without file events")
		level      = flag.String("log-level", "info", "debug, info, warn or error")
	)
	flag.Parse()
	if flag.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", flag.Args())
	}
	if *once && *uninstall {
		return errors.New("--once and --uninstall are exclusive")
	}
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(*level)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lv}))

	entry := install.Entry{Mode: *mode, ICVBytes: *icv, ExternalMTU: *extMTU, InterfacePattern: *pattern, LogFile: *logFile}
	if entry.ExternalMTU == 0 && *detectMTU && !*uninstall {
		entry.ExternalMTU = detect(log, entry)
	}
	in, err := install.New(install.Config{
		CNIBinDir: *binDir, CNIConfDir: *confDir, PluginBinary: *pluginBin, Entry: entry, Log: log,
		WriteBurst: *burst, WriteEvery: *every, Resync: *resync,
	})
	if err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	switch {
	case *uninstall:
		return in.Uninstall(ctx)
	case *once:
		return in.Install(ctx)
	}
	// The sidecar follows its DaemonSet from the start (see owner.Tracker) so that the
	// decision at SIGTERM survives `kubectl delete -f` removing our RBAC first.
	var (
		client  kubernetes.Interface
		tracker *owner.Tracker
	)
	if *onDelete && *podName != "" && *podNS != "" {
		if client, err = owner.NewClient(*kubeconfig); err != nil {
			log.Warn("no kubernetes client; the plugin will be kept on termination", "err", err)
		} else {
			tracker = owner.NewTracker(client, *podNS, *podName)
			tracker.OnWatch = func() {
				log.Info("following the pod's DaemonSet: its deletion makes termination remove the plugin", "pod", *podNS+"/"+*podName)
			}
			tctx, tcancel := context.WithCancel(context.Background())
			defer tcancel()
			go tracker.Run(tctx, func(format string, args ...any) { log.Warn(fmt.Sprintf(format, args...)) })
		}
	}
	log.Info("sidecar running: keeps the plugin installed until terminated", "followsDaemonSet", tracker != nil)
	if err := in.Run(ctx); err != nil {
		return err
	}
	stop()
	log.Info("terminating")
	if !*onDelete {
		return nil
	}
	return uninstallIfDeleted(log, in, client, tracker, *podNS, *podName)
}

// detect returns the host's external MTU for the entry, or 0 (the plugin then detects at
// ADD time) when it cannot be detected here.
func detect(log *slog.Logger, e install.Entry) int {
	re, err := budget.CompilePattern(e.InterfacePattern)
	if err != nil {
		return 0 // install.New reports the bad pattern
	}
	mtu, link, err := budget.DetectExternalMTU(re)
	if err == nil {
		_, err = budget.Budget(mtu, e.ICVBytes)
	}
	if err != nil {
		log.Warn("external mtu not detected; the plugin will detect it at ADD time", "err", err)
		return 0
	}
	log.Info("detected external mtu", "mtu", mtu, "link", link)
	return mtu
}

// uninstallIfDeleted asks the API (and the tracker) whether our DaemonSet is being
// deleted and uninstalls only then. It stays well inside the pod's termination grace
// period.
func uninstallIfDeleted(log *slog.Logger, in *install.Installer, c kubernetes.Interface, tr *owner.Tracker, ns, name string) error {
	if c == nil {
		log.Info("keeping the plugin", "reason", "pod identity or API access unknown (POD_NAME/POD_NAMESPACE unset or no client)")
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	d, err := owner.Decide(ctx, c, tr, ns, name, time.Second)
	if err != nil {
		log.Warn("cannot check the daemonset; keeping the plugin", "err", err)
		return nil
	}
	if !d.Uninstall {
		log.Info("keeping the plugin", "reason", d.Reason)
		return nil
	}
	log.Info("uninstalling", "reason", d.Reason)
	uctx, ucancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer ucancel()
	return in.Uninstall(uctx)
}
