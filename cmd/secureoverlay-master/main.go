// Command secureoverlay-master is the key manager: it creates, distributes and rotates
// the IPsec key ring and drives enable/disable cutover (see package master and
// docs/keys.md). Run two replicas; a Lease elects the leader.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/secureoverlay/secureoverlay/api"
	kubecfg "github.com/secureoverlay/secureoverlay/internal/kubeconfig"
	"github.com/secureoverlay/secureoverlay/keys"
	"github.com/secureoverlay/secureoverlay/master"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "secureoverlay-master:", err)
		os.Exit(1)
	}
}

func run() error {
	def := keys.DefaultConfig()
	host, _ := os.Hostname()
	var (
		kubeconfig  = flag.String("kubeconfig", "", "kubeconfig file (default: in-cluster config)")
		namespace   = flag.String("namespace", api.Namespace, "namespace of the key Secret, ConfigMaps and Lease")
		interval    = flag.Duration("rotate-interval", def.RotateInterval, "rotate keys this often (0 disables interval rotation)")
		grace       = flag.Duration("grace", def.Grace, "keep a retiring key generation installed at most this long after the switch")
		drain       = flag.Duration("drain", def.Drain, "keep a retiring key generation installed at least this long after the switch, even once no node sends with it")
		nodeTimeout = flag.Duration("node-timeout", def.NodeTimeout, "a node NotReady this long no longer blocks rotation or cutover")
		ackTimeout  = flag.Duration("ack-timeout", def.AckTimeout, "a Ready node that has lagged on rotation or cutover this long without a break no longer holds them (0: no bound)")
		seq         = flag.Float64("seq-threshold", def.SeqThreshold, "rotate early when an agent reports an SA sequence fraction at or above this (0 disables)")
		seqMin      = flag.Duration("seq-min-interval", def.SeqMinInterval, "start a sequence-triggered rotation only once the active generation is this old: at most one early rotation per interval (0: no bound)")
		cipher      = flag.String("cipher", string(def.Cipher), "cipher of new key generations: aes128gcm or aes256gcm")
		icv         = flag.Int("icv-bytes", def.ICVBytes, "ICV length of new key generations: 8, 12 or 16 (must match the agents' MTU budget)")
		metricsAddr = flag.String("metrics-addr", ":9466", "listen address for /metrics, /healthz and /readyz (empty disables)")
		leaseName   = flag.String("lease-name", "secureoverlay-master", "name of the leader election Lease")
		id          = flag.String("id", host, "identity of this replica in the Lease (default: hostname)")
		resync      = flag.Duration("resync", time.Minute, "full reconcile period")
		logJSON     = flag.Bool("log-json", false, "log as JSON")
		logLevel    = flag.String("log-level", "info", "debug, info, warn or error (debug adds each NodeView written, skipped or dropped)")
		nodeSel     = flag.String("node-selector", "", "label selector of the nodes that run an agent (match the agent DaemonSet); empty: all nodes")
		apiQPS      = flag.Float64("kube-api-qps", 20, "sustained requests per second to the API server (client-side limit, each of the two clients: the reconcile's, and the one that writes NodeViews)")
		apiBurst    = flag.Int("kube-api-burst", 40, "requests allowed at once above --kube-api-qps")
		protoV2     = flag.Bool("protocol-v2", def.ProtocolV2, "create protocol v2 key generations (pair keys from the nodes' own X25519 keys: no shared root) once every node publishes its key for the next one")
	)
	flag.Parse()

	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("--log-level %q: want debug, info, warn or error", *logLevel)
	}
	hopts := &slog.HandlerOptions{Level: level}
	var h slog.Handler = slog.NewTextHandler(os.Stderr, hopts)
	if *logJSON {
		h = slog.NewJSONHandler(os.Stderr, hopts)
	}
	log := slog.New(h)

	policy := keys.Config{RotateInterval: *interval, Grace: *grace, Drain: *drain, NodeTimeout: *nodeTimeout, AckTimeout: *ackTimeout, SeqThreshold: *seq,
		SeqMinInterval: *seqMin, Cipher: keys.Cipher(*cipher), ICVBytes: *icv, ProtocolV2: *protoV2}
	if policy.Cipher.KeyBytes() == 0 {
		return fmt.Errorf("--cipher %q: want aes128gcm or aes256gcm", *cipher)
	}
	if *drain < 0 || *grace < *drain {
		return fmt.Errorf("--drain %s must be between 0 and --grace %s", *drain, *grace)
	}
	if *ackTimeout < 0 {
		return fmt.Errorf("--ack-timeout %s: must not be negative", *ackTimeout)
	}
	if *seqMin < 0 {
		return fmt.Errorf("--seq-min-interval %s: must not be negative", *seqMin)
	}
	if !keys.ValidICV(policy.ICVBytes) {
		return fmt.Errorf("--icv-bytes %d: want 8, 12 or 16", *icv)
	}
	if _, err := labels.Parse(*nodeSel); err != nil {
		return fmt.Errorf("--node-selector %q: %w", *nodeSel, err)
	}
	if *id == "" {
		return errors.New("--id is empty and the hostname is unknown")
	}

	if *apiQPS <= 0 || *apiBurst < 1 {
		return fmt.Errorf("--kube-api-qps %g / --kube-api-burst %d: want a positive rate and a burst of at least 1", *apiQPS, *apiBurst)
	}
	cfg, err := kubecfg.Load(*kubeconfig)
	if err != nil {
		return err
	}
	// client-go's default (5/s, burst 10) would take the NodeView writes after a reboot
	// at 5,000 nodes 1,000 s (docs/protocol-v2.md §9 step 2).
	cfg.QPS, cfg.Burst = float32(*apiQPS), *apiBurst
	client, err := kubernetes.NewForConfig(kubecfg.Protobuf(cfg))
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	dc, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("kubernetes dynamic client: %w", err)
	}

	metrics := master.NewMetrics()
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if err := metrics.Register(reg); err != nil {
		return fmt.Errorf("register metrics: %w", err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if *metricsAddr != "" {
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		ok := func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) }
		mux.HandleFunc("/healthz", ok)
		mux.HandleFunc("/readyz", ok)
		srv := &http.Server{Addr: *metricsAddr, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() {
			if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("metrics server", "addr", *metricsAddr, "err", err)
			}
		}()
		defer srv.Close()
	}

	log.Info("starting", "namespace", *namespace, "lease", *leaseName, "id", *id, "rotateInterval", *interval,
		"grace", *grace, "drain", *drain, "nodeTimeout", *nodeTimeout, "ackTimeout", *ackTimeout, "seqThreshold", *seq, "seqMinInterval", *seqMin, "cipher", *cipher, "icvBytes", *icv)
	return master.Run(ctx, client, master.Options{Namespace: *namespace, Identity: *id, LeaseName: *leaseName,
		Resync: *resync, NodeSelector: *nodeSel, Policy: policy, Logger: log, Metrics: metrics, Dynamic: dc})
}
