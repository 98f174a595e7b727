// Package kube runs a real Kubernetes control plane for tests: a real etcd and a
// real kube-apiserver, built from pinned modules by hack/tools-kube.sh (`make
// tools`), on loopback ports of this machine.
//
// Invariants:
//   - Everything a Cluster starts listens on 127.0.0.1 only, lives in one
//     directory (certificates, tokens, etcd data, logs), and is stopped when the
//     test ends (t.Cleanup) or when Close is called; children are also killed if
//     the test binary dies (Pdeathsig).
//   - Authentication and authorization are real: TLS with a throw-away CA, a
//     static admin token in system:masters, service-account tokens issued by the
//     TokenRequest API and signed by the API server, and the Node,RBAC
//     authorizers. Nothing is faked.
//   - There is no controller-manager, scheduler or kubelet: the harness creates
//     the namespaces it is asked for, and tests create Nodes (and set their
//     status) themselves.
//   - StopAPIServer/StartAPIServer restart only the API server, on the same
//     port with the same etcd data, so clients can reconnect.
//   - Process logs stay in files; their tails are printed only when a test
//     failed.
//
// Binaries are found in $SECUREOVERLAY_KUBE_BIN, else
// $SECUREOVERLAY_CACHE_DIR/kube/bin, else <repo>/.cache/kube/bin. When they are
// missing, Start skips the test (run `make tools`), or fails it when
// SECUREOVERLAY_REQUIRE_ALL=1.
package kube

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/secureoverlay/secureoverlay/api"
)

// AdminUser is the user name of the static admin token (group system:masters).
const AdminUser = "secureoverlay-admin"

// Environment variables the harness reads.
const (
	EnvKubeBin    = "SECUREOVERLAY_KUBE_BIN"    // directory holding kube-apiserver and etcd
	EnvCacheDir   = "SECUREOVERLAY_CACHE_DIR"   // the build cache (binaries in kube/bin)
	EnvRequireAll = "SECUREOVERLAY_REQUIRE_ALL" // "1": missing binaries fail instead of skip
)

// Option changes how a Cluster is started.
type Option func(*options)

type options struct {
	namespaces   []string
	startTimeout time.Duration
	extraArgs    []string
	etcdArgs     []string
	sans         []string
	controllers  bool
}

// WithNamespaces asks the harness to create these namespaces (in addition to
// api.Namespace) once the API server is ready.
func WithNamespaces(ns ...string) Option {
	return func(o *options) { o.namespaces = append(o.namespaces, ns...) }
}

// WithStartTimeout bounds how long the API server may take to become ready
// (default 90s; the machine is shared with other builds and tests).
func WithStartTimeout(d time.Duration) Option {
	return func(o *options) { o.startTimeout = d }
}

// WithAPIServerArgs appends extra kube-apiserver flags (later flags win).
func WithAPIServerArgs(args ...string) Option {
	return func(o *options) { o.extraArgs = append(o.extraArgs, args...) }
}

// WithEtcdArgs appends extra etcd flags (later flags win), e.g. a larger
// --quota-backend-bytes for a benchmark that stores gigabytes.
func WithEtcdArgs(args ...string) Option {
	return func(o *options) { o.etcdArgs = append(o.etcdArgs, args...) }
}

// WithServingSANs adds names or IP addresses to the API server's serving
// certificate (which always covers 127.0.0.1, ::1 and localhost), e.g. the
// address under which a VM reaches the host's loopback through QEMU's user
// networking. The API server still listens on 127.0.0.1 only.
func WithServingSANs(sans ...string) Option {
	return func(o *options) { o.sans = append(o.sans, sans...) }
}

// Cluster is a running etcd + kube-apiserver pair.
type Cluster struct {
	t    testing.TB // nil for StartProcess
	dir  string
	opts options

	apiserverBin string
	etcdBin      string
	pki          *pkiFiles

	etcdPort, etcdPeerPort, apiPort int
	etcd, apiserver                 *process
	// controllerManager and scheduler are nil without WithControllers.
	controllerManager, scheduler *process

	kubeconfig string
	admin      *rest.Config

	mu     sync.Mutex
	closed bool
}

// Start starts a cluster for the test t in a fresh temporary directory and
// registers its teardown with t.Cleanup. It skips t when the binaries are
// missing (fails when SECUREOVERLAY_REQUIRE_ALL=1), and fails t on any other
// error.
func Start(t testing.TB, opts ...Option) *Cluster {
	t.Helper()
	apiserverBin, etcdBin, err := FindBinaries()
	if err != nil {
		if os.Getenv(EnvRequireAll) == "1" {
			t.Fatalf("kube harness: %v (%s=1, so this fails instead of skipping)", err, EnvRequireAll)
		}
		t.Skipf("kube harness: %v", err)
	}
	dir := t.TempDir()
	c := newCluster(dir, apiserverBin, etcdBin, opts)
	c.t = t
	t.Cleanup(func() {
		if t.Failed() {
			c.dumpLogs(t.Logf)
		}
		_ = c.Close()
	})
	ctx, cancel := context.WithTimeout(context.Background(), c.opts.startTimeout+30*time.Second)
	defer cancel()
	if err := c.start(ctx); err != nil {
		t.Fatalf("kube harness: %v", err) // the cleanup prints the logs' tails
	}
	return c
}

// StartProcess starts a cluster outside a test (e.g. from a demo binary), keeping
// all its files in dir (which must exist). The caller must call Close. Methods
// that have no error result panic on failure when the cluster was started this
// way; use the *Err variants instead.
func StartProcess(ctx context.Context, dir string, opts ...Option) (*Cluster, error) {
	apiserverBin, etcdBin, err := FindBinaries()
	if err != nil {
		return nil, err
	}
	c := newCluster(dir, apiserverBin, etcdBin, opts)
	if err := c.start(ctx); err != nil {
		_ = c.Close()
		return nil, fmt.Errorf("%w\n--- etcd log (tail) ---\n%s\n--- kube-apiserver log (tail) ---\n%s",
			err, c.etcd.tail(20), c.apiserver.tail(20))
	}
	return c, nil
}

func newCluster(dir, apiserverBin, etcdBin string, opts []Option) *Cluster {
	o := options{namespaces: []string{api.Namespace}, startTimeout: 90 * time.Second}
	for _, f := range opts {
		f(&o)
	}
	return &Cluster{
		dir:          dir,
		opts:         o,
		apiserverBin: apiserverBin,
		etcdBin:      etcdBin,
		etcd:         &process{name: "etcd", logPath: filepath.Join(dir, "etcd.log")},
		apiserver:    &process{name: "kube-apiserver", logPath: filepath.Join(dir, "kube-apiserver.log")},
	}
}

// FindBinaries returns the paths of kube-apiserver and etcd, or an error that
// says how to build them.
func FindBinaries() (apiserver, etcd string, err error) {
	var dirs []string
	if d := os.Getenv(EnvKubeBin); d != "" {
		dirs = append(dirs, d)
	} else {
		if d := os.Getenv(EnvCacheDir); d != "" {
			dirs = append(dirs, filepath.Join(d, "kube", "bin"))
		}
		if root, err := repoRoot(); err == nil {
			dirs = append(dirs, filepath.Join(root, ".cache", "kube", "bin"))
		}
	}
	for _, d := range dirs {
		a, e := filepath.Join(d, "kube-apiserver"), filepath.Join(d, "etcd")
		if isExecutable(a) && isExecutable(e) {
			return a, e, nil
		}
	}
	return "", "", fmt.Errorf("kube-apiserver and etcd not found in %s: run `make tools` (or hack/tools-kube.sh)",
		strings.Join(dirs, ", "))
}

func isExecutable(path string) bool {
	st, err := os.Stat(path)
	return err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0
}

// repoRoot walks up from the working directory to the root module's go.mod.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if b, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil &&
			strings.Contains(string(b), "module github.com/secureoverlay/secureoverlay\n") {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("repository root not found")
		}
		dir = parent
	}
}

func (c *Cluster) start(ctx context.Context) error {
	p, err := writePKI(c.dir, c.opts.sans)
	if err != nil {
		return err
	}
	c.pki = p
	// Ports are picked free and then released, so another process may take one
	// before our child binds it: retry with fresh ports when that happens.
	for attempt := 1; ; attempt++ {
		err := c.startOnFreePorts(ctx)
		if err == nil {
			break
		}
		busy := errors.Is(err, errPortBusy) || c.etcd.addrInUse() || c.apiserver.addrInUse()
		if attempt == 3 || !busy {
			return err
		}
		c.apiserver.stop(5 * time.Second)
		c.etcd.stop(5 * time.Second)
		_ = os.RemoveAll(filepath.Join(c.dir, "etcd-data"))
	}
	if err := c.ensureNamespaces(ctx, c.opts.namespaces...); err != nil {
		return err
	}
	// As `kubectl apply -f manifests/secureoverlay.yaml` does before any agent starts:
	// agents and masters read (and agents write) NodeReports.
	crds, err := OurCRDs()
	if err != nil {
		return err
	}
	if err := InstallCRDs(ctx, c.admin, crds...); err != nil {
		return fmt.Errorf("install our CRDs: %w", err)
	}
	if c.opts.controllers {
		return c.startControllers(ctx)
	}
	return nil
}

func (c *Cluster) startOnFreePorts(ctx context.Context) error {
	ports, err := pickPorts(3)
	if err != nil {
		return err
	}
	c.etcdPort, c.etcdPeerPort, c.apiPort = ports[0], ports[1], ports[2]
	c.admin = &rest.Config{
		Host:            c.Host(),
		BearerToken:     c.pki.adminToken,
		TLSClientConfig: rest.TLSClientConfig{CAData: c.pki.caPEM},
		QPS:             200,
		Burst:           400,
		Timeout:         30 * time.Second,
	}
	if err := c.writeKubeconfig(); err != nil {
		return err
	}
	if err := c.etcd.start(c.etcdBin, c.etcdArgs()); err != nil {
		return err
	}
	if err := c.waitEtcd(ctx); err != nil {
		return err
	}
	return c.startAPIServer(ctx, time.Second)
}

// pickPorts chooses the loopback ports of a new cluster (a variable for tests).
var pickPorts = freePorts

// errPortBusy: the API server's port is taken by another process.
var errPortBusy = errors.New("port busy")

func (c *Cluster) etcdArgs() []string {
	client := "http://127.0.0.1:" + strconv.Itoa(c.etcdPort)
	peer := "http://127.0.0.1:" + strconv.Itoa(c.etcdPeerPort)
	args := []string{
		"--name=default",
		"--data-dir=" + filepath.Join(c.dir, "etcd-data"),
		"--listen-client-urls=" + client,
		"--advertise-client-urls=" + client,
		"--listen-peer-urls=" + peer,
		"--initial-advertise-peer-urls=" + peer,
		"--initial-cluster=default=" + peer,
		"--unsafe-no-fsync=true", // test data only; much faster on a busy disk
		"--log-level=warn",
		"--quota-backend-bytes=" + strconv.Itoa(1<<30),
	}
	return append(args, c.opts.etcdArgs...)
}

func (c *Cluster) apiserverArgs() []string {
	args := []string{
		"--etcd-servers=http://127.0.0.1:" + strconv.Itoa(c.etcdPort),
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(c.apiPort),
		"--cert-dir=" + filepath.Join(c.dir, "apiserver-certs"),
		"--tls-cert-file=" + c.pki.serveCert,
		"--tls-private-key-file=" + c.pki.serveKey,
		"--client-ca-file=" + c.pki.caCert,
		"--token-auth-file=" + c.pki.tokenFile,
		"--authorization-mode=Node,RBAC",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + c.pki.saPub,
		"--service-account-signing-key-file=" + c.pki.saKey,
		"--service-account-lookup=true",
		// Only an allocation range for Service objects; no traffic goes there.
		"--service-cluster-ip-range=198.19.255.0/24",
		// No kube-proxy or real endpoints: do not publish 127.0.0.1 as the
		// kubernetes Service's endpoint.
		"--endpoint-reconciler-type=none",
		"--profiling=false",
		"--shutdown-delay-duration=0s",
		"--shutdown-send-retry-after=false",
		// Close open watches on SIGTERM instead of waiting for them (a stopped
		// API server with an informer attached would otherwise hang for a minute).
		"--shutdown-watch-termination-grace-period=1s",
		"--v=0",
	}
	return append(args, c.opts.extraArgs...)
}

func (c *Cluster) waitEtcd(ctx context.Context) error {
	url := "http://127.0.0.1:" + strconv.Itoa(c.etcdPort) + "/health"
	hc := &http.Client{Timeout: 2 * time.Second}
	return poll(ctx, 60*time.Second, 50*time.Millisecond, c.etcd, func() (bool, error) {
		resp, err := hc.Get(url)
		if err != nil {
			return false, nil
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, nil
	}, "etcd to become healthy")
}

// poll runs cond until it is true, the timeout passes, ctx ends, or p exits.
func poll(ctx context.Context, timeout, every time.Duration, p *process, cond func() (bool, error), what string) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var lastErr error
	for {
		ok, err := cond()
		if ok {
			return nil
		}
		if err != nil {
			lastErr = err
		}
		if exited, why := p.exited(); exited {
			return fmt.Errorf("waiting for %s: %s exited: %v", what, p.name, why)
		}
		select {
		case <-ctx.Done():
			if lastErr != nil {
				return fmt.Errorf("waiting for %s: %w (last error: %v)", what, ctx.Err(), lastErr)
			}
			return fmt.Errorf("waiting for %s: %w", what, ctx.Err())
		case <-time.After(every):
		}
	}
}

// waitAPIServer waits until /readyz answers ok and the default namespace exists.
func (c *Cluster) waitAPIServer(ctx context.Context) error {
	tlsCfg, err := c.tlsConfig()
	if err != nil {
		return err
	}
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: tlsCfg}}
	defer hc.CloseIdleConnections()
	var last string
	err = poll(ctx, c.opts.startTimeout, 100*time.Millisecond, c.apiserver, func() (bool, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.Host()+"/readyz", nil)
		if err != nil {
			return false, err
		}
		req.Header.Set("Authorization", "Bearer "+c.pki.adminToken)
		resp, err := hc.Do(req)
		if err != nil {
			return false, nil
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			last = fmt.Sprintf("readyz: HTTP %d", resp.StatusCode)
			return false, errors.New(last)
		}
		return true, nil
	}, "kube-apiserver /readyz")
	if err != nil {
		return err
	}
	cs, err := kubernetes.NewForConfig(c.admin)
	if err != nil {
		return fmt.Errorf("admin client: %w", err)
	}
	// The system namespaces are created by a controller inside the API server,
	// shortly after it is ready.
	return poll(ctx, 30*time.Second, 50*time.Millisecond, c.apiserver, func() (bool, error) {
		_, err := cs.CoreV1().Namespaces().Get(ctx, metav1.NamespaceDefault, metav1.GetOptions{})
		return err == nil, err
	}, "the default namespace")
}

func (c *Cluster) tlsConfig() (*tls.Config, error) {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(c.pki.caPEM) {
		return nil, errors.New("parse test CA certificate")
	}
	return &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}, nil
}

func (c *Cluster) ensureNamespaces(ctx context.Context, names ...string) error {
	if len(names) == 0 {
		return nil
	}
	cs, err := kubernetes.NewForConfig(c.admin)
	if err != nil {
		return fmt.Errorf("admin client: %w", err)
	}
	for _, n := range names {
		ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: n}}
		if _, err := cs.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("create namespace %s: %w", n, err)
		}
	}
	return nil
}

func (c *Cluster) writeKubeconfig() error {
	c.kubeconfig = filepath.Join(c.dir, "admin.kubeconfig")
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["secureoverlay-test"] = &clientcmdapi.Cluster{
		Server:                   c.Host(),
		CertificateAuthorityData: c.pki.caPEM,
	}
	cfg.AuthInfos[AdminUser] = &clientcmdapi.AuthInfo{Token: c.pki.adminToken}
	cfg.Contexts["secureoverlay-test"] = &clientcmdapi.Context{Cluster: "secureoverlay-test", AuthInfo: AdminUser}
	cfg.CurrentContext = "secureoverlay-test"
	if err := clientcmd.WriteToFile(*cfg, c.kubeconfig); err != nil {
		return fmt.Errorf("write kubeconfig %s: %w", c.kubeconfig, err)
	}
	return nil
}

// Host is the API server URL, https://127.0.0.1:PORT.
func (c *Cluster) Host() string { return "https://127.0.0.1:" + strconv.Itoa(c.apiPort) }

// Dir is the directory holding the cluster's certificates, data and logs.
func (c *Cluster) Dir() string { return c.dir }

// CAData is the PEM of the CA that signed the API server's serving certificate.
func (c *Cluster) CAData() []byte { return append([]byte(nil), c.pki.caPEM...) }

// AdminConfig returns a fresh copy of a rest.Config for the admin (system:masters).
func (c *Cluster) AdminConfig() *rest.Config { return rest.CopyConfig(c.admin) }

// Kubeconfig returns the path of a kubeconfig file for the admin.
func (c *Cluster) Kubeconfig() string { return c.kubeconfig }

// ConfigFor returns an admin config that impersonates user in groups, so that
// requests are authorized (RBAC, Node) as that user.
func (c *Cluster) ConfigFor(user string, groups ...string) *rest.Config {
	cfg := c.AdminConfig()
	cfg.Impersonate = rest.ImpersonationConfig{UserName: user, Groups: groups}
	return cfg
}

// ServiceAccountConfig returns a config that authenticates as the ServiceAccount
// ns/name with a real token from the TokenRequest API. The namespace and the
// ServiceAccount are created when missing. Fails the test on error.
func (c *Cluster) ServiceAccountConfig(ns, name string) *rest.Config {
	if c.t != nil {
		c.t.Helper()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cfg, err := c.ServiceAccountConfigErr(ctx, ns, name)
	if err != nil {
		c.fail(err)
	}
	return cfg
}

// ServiceAccountConfigErr is ServiceAccountConfig returning its error.
func (c *Cluster) ServiceAccountConfigErr(ctx context.Context, ns, name string) (*rest.Config, error) {
	if err := c.ensureNamespaces(ctx, ns); err != nil {
		return nil, err
	}
	cs, err := kubernetes.NewForConfig(c.admin)
	if err != nil {
		return nil, fmt.Errorf("admin client: %w", err)
	}
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	if _, err := cs.CoreV1().ServiceAccounts(ns).Create(ctx, sa, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return nil, fmt.Errorf("create service account %s/%s: %w", ns, name, err)
	}
	expiry := int64(24 * 3600)
	tr := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &expiry}}
	tr, err = cs.CoreV1().ServiceAccounts(ns).CreateToken(ctx, name, tr, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("request token for service account %s/%s: %w", ns, name, err)
	}
	cfg := c.AdminConfig()
	cfg.BearerToken = tr.Status.Token
	return cfg, nil
}

// StopAPIServer stops the API server (etcd keeps running with the data).
func (c *Cluster) StopAPIServer() {
	c.apiserver.stop(30 * time.Second)
}

// StartAPIServer starts the API server again, on the same port with the same
// data, and waits until it is ready. Fails the test on error.
func (c *Cluster) StartAPIServer() {
	if c.t != nil {
		c.t.Helper()
	}
	ctx, cancel := context.WithTimeout(context.Background(), c.opts.startTimeout+30*time.Second)
	defer cancel()
	if err := c.StartAPIServerErr(ctx); err != nil {
		c.fail(err)
	}
}

// StartAPIServerErr is StartAPIServer returning its error.
func (c *Cluster) StartAPIServerErr(ctx context.Context) error {
	return c.startAPIServer(ctx, 30*time.Second)
}

// startAPIServer starts the API server once its port can be bound, waiting up
// to portWait for that.
func (c *Cluster) startAPIServer(ctx context.Context, portWait time.Duration) error {
	c.mu.Lock()
	closed := c.closed
	c.mu.Unlock()
	if closed {
		return errors.New("start kube-apiserver: cluster is closed")
	}
	// The port was just released by the previous instance (or reserved by
	// freePorts); wait briefly until the kernel lets it be bound again.
	if err := poll(ctx, portWait, 100*time.Millisecond, alwaysRunning, func() (bool, error) {
		return portFree(c.apiPort), nil
	}, fmt.Sprintf("port %d to be free", c.apiPort)); err != nil {
		return fmt.Errorf("start kube-apiserver: %w: %w", errPortBusy, err)
	}
	if err := c.apiserver.start(c.apiserverBin, c.apiserverArgs()); err != nil {
		return err
	}
	if err := c.waitAPIServer(ctx); err != nil {
		return fmt.Errorf("start kube-apiserver: %w", err)
	}
	return nil
}

// alwaysRunning is a process placeholder for poll loops not tied to a child.
var alwaysRunning = &process{name: "none", done: make(chan struct{})}

// Close stops the API server and etcd. It is safe to call more than once.
func (c *Cluster) Close() error {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	for _, p := range c.controllerProcesses() {
		p.stop(5 * time.Second)
	}
	// Nothing of the API server's needs to survive Close: do not wait long.
	c.apiserver.stop(5 * time.Second)
	c.etcd.stop(15 * time.Second)
	return nil
}

func (c *Cluster) fail(err error) {
	if c.t != nil {
		c.t.Helper()
		c.t.Fatalf("kube harness: %v", err)
	}
	panic(fmt.Sprintf("kube harness: %v", err))
}

// dumpLogs prints the tails of the process logs.
func (c *Cluster) dumpLogs(logf func(format string, args ...any)) {
	for _, p := range append([]*process{c.etcd, c.apiserver}, c.controllerProcesses()...) {
		logf("--- %s log (last 40 lines of %s) ---\n%s", p.name, p.logPath, p.tail(40))
	}
}

// LogLines returns the lines of a process log ("etcd", "kube-apiserver", and with
// WithControllers "kube-controller-manager" or "kube-scheduler"), for
// tests that inspect what the servers logged.
func (c *Cluster) LogLines(name string) ([]string, error) {
	var p *process
	for _, q := range append([]*process{c.etcd, c.apiserver}, c.controllerProcesses()...) {
		if q.name == name {
			p = q
		}
	}
	if p == nil {
		return nil, fmt.Errorf("unknown process %q", name)
	}
	f, err := os.Open(p.logPath)
	if err != nil {
		return nil, fmt.Errorf("open log of %s: %w", name, err)
	}
	defer f.Close()
	var lines []string
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 0, 64*1024), 4*1024*1024)
	for s.Scan() {
		lines = append(lines, s.Text())
	}
	return lines, s.Err()
}
