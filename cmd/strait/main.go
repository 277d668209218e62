// Command strait is a drop-in replacement for `consul connect proxy`: same
// flags, same agent registrations, production behaviour. It only turns
// flags into a configuration and handles signals; the work happens in the
// config, proxy, tlsutil, authz and upstream packages.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/proxy"
	"github.com/straitproxy/strait/tlsutil"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "0.1.0-dev"

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// usageError is invalid input: reported in one line, exit status 2, and
// nothing has been started.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, a ...any) error { return usageError{fmt.Sprintf(format, a...)} }

type upstreamFlags []config.Upstream

func (u *upstreamFlags) String() string { return fmt.Sprint(len(*u), " upstreams") }
func (u *upstreamFlags) Set(s string) error {
	up, err := config.ParseUpstream(s)
	if err != nil {
		return err
	}
	*u = append(*u, up)
	return nil
}

type options struct {
	proxyID, sidecarFor       string
	service, serviceAddr      string
	listen                    string
	upstreams                 upstreamFlags
	register                  bool
	registerID                string
	logLevel                  string
	logJSON                   bool
	pprofAddr                 string
	shutdownGrace             time.Duration
	halfCloseTimeout          time.Duration
	tlsKex                    string
	ktls                      string
	api                       config.API
	flagsModeSet, registerSet bool
}

func parseFlags(args []string) (*options, error) {
	o := &options{}
	fs := flag.NewFlagSet("strait", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&o.proxyID, "proxy-id", os.Getenv("CONNECT_PROXY_ID"), "Agent mode: the proxy's service ID in the local agent. Env CONNECT_PROXY_ID.")
	fs.StringVar(&o.sidecarFor, "sidecar-for", os.Getenv("CONNECT_SIDECAR_FOR"), "Agent mode: the ID of the service whose sidecar registration to run. Env CONNECT_SIDECAR_FOR.")
	fs.StringVar(&o.service, "service", "", "Flags mode: name of the service this proxy represents.")
	fs.StringVar(&o.serviceAddr, "service-addr", "", "Flags mode: host:port of the local application (required with -listen).")
	fs.StringVar(&o.listen, "listen", "", "Flags mode: host:port for the public mTLS listener.")
	fs.Var(&o.upstreams, "upstream", "Flags mode: <name>[.service|.query]:[<bind-host>:]<port>, or <name>:unix:/path; repeatable.")
	fs.BoolVar(&o.register, "register", false, "Flags mode: register the proxy with the agent (TTL check, deregistered on exit).")
	fs.StringVar(&o.registerID, "register-id", "", "Suffix of the registered proxy's ID.")
	fs.StringVar(&o.logLevel, "log-level", "INFO", "trace, debug, info, warn or error.")
	fs.BoolVar(&o.logJSON, "log-json", false, "Log JSON lines.")
	fs.StringVar(&o.pprofAddr, "pprof-addr", "", "Serve net/http/pprof on this host:port.")
	fs.DurationVar(&o.shutdownGrace, "shutdown-grace", 15*time.Second, "On SIGINT/SIGTERM, how long live connections may finish.")
	fs.DurationVar(&o.halfCloseTimeout, "half-close-timeout", proxy.DefaultHalfCloseTimeout, "Idle limit of a connection one side of which has finished sending.")
	fs.StringVar(&o.tlsKex, "tls-kex", "hybrid", "TLS key exchange: hybrid (post-quantum X25519MLKEM768 first, Go's default) or x25519 (cheaper handshakes).")
	fs.StringVar(&o.ktls, "ktls", "auto", "Kernel TLS offload: auto (probe and report at start) or off.")
	fs.StringVar(&o.api.Addr, "http-addr", "", "Consul agent HTTP address. Env CONSUL_HTTP_ADDR (default 127.0.0.1:8500).")
	fs.StringVar(&o.api.Token, "token", "", "ACL token. Env CONSUL_HTTP_TOKEN.")
	fs.StringVar(&o.api.TokenFile, "token-file", "", "File holding the ACL token, re-read on SIGHUP. Env CONSUL_HTTP_TOKEN_FILE.")
	fs.StringVar(&o.api.CAFile, "ca-file", "", "CA file for the agent's HTTPS. Env CONSUL_CACERT.")
	fs.StringVar(&o.api.CAPath, "ca-path", "", "CA directory for the agent's HTTPS. Env CONSUL_CAPATH.")
	fs.StringVar(&o.api.ClientCert, "client-cert", "", "Client certificate for the agent's HTTPS. Env CONSUL_CLIENT_CERT.")
	fs.StringVar(&o.api.ClientKey, "client-key", "", "Client key for the agent's HTTPS. Env CONSUL_CLIENT_KEY.")
	fs.StringVar(&o.api.TLSServerName, "tls-server-name", "", "Server name for the agent's HTTPS. Env CONSUL_TLS_SERVER_NAME.")
	fs.StringVar(&o.api.Datacenter, "datacenter", "", "Datacenter for agent queries; defaults to the agent's.")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, err
		}
		return nil, usageError{err.Error()}
	}
	if fs.NArg() > 0 {
		return nil, usagef("unexpected argument %q (strait takes only flags, or the 'version' command)", fs.Arg(0))
	}
	fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "service", "service-addr", "listen", "upstream":
			o.flagsModeSet = true
		case "register", "register-id":
			o.registerSet = true
		}
	})
	return o, o.validate()
}

func (o *options) validate() error {
	if _, err := tlsutil.KeyExchange(o.tlsKex); err != nil {
		return usagef("-tls-kex: %v", err)
	}
	if o.ktls != "auto" && o.ktls != "off" {
		return usagef("-ktls %q: want auto or off", o.ktls)
	}
	if hclog.LevelFromString(o.logLevel) == hclog.NoLevel {
		return usagef("-log-level %q: want trace, debug, info, warn or error", o.logLevel)
	}
	agentMode := o.proxyID != "" || o.sidecarFor != ""
	switch {
	case agentMode && (o.flagsModeSet || o.registerSet):
		return usagef("both modes given: -proxy-id/-sidecar-for (agent mode) cannot be combined with -service, -listen, -service-addr, -upstream or -register (flags mode)")
	case !agentMode && o.service == "":
		return usagef("no mode given: use -proxy-id or -sidecar-for (agent mode) or -service (flags mode)")
	case agentMode:
		return nil
	}
	if o.listen != "" {
		if o.serviceAddr == "" {
			return usagef("-listen requires -service-addr (the local application's host:port)")
		}
		if _, _, err := config.ParseListen(o.listen); err != nil {
			return usagef("-listen: %v", err)
		}
	}
	if o.serviceAddr != "" {
		if _, _, err := net.SplitHostPort(o.serviceAddr); err != nil {
			return usagef("-service-addr %q: want host:port", o.serviceAddr)
		}
	}
	if o.register && o.listen == "" {
		return usagef("-register requires -listen")
	}
	if o.shutdownGrace < 0 {
		return usagef("-shutdown-grace must not be negative")
	}
	seen := map[string]bool{}
	for _, u := range o.upstreams {
		k := u.Network() + " " + u.Addr()
		if seen[k] {
			return usagef("-upstream: two upstreams bind %s", u.Addr())
		}
		seen[k] = true
	}
	return nil
}

// flagsConfig is the static Config of flags mode.
func (o *options) flagsConfig() *config.Config {
	c := &config.Config{Service: o.service, Upstreams: o.upstreams}
	if o.listen != "" {
		host, port, _ := config.ParseListen(o.listen)
		c.Public = &config.Public{BindAddress: host, BindPort: port, LocalServiceAddress: o.serviceAddr}
	}
	return c
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && (args[0] == "version" || args[0] == "-version" || args[0] == "--version") {
		fmt.Fprintf(stdout, "strait %s\n", version)
		return 0
	}
	o, err := parseFlags(args)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprintln(stdout, "usage: strait [flags]   (same flags as `consul connect proxy`; see README.md)")
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "strait: %v\n", err)
		return 2
	}
	agent, err := o.api.Connect()
	if err != nil {
		fmt.Fprintf(stderr, "strait: %v\n", err)
		return 2
	}
	client := agent.Client
	log := hclog.New(&hclog.LoggerOptions{
		Name: "strait", Level: hclog.LevelFromString(o.logLevel), JSONFormat: o.logJSON, Output: stderr,
	})

	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)

	if o.pprofAddr != "" {
		if err := servePprof(ctx, o.pprofAddr, log); err != nil {
			fmt.Fprintf(stderr, "strait: -pprof-addr: %v\n", err)
			return 2
		}
	}

	cfgs := make(chan *config.Config, 1)
	runCtx, stopRun := context.WithCancel(ctx)
	defer stopRun()
	// feeder delivers configurations; in flags mode with -register it also
	// owns the registration and deregisters when runCtx ends.
	feederDone := make(chan struct{})
	go func() {
		defer close(feederDone)
		if o.proxyID == "" && o.sidecarFor == "" {
			cfgs <- o.flagsConfig()
			if o.register {
				host, port, _ := config.ParseListen(o.listen)
				r := &config.Register{Client: client, Service: o.service, Address: host, Port: port, IDSuffix: o.registerID, Logger: log.Named("register")}
				r.Run(runCtx)
			}
			return
		}
		id := o.proxyID
		for id == "" && runCtx.Err() == nil {
			var err error
			if id, err = config.SidecarFor(client, o.sidecarFor); err != nil {
				log.Error("finding the sidecar registration; retrying", "sidecar_for", o.sidecarFor, "error", err)
				if !sleep(runCtx, 2*time.Second) {
					return
				}
			}
		}
		log.Info("agent mode", "proxy_id", id)
		config.WatchAgent(runCtx, client, id, log.Named("config"), cfgs)
	}()

	curves, _ := tlsutil.KeyExchange(o.tlsKex)
	p := proxy.New(proxy.Options{KTLS: o.ktls, CurvePreferences: curves, Client: client, AgentConfig: agent.Config, Logger: log, HalfCloseTimeout: o.halfCloseTimeout, DrainTimeout: o.shutdownGrace})
	runErr := make(chan error, 1)
	go func() { runErr <- p.Run(runCtx, cfgs) }()

	for {
		select {
		case err := <-runErr:
			if err != nil {
				log.Error("proxy failed", "error", err)
				shutdown(p, log, 0)
				return 1
			}
			runErr = nil
		case s := <-sigs:
			if s == syscall.SIGHUP {
				reloadToken(agent, log)
				continue
			}
			log.Info("signal received; draining", "signal", s.String(), "grace", o.shutdownGrace)
			stopRun()
			done := make(chan struct{})
			go func() {
				shutdown(p, log, o.shutdownGrace)
				<-feederDone
				close(done)
			}()
			select {
			case <-done:
				log.Info("stopped")
				return 0
			case s := <-sigs:
				log.Warn("second signal; exiting now", "signal", s.String())
				return 1
			}
		}
	}
}

func shutdown(p *proxy.Proxy, log hclog.Logger, grace time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	p.Shutdown(ctx)
}

// reloadToken re-reads the token file on SIGHUP. A failure keeps the old
// token: SIGHUP never stops the proxy.
func reloadToken(agent *config.Agent, log hclog.Logger) {
	if agent.TokenFile == "" {
		log.Info("SIGHUP: no token file configured; nothing to reload")
		return
	}
	if err := agent.ReloadToken(); err != nil {
		log.Error("SIGHUP: keeping the previous token", "error", err)
		return
	}
	log.Info("SIGHUP: token reloaded", "file", agent.TokenFile)
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

func servePprof(ctx context.Context, addr string, log hclog.Logger) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("pprof server stopped", "error", err)
		}
	}()
	go func() { <-ctx.Done(); srv.Close() }()
	log.Info("pprof listening", "addr", ln.Addr().String())
	return nil
}
