// Package integration runs strait end to end against a real Consul agent
// (`consul agent -dev`), real `consul connect proxy` processes and
// Connect-native peers written with the Consul SDK.
//
// Every test starts its own agent on free ports, so tests are independent and
// run in parallel. Every process a test starts is stopped by PID in
// t.Cleanup, and its combined stdout+stderr is dumped when the test fails.
//
// Environment:
//
//	STRAIT_CONSUL  path of the consul binary (default <repo>/bin/consul,
//	               built by scripts/build-consul.sh)
//	STRAIT_BIN     path of a prebuilt strait binary (default: built once by
//	               TestMain from ../cmd/strait)
//	STRAIT_RACE=1  build strait with -race; any "DATA RACE" report in a
//	               strait log fails the test that ran it
//	STRAIT_IT_SCALE_CONNS  connections held by TestNineThousandConnections
//	               (default 9000)
//
// When the strait binary has the -admin-bind flag, every strait a test
// starts gets an admin listener on a port of its own (proc.adminAddr), since
// the default 127.0.0.1:19100 would collide between parallel processes.
package integration

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/agent/connect"
	"github.com/hashicorp/consul/api"
)

var (
	repoRoot       string
	consulBin      string
	straitBin      string
	straitBuildErr error
	straitBuildOut string
	// straitHasAdmin: the binary accepts -admin-bind (probed in TestMain).
	straitHasAdmin bool
)

func TestMain(m *testing.M) {
	if os.Getenv(echoAppEnv) != "" {
		// Re-executed as a stand-alone echo app (see startEchoProcess).
		os.Exit(echoAppMain())
	}
	if os.Getenv(execNoFileEnv) != "" {
		// Re-executed to exec strait under a low soft RLIMIT_NOFILE (see
		// startStraitNoFile); returns only on failure.
		os.Exit(execWithNoFile())
	}
	code := func() int {
		wd, err := os.Getwd()
		if err != nil {
			fmt.Fprintln(os.Stderr, "getwd:", err)
			return 1
		}
		repoRoot = filepath.Dir(wd) // the package dir is <repo>/integration

		consulBin = os.Getenv("STRAIT_CONSUL")
		if consulBin == "" {
			consulBin = filepath.Join(repoRoot, "bin", "consul")
		}

		if p := os.Getenv("STRAIT_BIN"); p != "" {
			straitBin = p
		} else {
			dir, err := os.MkdirTemp("", "strait-it-bin-")
			if err != nil {
				fmt.Fprintln(os.Stderr, "mkdtemp:", err)
				return 1
			}
			defer os.RemoveAll(dir)
			straitBin = filepath.Join(dir, "strait")
			args := []string{"build", "-o", straitBin}
			if os.Getenv("STRAIT_RACE") == "1" {
				args = append(args, "-race")
			}
			args = append(args, "github.com/straitproxy/strait/cmd/strait")
			cmd := exec.Command("go", args...)
			cmd.Dir = repoRoot
			out, err := cmd.CombinedOutput()
			if err != nil {
				// Tests that need strait fail with this; the harness
				// self-test against `consul connect proxy` still runs.
				straitBuildErr = err
				straitBuildOut = string(out)
				fmt.Fprintf(os.Stderr, "integration: building strait failed: %v\n%s\n", err, out)
			}
		}
		if straitBuildErr == nil {
			straitHasAdmin = probeAdminFlag()
			fmt.Fprintf(os.Stderr, "integration: strait -admin-bind supported: %v\n", straitHasAdmin)
		}
		return m.Run()
	}()
	os.Exit(code)
}

// probeAdminFlag reports whether strait defines -admin-bind: flag parsing
// stops at the first unknown flag (exit 2) and "-h" exits 0.
func probeAdminFlag() bool {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, straitBin, "-admin-bind", "off", "-h")
	cmd.Env = cleanEnv()
	return cmd.Run() == nil
}

// ---------------------------------------------------------------------------
// polling

// poll calls fn until it returns nil or timeout passes; it returns the last
// error on timeout. Safe to call from any goroutine.
func poll(timeout time.Duration, fn func() error) error {
	deadline := time.Now().Add(timeout)
	wait := 20 * time.Millisecond
	for {
		err := fn()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("still failing after %s: %w", timeout, err)
		}
		time.Sleep(wait)
		if wait < 250*time.Millisecond {
			wait *= 2
		}
	}
}

// eventually fails the test unless fn returns nil within timeout.
func eventually(t testing.TB, timeout time.Duration, fn func() error) {
	t.Helper()
	if err := poll(timeout, fn); err != nil {
		t.Fatal(err)
	}
}

// consistently fails the test if fn returns an error at any point during d.
// It is used to assert that something does NOT happen (e.g. the app is not
// dialed), which cannot be polled for.
func consistently(t testing.TB, d time.Duration, fn func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		if err := fn(); err != nil {
			t.Fatal(err)
		}
		if time.Now().After(deadline) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ---------------------------------------------------------------------------
// processes

// logBuf is a goroutine-safe buffer collecting a process's stdout+stderr.
type logBuf struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuf) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuf) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// proc is a child process started by a test.
type proc struct {
	name    string
	cmd     *exec.Cmd
	out     *logBuf
	done    chan struct{} // closed when the process has exited
	waitErr error         // valid after done is closed
	// strait processes are expected to exit cleanly on SIGTERM and never
	// to report a data race or a panic.
	strict bool
	// adminAddr is strait's -admin-bind address, "" when the binary has no
	// admin endpoint.
	adminAddr string
}

func (p *proc) Pid() int { return p.cmd.Process.Pid }

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *proc) Output() string { return p.out.String() }

// cleanEnv is the test process's environment without anything that would
// point a child at another Consul agent or identity.
func cleanEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "CONSUL_") || strings.HasPrefix(kv, "CONNECT_") {
			continue
		}
		env = append(env, kv)
	}
	return append(env, extra...)
}

// startProc starts bin with args. The process is stopped by PID (SIGTERM,
// then SIGKILL after stopTimeout) in t.Cleanup, and its output is dumped if the test
// failed.
func startProc(t testing.TB, name, bin string, args, env []string, strict bool) *proc {
	t.Helper()
	p := &proc{name: name, out: &logBuf{}, done: make(chan struct{}), strict: strict}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Env = env
	p.cmd.Stdout = p.out
	p.cmd.Stderr = p.out
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s (%s %s): %v", name, bin, strings.Join(args, " "), err)
	}
	go func() {
		p.waitErr = p.cmd.Wait()
		close(p.done)
	}()
	t.Logf("started %s pid %d: %s %s", name, p.Pid(), filepath.Base(bin), strings.Join(args, " "))
	t.Cleanup(func() {
		p.stop(t)
		out := p.Output()
		if p.strict {
			if strings.Contains(out, "WARNING: DATA RACE") {
				t.Errorf("%s (pid %d) reported a data race", name, p.Pid())
			}
			if strings.Contains(out, "panic:") || strings.Contains(out, "fatal error:") {
				t.Errorf("%s (pid %d) panicked", name, p.Pid())
			}
		}
		if t.Failed() {
			t.Logf("---- output of %s (pid %d, %s) ----\n%s---- end of %s ----",
				name, p.Pid(), p.cmd.ProcessState, tail(out, 40000), name)
		}
	})
	return p
}

// stopTimeout is how long a process gets to exit after SIGTERM. strait's
// default -shutdown-grace is 15s; tests close their connections before
// cleanup, so strait normally exits at once.
const stopTimeout = 25 * time.Second

func (p *proc) stop(t testing.TB) {
	if p.exited() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		if p.strict && p.waitErr != nil {
			t.Errorf("%s (pid %d) did not exit cleanly on SIGTERM: %v", p.name, p.Pid(), p.waitErr)
		}
	case <-time.After(stopTimeout):
		t.Errorf("%s (pid %d) still running %s after SIGTERM; SIGQUIT for its goroutines, then killing it", p.name, p.Pid(), stopTimeout)
		// A Go process prints every goroutine's stack on SIGQUIT and
		// exits: the output below then shows what it was stuck on.
		_ = p.cmd.Process.Signal(syscall.SIGQUIT)
		select {
		case <-p.done:
		case <-time.After(5 * time.Second):
			_ = p.cmd.Process.Kill()
			<-p.done
		}
	}
}

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "[... " + strconv.Itoa(len(s)-n) + " bytes cut ...]\n" + s[len(s)-n:]
}

// ---------------------------------------------------------------------------
// ports and names

// freePorts returns n distinct TCP ports that were free a moment ago on
// 127.0.0.1 (and also free for UDP, which serf needs).
func freePorts(t testing.TB, n int) []int {
	t.Helper()
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for len(ports) < n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("listen :0: %v", err)
		}
		ls = append(ls, l)
		port := l.Addr().(*net.TCPAddr).Port
		if pc, err := net.ListenPacket("udp", "127.0.0.1:"+strconv.Itoa(port)); err == nil {
			pc.Close()
			ports = append(ports, port)
		}
	}
	return ports
}

func freePort(t testing.TB) int { return freePorts(t, 1)[0] }

func hostPort(port int) string { return "127.0.0.1:" + strconv.Itoa(port) }

// uniq returns prefix plus a random suffix: service names never collide
// between tests.
func uniq(prefix string) string {
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	return prefix + "-" + hex.EncodeToString(b)
}

// randomUUID is a random UUID-formatted string (Consul's token secrets).
func randomUUID(t testing.TB) string {
	b := randomBytes(t, 16)
	h := hex.EncodeToString(b)
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}

// ---------------------------------------------------------------------------
// the Consul agent

type agent struct {
	proc        *proc
	args        []string // to restart it on the same ports and data dir
	httpAddr    string
	grpcPort    int    // plaintext public gRPC port
	token       string // management token when ACLs are on ("" otherwise)
	client      *api.Client
	trustDomain string
	dc          string
	ca          *testCA // the CA key the agent signs leaves with
}

func requireConsul(t testing.TB) {
	t.Helper()
	if _, err := os.Stat(consulBin); err != nil {
		t.Fatalf("consul binary %s missing (%v): run scripts/build-consul.sh (make test does) or set STRAIT_CONSUL", consulBin, err)
	}
}

// startAgent starts `consul agent -dev` on free ports, waits for it to have
// a leader and a Connect CA, then replaces the CA with one whose private key
// the test knows (so tests can mint leaves signed by the mesh CA).
func startAgent(t testing.TB) *agent {
	t.Helper()
	return startAgentOpts(t, agentOpts{})
}

// agentOpts vary the dev agent startAgentOpts starts.
type agentOpts struct {
	// aclDeny turns ACLs on with default_policy deny; the agent's client
	// then uses the management token a.token.
	aclDeny bool
}

// startAgentOpts is startAgent with options.
func startAgentOpts(t testing.TB, opts agentOpts) *agent {
	t.Helper()
	requireConsul(t)
	var lastErr error
	for attempt := 1; attempt <= 3; attempt++ {
		a, err := tryStartAgent(t, opts)
		if err == nil {
			a.installCA(t, newTestCA(t, a.trustDomain))
			return a
		}
		lastErr = err
		t.Logf("agent start attempt %d failed: %v", attempt, err)
	}
	t.Fatalf("could not start consul agent: %v", lastErr)
	return nil
}

func tryStartAgent(t testing.TB, opts agentOpts) (*agent, error) {
	ports := freePorts(t, 6)
	dataDir := t.TempDir()
	node := uniq("strait-it")
	args := []string{
		"agent", "-dev",
		"-log-level", "info",
		"-node", node,
		"-bind", "127.0.0.1",
		"-client", "127.0.0.1",
		"-data-dir", dataDir,
		"-http-port", strconv.Itoa(ports[0]),
		"-grpc-port", strconv.Itoa(ports[1]),
		"-grpc-tls-port", "-1",
		"-dns-port", "-1",
		"-serf-lan-port", strconv.Itoa(ports[2]),
		"-serf-wan-port", strconv.Itoa(ports[3]),
		"-server-port", strconv.Itoa(ports[4]),
	}
	a := &agent{httpAddr: hostPort(ports[0]), grpcPort: ports[1]}
	if opts.aclDeny {
		a.token = randomUUID(t)
		args = append(args, "-hcl", `acl { enabled = true, default_policy = "deny", tokens { initial_management = "`+a.token+`", agent = "`+a.token+`" } }`)
	}
	a.args = args
	client, err := api.NewClient(&api.Config{Address: a.httpAddr, Scheme: "http", Token: a.token})
	if err != nil {
		return nil, err
	}
	a.client = client
	if err := a.launch(t); err != nil {
		return nil, err
	}
	return a, nil
}

// launch starts the agent process with a.args and waits until it has a
// leader, a Connect CA and a datacenter.
func (a *agent) launch(t testing.TB) error {
	p := startProc(t, "consul-agent", consulBin, a.args, cleanEnv(), false)
	a.proc = p
	client := a.client
	err := poll(60*time.Second, func() error {
		if p.exited() {
			return nil // reported below
		}
		leader, err := client.Status().Leader()
		if err != nil {
			return err
		}
		if leader == "" {
			return errors.New("no leader yet")
		}
		roots, _, err := client.Agent().ConnectCARoots(nil)
		if err != nil {
			return err
		}
		if roots.ActiveRootID == "" || roots.TrustDomain == "" {
			return errors.New("connect CA not initialised yet")
		}
		a.trustDomain = roots.TrustDomain
		self, err := client.Agent().Self()
		if err != nil {
			return err
		}
		dc, _ := self["Config"]["Datacenter"].(string)
		if dc == "" {
			return errors.New("agent reports no datacenter")
		}
		a.dc = dc
		return nil
	})
	if p.exited() {
		return fmt.Errorf("agent exited during startup: %v\n%s", p.waitErr, tail(p.Output(), 4000))
	}
	if err != nil {
		p.stop(t)
		return err
	}
	return nil
}

// kill SIGKILLs the agent by pid and waits for it to be gone.
func (a *agent) kill(t testing.TB) {
	t.Helper()
	if err := a.proc.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatalf("SIGKILL consul agent pid %d: %v", a.proc.Pid(), err)
	}
	select {
	case <-a.proc.done:
	case <-time.After(10 * time.Second):
		t.Fatalf("consul agent pid %d still running 10s after SIGKILL", a.proc.Pid())
	}
	t.Logf("consul agent pid %d killed (%v)", a.proc.Pid(), a.proc.cmd.ProcessState)
}

// restart starts the agent again with the same arguments: same ports, node
// name and data dir. A dev agent keeps no raft state across restarts: it
// comes back with a new CA and trust domain, no intentions or config
// entries, and raft indexes starting over; only the services registered
// through its HTTP API are restored (from the data dir). a.ca is cleared
// (the new CA's key is the agent's own).
func (a *agent) restart(t testing.TB) {
	t.Helper()
	// The ports were free while the agent was down; another test may
	// have picked one up as an ephemeral port in the meantime (the agent
	// then exits at once), so retry for a while.
	attempt := 0
	err := poll(60*time.Second, func() error {
		attempt++
		err := a.launch(t)
		if err != nil {
			t.Logf("agent restart attempt %d failed: %v", attempt, err)
		}
		return err
	})
	if err != nil {
		t.Fatalf("could not restart consul agent on the same ports: %v", err)
	}
	a.ca = nil
	t.Logf("consul agent restarted as pid %d; trust domain %s", a.proc.Pid(), a.trustDomain)
}

// installCA makes ca the active Connect CA and waits until the local agent
// serves it as the active root.
func (a *agent) installCA(t testing.TB, ca *testCA) {
	t.Helper()
	eventually(t, 30*time.Second, func() error {
		_, err := a.client.Connect().CASetConfig(&api.CAConfig{
			Provider: "consul",
			Config: map[string]interface{}{
				"PrivateKey":  ca.keyPEM,
				"RootCert":    ca.certPEM,
				"LeafCertTTL": "72h",
			},
		}, nil)
		return err
	})
	want := connect.CalculateCertFingerprint(ca.cert.Raw)
	eventually(t, 30*time.Second, func() error {
		roots, _, err := a.client.Agent().ConnectCARoots(nil)
		if err != nil {
			return err
		}
		if roots.ActiveRootID != want {
			return fmt.Errorf("agent active root %s, want %s", roots.ActiveRootID, want)
		}
		return nil
	})
	a.ca = ca
}

// spiffeID is the identity Consul issues to service svc.
func (a *agent) spiffeID(svc string) string {
	return fmt.Sprintf("spiffe://%s/ns/default/dc/%s/svc/%s", a.trustDomain, a.dc, svc)
}

func (a *agent) serviceURI(svc string) *connect.SpiffeIDService {
	return &connect.SpiffeIDService{
		Host:       a.trustDomain,
		Namespace:  "default",
		Datacenter: a.dc,
		Service:    svc,
	}
}

// leaf fetches the leaf certificate the agent issues for service svc (the
// service does not have to be registered).
func (a *agent) leaf(t testing.TB, svc string) tls.Certificate {
	t.Helper()
	var cert tls.Certificate
	eventually(t, 30*time.Second, func() error {
		l, _, err := a.client.Agent().ConnectCALeaf(svc, nil)
		if err != nil {
			return err
		}
		cert, err = tls.X509KeyPair([]byte(l.CertPEM), []byte(l.PrivateKeyPEM))
		return err
	})
	return cert
}

// roots returns the agent's current trust bundle.
func (a *agent) roots(t testing.TB) *x509.CertPool {
	t.Helper()
	list, _, err := a.client.Agent().ConnectCARoots(nil)
	if err != nil {
		t.Fatalf("roots: %v", err)
	}
	pool := x509.NewCertPool()
	for _, r := range list.Roots {
		if !pool.AppendCertsFromPEM([]byte(r.RootCertPEM)) {
			t.Fatalf("bad root PEM from agent")
		}
	}
	return pool
}

// setIntention writes the service-intentions config entry for dst with a
// single source.
func (a *agent) setIntention(t testing.TB, src, dst string, action api.IntentionAction) {
	t.Helper()
	_, _, err := a.client.ConfigEntries().Set(&api.ServiceIntentionsConfigEntry{
		Kind: api.ServiceIntentions,
		Name: dst,
		Sources: []*api.SourceIntention{
			{Name: src, Action: action},
		},
	}, nil)
	if err != nil {
		t.Fatalf("set intention %s -> %s %s: %v", src, dst, action, err)
	}
	t.Logf("intention %s -> %s: %s", src, dst, action)
}

func (a *agent) deleteIntentions(t testing.TB, dst string) {
	t.Helper()
	if _, err := a.client.ConfigEntries().Delete(api.ServiceIntentions, dst, nil); err != nil {
		t.Fatalf("delete intentions for %s: %v", dst, err)
	}
	t.Logf("intentions for %s deleted", dst)
}

// registerProxy registers a connect-proxy for dst listening on
// 127.0.0.1:port, so that upstreams (strait, the built-in proxy, the SDK
// resolver) discover it through /v1/health/connect/<dst>.
func (a *agent) registerProxy(t testing.TB, dst string, port int) string {
	t.Helper()
	id := dst + "-proxy-" + strconv.Itoa(port)
	err := a.client.Agent().ServiceRegister(&api.AgentServiceRegistration{
		Kind:    api.ServiceKindConnectProxy,
		ID:      id,
		Name:    dst + "-proxy",
		Address: "127.0.0.1",
		Port:    port,
		Proxy:   &api.AgentServiceConnectProxyConfig{DestinationServiceName: dst},
	})
	if err != nil {
		t.Fatalf("register proxy for %s: %v", dst, err)
	}
	return id
}

// registerNative registers a Connect-native service instance.
func (a *agent) registerNative(t testing.TB, name string, port int) {
	t.Helper()
	err := a.client.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID:      name,
		Name:    name,
		Address: "127.0.0.1",
		Port:    port,
		Connect: &api.AgentServiceConnect{Native: true},
	})
	if err != nil {
		t.Fatalf("register native %s: %v", name, err)
	}
}

// ---------------------------------------------------------------------------
// strait and the built-in proxy

func requireStrait(t testing.TB) {
	t.Helper()
	if straitBuildErr != nil {
		t.Fatalf("strait binary could not be built (go build ./cmd/strait in %s): %v\n%s", repoRoot, straitBuildErr, straitBuildOut)
	}
	if _, err := os.Stat(straitBin); err != nil {
		t.Fatalf("strait binary %s: %v", straitBin, err)
	}
}

// startStrait starts strait with -http-addr pointing at a and waits until it
// logs "proxy ready".
func startStrait(t testing.TB, a *agent, args ...string) *proc {
	t.Helper()
	return startStraitEnv(t, nil, append([]string{"-http-addr", a.httpAddr}, args...)...)
}

// startStraitEnv starts strait with extra environment and args, and waits
// until it logs "proxy ready". If the binary has an admin endpoint and args
// do not set -admin-bind, it is bound on a free port (p.adminAddr).
func startStraitEnv(t testing.TB, env []string, args ...string) *proc {
	t.Helper()
	requireStrait(t)
	args, admin := withAdmin(t, args)
	p := startProc(t, "strait", straitBin, args, cleanEnv(env...), true)
	p.adminAddr = admin
	waitReady(t, p)
	return p
}

// withAdmin appends -admin-bind on a free port to args if the binary has an
// admin endpoint and args do not set one; it returns the new args and the
// admin address ("" if none was added).
func withAdmin(t testing.TB, args []string) ([]string, string) {
	if !straitHasAdmin || hasFlag(args, "admin-bind") {
		return args, ""
	}
	admin := hostPort(freePort(t))
	return append(append([]string(nil), args...), "-admin-bind", admin), admin
}

// hasFlag reports whether args set -name or --name (either form).
func hasFlag(args []string, name string) bool {
	for _, a := range args {
		a = strings.TrimPrefix(strings.TrimPrefix(a, "-"), "-")
		if a == name || strings.HasPrefix(a, name+"=") {
			return true
		}
	}
	return false
}

func waitReady(t testing.TB, p *proc) {
	t.Helper()
	err := poll(30*time.Second, func() error {
		if strings.Contains(p.Output(), "proxy ready") {
			return nil
		}
		if p.exited() {
			return nil
		}
		return errors.New(`no "proxy ready" log line`)
	})
	if p.exited() {
		t.Fatalf("%s (pid %d) exited before becoming ready: %v", p.name, p.Pid(), p.waitErr)
	}
	if err != nil {
		t.Fatalf("%s (pid %d): %v", p.name, p.Pid(), err)
	}
}

// startBuiltin starts `consul connect proxy` (the reference implementation).
func startBuiltin(t testing.TB, a *agent, args ...string) *proc {
	t.Helper()
	requireConsul(t)
	full := append([]string{"connect", "proxy", "-http-addr", a.httpAddr}, args...)
	return startProc(t, "consul-connect-proxy", consulBin, full, cleanEnv(), false)
}

// ---------------------------------------------------------------------------
// the backend app

type appMode int

const (
	// modeEcho writes back every byte XOR key (key 0: plain echo); on EOF
	// from the client it half-closes and finishes.
	modeEcho appMode = iota
	// modeDigest reads until EOF, waits digestDelay, then replies
	// "<byte count> <sha256 hex>\n" and closes.
	modeDigest
)

const digestDelay = 300 * time.Millisecond

// app is an in-test TCP (or TLS) server counting accepted connections.
type app struct {
	ln      net.Listener
	mode    appMode
	key     byte
	accepts atomic.Int64
	resumed atomic.Int64 // TLS connections that resumed a session

	mu       sync.Mutex
	conns    map[net.Conn]struct{}
	peerURIs []string // first URI SAN of TLS peers (Connect-native servers)
}

// startApp starts a plaintext app on 127.0.0.1:0.
func startApp(t testing.TB, mode appMode, key byte) *app {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("app listen: %v", err)
	}
	return serveApp(t, ln, mode, key)
}

// serveApp serves the app protocol on ln (which may be a tls listener).
func serveApp(t testing.TB, ln net.Listener, mode appMode, key byte) *app {
	a := &app{ln: ln, mode: mode, key: key, conns: map[net.Conn]struct{}{}}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			a.accepts.Add(1)
			a.mu.Lock()
			a.conns[c] = struct{}{}
			a.mu.Unlock()
			go a.handle(c)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		a.mu.Lock()
		for c := range a.conns {
			c.Close()
		}
		a.mu.Unlock()
	})
	return a
}

func (a *app) Addr() string { return a.ln.Addr().String() }

func (a *app) Port() int { return a.ln.Addr().(*net.TCPAddr).Port }

func (a *app) Accepts() int64 { return a.accepts.Load() }

func (a *app) PeerURIs() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.peerURIs...)
}

func (a *app) handle(c net.Conn) {
	defer func() {
		c.Close()
		a.mu.Lock()
		delete(a.conns, c)
		a.mu.Unlock()
	}()
	if tc, ok := c.(*tls.Conn); ok {
		_ = tc.SetDeadline(time.Now().Add(30 * time.Second))
		if err := tc.Handshake(); err != nil {
			return
		}
		_ = tc.SetDeadline(time.Time{})
		if tc.ConnectionState().DidResume {
			a.resumed.Add(1)
		}
		if certs := tc.ConnectionState().PeerCertificates; len(certs) > 0 && len(certs[0].URIs) > 0 {
			a.mu.Lock()
			a.peerURIs = append(a.peerURIs, certs[0].URIs[0].String())
			a.mu.Unlock()
		}
	}
	switch a.mode {
	case modeEcho:
		buf := make([]byte, 32*1024)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				for i := range buf[:n] {
					buf[i] ^= a.key
				}
				if _, werr := c.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				if err == io.EOF {
					closeWrite(c)
				}
				return
			}
		}
	case modeDigest:
		h := newDigest()
		if _, err := io.Copy(h, c); err != nil {
			return
		}
		time.Sleep(digestDelay) // a slow server: the reply comes well after EOF
		_, _ = io.WriteString(c, h.String()+"\n")
		closeWrite(c)
	}
}

func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
}

// ---------------------------------------------------------------------------
// client-side helpers

func randomBytes(t testing.TB, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// roundTrip writes payload and reads back len(payload) bytes, which must be
// payload XOR key, byte for byte.
func roundTrip(c net.Conn, payload []byte, key byte, timeout time.Duration) error {
	_ = c.SetDeadline(time.Now().Add(timeout))
	defer c.SetDeadline(time.Time{})
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		werr <- err
	}()
	got := make([]byte, len(payload))
	n, rerr := io.ReadFull(c, got)
	if err := <-werr; err != nil {
		return fmt.Errorf("write: %w (read %d/%d bytes)", err, n, len(payload))
	}
	if rerr != nil {
		return fmt.Errorf("read %d/%d bytes: %w", n, len(payload), rerr)
	}
	for i := range got {
		if got[i] != payload[i]^key {
			return fmt.Errorf("byte %d of %d: got %#x, want %#x", i, len(payload), got[i], payload[i]^key)
		}
	}
	return nil
}

// echoVia dials network/addr, round-trips size random bytes and closes.
func echoVia(network, addr string, size int, key byte) error {
	c, err := net.DialTimeout(network, addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	payload := make([]byte, size)
	_, _ = rand.Read(payload)
	return roundTrip(c, payload, key, 10*time.Second)
}

// refused checks that an established connection is closed by the other side
// without a single byte coming back. Returns nil if refused.
func refused(c net.Conn, timeout time.Duration) error {
	_ = c.SetDeadline(time.Now().Add(timeout))
	_, _ = c.Write([]byte("is anybody there?"))
	buf := make([]byte, 64)
	n, err := c.Read(buf)
	if n > 0 {
		return fmt.Errorf("connection was not refused: received %q", buf[:n])
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return fmt.Errorf("connection neither answered nor closed within %s", timeout)
	}
	return nil // EOF, reset or a TLS alert
}

// refusedVia dials network/addr (which must accept the TCP connection) and
// checks the connection is refused.
func refusedVia(network, addr string) error {
	c, err := net.DialTimeout(network, addr, 5*time.Second)
	if errors.Is(err, syscall.ECONNRESET) {
		// Accepted and reset before the dialer looked at the socket (a
		// busy machine): refused all the same.
		return nil
	}
	if err != nil {
		return fmt.Errorf("dial %s: %w (want an accepted-then-refused connection)", addr, err)
	}
	defer c.Close()
	return refused(c, 10*time.Second)
}

// dialFails returns nil once nothing accepts on addr.
func dialFails(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return nil
	}
	c.Close()
	return fmt.Errorf("%s still accepts connections", addr)
}

// ---------------------------------------------------------------------------
// mesh TLS clients

// meshClientConfig is a TLS client config that presents cert (may be nil)
// and verifies the server like Connect does: chain to roots, ServerAuth EKU
// and the expected SPIFFE URI (if wantURI is set). Verification runs in
// VerifyConnection, so it also runs on resumed sessions.
func meshClientConfig(cert *tls.Certificate, roots *x509.CertPool, wantURI string) *tls.Config {
	cfg := &tls.Config{
		InsecureSkipVerify: true, // verified below: SPIFFE, not DNS names
		MinVersion:         tls.VersionTLS12,
		VerifyConnection: func(cs tls.ConnectionState) error {
			return verifyMeshServer(cs.PeerCertificates, roots, wantURI)
		},
	}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	return cfg
}

func verifyMeshServer(certs []*x509.Certificate, roots *x509.CertPool, wantURI string) error {
	if len(certs) == 0 {
		return errors.New("server presented no certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	if _, err := certs[0].Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: inter,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}); err != nil {
		return fmt.Errorf("server certificate: %w", err)
	}
	if wantURI != "" {
		if len(certs[0].URIs) == 0 || !strings.EqualFold(certs[0].URIs[0].String(), wantURI) {
			return fmt.Errorf("server identity %v, want %s", certs[0].URIs, wantURI)
		}
	}
	return nil
}

// dialMesh dials addr with cfg and completes the client side of the
// handshake.
func dialMesh(addr string, cfg *tls.Config) (*tls.Conn, error) {
	raw, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	c := tls.Client(raw, cfg)
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if err := c.Handshake(); err != nil {
		c.Close()
		return nil, err
	}
	_ = c.SetDeadline(time.Time{})
	return c, nil
}

// tlsRefused dials addr with cfg and checks the server refuses the
// connection, during the handshake or right after it (TLS 1.3 clients
// finish before the server has checked their certificate). It returns a
// description of how it was refused.
func tlsRefused(addr string, cfg *tls.Config) (string, error) {
	raw, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return "", fmt.Errorf("dial %s: %w", addr, err)
	}
	defer raw.Close()
	c := tls.Client(raw, cfg)
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if err := c.Handshake(); err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return "", fmt.Errorf("handshake neither completed nor refused: %w", err)
		}
		return "handshake failed: " + err.Error(), nil
	}
	if err := refused(c, 10*time.Second); err != nil {
		return "", err
	}
	return "closed after handshake", nil
}

// ---------------------------------------------------------------------------
// a CA of our own

type testCA struct {
	key     *ecdsa.PrivateKey
	cert    *x509.Certificate
	certPEM string
	keyPEM  string
}

// newTestCA makes a self-signed root shaped like the ones Consul generates:
// URI SAN spiffe://<trustDomain>, SKID = Consul's KeyId of the public key.
func newTestCA(t testing.TB, trustDomain string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	kid, err := connect.KeyId(key.Public())
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "strait integration CA " + serial.Text(16)},
		URIs:                  []*url.URL{{Scheme: "spiffe", Host: trustDomain}},
		BasicConstraintsValid: true,
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(10 * 24 * time.Hour),
		SubjectKeyId:          kid,
		AuthorityKeyId:        kid,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{
		key:     key,
		cert:    cert,
		certPEM: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})),
		keyPEM:  string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})),
	}
}

// leaf mints a Connect-style leaf for the SPIFFE URI uri.
func (ca *testCA) leaf(t testing.TB, uri string) tls.Certificate {
	t.Helper()
	u, err := url.Parse(uri)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	kid, _ := connect.KeyId(key.Public())
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		URIs:                  []*url.URL{u},
		BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageDataEncipherment | x509.KeyUsageKeyAgreement |
			x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:    []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
		NotBefore:      time.Now().Add(-time.Minute),
		NotAfter:       time.Now().Add(time.Hour),
		SubjectKeyId:   kid,
		AuthorityKeyId: ca.cert.SubjectKeyId,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}

// ---------------------------------------------------------------------------
// common topologies

// straitPair is app <- strait public listener (service dst) <- strait
// upstream listener (service src).
type straitPair struct {
	app          *app
	src, dst     string
	server       *proc // public listener for dst
	client       *proc // upstream for src
	publicAddr   string
	upstreamAddr string
}

// startStraitPair starts the pair and waits until data flows end to end.
func startStraitPair(t testing.TB, a *agent, mode appMode, key byte, extraServerArgs ...string) *straitPair {
	t.Helper()
	return startStraitPairArgs(t, a, mode, key, extraServerArgs, nil)
}

// startStraitPairArgs is startStraitPair with extra arguments for both ends.
func startStraitPairArgs(t testing.TB, a *agent, mode appMode, key byte, extraServerArgs, extraClientArgs []string) *straitPair {
	t.Helper()
	p := &straitPair{app: startApp(t, mode, key), src: uniq("web"), dst: uniq("db")}
	pub := freePort(t)
	p.publicAddr = hostPort(pub)
	args := append([]string{"-service", p.dst, "-listen", p.publicAddr, "-service-addr", p.app.Addr()}, extraServerArgs...)
	p.server = startStrait(t, a, args...)
	a.registerProxy(t, p.dst, pub)
	up := freePort(t)
	p.upstreamAddr = hostPort(up)
	p.client = startStrait(t, a, append([]string{"-service", p.src, "-upstream", fmt.Sprintf("%s:%d", p.dst, up)}, extraClientArgs...)...)
	if mode == modeEcho {
		eventually(t, 30*time.Second, func() error { return echoVia("tcp", p.upstreamAddr, 1024, key) })
	}
	return p
}

// digestWriter is "<count> <sha256 hex>" of everything written to it.
type digestWriter struct {
	n int64
	h interface {
		io.Writer
		Sum([]byte) []byte
	}
}

func newDigest() *digestWriter { return &digestWriter{h: sha256.New()} }

func (d *digestWriter) Write(p []byte) (int, error) {
	d.n += int64(len(p))
	return d.h.Write(p)
}

func (d *digestWriter) String() string {
	return fmt.Sprintf("%d %x", d.n, d.h.Sum(nil))
}

// ctxTimeout is a context that the test's cleanup cancels.
func ctxTimeout(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
