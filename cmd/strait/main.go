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
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/admin"
	"github.com/straitproxy/strait/config"
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
	agent, err := o.api.Connect()
	if err != nil {
		fmt.Fprintf(stderr, "strait: %v\n", err)
		return 2
	}
	client := agent.Client
	started := time.Now()
	log := hclog.New(&hclog.LoggerOptions{
		Name: "strait", Level: hclog.LevelFromString(o.logLevel), JSONFormat: o.logJSON, Output: stderr,
		IndependentLevels: true,
	})
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
	m := metrics.New(metrics.Options{Logger: log.Named("metrics")})
	// Deferred early, so it runs after the proxy's shutdown: the push
	// sinks send what they hold and their goroutines are joined.
	defer m.Close()
	w := newParts(agent, log, curves, o.tunnels == "on")
	p := proxy.New(proxy.Options{
		Parts: w.build, Tunnels: w.tunnels, KTLS: o.ktls, Logger: log,
		HalfCloseTimeout: o.halfCloseTimeout, DrainTimeout: o.shutdownGrace,
		Metrics: m, Telemetry: o.telemetry(), AccessLog: accessMode, AccessLogger: access,
		MaxInboundConnections: o.maxInbound, MaxHandshakes: o.maxHandshakes, MaxOutboundConnections: o.maxOutbound,
	})
	// The admin listener binds before anything else starts, so that /ready
	// answers 503 with the reason while strait waits for the agent.
	if o.adminBind != "off" {
		srv, err := admin.Listen(o.adminBind, admin.Options{
			Proxy: p, Metrics: m, Pprof: o.adminPprof, Logger: log.Named("admin"), Started: started,
			Settings: o.settings(agent.Config.Scheme + "://" + agent.Config.Address),
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

	for {
		select {
		case err := <-runErr:
			if err != nil {
				log.Error("proxy failed", "error", err)
				shutdown(p, log, 0)
				stopAll()
				return 1
			}
			runErr = nil
		case s := <-sigs:
			if s == syscall.SIGHUP {
				sd.Reload(func() { reloadToken(agent, log) })
				continue
			}
			log.Info("signal received; draining", "signal", s.String(), "grace", o.shutdownGrace)
			sd.Stopping()
			stopRun()
			done := make(chan struct{})
			go func() {
				shutdown(p, log, o.shutdownGrace)
				stopAll()
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
