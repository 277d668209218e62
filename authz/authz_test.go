package authz

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/straitproxy/strait/internal/testutil"
	"github.com/straitproxy/strait/internal/watch"
	"github.com/straitproxy/strait/tlsutil"
)

const waitFor = 10 * time.Second // generous bound for anything that should be quick

var (
	web     = svc("", "default", "web")
	apiID   = svc("", "default", "api")
	teamAPI = svc("", "team", "api")
)

func newAuthorizer(t *testing.T, f *fakeAgent, direct bool, opts Options) *Authorizer {
	t.Helper()
	if opts.Target == "" {
		opts.Target = "db"
	}
	opts.Backoff = watch.Backoff{Min: time.Millisecond, Max: 20 * time.Millisecond}
	if direct {
		opts.AgentConfig = f.config()
	}
	return New(f.client(), opts)
}

// run starts a.Run and stops it (waiting for it to return) at cleanup.
func run(t *testing.T, a *Authorizer) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
}

func waitReady(t *testing.T, a *Authorizer) {
	t.Helper()
	select {
	case <-a.Ready():
	case <-time.After(waitFor):
		t.Fatal("not ready")
	}
}

func receive(t *testing.T, what string, ch <-chan struct{}) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(waitFor):
		t.Fatalf("timed out waiting for %s", what)
	}
}

func authorize(t *testing.T, a *Authorizer, src tlsutil.Identity) Decision {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	d, err := a.Authorize(ctx, src, "0a:0b")
	if err != nil {
		t.Fatalf("Authorize(%s): %v", src, err)
	}
	return d
}

func wantDecision(t *testing.T, got Decision, allow, isDefault bool, reason string) {
	t.Helper()
	if got.Allow != allow || got.Default != isDefault || got.Reason != reason {
		t.Errorf("decision %+v, want {Allow:%v Reason:%s Default:%v}", got, allow, reason, isDefault)
	}
}

// bothPaths runs fn against the api.ConnectAuthorize path and the direct,
// context-aware one.
func bothPaths(t *testing.T, fn func(t *testing.T, direct bool)) {
	for _, direct := range []bool{false, true} {
		name := "ConnectAuthorize"
		if direct {
			name = "direct"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			fn(t, direct)
		})
	}
}

func TestLocalMatchMakesNoHTTPCall(t *testing.T) {
	t.Parallel()
	admin := ixn("default", "admin", "default", "db", "")
	admin.Permissions = []*api.IntentionPermission{{Action: api.IntentionActionAllow}}
	f := newFakeAgent(t, 10,
		ixn("default", "web", "default", "db", api.IntentionActionAllow),
		ixn("default", "api", "default", "db", api.IntentionActionDeny),
		admin,
	)
	a := newAuthorizer(t, f, false, Options{})
	run(t, a)
	waitReady(t, a)

	for range 100 {
		wantDecision(t, authorize(t, a, web), true, false, "matched intention web => db (allow)")
		wantDecision(t, authorize(t, a, apiID), false, false, "matched intention api => db (deny)")
		wantDecision(t, authorize(t, a, svc("", "default", "admin")), false, false, "L7 intention admin => db denies at L4")
	}
	if n := f.totalAuthCalls(); n != 0 {
		t.Errorf("%d authorize calls, want 0", n)
	}
	// The initial read and at most the blocking query now waiting.
	if m, _ := f.counts(); m > 2 {
		t.Errorf("%d intention queries, want at most 2", m)
	}
}

func TestDefaultDecisionOneCallPerSource(t *testing.T) {
	t.Parallel()
	bothPaths(t, func(t *testing.T, direct bool) {
		f := newFakeAgent(t, 3, ixn("default", "web", "default", "other", api.IntentionActionDeny))
		hold := make(chan struct{})
		f.setAuthorize(0, api.AgentAuthorize{Authorized: true, Reason: "Default behavior configured by ACLs"}, hold)
		a := newAuthorizer(t, f, direct, Options{})
		run(t, a)
		waitReady(t, a)

		concurrently := func(src tlsutil.Identity) {
			t.Helper()
			var wg sync.WaitGroup
			for range 50 {
				wg.Go(func() {
					ctx, cancel := context.WithTimeout(context.Background(), waitFor)
					defer cancel()
					d, err := a.Authorize(ctx, src, "0a:0b")
					if err != nil || d != (Decision{Allow: true, Default: true, Reason: "default: Default behavior configured by ACLs"}) {
						t.Errorf("Authorize(%s) = %+v, %v", src, d, err)
					}
				})
			}
			wg.Wait()
		}

		done := make(chan struct{})
		go func() {
			defer close(done)
			concurrently(web)
		}()
		receive(t, "the authorize call", f.started)
		close(hold) // release it; latecomers join the flight or hit the cache
		receive(t, "50 callers", done)
		concurrently(apiID)
		concurrently(web)

		if n := f.calls(web.String()); n != 1 {
			t.Errorf("%d authorize calls for web, want 1", n)
		}
		if n := f.calls(apiID.String()); n != 1 {
			t.Errorf("%d authorize calls for api, want 1", n)
		}
		f.mu.Lock()
		req := f.authReqs[0]
		f.mu.Unlock()
		if req.Target != "db" || req.ClientCertURI != web.String() || req.ClientCertSerial != "0a:0b" {
			t.Errorf("authorize request %+v", req)
		}
	})
}

func TestIntentionChangeIsPickedUp(t *testing.T) {
	t.Parallel()
	f := newFakeAgent(t, 5, ixn("default", "web", "default", "db", api.IntentionActionDeny))
	a := newAuthorizer(t, f, false, Options{})
	run(t, a)
	waitReady(t, a)

	wantDecision(t, authorize(t, a, web), false, false, "matched intention web => db (deny)")
	wantDecision(t, authorize(t, a, apiID), true, true, "default: Default behavior configured by ACLs")

	f.set(6,
		ixn("default", "web", "default", "db", api.IntentionActionAllow),
		ixn("default", "api", "default", "db", api.IntentionActionDeny),
	)
	testutil.Eventually(t, "index 6", func() bool { return a.Snapshot().Index == 6 })
	wantDecision(t, authorize(t, a, web), true, false, "matched intention web => db (allow)")
	wantDecision(t, authorize(t, a, apiID), false, false, "matched intention api => db (deny)")

	// With no intentions left, the cached default for api from index 5
	// must not come back: the agent is asked again.
	f.set(7)
	testutil.Eventually(t, "index 7", func() bool { return a.Snapshot().Index == 7 })
	wantDecision(t, authorize(t, a, apiID), true, true, "default: Default behavior configured by ACLs")
	wantDecision(t, authorize(t, a, web), true, true, "default: Default behavior configured by ACLs")
	if n := f.calls(apiID.String()); n != 2 {
		t.Errorf("%d authorize calls for api, want 2", n)
	}
	if n := f.calls(web.String()); n != 1 {
		t.Errorf("%d authorize calls for web, want 1", n)
	}
}

func TestAgentGoneKeepsLastSet(t *testing.T) {
	t.Parallel()
	f := newFakeAgent(t, 5,
		ixn("default", "web", "default", "db", api.IntentionActionAllow),
		ixn("default", "api", "default", "db", api.IntentionActionDeny),
	)
	a := newAuthorizer(t, f, true, Options{})
	run(t, a)
	waitReady(t, a)
	cached := svc("", "default", "cached")
	wantDecision(t, authorize(t, a, cached), true, true, "default: Default behavior configured by ACLs")

	check := func() {
		t.Helper()
		wantDecision(t, authorize(t, a, web), true, false, "matched intention web => db (allow)")
		wantDecision(t, authorize(t, a, apiID), false, false, "matched intention api => db (deny)")
		wantDecision(t, authorize(t, a, cached), true, true, "default: Default behavior configured by ACLs")
		if s := a.Snapshot(); !s.Loaded || s.Index != 5 || len(s.Intentions) != 2 || len(s.Cached) != 1 {
			t.Errorf("snapshot %+v", s)
		}
	}

	// The agent answers errors for a while...
	f.setMatchFail(true)
	testutil.Eventually(t, "three failed queries", func() bool { _, n := f.counts(); return n >= 3 })
	check()

	// ...then goes away altogether.
	f.stop()
	check()
	if n := f.calls(cached.String()); n != 1 {
		t.Errorf("%d authorize calls for the cached source, want 1", n)
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	d, err := a.Authorize(ctx, svc("", "default", "new"), "")
	if err == nil || d.Allow || !strings.HasPrefix(err.Error(), "authz: ") {
		t.Errorf("new source with the agent gone: %+v, %v; want an authz: error", d, err)
	}
}

func TestDefaultTTL(t *testing.T) {
	t.Parallel()
	f := newFakeAgent(t, 5)
	a := newAuthorizer(t, f, false, Options{DefaultTTL: time.Minute})
	var clock atomic.Int64
	clock.Store(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	a.now = func() time.Time { return time.Unix(0, clock.Load()) }
	run(t, a)
	waitReady(t, a)

	authorize(t, a, web)
	clock.Add(int64(59 * time.Second))
	authorize(t, a, web)
	if n := f.calls(web.String()); n != 1 {
		t.Fatalf("%d calls within the TTL, want 1", n)
	}
	if s := a.Snapshot(); len(s.Cached) != 1 || s.Cached[0].Source != web.String() {
		t.Errorf("cached %+v", s.Cached)
	}
	clock.Add(int64(2 * time.Second))
	if s := a.Snapshot(); len(s.Cached) != 0 {
		t.Errorf("expired entries in snapshot: %+v", s.Cached)
	}
	authorize(t, a, web)
	if n := f.calls(web.String()); n != 2 {
		t.Errorf("%d calls after the TTL, want 2", n)
	}
}

func TestAgentErrorIsNotCached(t *testing.T) {
	t.Parallel()
	bothPaths(t, func(t *testing.T, direct bool) {
		f := newFakeAgent(t, 5)
		f.setAuthorize(403, api.AgentAuthorize{}, nil)
		a := newAuthorizer(t, f, direct, Options{})
		for i := 1; i <= 2; i++ {
			d, err := a.Authorize(context.Background(), web, "")
			var se api.StatusError
			if !errors.As(err, &se) || se.Code != 403 || d.Allow || !strings.HasPrefix(err.Error(), "authz: ") {
				t.Fatalf("Authorize = %+v, %v; want an authz: error wrapping a 403", d, err)
			}
			if n := f.calls(web.String()); n != i {
				t.Fatalf("%d calls, want %d", n, i)
			}
		}
	})
}

func TestAuthorizeHonoursContext(t *testing.T) {
	t.Parallel()
	bothPaths(t, func(t *testing.T, direct bool) {
		f := newFakeAgent(t, 5)
		hold := make(chan struct{})
		f.setAuthorize(0, api.AgentAuthorize{Authorized: true, Reason: "ok"}, hold)
		a := newAuthorizer(t, f, direct, Options{AuthorizeTimeout: 200 * time.Millisecond})

		ctx, cancel := context.WithCancel(context.Background())
		errc := make(chan error, 1)
		go func() {
			_, err := a.Authorize(ctx, web, "")
			errc <- err
		}()
		receive(t, "the authorize call", f.started)
		cancel()
		select {
		case err := <-errc:
			if !errors.Is(err, context.Canceled) || !strings.HasPrefix(err.Error(), "authz: ") {
				t.Fatalf("Authorize after cancel: %v", err)
			}
		case <-time.After(waitFor):
			t.Fatal("Authorize did not return after its context was cancelled")
		}

		if direct {
			// The shared call outlives the cancelled caller but not
			// AuthorizeTimeout.
			receive(t, "the request to be aborted", f.aborted)
			return
		}
		// ConnectAuthorize cannot be cancelled; once it completes its
		// answer is cached for the next caller.
		close(hold)
		testutil.Eventually(t, "the answer to be cached", func() bool { return len(a.Snapshot().Cached) == 1 })
		wantDecision(t, authorize(t, a, web), true, false, "agent (intentions not loaded yet): ok")
		if n := f.calls(web.String()); n != 1 {
			t.Errorf("%d calls, want 1", n)
		}
	})
}

func TestAgentRequests(t *testing.T) {
	t.Parallel()
	bothPaths(t, func(t *testing.T, direct bool) {
		f := newFakeAgent(t, 5)
		a := newAuthorizer(t, f, direct, Options{Namespace: "ns1", Partition: "ap1"})
		run(t, a)
		waitReady(t, a)
		authorize(t, a, web)

		f.mu.Lock()
		defer f.mu.Unlock()
		for _, want := range []string{"by=destination", "name=db", "ns=ns1", "partition=ap1", "cached"} {
			if !strings.Contains(f.matchURLs[0], want) {
				t.Errorf("intention query %s lacks %s", f.matchURLs[0], want)
			}
		}
		req, hdr, u := f.authReqs[0], f.authHdrs[0], f.authURLs[0]
		if hdr.Get("X-Consul-Token") != "test-token" || !strings.HasPrefix(hdr.Get("Content-Type"), "application/json") {
			t.Errorf("authorize headers %v", hdr)
		}
		// Query parameters, as api.Client sends them; the fake agent
		// refuses unknown body fields like Consul.
		if wantNS := direct; strings.Contains(u, "ns=ns1") != wantNS || strings.Contains(u, "partition=ap1") != wantNS {
			t.Errorf("authorize URL %s (direct %v)", u, direct)
		}
		if req.Target != "db" || req.ClientCertURI != web.String() {
			t.Errorf("authorize request %+v", req)
		}
	})
}

func TestNonServiceIdentitiesAreDenied(t *testing.T) {
	t.Parallel()
	f := newFakeAgent(t, 5, ixn("*", "*", "*", "*", api.IntentionActionAllow))
	a := newAuthorizer(t, f, false, Options{})
	run(t, a)
	waitReady(t, a)
	for _, id := range []tlsutil.Identity{
		{},
		{Kind: tlsutil.KindAgent, TrustDomain: "td", Partition: "default", Datacenter: "dc1", NodeID: "n1"},
		{Kind: tlsutil.KindServer, TrustDomain: "td", Partition: "default", Datacenter: "dc1"},
		{Kind: tlsutil.KindMeshGateway, TrustDomain: "td", Partition: "default", Datacenter: "dc1"},
	} {
		d, err := a.Authorize(context.Background(), id, "")
		if err != nil || d.Allow || d.Default {
			t.Errorf("Authorize(%v) = %+v, %v", id.Kind, d, err)
		}
	}
	if n := f.totalAuthCalls(); n != 0 {
		t.Errorf("%d authorize calls, want 0", n)
	}
}

func TestAuthorizeBeforeReady(t *testing.T) {
	t.Parallel()
	f := newFakeAgent(t, 5)
	a := newAuthorizer(t, f, false, Options{})
	select {
	case <-a.Ready():
		t.Fatal("ready before Run")
	default:
	}
	wantDecision(t, authorize(t, a, web), true, false, "agent (intentions not loaded yet): Default behavior configured by ACLs")
	run(t, a)
	waitReady(t, a)
	// The answer given before the first load is not reused.
	wantDecision(t, authorize(t, a, web), true, true, "default: Default behavior configured by ACLs")
	if n := f.calls(web.String()); n != 2 {
		t.Errorf("%d calls, want 2", n)
	}
}

func TestSamenessGroupIntentionAsksAgent(t *testing.T) {
	t.Parallel()
	sg := ixn("default", "web", "default", "db", api.IntentionActionDeny)
	sg.SourceSamenessGroup = "sg"
	f := newFakeAgent(t, 5, sg, ixn("*", "*", "default", "db", api.IntentionActionAllow))
	f.setAuthorize(0, api.AgentAuthorize{Authorized: false, Reason: "Matched L4 intention: sg web => db"}, nil)
	a := newAuthorizer(t, f, false, Options{})
	run(t, a)
	waitReady(t, a)
	for range 3 {
		wantDecision(t, authorize(t, a, web), false, false, "agent (sameness-group intention): Matched L4 intention: sg web => db")
	}
	wantDecision(t, authorize(t, a, apiID), true, false, "matched intention */* => db (allow)")
	if n := f.totalAuthCalls(); n != 1 {
		t.Errorf("%d calls, want 1", n)
	}
}

func TestAgentAheadOfLocalCopy(t *testing.T) {
	t.Parallel()
	f := newFakeAgent(t, 5)
	f.setAuthorize(0, api.AgentAuthorize{Reason: "Matched L4 intention: DENY default/web => default/db (ID: x)"}, nil)
	a := newAuthorizer(t, f, false, Options{})
	run(t, a)
	waitReady(t, a)
	wantDecision(t, authorize(t, a, web), false, false,
		"agent (intention not yet seen locally): Matched L4 intention: DENY default/web => default/db (ID: x)")
}

func TestSnapshot(t *testing.T) {
	t.Parallel()
	peer := ixn("default", "web", "default", "db", api.IntentionActionDeny)
	peer.SourcePeer = "cluster2"
	peer.ID = "p1"
	f := newFakeAgent(t, 42, peer, ixn("default", "web", "default", "db", api.IntentionActionAllow))
	a := newAuthorizer(t, f, false, Options{})
	if s := a.Snapshot(); s.Loaded || len(s.Intentions) != 0 || s.Target != "db" {
		t.Errorf("snapshot before load: %+v", s)
	}
	run(t, a)
	waitReady(t, a)
	authorize(t, a, apiID) // matches nothing: a cached default

	s := a.Snapshot()
	if !s.Loaded || s.Index != 42 || s.UpdatedAt.IsZero() {
		t.Errorf("snapshot %+v", s)
	}
	if len(s.Intentions) != 2 {
		t.Fatalf("intentions %+v", s.Intentions)
	}
	// Equal precedence: the local source sorts before the peer one.
	if got := s.Intentions[0]; !got.Allow || got.Ignored != "" || got.Precedence != 9 ||
		got.Reason != "matched intention web => db (allow)" {
		t.Errorf("first intention %+v", got)
	}
	if got := s.Intentions[1]; got.SourceName != "web" || got.SourcePeer != "cluster2" || got.Ignored != "" || got.ID != "p1" {
		t.Errorf("second intention %+v", got)
	}
	if len(s.Cached) != 1 || s.Cached[0].Source != apiID.String() || !s.Cached[0].Default {
		t.Errorf("cached %+v", s.Cached)
	}
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	var back Snapshot
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if back.Index != 42 || len(back.Intentions) != 2 || len(back.Cached) != 1 {
		t.Errorf("JSON round trip: %s", b)
	}
}

func TestDirectAgentConfigErrorFallsBack(t *testing.T) {
	t.Parallel()
	f := newFakeAgent(t, 5)
	a := New(f.client(), Options{Target: "db", AgentConfig: &api.Config{Address: "bogus://x"}})
	wantDecision(t, authorize(t, a, web), true, false, "agent (intentions not loaded yet): Default behavior configured by ACLs")
}

// hotAuthorizer has a loaded intention set where web matches the last of 20
// intentions and team/api (no intention matches) has a cached default. No
// agent is reachable.
func hotAuthorizer() *Authorizer {
	a := New(nil, Options{Target: "db"})
	var ixns []*api.Intention
	for _, name := range []string{"a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q", "r", "s"} {
		ixns = append(ixns, ixn("default", name, "default", "db", api.IntentionActionDeny))
	}
	ixns = append(ixns, ixn("default", "*", "default", "*", api.IntentionActionAllow))
	ixns[5].DestinationName = "api" // not db: never matches, still scanned
	a.install(1, ixns[:len(ixns)-1], false)
	a.install(2, ixns, false)
	a.state.Load().store(teamAPI, Decision{Allow: true, Default: true, Reason: "default: x"}, a.now(), time.Hour)
	return a
}

// Not parallel: AllocsPerRun counts the whole process's allocations and
// panics in a parallel test.
func TestHotPathDoesNotAllocate(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	a := hotAuthorizer()
	ctx := context.Background()
	for src, allow := range map[tlsutil.Identity]bool{web: true, svc("", "default", "s"): false, teamAPI: true} {
		d, err := a.Authorize(ctx, src, "")
		if err != nil || d.Allow != allow {
			t.Fatalf("Authorize(%s) = %+v, %v", src, d, err)
		}
		if n := testing.AllocsPerRun(100, func() { _, _ = a.Authorize(ctx, src, "") }); n != 0 {
			t.Errorf("Authorize(%s): %v allocations", src, n)
		}
	}
}

func BenchmarkAuthorize(b *testing.B) {
	a := hotAuthorizer()
	ctx := context.Background()
	for _, bc := range []struct {
		name string
		src  tlsutil.Identity
	}{{"match-last", web}, {"match-first", svc("", "default", "a")}, {"cached-default", teamAPI}} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := a.Authorize(ctx, bc.src, ""); err != nil {
						b.Fatal(err)
					}
				}
			})
		})
	}
}

func TestDirectAgentOverUnixSocket(t *testing.T) {
	t.Parallel()
	sock := filepath.Join(t.TempDir(), "agent.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Skipf("unix sockets unavailable: %v", err)
	}
	var calls atomic.Int32
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.URL.Path != "/v1/agent/connect/authorize" {
			http.NotFound(w, r)
			return
		}
		calls.Add(1)
		_ = json.NewEncoder(w).Encode(api.AgentAuthorize{Authorized: true, Reason: "Default intention policy"})
	}))
	srv.Listener = ln
	srv.Start()
	t.Cleanup(srv.Close)

	client, err := api.NewClient(&api.Config{Address: "unix://" + sock})
	if err != nil {
		t.Fatal(err)
	}
	// A config not yet normalized by api.NewClient works too.
	a := New(client, Options{Target: "db", AgentConfig: &api.Config{Address: "unix://" + sock}})
	wantDecision(t, authorize(t, a, web), true, false, "agent (intentions not loaded yet): Default intention policy")
	if calls.Load() != 1 {
		t.Errorf("%d calls, want 1", calls.Load())
	}
}

// TestExpiredDefaultSurvivesAgentOutage: while the agent cannot answer, the
// last answer for a source stays in force past its TTL, as the cached
// intentions do; only a source never seen before fails.
func TestExpiredDefaultSurvivesAgentOutage(t *testing.T) {
	t.Parallel()
	f := newFakeAgent(t, 5)
	a := newAuthorizer(t, f, false, Options{DefaultTTL: time.Minute})
	var clock atomic.Int64
	clock.Store(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	a.now = func() time.Time { return time.Unix(0, clock.Load()) }
	run(t, a)
	waitReady(t, a)
	authorize(t, a, web)

	f.setAuthorize(500, api.AgentAuthorize{}, nil) // the agent is failing
	clock.Add(int64(2 * time.Minute))
	d, err := a.Authorize(context.Background(), web, "")
	if err != nil || !d.Allow || !strings.Contains(d.Reason, "stale") {
		t.Fatalf("expired answer during an outage: %+v, %v; want the last allow, marked stale", d, err)
	}
	other := tlsutil.ServiceID(web.TrustDomain, "", "", "dc1", "never-seen")
	if _, err := a.Authorize(context.Background(), other, ""); err == nil {
		t.Fatal("a source never seen got a decision while the agent fails")
	}
}

// TestChangedSignalsWhatCanRevoke: Changed fires on a new intention set
// and when the agent's answer for a source flips after its TTL, and not
// when a re-asked answer is the same.
func TestChangedSignalsWhatCanRevoke(t *testing.T) {
	t.Parallel()
	f := newFakeAgent(t, 5)
	a := newAuthorizer(t, f, false, Options{DefaultTTL: time.Minute})
	var clock atomic.Int64
	clock.Store(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	a.now = func() time.Time { return time.Unix(0, clock.Load()) }
	run(t, a)
	waitReady(t, a)

	ch := a.Changed()
	f.set(6, ixn("default", "web", "default", "db", api.IntentionActionDeny))
	receive(t, "Changed after a new intention set", ch)

	ch = a.Changed()
	wantDecision(t, authorize(t, a, apiID), true, true, "default: Default behavior configured by ACLs")
	clock.Add(int64(2 * time.Minute))
	wantDecision(t, authorize(t, a, apiID), true, true, "default: Default behavior configured by ACLs")
	select {
	case <-ch:
		t.Fatal("Changed fired for an unchanged answer")
	default:
	}
	f.setAuthorize(200, api.AgentAuthorize{Authorized: false, Reason: "Default behavior configured by ACLs"}, nil)
	clock.Add(int64(2 * time.Minute))
	wantDecision(t, authorize(t, a, apiID), false, true, "default: Default behavior configured by ACLs")
	receive(t, "Changed after the default answer flipped", ch)
}

// A source in a cluster peer: a SourcePeer intention decides locally; with
// none, the default is learned from the agent about a probe identity (the
// agent's authorize knows nothing of peers), cached per source; a probe
// that the agent matches to an intention denies.
func TestPeerSource(t *testing.T) {
	deny := ixn("default", "web", "default", "db", api.IntentionActionDeny)
	deny.SourcePeer = "cluster2"
	f := newFakeAgent(t, 42, deny, ixn("default", "web", "default", "db", api.IntentionActionAllow))
	a := newAuthorizer(t, f, false, Options{})
	run(t, a)
	waitReady(t, a)

	if d := authorize(t, a, peerSvc("cluster2", "web")); d.Allow || d.Reason != "matched intention peer:cluster2/default/web => db (deny)" {
		t.Errorf("cluster2 web: %+v", d)
	}
	if d := authorize(t, a, svc("", "default", "web")); !d.Allow {
		t.Errorf("local web: %+v", d)
	}
	if f.totalAuthCalls() != 0 {
		t.Fatalf("%d agent calls for decisions intentions make", f.totalAuthCalls())
	}

	// cluster3's web matches neither the local nor the cluster2 intention.
	src := peerSvc("cluster3", "web")
	probe := src
	probe.Peer, probe.Namespace = "", peerProbeNamespace
	if d := authorize(t, a, src); !d.Allow || !d.Default {
		t.Errorf("cluster3 web: %+v", d)
	}
	authorize(t, a, src)
	if n := f.calls(probe.String()); n != 1 {
		t.Errorf("agent asked %d times about the probe %s, want 1 (then cached)", n, probe)
	}
	if n := f.calls(src.String()); n != 0 {
		t.Errorf("agent asked about the peer's own URI %d times", n)
	}

	f.setAuthorize(http.StatusOK, api.AgentAuthorize{Authorized: true, Reason: "Matched L4 intention: */* => db (allow)"}, nil)
	if d := authorize(t, a, peerSvc("cluster4", "api")); d.Allow || d.Default {
		t.Errorf("cluster4 api with a probe the agent matched: %+v", d)
	}
}
