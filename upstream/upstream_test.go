package upstream

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/internal/testutil"
	"github.com/straitproxy/strait/tlsutil"
)

func TestNewValidates(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	good := f.options(t)
	tests := []struct {
		name string
		cfg  config.Upstream
		opts Options
		want string
	}{
		{"no name", config.Upstream{LocalBindPort: 1}, good, "no destination name"},
		{"bad type", config.Upstream{DestinationName: "db", DestinationType: "mesh", LocalBindPort: 1}, good, "unknown destination type"},
		{"no client", serviceUpstream("db"), Options{TLS: f.tls}, "upstream db: no Consul client"},
		{"no TLS", serviceUpstream("db"), Options{Client: good.Client}, "upstream db: no TLS source"},
	}
	for _, tt := range tests {
		_, err := New(tt.cfg, tt.opts)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: err = %v, want it to contain %q", tt.name, err, tt.want)
		}
	}
	u := newUpstream(t, serviceUpstream("db"), Options{Client: good.Client, TLS: f.tls})
	if u.maxAttempts != DefaultMaxAttempts || u.queryTTL != DefaultQueryTTL || u.netDialer == nil || u.log == nil {
		t.Errorf("defaults not applied: attempts %d ttl %v", u.maxAttempts, u.queryTTL)
	}
}

func TestEndpointOf(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	cfg := serviceUpstream("db")
	cfg.Datacenter = "dc2"
	u := newUpstream(t, cfg, f.options(t))
	node := &api.Node{Node: "n1", Address: "10.0.0.1", Datacenter: "dc3"}
	tests := []struct {
		name   string
		entry  api.ServiceEntry
		ns, dc string
		want   Endpoint
		ok     bool
	}{
		{
			name: "sidecar on node address",
			entry: api.ServiceEntry{Node: node, Service: &api.AgentService{
				Kind: api.ServiceKindConnectProxy, Service: "db-sidecar-proxy", Port: 21000,
				Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "db"},
			}},
			want: Endpoint{Addr: "10.0.0.1:21000", Node: "n1", Service: "db", Namespace: "default", Partition: "default", Datacenter: "dc3"},
			ok:   true,
		},
		{
			name: "native with service address, namespace and partition",
			entry: api.ServiceEntry{Node: &api.Node{Node: "n2", Address: "10.0.0.2"}, Service: &api.AgentService{
				Service: "db", Address: "fd00::1", Port: 8443, Namespace: "team", Partition: "AP1",
				Connect: &api.AgentServiceConnect{Native: true},
			}},
			want: Endpoint{Addr: "[fd00::1]:8443", Node: "n2", Service: "db", Namespace: "team", Partition: "AP1", Datacenter: "dc2"},
			ok:   true,
		},
		{
			name: "datacenter and namespace from a prepared query answer",
			entry: api.ServiceEntry{Node: &api.Node{Node: "n4", Address: "10.0.0.4"}, Service: &api.AgentService{
				Kind: api.ServiceKindConnectProxy, Port: 21000,
				Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "db"},
			}},
			ns: "qns", dc: "dc9",
			want: Endpoint{Addr: "10.0.0.4:21000", Node: "n4", Service: "db", Namespace: "qns", Partition: "default", Datacenter: "dc9"},
			ok:   true,
		},
		{
			name: "no port",
			entry: api.ServiceEntry{Node: node, Service: &api.AgentService{
				Kind: api.ServiceKindConnectProxy, Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "db"},
			}},
		},
		{
			name:  "plain service is not a mesh endpoint",
			entry: api.ServiceEntry{Node: node, Service: &api.AgentService{Service: "db", Port: 5432}},
		},
		{
			name: "no address at all",
			entry: api.ServiceEntry{Service: &api.AgentService{
				Kind: api.ServiceKindConnectProxy, Port: 21000, Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "db"},
			}},
		},
	}
	for _, tt := range tests {
		got, ok := u.endpointOf(&tt.entry, tt.ns, "", tt.dc)
		if ok != tt.ok || got != tt.want {
			t.Errorf("%s: got %+v, %v; want %+v, %v", tt.name, got, ok, tt.want, tt.ok)
		}
	}
}

func TestWatchUsesOnlyHealthyEndpoints(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	good := startTLSServer(t, f.ca, "db")
	warn := startTLSServer(t, f.ca, "db")
	crit := startTLSServer(t, f.ca, "db")
	f.agent.setEntries(
		proxyEntry("n1", "db", good.port, api.HealthPassing),
		proxyEntry("n2", "db", warn.port, api.HealthWarning),
		proxyEntry("n3", "db", crit.port, api.HealthCritical),
	)
	u := newUpstream(t, serviceUpstream("db"), f.options(t))
	run(t, u)
	waitReady(t, u)

	// Consul's rule for a subset without OnlyPassing: a warning instance
	// is healthy, a critical one is not.
	want := []string{good.addr, warn.addr}
	slices.Sort(want)
	if got := addrs(u.Endpoints()); !slices.Equal(got, want) {
		t.Fatalf("endpoints = %v, want %v", got, want)
	}
	for _, q := range f.agent.requests() {
		if !q.Has("cached") {
			t.Errorf("query %v does not use the agent cache", q)
		}
	}
	for range 10 {
		if ep := dialOK(t, u, "db"); ep.Addr == crit.addr {
			t.Fatalf("dialed the critical endpoint %s", ep.Addr)
		}
	}
	if crit.conns.Load() != 0 {
		t.Error("an unhealthy endpoint was dialed")
	}
}

func TestPickPowerOfTwoChoices(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	u := newUpstream(t, serviceUpstream("db"), f.options(t))
	set := u.store([]Endpoint{
		{Addr: "10.0.0.1:1", Service: "db"},
		{Addr: "10.0.0.2:1", Service: "db"},
		{Addr: "10.0.0.3:1", Service: "db"},
	})
	lb := defaultBalancer
	load(t, u, "10.0.0.2:1", 5)
	load(t, u, "10.0.0.3:1", 10)

	const picks = 3000
	counts := make([]int, 3)
	tried := make([]bool, 3)
	for range picks {
		counts[u.pick(set, &lb, tried, netip.Addr{})]++
	}
	// Two distinct candidates: the most loaded never wins, the least
	// loaded wins whenever drawn (2/3 of picks), the middle one otherwise.
	if counts[2] != 0 {
		t.Errorf("most loaded endpoint picked %d times", counts[2])
	}
	if counts[0] < picks/2 || counts[1] < picks/6 {
		t.Errorf("picks = %v, want about [2000 1000 0]", counts)
	}

	// Equal load spreads evenly.
	load(t, u, "10.0.0.2:1", -5)
	load(t, u, "10.0.0.3:1", -10)
	clear(counts)
	for range picks {
		counts[u.pick(set, &lb, tried, netip.Addr{})]++
	}
	for i, c := range counts {
		if c < picks/5 {
			t.Errorf("equal load: endpoint %d picked %d of %d times", i, c, picks)
		}
	}

	// Tried endpoints are skipped while others remain.
	tried[0], tried[1] = true, true
	for range 100 {
		if i := u.pick(set, &lb, tried, netip.Addr{}); i != 2 {
			t.Fatalf("picked tried endpoint %d", i)
		}
	}
}

func TestFailoverOnRefusedConnection(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	good := startTLSServer(t, f.ca, "db")
	deadPort := closedPort(t)
	dead := fmt.Sprintf("127.0.0.1:%d", deadPort)
	f.agent.setEntries(proxyEntry("dead", "db", deadPort, api.HealthPassing), proxyEntry("good", "db", good.port, api.HealthPassing))
	u := newUpstream(t, serviceUpstream("db"), f.options(t))
	run(t, u)
	waitReady(t, u)
	load(t, u, good.addr, 100) // P2C then tries the dead one first

	if ep := dialOK(t, u, "db"); ep.Addr != good.addr || ep.Attempts != 2 {
		t.Fatalf("dialed %s in %d attempts, want %s in 2", ep.Addr, ep.Attempts, good.addr)
	}
	st := statusOf(t, u, dead)
	if st.ConsecutiveFailures != 1 || !strings.Contains(st.LastError, "refused") || st.EjectedUntil.IsZero() {
		t.Errorf("dead endpoint status = %+v, want one refused failure and ejected", st)
	}
	if logs := f.logs.String(); !strings.Contains(logs, "dial attempt failed") || !strings.Contains(logs, dead) {
		t.Errorf("failure of %s not logged:\n%s", dead, logs)
	}

	// Ejected: skipped although it is the least loaded.
	if ep := dialOK(t, u, "db"); ep.Attempts != 1 {
		t.Errorf("%d attempts past an ejected endpoint, want 1", ep.Attempts)
	}
	if st := statusOf(t, u, dead); st.ConsecutiveFailures != 1 {
		t.Errorf("ejected endpoint was dialed again: %+v", st)
	}
	if st := statusOf(t, u, good.addr); st.ConsecutiveFailures != 0 || st.Active != 100 {
		t.Errorf("good endpoint status = %+v", st)
	}
}

func TestFailoverOnWrongIdentity(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	good := startTLSServer(t, f.ca, "db")
	impostor := startTLSServer(t, f.ca, "web")
	f.agent.setEntries(proxyEntry("bad", "db", impostor.port, api.HealthPassing), proxyEntry("good", "db", good.port, api.HealthPassing))
	u := newUpstream(t, serviceUpstream("db"), f.options(t))
	run(t, u)
	waitReady(t, u)
	load(t, u, good.addr, 100)

	if ep := dialOK(t, u, "db"); ep.Addr != good.addr {
		t.Fatalf("dialed %s, want %s", ep.Addr, good.addr)
	}
	st := statusOf(t, u, impostor.addr)
	if st.ConsecutiveFailures != 1 || !strings.Contains(st.LastError, "/svc/web") {
		t.Errorf("impostor status = %+v, want an identity failure", st)
	}
	if !strings.Contains(f.logs.String(), impostor.addr) {
		t.Errorf("failure of %s not logged", impostor.addr)
	}
}

func TestDialErrorNamesEveryAttempt(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	impostor := startTLSServer(t, f.ca, "web")
	p1, p2 := closedPort(t), closedPort(t)
	f.agent.setEntries(
		proxyEntry("n1", "db", p1, api.HealthPassing),
		proxyEntry("n2", "db", p2, api.HealthPassing),
		proxyEntry("n3", "db", impostor.port, api.HealthPassing),
	)
	u := newUpstream(t, serviceUpstream("db"), f.options(t))
	run(t, u)
	waitReady(t, u)

	conn, res, release, err := u.Dial(context.Background(), DialOptions{})
	if err == nil || conn != nil || release != nil {
		t.Fatalf("Dial = %v, %v; want an error only", conn, err)
	}
	if res.Attempts != 3 || res.Addr != "" {
		t.Errorf("failed Dial's result %+v, want 3 attempts and no endpoint", res)
	}
	msg := err.Error()
	for _, want := range []string{
		"upstream db: ", "attempt 1 ", "attempt 2 ", "attempt 3 ",
		fmt.Sprintf("127.0.0.1:%d", p1), fmt.Sprintf("127.0.0.1:%d", p2), impostor.addr,
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("error does not contain %q:\n%s", want, msg)
		}
	}

	// MaxAttempts bounds the endpoints tried.
	opts := f.options(t)
	opts.MaxAttempts = 1
	one := newUpstream(t, serviceUpstream("db"), opts)
	run(t, one)
	waitReady(t, one)
	_, res, _, err = one.Dial(context.Background(), DialOptions{})
	if err == nil || strings.Contains(err.Error(), "attempt 2") || res.Attempts != 1 {
		t.Errorf("MaxAttempts 1: err = %v after %d attempts", err, res.Attempts)
	}
}

func TestDialRespectsConnectTimeout(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	hole1, port1 := startBlackHole(t)
	hole2, port2 := startBlackHole(t)
	f.agent.setEntries(proxyEntry("n1", "db", port1, api.HealthPassing), proxyEntry("n2", "db", port2, api.HealthPassing))
	f.agent.setChain("db", chainTimeout("db", 300*time.Millisecond))
	u := newUpstream(t, serviceUpstream("db"), f.options(t))
	run(t, u)
	waitReady(t, u)

	start := time.Now()
	_, _, _, err := u.Dial(context.Background(), DialOptions{})
	elapsed := time.Since(start)
	if err == nil {
		t.Fatal("Dial to black holes succeeded")
	}
	if elapsed > 3*time.Second {
		t.Errorf("Dial took %v with a 300ms connect timeout", elapsed)
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("err = %v, want a deadline error", err)
	}
	// The deadline is shared out, so the second endpoint got its turn.
	if !strings.Contains(err.Error(), hole1) || !strings.Contains(err.Error(), hole2) {
		t.Errorf("error does not name both endpoints:\n%v", err)
	}
}

func TestDialFailsOverFromStalledHandshake(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	hole, holePort := startBlackHole(t)
	good := startTLSServer(t, f.ca, "db")
	f.agent.setEntries(proxyEntry("n1", "db", holePort, api.HealthPassing), proxyEntry("n2", "db", good.port, api.HealthPassing))
	f.agent.setChain("db", chainTimeout("db", 2*time.Second))
	u := newUpstream(t, serviceUpstream("db"), f.options(t))
	run(t, u)
	waitReady(t, u)
	load(t, u, good.addr, 100)

	start := time.Now()
	if ep := dialOK(t, u, "db"); ep.Addr != good.addr {
		t.Fatalf("dialed %s, want %s", ep.Addr, good.addr)
	}
	if elapsed := time.Since(start); elapsed > 2*time.Second {
		t.Errorf("Dial took %v, beyond the connect timeout", elapsed)
	}
	if st := statusOf(t, u, hole); st.ConsecutiveFailures != 1 {
		t.Errorf("stalled endpoint status = %+v", st)
	}
}

func TestCallerCancelDoesNotEjectEndpoint(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	hole, port := startBlackHole(t)
	f.agent.setEntries(proxyEntry("n1", "db", port, api.HealthPassing))
	u := newUpstream(t, serviceUpstream("db"), f.options(t)) // 5s connect timeout
	run(t, u)
	waitReady(t, u)

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, _, _, err := u.Dial(ctx, DialOptions{})
	if err == nil || time.Since(start) > 3*time.Second {
		t.Fatalf("Dial = %v after %v; want an error by the caller's deadline", err, time.Since(start))
	}
	if st := statusOf(t, u, hole); st.ConsecutiveFailures != 0 || st.Active != 0 {
		t.Errorf("endpoint blamed for the caller's deadline: %+v", st)
	}
}

func TestDialSendsServiceSNI(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	srv := startTLSServer(t, f.ca, "db")
	f.agent.setEntries(proxyEntry("n1", "db", srv.port, api.HealthPassing))
	u := newUpstream(t, serviceUpstream("db"), f.options(t))
	run(t, u)
	waitReady(t, u)

	dialOK(t, u, "db")
	want := tlsutil.ServiceSNI("db", "default", "default", "dc1", testTD)
	if got := srv.sawSNIs(); !slices.Equal(got, []string{want}) {
		t.Errorf("SNI = %q, want %q", got, want)
	}
}

func TestReleaseTracksActiveAcrossRefresh(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	a := startTLSServer(t, f.ca, "db")
	b := startTLSServer(t, f.ca, "db")
	f.agent.setEntries(proxyEntry("a", "db", a.port, api.HealthPassing))
	u := newUpstream(t, serviceUpstream("db"), f.options(t))
	run(t, u)
	waitReady(t, u)

	conn, _, release, err := u.Dial(context.Background(), DialOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if st := statusOf(t, u, a.addr); st.Active != 1 {
		t.Fatalf("active = %d after Dial, want 1", st.Active)
	}

	// Gone from the set while the connection lives, then back.
	f.agent.setEntries(proxyEntry("b", "db", b.port, api.HealthPassing))
	testutil.Eventually(t, "a to leave the set", func() bool { return slices.Equal(addrs(u.Endpoints()), []string{b.addr}) })
	f.agent.setEntries(proxyEntry("a", "db", a.port, api.HealthPassing), proxyEntry("b", "db", b.port, api.HealthPassing))
	testutil.Eventually(t, "a to come back", func() bool { return len(u.Endpoints()) == 2 })
	if st := statusOf(t, u, a.addr); st.Active != 1 {
		t.Errorf("active = %d after the set changed, want 1", st.Active)
	}
	release()
	release()
	if st := statusOf(t, u, a.addr); st.Active != 0 {
		t.Errorf("active = %d after release, want 0", st.Active)
	}
}

func TestDialWithoutEndpoints(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	u := newUpstream(t, serviceUpstream("db"), f.options(t))
	if _, _, _, err := u.Dial(context.Background(), DialOptions{}); !errors.Is(err, ErrNoEndpoints) || !strings.Contains(err.Error(), "upstream db: ") {
		t.Errorf("before discovery: err = %v", err)
	}
	if n := len(f.agent.requests()); n != 0 {
		t.Errorf("a service Dial made %d agent requests", n)
	}
	run(t, u)
	waitReady(t, u)
	if _, _, _, err := u.Dial(context.Background(), DialOptions{}); !errors.Is(err, ErrNoEndpoints) {
		t.Errorf("empty set: err = %v", err)
	}
}

func TestWatchFollowsChanges(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	a := startTLSServer(t, f.ca, "db")
	b := startTLSServer(t, f.ca, "db")
	f.agent.setEntries(proxyEntry("a", "db", a.port, api.HealthPassing))
	u := newUpstream(t, serviceUpstream("db"), f.options(t))
	run(t, u)
	waitReady(t, u)
	if got := addrs(u.Endpoints()); !slices.Equal(got, []string{a.addr}) {
		t.Fatalf("endpoints = %v", got)
	}

	f.agent.setEntries(proxyEntry("b", "db", b.port, api.HealthPassing))
	testutil.Eventually(t, "the new set", func() bool { return slices.Equal(addrs(u.Endpoints()), []string{b.addr}) })
	if ep := dialOK(t, u, "db"); ep.Addr != b.addr {
		t.Errorf("dialed %s, want %s", ep.Addr, b.addr)
	}
	// Blocking, not polling: later requests carry the index of the last
	// answer.
	var blocking bool
	for _, q := range f.agent.requests() {
		if q.Get("index") != "" && q.Get("index") != "0" {
			blocking = true
		}
	}
	if !blocking {
		t.Error("no blocking health query was made")
	}
}

func TestAgentOutageKeepsLastSet(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	a := startTLSServer(t, f.ca, "db")
	b := startTLSServer(t, f.ca, "db")
	f.agent.setEntries(proxyEntry("a", "db", a.port, api.HealthPassing))
	u := newUpstream(t, serviceUpstream("db"), f.options(t))
	run(t, u)
	waitReady(t, u)

	f.agent.setFailing(true)
	testutil.Eventually(t, "the watch to retry during the outage", func() bool { return f.agent.failedCalls.Load() >= 2 })
	if got := addrs(u.Endpoints()); !slices.Equal(got, []string{a.addr}) {
		t.Fatalf("endpoints during outage = %v, want %s", got, a.addr)
	}
	dialOK(t, u, "db")

	f.agent.setEntries(proxyEntry("a", "db", a.port, api.HealthPassing), proxyEntry("b", "db", b.port, api.HealthPassing))
	f.agent.setFailing(false)
	testutil.Eventually(t, "recovery", func() bool { return len(u.Endpoints()) == 2 })
	if !strings.Contains(f.logs.String(), "watch failed") {
		t.Error("outage not logged")
	}
}

func queryUpstream(name string) config.Upstream {
	u := serviceUpstream(name)
	u.DestinationType = config.TypePreparedQuery
	u.Datacenter = "dc1"
	return u
}

func queryAnswer(ports ...int) *api.PreparedQueryExecuteResponse {
	r := &api.PreparedQueryExecuteResponse{Service: "db", Datacenter: "dc1"}
	for i, p := range ports {
		r.Nodes = append(r.Nodes, *proxyEntry(fmt.Sprintf("n%d", i), "db", p, api.HealthPassing))
	}
	return r
}

func TestPreparedQueryIsCached(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	srv := startTLSServer(t, f.ca, "db")
	f.agent.setQuery(queryAnswer(srv.port), nil)
	u := newUpstream(t, queryUpstream("pq"), f.options(t))
	run(t, u)
	waitReady(t, u)

	for range 10 {
		dialOK(t, u, "db")
	}
	if n := f.agent.pqCalls.Load(); n != 1 {
		t.Errorf("%d executes for 10 dials within the TTL, want 1", n)
	}
	q := f.agent.requests()[0]
	if q.Get("connect") != "true" || q.Get("dc") != "dc1" {
		t.Errorf("execute query = %v, want connect=true and dc=dc1", q)
	}
	want := tlsutil.ServiceSNI("db", "default", "default", "dc1", testTD)
	if got := srv.sawSNIs(); len(got) == 0 || got[0] != want {
		t.Errorf("SNI = %q, want the service's %q", got, want)
	}
}

func TestPreparedQueryFirstDialFetches(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	srv := startTLSServer(t, f.ca, "db")
	f.agent.setQuery(queryAnswer(srv.port), nil)
	u := newUpstream(t, queryUpstream("pq"), f.options(t)) // Run not started

	for range 5 {
		dialOK(t, u, "db")
	}
	if n := f.agent.pqCalls.Load(); n != 1 {
		t.Errorf("%d executes, want 1 (first dial only)", n)
	}
	select {
	case <-u.Ready():
	default:
		t.Error("not ready after the first dial fetched")
	}
}

func TestPreparedQueryRefreshesInBackground(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	a := startTLSServer(t, f.ca, "db")
	b := startTLSServer(t, f.ca, "db")
	gate := make(chan struct{})
	f.agent.setQuery(queryAnswer(a.port), gate) // every execute after the first blocks on the gate
	opts := f.options(t)
	opts.QueryTTL = 50 * time.Millisecond
	u := newUpstream(t, queryUpstream("pq"), opts)
	run(t, u)
	waitReady(t, u)

	// Once stale, a Dial asks for a refresh and goes on with the old set.
	testutil.Eventually(t, "a background refresh", func() bool {
		dialOK(t, u, "db")
		return f.agent.pqCalls.Load() == 2
	})
	// The refresh is stuck in the agent: Dial neither waits for it nor
	// starts another.
	for range 20 {
		dialOK(t, u, "db")
	}
	if n, m := f.agent.pqCalls.Load(), f.agent.pqMaxInflight.Load(); n != 2 || m != 1 {
		t.Errorf("executes = %d, max in flight = %d; want 2 and 1", n, m)
	}

	f.agent.setQuery(queryAnswer(a.port, b.port), gate)
	close(gate)
	testutil.Eventually(t, "the refreshed set", func() bool { return len(u.Endpoints()) == 2 })
	if m := f.agent.pqMaxInflight.Load(); m != 1 {
		t.Errorf("max executes in flight = %d, want 1", m)
	}
}

// TestResumesOnlyWithStraitPeers: sessions are resumed only with a server
// that selected ALPNStrait (it re-authorizes resumed sessions); a server that
// selects nothing (built-in proxy, Envoy) gets a full handshake every time,
// and one that refuses the offer (an h2-only Connect-native service) is
// dialed again without ALPN and remembered.
func TestResumesOnlyWithStraitPeers(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name        string
		protos      []string
		wantResumed int64 // of 4 dials
		wantConns   int64
		wantALPN    int64
	}{
		// The first dial learns the peer is strait; the second, the first
		// with a session cache, stores a ticket; the rest resume.
		{"strait", []string{tlsutil.ALPNStrait}, 2, 4, 4},
		{"builtin", nil, 0, 4, 0},
		{"native h2", []string{"h2"}, 0, 4, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t)
			srv := startTLSServerProtos(t, f.ca, "db", tc.protos)
			f.agent.setEntries(proxyEntry("n1", "db", srv.port, api.HealthPassing))
			u := newUpstream(t, serviceUpstream("db"), f.options(t))
			run(t, u)
			waitReady(t, u)
			for range 4 {
				// A retry without ALPN is part of the same attempt.
				if r := dialOK(t, u, "db"); r.Attempts != 1 {
					t.Errorf("%d attempts, want 1", r.Attempts)
				}
			}
			if got := srv.conns.Load(); got != tc.wantConns {
				t.Errorf("%d handshakes completed, want %d", got, tc.wantConns)
			}
			if got := srv.resumed.Load(); got != tc.wantResumed {
				t.Errorf("%d resumed sessions, want %d", got, tc.wantResumed)
			}
			if got := srv.alpn.Load(); got != tc.wantALPN {
				t.Errorf("%d connections negotiated ALPN, want %d", got, tc.wantALPN)
			}
		})
	}
}
