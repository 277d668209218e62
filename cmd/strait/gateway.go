package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	stdlog "log"
	"net"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/admin"
	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/gateway"
	"github.com/straitproxy/strait/internal/lifecycle"
	"github.com/straitproxy/strait/metrics"
	"github.com/straitproxy/strait/proxy"
	"github.com/straitproxy/strait/tlsutil"
)

// defaultGatewayPort is `consul connect envoy`'s port when -address or
// -wan-address has none.
const defaultGatewayPort = 8443

// gatewayOptions are the flags of strait -gateway mesh that the proxy
// does not have.
type gatewayOptions struct {
	kind           string
	address        string
	wanAddress     string
	helloTimeout   time.Duration
	maxConnections int
	maxPending     int
	maxWatches     int

	// Parsed by validateGateway.
	lanHost, wanHost string
	lanPort, wanPort int
}

// meshOnlyFlags apply to the mesh gateway only: terminating and ingress
// gateways are not dialed across datacenters and read no ClientHello
// before their handshake, and watch one service per link or listener.
var meshOnlyFlags = []string{"wan-address", "max-pending", "max-watches"}

// gatewayOnlyFlags apply only with -gateway.
var gatewayOnlyFlags = []string{"address", "wan-address", "hello-timeout", "max-connections", "max-pending", "max-watches"}

// proxyOnlyFlags do not apply with -gateway: a mesh gateway has no
// application, upstreams, certificate or TLS of its own.
var proxyOnlyFlags = []string{"sidecar-for", "service-addr", "listen", "upstream", "register-id", "tunnels",
	"tls-kex", "ktls", "max-inbound-connections", "max-handshakes", "max-outbound-connections", "datacenter"}

func defineGatewayFlags(fs *flag.FlagSet, g *gatewayOptions) {
	fs.StringVar(&g.kind, "gateway", "", "Run as a gateway of this `kind` instead of a sidecar proxy: mesh (routes TLS by SNI between datacenters, never terminating it), terminating (mesh clients reach the services linked to it, which run no sidecar), ingress (clients outside the mesh reach mesh services on its config entry's listeners).")
	fs.StringVar(&g.address, "address", ":8443", "Gateway: LAN `host:port` to listen on and advertise (port 8443 when omitted; an empty or 0.0.0.0 host listens everywhere and advertises the node's address).")
	fs.StringVar(&g.wanAddress, "wan-address", "", "Gateway: WAN `host:port` other datacenters dial (the -address port when omitted); also listened on when it differs from -address and is a local address.")
	fs.DurationVar(&g.helloTimeout, "hello-timeout", gateway.DefaultHelloTimeout, "Gateway: how long a connection may take to send its TLS ClientHello.")
	fs.IntVar(&g.maxConnections, "max-connections", gateway.DefaultMaxConnections, "Gateway: `limit` of connections held at once (waiting for a ClientHello or proxied); beyond it new connections are closed at once.")
	fs.IntVar(&g.maxPending, "max-pending", gateway.DefaultMaxPending, "Gateway: `limit` of connections waiting for their ClientHello (up to 16 KiB each).")
	fs.IntVar(&g.maxWatches, "max-watches", gateway.DefaultMaxWatches, "Gateway: `limit` of local services and subsets watched at once (one blocking agent query each); the least recently used idle one makes room.")
}

// validateGateway checks the flags of gateway mode; o.validate has checked
// the ones shared with the proxy.
func (o *options) validateGateway() error {
	switch o.gw.kind {
	case "mesh", "terminating", "ingress":
	default:
		return usagef("-gateway %q: want mesh, terminating or ingress", o.gw.kind)
	}
	kind := o.gw.kind
	for _, f := range proxyOnlyFlags {
		if o.set[f] && !(f == "tls-kex" && kind != "mesh") {
			return usagef("-%s does not apply with -gateway %s", f, kind)
		}
	}
	if kind != "mesh" {
		for _, f := range meshOnlyFlags {
			if o.set[f] {
				return usagef("-%s applies only with -gateway mesh", f)
			}
		}
	}
	if !o.set["service"] {
		o.service = kind + "-gateway"
	}
	if o.service == "" {
		return usagef("-service: the gateway needs a name")
	}
	var err error
	if o.gw.lanHost, o.gw.lanPort, err = parseGatewayAddr(o.gw.address, defaultGatewayPort); err != nil {
		return usagef("-address: %v", err)
	}
	if ip := net.ParseIP(o.gw.lanHost); o.gw.lanHost != "" && ip == nil {
		return usagef("-address %q: the host must be an IP address (the gateway listens on it)", o.gw.address)
	}
	if o.gw.wanAddress != "" {
		if o.gw.wanHost, o.gw.wanPort, err = parseGatewayAddr(o.gw.wanAddress, o.gw.lanPort); err != nil {
			return usagef("-wan-address: %v", err)
		}
		if o.gw.wanHost == "" {
			return usagef("-wan-address %q: needs a host", o.gw.wanAddress)
		}
	}
	switch {
	case o.gw.helloTimeout <= 0:
		return usagef("-hello-timeout must be positive")
	case o.gw.maxConnections < 1:
		return usagef("-max-connections %d: want 1 or more", o.gw.maxConnections)
	case o.gw.maxPending < 1:
		return usagef("-max-pending %d: want 1 or more", o.gw.maxPending)
	case o.gw.maxWatches < 1:
		return usagef("-max-watches %d: want 1 or more", o.gw.maxWatches)
	case o.shutdownGrace < 0:
		return usagef("-shutdown-grace must not be negative")
	}
	return nil
}

// parseGatewayAddr parses "host:port", "host" or ":port"; a missing port
// is defPort.
func parseGatewayAddr(s string, defPort int) (string, int, error) {
	host, portStr, err := net.SplitHostPort(s)
	if err != nil {
		// No port: the whole input is the host.
		if _, _, err2 := net.SplitHostPort(s + ":0"); err2 != nil {
			return "", 0, fmt.Errorf("%q: want host:port", s)
		}
		return s, defPort, nil
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 1 || port > 65535 {
		return "", 0, fmt.Errorf("%q: port must be 1-65535", s)
	}
	return host, port, nil
}

// runGateway is strait -gateway mesh: it listens, routes with the catalog,
// registers when asked, and drains on SIGINT/SIGTERM.
func runGateway(o *options, stdout, stderr io.Writer) int {
	agent, err := o.api.Connect()
	if err != nil {
		fmt.Fprintf(stderr, "strait: %v\n", err)
		return 2
	}
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
	access := log.Named("access")
	access.SetLevel(hclog.Info)
	stdlog.SetFlags(0)
	stdlog.SetOutput(log.StandardWriter(&hclog.StandardLoggerOptions{InferLevels: true}))

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
	m := metrics.New(metrics.Options{Logger: log.Named("metrics")})
	defer m.Close()
	if err := m.Configure(o.telemetry()); err != nil {
		fmt.Fprintf(stderr, "strait: telemetry: %v\n", err)
		return 2
	}

	accessMode, _ := proxy.ParseAccessLog(o.accessLog)
	role := newGatewayRole(o, agent, log, access, accessMode, m)
	var lns []net.Listener
	if role.serve != nil {
		if lns, err = gatewayListeners(o, log); err != nil {
			fmt.Fprintf(stderr, "strait: %v\n", err)
			return 1
		}
	}
	var draining sync.Once
	drainingNow := make(chan struct{})
	ready := func() (bool, string) {
		select {
		case <-drainingNow:
			return false, "draining"
		default:
		}
		select {
		case <-role.ready:
			return true, ""
		default:
			return false, role.waiting
		}
	}
	if o.adminBind != "off" {
		var listen []string
		for _, ln := range lns {
			listen = append(listen, ln.Addr().String())
		}
		as, err := admin.ListenGateway(o.adminBind, admin.GatewayOptions{
			Metrics: m, Ready: ready, Routes: role.routes, Stats: role.stats,
			Config: admin.GatewayConfigView(o.gatewaySettings(agent.Config.Scheme+"://"+agent.Config.Address, listen), m.Telemetry()),
			Pprof:  o.adminPprof, Logger: log.Named("admin"), Started: started,
		})
		switch {
		case err == nil:
			defer as.Close()
		case o.adminBindSet:
			for _, ln := range lns {
				ln.Close()
			}
			fmt.Fprintf(stderr, "strait: -admin-bind: %v\n", err)
			return 2
		default:
			log.Warn("admin listener not started; give each strait its own -admin-bind", "addr", o.adminBind, "error", err)
		}
	}

	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	regCtx, stopReg := context.WithCancel(ctx)
	defer stopReg()
	var bg sync.WaitGroup
	bg.Go(func() { role.run(ctx) })
	if o.register {
		r := &gateway.Register{
			Client: agent.Client, Kind: role.kind, ID: o.gatewayID(), Name: o.service, NoCheck: role.serve == nil,
			LANHost: o.gw.lanHost, LANPort: o.gw.lanPort, WANHost: o.gw.wanHost, WANPort: o.gw.wanPort,
			Logger: log.Named("register"),
		}
		bg.Go(func() { r.Run(regCtx) })
	}
	for _, ln := range lns {
		role.serve(ln)
	}
	healthy := func() bool { ok, _ := ready(); return ok }
	bg.Go(func() {
		select {
		case <-role.ready:
			log.Info("gateway ready", "gateway", o.gw.kind, "service", o.service, "listeners", len(lns))
		case <-ctx.Done():
		}
	})
	bg.Go(func() { sd.ReadyWhen(ctx, healthy) })
	bg.Go(func() { sd.Watchdog(ctx, healthy) })

	for {
		s := <-sigs
		if s == syscall.SIGHUP {
			sd.Reload(func() { reloadToken(agent, log) })
			continue
		}
		log.Info("signal received; draining", "signal", s.String(), "grace", o.shutdownGrace)
		sd.Stopping()
		draining.Do(func() { close(drainingNow) })
		// Deregister first, so that clients stop picking this gateway,
		// while the live connections finish.
		stopReg()
		done := make(chan struct{})
		go func() {
			sctx, cancel := context.WithTimeout(context.Background(), o.shutdownGrace)
			role.shutdown(sctx)
			cancel()
			stop()
			bg.Wait()
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

// gatewayListeners binds the LAN address, and the WAN address when it
// differs and is local (behind NAT it is not: a bind error
// EADDRNOTAVAIL only means the gateway is reached through the LAN one).
func gatewayListeners(o *options, log hclog.Logger) ([]net.Listener, error) {
	lanAddr := net.JoinHostPort(o.gw.lanHost, strconv.Itoa(o.gw.lanPort))
	lan, err := net.Listen("tcp", lanAddr)
	if err != nil {
		return nil, fmt.Errorf("-address: %w", err)
	}
	lns := []net.Listener{lan}
	log.Info("gateway listening", "addr", lan.Addr().String(), "side", "lan")
	if o.gw.wanHost == "" || o.gw.wanPort == o.gw.lanPort && (o.gw.wanHost == o.gw.lanHost || gateway.Unspecified(o.gw.lanHost)) {
		return lns, nil
	}
	if net.ParseIP(o.gw.wanHost) == nil {
		log.Info("WAN address is a name; not listening on it", "wan_address", o.gw.wanAddress)
		return lns, nil
	}
	wanAddr := net.JoinHostPort(o.gw.wanHost, strconv.Itoa(o.gw.wanPort))
	wan, err := net.Listen("tcp", wanAddr)
	switch {
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		log.Info("WAN address is not local (NAT?); not listening on it", "wan_address", wanAddr)
	case err != nil:
		lan.Close()
		return nil, fmt.Errorf("-wan-address: %w", err)
	default:
		lns = append(lns, wan)
		log.Info("gateway listening", "addr", wan.Addr().String(), "side", "wan")
	}
	return lns, nil
}

// gatewayID is the registration's ID: -proxy-id, else the service name
// (as `consul connect envoy -register` does).
func (o *options) gatewayID() string {
	if o.proxyID != "" {
		return o.proxyID
	}
	return o.service
}

func (o *options) gatewaySettings(httpAddr string, listen []string) admin.GatewaySettings {
	return admin.GatewaySettings{
		Gateway: o.gw.kind, Service: o.service, ID: o.gatewayID(), Register: o.register,
		Address: o.gw.address, WANAddress: o.gw.wanAddress, Listen: listen, API: o.api, HTTPAddr: httpAddr,
		LogLevel: o.logLevel, LogJSON: o.logJSON, AccessLog: o.accessLog, AdminBind: o.adminBind,
		AdminPprof: o.adminPprof, PprofAddr: o.pprofAddr, ShutdownGrace: o.shutdownGrace,
		HalfCloseTimeout: o.halfCloseTimeout, HelloTimeout: o.gw.helloTimeout,
		MaxConnections: o.gw.maxConnections, MaxPending: o.gw.maxPending, MaxWatches: o.gw.maxWatches,
	}
}

// gatewayRole is what differs between the gateway kinds: what serves the
// listeners and what it follows in Consul.
type gatewayRole struct {
	kind     api.ServiceKind
	serve    func(net.Listener)
	run      func(context.Context) // until ctx is done
	shutdown func(context.Context)
	ready    <-chan struct{}
	waiting  string // what /ready says before ready
	routes   func() any
	stats    func() any
}

func newGatewayRole(o *options, agent *config.Agent, log, access hclog.Logger, accessMode proxy.AccessLog, m *metrics.Metrics) gatewayRole {
	switch o.gw.kind {
	case "ingress":
		return ingressRole(o, agent, log, access, accessMode, m)
	case "terminating":
		curves, _ := tlsutil.KeyExchange(o.tlsKex)
		t := gateway.NewTerminating(gateway.TerminatingOptions{
			Client: agent.Client, AgentConfig: agent.Config, Name: o.service,
			Logger: log.Named("gateway"), AccessLogger: access, AccessLog: accessMode, Metrics: m,
			CurvePreferences: curves, HandshakeTimeout: o.gw.helloTimeout, MaxConnections: o.gw.maxConnections,
			HalfCloseTimeout: o.halfCloseTimeout,
		})
		return gatewayRole{
			kind: api.ServiceKindTerminatingGateway, serve: t.Serve, run: t.Run, shutdown: t.Shutdown,
			ready: t.Ready(), waiting: "waiting for the agent: linked services, their certificates and intentions",
			routes: func() any { return t.Routes() }, stats: func() any { return t.Stats() },
		}
	}
	cat := gateway.NewCatalog(gateway.CatalogOptions{
		Client: agent.Client, Logger: log.Named("catalog"), Metrics: m, MaxWatches: o.gw.maxWatches,
	})
	srv := gateway.New(gateway.Options{
		Router: cat, Logger: log.Named("gateway"), AccessLogger: access, AccessLog: accessMode, Metrics: m,
		HelloTimeout: o.gw.helloTimeout, MaxPending: o.gw.maxPending, MaxConnections: o.gw.maxConnections,
		HalfCloseTimeout: o.halfCloseTimeout,
	})
	return gatewayRole{
		kind: api.ServiceKindMeshGateway, serve: srv.Serve, run: cat.Run, shutdown: srv.Shutdown,
		ready: cat.Ready(), waiting: "waiting for the agent: datacenter, trust domain, catalog and resolvers",
		routes: func() any { return cat.Routes() }, stats: func() any { return srv.Stats() },
	}
}

// ingressRole runs the proxy's upstream machinery for the listeners of the
// gateway's config entry, with the gateway's own identity: each listener
// is an upstream of the gateway's service. There is no -address listener.
func ingressRole(o *options, agent *config.Agent, log, access hclog.Logger, accessMode proxy.AccessLog, m *metrics.Metrics) gatewayRole {
	curves, _ := tlsutil.KeyExchange(o.tlsKex)
	w := newParts(agent, nil, log, curves, false)
	p := proxy.New(proxy.Options{
		Parts: w.build, Logger: log.Named("gateway"), AccessLogger: access, AccessLog: accessMode, Metrics: m,
		HalfCloseTimeout: o.halfCloseTimeout, DrainTimeout: o.shutdownGrace,
	})
	iw := &gateway.IngressWatch{Client: agent.Client, Name: o.service, BindAddress: o.gw.lanHost, Logger: log.Named("ingress")}
	ready := make(chan struct{})
	run := func(ctx context.Context) {
		cfgs := make(chan *config.Config)
		watchDone := make(chan struct{})
		var wg sync.WaitGroup
		wg.Go(func() {
			defer close(watchDone)
			iw.Run(ctx, cfgs)
		})
		wg.Go(func() {
			// The proxy has no readiness channel: poll its flag.
			t := time.NewTicker(50 * time.Millisecond)
			defer t.Stop()
			for !p.Ready() {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
			}
			close(ready)
		})
		if err := p.Run(ctx, cfgs); err != nil {
			log.Error("ingress listeners could not be opened; fix the config entry or the ports and restart", "error", err)
		}
		// Take what the watch may still send until it stops (with ctx).
		for done := false; !done; {
			select {
			case <-cfgs:
			case <-watchDone:
				done = true
			}
		}
		wg.Wait()
	}
	return gatewayRole{
		kind: api.ServiceKindIngressGateway, run: run, shutdown: p.Shutdown,
		ready: ready, waiting: "waiting for the agent: the gateway's certificate and config entry",
		routes: func() any { return p.Upstreams() }, stats: func() any { return p.Listeners() },
	}
}
