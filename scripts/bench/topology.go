package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"time"
)

// env is what every topology is started with.
type env struct {
	procs   *procSet
	tmp     string
	self    string // this binary, for the backend and relay modes
	agent   *agent
	backend string // backend address (echo/source/sink by mode byte)
	strait  string
	consul  string
	tck     int64
	profile string // directory for CPU profiles; empty: none
}

// pair is one running topology: clients dial entry, which is proxy A's
// upstream listener; A forwards to B, B to the backend.
type pair struct {
	entry string
	a, b  *proc
	// pprofA, pprofB serve net/http/pprof (-pprof-addr) when profiling.
	pprofA, pprofB string
}

// pids are the measured proxy processes.
func (p *pair) pids() []int { return []int{p.a.pid(), p.b.pid()} }

// stop stops both proxies by PID: A first, so B sees its clients go away.
func (p *pair) stop() {
	for _, q := range []*proc{p.a, p.b} {
		if q != nil {
			q.stop(10 * time.Second)
		}
	}
}

type topology struct {
	label    string
	optional bool // a setup failure is reported but does not fail the run
	start    func(context.Context, *env) (*pair, error)
}

var topologies = map[string]topology{
	"strait": {label: "strait pair (tunnels, default)", start: func(ctx context.Context, e *env) (*pair, error) {
		// A short drain: the harness closes its connections before stopping.
		return startMeshPair(ctx, e, "strait", []string{e.strait}, "-shutdown-grace", "1s")
	}},
	"strait-classic": {label: "strait pair (classic, -tunnels=off)", start: func(ctx context.Context, e *env) (*pair, error) {
		return startMeshPair(ctx, e, "strait-classic", []string{e.strait}, "-shutdown-grace", "1s", "-tunnels", "off")
	}},
	"strait-x25519": {label: "strait pair (classic, -tunnels=off -tls-kex x25519)", start: func(ctx context.Context, e *env) (*pair, error) {
		return startMeshPair(ctx, e, "strait-x25519", []string{e.strait}, "-shutdown-grace", "1s", "-tunnels", "off", "-tls-kex", "x25519")
	}},
	"builtin": {label: "built-in pair", start: func(ctx context.Context, e *env) (*pair, error) {
		return startMeshPair(ctx, e, "builtin", []string{e.consul, "connect", "proxy"})
	}},
	"relay": {label: "plain relay pair", start: func(ctx context.Context, e *env) (*pair, error) {
		return startRelayPair(ctx, e)
	}},
	"relay-copy": {label: "copy relay pair (read/write, no splice)", start: func(ctx context.Context, e *env) (*pair, error) {
		return startRelayPair(ctx, e, "-copy")
	}},
	"haproxy": {label: "HAProxy mTLS pair", optional: true, start: startHAProxyPair},
	"stunnel": {label: "stunnel mTLS pair", optional: true, start: startStunnelPair},
}

// readyRE matches strait's "proxy ready" and the built-in's
// "Proxy loaded config and ready to serve".
var readyRE = regexp.MustCompile(`proxy ready|ready to serve`)

// startMeshPair starts B (`-service bench-server-<name> -listen ...
// -register`, so the agent lists it as bench-server-<name>'s connect
// proxy), waits until it is listening and passing, then A (`-service
// bench-client-<name> -upstream bench-server-<name>:...`). argv is the
// proxy command (strait, or consul connect proxy); both take the same flags.
func startMeshPair(ctx context.Context, e *env, name string, argv []string, extra ...string) (*pair, error) {
	client, server := "bench-client-"+name, "bench-server-"+name
	ports, err := freePorts(2)
	if err != nil {
		return nil, err
	}
	upstream := "127.0.0.1:" + strconv.Itoa(ports[0])
	public := "127.0.0.1:" + strconv.Itoa(ports[1])
	common := []string{"-http-addr", e.agent.httpAddr, "-log-level", "info"}
	common = append(common, extra...)

	pr := &pair{entry: upstream}
	var aProf, bProf []string
	if e.profile != "" {
		pp, err := freePorts(2)
		if err != nil {
			return nil, err
		}
		pr.pprofA, pr.pprofB = "127.0.0.1:"+strconv.Itoa(pp[0]), "127.0.0.1:"+strconv.Itoa(pp[1])
		aProf, bProf = []string{"-pprof-addr", pr.pprofA}, []string{"-pprof-addr", pr.pprofB}
	}
	bArgs := append(append([]string{}, argv[1:]...),
		"-service", server, "-service-addr", e.backend, "-listen", public, "-register")
	bArgs = append(bArgs, bProf...)
	pr.b, err = e.procs.start(name+"-B", e.tmp, argv[0], append(bArgs, common...)...)
	if err != nil {
		return nil, err
	}
	if _, err := pr.b.waitLog(ctx, readyRE, 30*time.Second); err != nil {
		return pr, err
	}
	if err := waitDialable(ctx, public, pr.b, 30*time.Second); err != nil {
		return pr, fmt.Errorf("%s public listener: %w", pr.b.name, err)
	}
	if err := e.agent.waitPassing(ctx, server, pr.b, 30*time.Second); err != nil {
		return pr, err
	}

	aArgs := append(append([]string{}, argv[1:]...),
		"-service", client, "-upstream", server+":"+upstream)
	aArgs = append(aArgs, aProf...)
	pr.a, err = e.procs.start(name+"-A", e.tmp, argv[0], append(aArgs, common...)...)
	if err != nil {
		return pr, err
	}
	if _, err := pr.a.waitLog(ctx, readyRE, 30*time.Second); err != nil {
		return pr, err
	}
	if err := waitDialable(ctx, upstream, pr.a, 30*time.Second); err != nil {
		return pr, fmt.Errorf("%s upstream listener: %w", pr.a.name, err)
	}
	return pr, nil
}

// startRelayPair starts two plain TCP relays (this binary's relay mode):
// A -> B -> backend, no TLS, no discovery; extra goes to both.
func startRelayPair(ctx context.Context, e *env, extra ...string) (*pair, error) {
	pr := &pair{}
	var bAddr string
	var err error
	pr.b, bAddr, err = startSelf(ctx, e.procs, e.self, e.tmp, "relay-B", append([]string{"relay", "-listen", "127.0.0.1:0", "-target", e.backend}, extra...)...)
	if err != nil {
		return pr, err
	}
	pr.a, pr.entry, err = startSelf(ctx, e.procs, e.self, e.tmp, "relay-A", append([]string{"relay", "-listen", "127.0.0.1:0", "-target", bAddr}, extra...)...)
	if err != nil {
		return pr, err
	}
	return pr, nil
}

// agentCerts writes leaf certificates (with their keys) issued by the
// agent's Connect CA for bench-client-<name> and bench-server-<name>, and
// the CA roots, into dir: client.pem, server.pem, ca.pem.
func agentCerts(ctx context.Context, e *env, name, dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	var roots string
	for _, side := range []string{"client", "server"} {
		cert, key, r, err := e.agent.leaf(ctx, "bench-"+side+"-"+name)
		if err != nil {
			return fmt.Errorf("leaf for bench-%s-%s: %w", side, name, err)
		}
		roots = r
		if err := os.WriteFile(filepath.Join(dir, side+".pem"), []byte(cert+"\n"+key+"\n"), 0o600); err != nil {
			return err
		}
	}
	return os.WriteFile(filepath.Join(dir, "ca.pem"), []byte(roots), 0o600)
}

// startConfigPair starts B then A, each as bin with args plus the path of
// its config file (written to dir), and waits until each listens.
func startConfigPair(ctx context.Context, e *env, name, dir, bin string, args []string, cfgA, cfgB, upstream, public string) (*pair, error) {
	pr := &pair{entry: upstream}
	for _, side := range []struct {
		name, cfg, addr string
		p               **proc
	}{{name + "-B", cfgB, public, &pr.b}, {name + "-A", cfgA, upstream, &pr.a}} {
		path := filepath.Join(dir, side.name+".cfg")
		if err := os.WriteFile(path, []byte(side.cfg), 0o600); err != nil {
			return pr, fmt.Errorf("%s: %w", name, err)
		}
		p, err := e.procs.start(side.name, e.tmp, bin, append(slices.Clone(args), path)...)
		if err != nil {
			return pr, err
		}
		*side.p = p
		if err := waitDialable(ctx, side.addr, p, 15*time.Second); err != nil {
			return pr, fmt.Errorf("%s: %w", side.name, err)
		}
	}
	return pr, nil
}

// startHAProxyPair runs two HAProxy processes doing mTLS between them with
// certificates issued by the agent's Connect CA (chain verified against the
// roots; HAProxy does not check the peer's SPIFFE ID, so it does a little
// less work than the mesh proxies). Skipped when haproxy is not installed.
func startHAProxyPair(ctx context.Context, e *env) (*pair, error) {
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		return nil, skipError{"haproxy not installed"}
	}
	dir := filepath.Join(e.tmp, "haproxy")
	if err := agentCerts(ctx, e, "haproxy", dir); err != nil {
		return nil, fmt.Errorf("haproxy: %w", err)
	}
	ports, err := freePorts(2)
	if err != nil {
		return nil, err
	}
	upstream := "127.0.0.1:" + strconv.Itoa(ports[0])
	public := "127.0.0.1:" + strconv.Itoa(ports[1])
	const global = "global\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n"
	cfgB := global + fmt.Sprintf("frontend pub\n  bind %s ssl crt %s ca-file %s verify required\n  default_backend app\nbackend app\n  server app %s\n",
		public, filepath.Join(dir, "server.pem"), filepath.Join(dir, "ca.pem"), e.backend)
	cfgA := global + fmt.Sprintf("frontend up\n  bind %s\n  default_backend mesh\nbackend mesh\n  server b %s ssl crt %s ca-file %s verify required\n",
		upstream, public, filepath.Join(dir, "client.pem"), filepath.Join(dir, "ca.pem"))
	return startConfigPair(ctx, e, "haproxy", dir, bin, []string{"-db", "-f"}, cfgA, cfgB, upstream, public)
}

// startStunnelPair runs two stunnel processes (Debian's stunnel4) doing
// mTLS between them with agent-issued certificates, like the HAProxy pair
// (chain verified, no SPIFFE ID check). stunnel runs a thread per
// connection. Skipped when stunnel is not installed.
func startStunnelPair(ctx context.Context, e *env) (*pair, error) {
	bin, err := exec.LookPath("stunnel4")
	if err != nil {
		if bin, err = exec.LookPath("stunnel"); err != nil {
			return nil, skipError{"stunnel not installed"}
		}
	}
	dir := filepath.Join(e.tmp, "stunnel")
	if err := agentCerts(ctx, e, "stunnel", dir); err != nil {
		return nil, fmt.Errorf("stunnel: %w", err)
	}
	ports, err := freePorts(2)
	if err != nil {
		return nil, err
	}
	upstream := "127.0.0.1:" + strconv.Itoa(ports[0])
	public := "127.0.0.1:" + strconv.Itoa(ports[1])
	// Errors only: the default level logs every connection.
	const global = "foreground = yes\npid =\ndebug = err\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n"
	cfgB := global + fmt.Sprintf("[pub]\naccept = %s\nconnect = %s\ncert = %s\nCAfile = %s\nverifyChain = yes\nrequireCert = yes\n",
		public, e.backend, filepath.Join(dir, "server.pem"), filepath.Join(dir, "ca.pem"))
	cfgA := global + fmt.Sprintf("[up]\nclient = yes\naccept = %s\nconnect = %s\ncert = %s\nCAfile = %s\nverifyChain = yes\n",
		upstream, public, filepath.Join(dir, "client.pem"), filepath.Join(dir, "ca.pem"))
	return startConfigPair(ctx, e, "stunnel", dir, bin, nil, cfgA, cfgB, upstream, public)
}
