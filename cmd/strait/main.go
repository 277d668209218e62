// Command strait is a drop-in replacement for `consul connect proxy`: same
// flags, same agent registrations, production behaviour. It only turns
// flags into a configuration (flags.go), builds the proxy's parts
// (wiring.go) and handles signals; the work happens in the config, proxy,
// tlsutil, authz, upstream and tunnel packages.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	stdlog "log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/admin"
	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/dataplane"
	"github.com/straitproxy/strait/internal/lifecycle"
	"github.com/straitproxy/strait/internal/watch"
	"github.com/straitproxy/strait/metrics"
	"github.com/straitproxy/strait/proxy"
	"github.com/straitproxy/strait/tlsutil"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "0.1.0-dev"

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && (args[0] == "version" || args[0] == "-version" || args[0] == "--version") {
		fmt.Fprintf(stdout, "strait %s\n", version)
		return 0
	}
	if len(args) > 0 && args[0] == "redirect-traffic" {
		return runRedirect(args[1:], stdout, stderr)
	}
	if len(args) > 0 && args[0] == "dataplane" {
		o, err := parseDataplaneFlags(args[1:])
		if errors.Is(err, flag.ErrHelp) {
			if err := writeDataplaneHelp(stdout); err != nil {
				fmt.Fprintf(stderr, "strait: -h: %v\n", err)
				return 1
			}
			return 0
		}
		if err != nil {
			fmt.Fprintf(stderr, "strait: %v\n", err)
			return 2
		}
		if o.dp.checkHealth {
			return checkProxyHealth(o, stdout, stderr)
		}
		return runProxy(o, stdout, stderr)
	}
	o, err := parseFlags(args)
	if errors.Is(err, flag.ErrHelp) {
		if err := writeHelp(stdout); err != nil {
			fmt.Fprintf(stderr, "strait: -h: %v\n", err)
			return 1
		}
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "strait: %v\n", err)
		return 2
	}
	if o.gw.kind != "" {
		return runGateway(o, stdout, stderr)
	}
	return runProxy(o, stdout, stderr)
}

// runProxy runs the sidecar proxy in agent, flags or dataplane mode.
func runProxy(o *options, stdout, stderr io.Writer) int {
	started := time.Now()
	log := hclog.New(&hclog.LoggerOptions{
		Name: "strait", Level: hclog.LevelFromString(o.logLevel), JSONFormat: o.logJSON, Output: stderr,
		IndependentLevels: true,
	})
	m := metrics.New(metrics.Options{Logger: log.Named("metrics")})
	// Deferred early, so it runs after the proxy's shutdown: the push
	// sinks send what they hold and their goroutines are joined.
	defer m.Close()
	var (
		agent *config.Agent
		dp    *dataplane.Dataplane
		err   error
	)
	if o.dp != nil {
		id, err := o.dp.proxyServiceID()
		if err != nil {
			fmt.Fprintf(stderr, "strait: dataplane: %v\n", err)
			return 2
		}
		o.dp.proxyID = id
		dopts := o.dp.options(id)
		dopts.Logger, dopts.Metrics = log.Named("dataplane"), m
		if dp, err = dataplane.New(dopts); err != nil {
			fmt.Fprintf(stderr, "strait: dataplane: %v\n", err)
			return 2
		}
		// The servers' API client stands in for the agent's.
		agent = &config.Agent{Client: dp.Client, Config: dp.Config}
		if len(o.dp.ignored) > 0 || len(o.dp.extra) > 0 {
			log.Warn("ignoring flags and arguments that configure Envoy or consul-dataplane features strait does not have",
				"flags", strings.Join(o.dp.ignored, ","), "envoy_args", strings.Join(o.dp.extra, " "))
		}
	} else if agent, err = o.api.Connect(); err != nil {
		fmt.Fprintf(stderr, "strait: %v\n", err)
		return 2
	}
	client := agent.Client
	if soft, hard, err := lifecycle.RaiseNoFile(); err != nil {
		log.Warn("could not raise the open-file limit", "error", err)
	} else {
		log.Info("open-file limit", "soft", soft, "hard", hard)
	}
	sd := lifecycle.New(log)
	// The access log is governed by -access-log, not -log-level.
	access := log.Named("access")
	access.SetLevel(hclog.Info)
	// go-metrics' statsd sinks and net/http report through the standard
	// logger: keep their lines in strait's format.
	stdlog.SetFlags(0)
	stdlog.SetOutput(log.StandardWriter(&hclog.StandardLoggerOptions{InferLevels: true}))

	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)

	if o.pprofAddr != "" {
		ps, err := admin.ServePprof(o.pprofAddr, log)
		if err != nil {
			fmt.Fprintf(stderr, "strait: -pprof-addr: %v\n", err)
			return 2
		}
		defer ps.Close()
	}

	accessMode, _ := proxy.ParseAccessLog(o.accessLog)
	curves, _ := tlsutil.KeyExchange(o.tlsKex)
	w := newParts(agent, dp, log, curves, o.tunnels == "on")
	p := proxy.New(proxy.Options{
		Parts: w.build, Tunnels: w.tunnels, KTLS: o.ktls, Logger: log,
		HalfCloseTimeout: o.halfCloseTimeout, DrainTimeout: o.shutdownGrace,
		Metrics: m, Telemetry: o.telemetry(), AccessLog: accessMode, AccessLogger: access,
		MaxInboundConnections: o.maxInbound, MaxHandshakes: o.maxHandshakes, MaxOutboundConnections: o.maxOutbound,
	})
	// graceful is consul-dataplane's lifecycle (dataplane mode): its
	// endpoints are on the admin listener and on -graceful-port.
	var graceful *lifecycleEndpoints
	var extra map[string]http.Handler
	if o.dp != nil {
		graceful = newLifecycleEndpoints(o.dp, p, o.shutdownGrace, log.Named("lifecycle"))
		extra = graceful.handlers()
		if o.dp.gracefulPort != 0 {
			addr := net.JoinHostPort(o.dp.gracefulAddr, strconv.Itoa(o.dp.gracefulPort))
			mux := http.NewServeMux()
			for pattern, h := range extra {
				mux.Handle(pattern, h)
			}
			gs, err := admin.ListenHandler(addr, mux, log.Named("lifecycle"), "lifecycle")
			switch {
			case err == nil:
				defer gs.Close()
			case o.set["graceful-port"] || o.set["graceful-addr"]:
				fmt.Fprintf(stderr, "strait: dataplane: -graceful-port: %v\n", err)
				return 2
			default: // the default port is taken: the admin listener still has the endpoints
				log.Warn("lifecycle listener not started; the endpoints are on the admin listener", "addr", addr, "error", err)
			}
		}
	}
	httpAddr := agent.Config.Scheme + "://" + agent.Config.Address
	if dp != nil {
		httpAddr = o.dp.addresses
	}
	// The admin listener binds before anything else starts, so that /ready
	// answers 503 with the reason while strait waits for the agent.
	if o.adminBind != "off" {
		srv, err := admin.Listen(o.adminBind, admin.Options{
			Proxy: p, Metrics: m, Pprof: o.adminPprof, Logger: log.Named("admin"), Started: started,
			Settings: o.settings(httpAddr), Extra: extra,
		})
		switch {
		case err == nil:
			defer srv.Close()
		case o.adminBindSet:
			fmt.Fprintf(stderr, "strait: -admin-bind: %v\n", err)
			return 2
		default:
			// The default address cannot be bound (typically a second
			// strait on this host): run without it rather than refuse to
			// proxy where the built-in would run.
			log.Warn("admin listener not started; give each strait its own -admin-bind", "addr", o.adminBind, "error", err)
		}
	}

	cfgs := make(chan *config.Config, 1)
	runCtx, stopRun := context.WithCancel(ctx)
	defer stopRun()
	watchCtx := watch.WithObserver(runCtx, p.WatchObserver()) // config watch failures show on /ready
	// bg owns the goroutines started below; every exit but the forced one
	// (second signal) stops and joins them.
	var bg sync.WaitGroup
	stopAll := func() {
		stop() // runCtx too
		bg.Wait()
	}
	// feeder delivers configurations; in flags mode with -register it also
	// owns the registration and deregisters when runCtx ends.
	bg.Go(func() {
		if dp != nil {
			if err := dp.Start(watchCtx); err != nil {
				return // stopped before the first login
			}
			bg.Go(func() { dp.Run(runCtx) })
			log.Info("dataplane mode", "proxy_service_id", o.dp.proxyID, "node", o.dp.nodeName)
			dp.WatchRegistration(watchCtx, cfgs)
			return
		}
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
			id, err = config.SidecarFor(client, o.sidecarFor)
			p.WatchObserver().WatchResult("sidecar-for "+o.sidecarFor, err)
			if err != nil {
				log.Error("finding the sidecar registration; retrying", "sidecar_for", o.sidecarFor, "error", err)
				if !watch.Sleep(runCtx, 2*time.Second) {
					return
				}
			}
		}
		log.Info("agent mode", "proxy_id", id)
		config.WatchAgent(watchCtx, client, id, log.Named("config"), cfgs)
	})

	runErr := make(chan error, 1)
	bg.Go(func() { runErr <- p.Run(runCtx, cfgs) })
	// systemd (Type=notify): READY=1 once ready; watchdog pings only while
	// the proxy can serve (an expired leaf stops them), the drain included.
	healthy := func() bool { return p.Readiness().Ready }
	bg.Go(func() { sd.ReadyWhen(runCtx, healthy) })
	bg.Go(func() { sd.Watchdog(ctx, healthy) })

	// logout ends the dataplane's login once the proxy has stopped.
	logout := func() {
		if dp == nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := dp.Close(ctx); err != nil {
			log.Error("logging out", "error", err)
		}
	}
	var gracefulReq <-chan struct{}
	if graceful != nil {
		gracefulReq = graceful.shutdownRequested()
	}
	for {
		var why string
		select {
		case err := <-runErr:
			if err != nil {
				log.Error("proxy failed", "error", err)
				shutdown(p, log, 0)
				stopAll()
				logout()
				return 1
			}
			runErr = nil
			continue
		case s := <-sigs:
			if s == syscall.SIGHUP {
				sd.Reload(func() { reloadToken(agent, log) })
				continue
			}
			why = s.String()
		case <-gracefulReq:
			why = "graceful shutdown request"
			gracefulReq = nil
		}
		{
			log.Info("signal received; draining", "signal", why, "grace", o.shutdownGrace)
			sd.Stopping()
			stopRun()
			done := make(chan struct{})
			go func() {
				shutdown(p, log, o.shutdownGrace)
				stopAll()
				logout()
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
