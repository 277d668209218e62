package config

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/straitproxy/strait/internal/testutil"
)

// fakeRegAgent records the agent calls Register makes.
type fakeRegAgent struct {
	mu            sync.Mutex
	calls         []string // "METHOD path"
	regs          []api.AgentServiceRegistration
	deregFailures int // answer this many deregistrations with 500
}

func (f *fakeRegAgent) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, r.Method+" "+r.URL.Path)
	switch {
	case r.Method == http.MethodPut && r.URL.Path == "/v1/agent/service/register":
		var reg api.AgentServiceRegistration
		if err := json.NewDecoder(r.Body).Decode(&reg); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		f.regs = append(f.regs, reg)
	case r.Method == http.MethodPut && strings.HasPrefix(r.URL.Path, "/v1/agent/service/deregister/"):
		if f.deregFailures > 0 {
			f.deregFailures--
			http.Error(w, "agent busy", http.StatusInternalServerError)
			return
		}
	case r.Method == http.MethodPut && strings.HasPrefix(r.URL.Path, "/v1/agent/check/pass/"):
	default:
		http.NotFound(w, r)
	}
}

func (f *fakeRegAgent) snapshot() ([]string, []api.AgentServiceRegistration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.calls...), append([]api.AgentServiceRegistration(nil), f.regs...)
}

func TestRegisterID(t *testing.T) {
	t.Parallel()
	if got := (&Register{Service: "web"}).ID(); got != "web-proxy" {
		t.Errorf("ID() = %q, want web-proxy", got)
	}
	if got := (&Register{Service: "web", IDSuffix: "2"}).ID(); got != "web-proxy-2" {
		t.Errorf("ID() = %q, want web-proxy-2", got)
	}
}

func runRegister(t *testing.T, f *fakeRegAgent, r *Register) (cancel func(), done <-chan struct{}) {
	t.Helper()
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	r.Client = newAPIClient(t, srv)
	ctx, cancelCtx := context.WithCancel(context.Background())
	d := make(chan struct{})
	go func() {
		defer close(d)
		r.Run(ctx)
	}()
	t.Cleanup(func() {
		cancelCtx()
		<-d
	})
	return cancelCtx, d
}

func waitDone(t *testing.T, done <-chan struct{}) {
	t.Helper()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		t.Fatal("Register.Run did not return after cancel")
	}
}

func TestRegisterRun(t *testing.T) {
	t.Parallel()
	f := &fakeRegAgent{}
	r := &Register{Service: "web", Address: "10.0.0.7", Port: 21000, IDSuffix: "abc"}
	cancel, done := runRegister(t, f, r)

	testutil.Eventually(t, "the registration", func() bool { _, regs := f.snapshot(); return len(regs) >= 1 })
	_, regs := f.snapshot()
	reg := regs[0]
	if reg.ID != "web-proxy-abc" || reg.Name != "web-proxy" || reg.Kind != api.ServiceKindConnectProxy {
		t.Fatalf("registered ID %q Name %q Kind %q", reg.ID, reg.Name, reg.Kind)
	}
	if reg.Address != "10.0.0.7" || reg.Port != 21000 {
		t.Fatalf("registered address %s:%d", reg.Address, reg.Port)
	}
	if reg.Proxy == nil || reg.Proxy.DestinationServiceName != "web" {
		t.Fatalf("registered proxy %+v", reg.Proxy)
	}
	if reg.Check == nil {
		t.Fatal("no check registered")
	}
	if reg.Check.CheckID != "web-proxy-abc-ttl" || reg.Check.TTL != "30s" || reg.Check.Status != api.HealthPassing {
		t.Fatalf("check %+v", reg.Check)
	}

	cancel()
	waitDone(t, done)
	calls, _ := f.snapshot()
	if last := calls[len(calls)-1]; last != "PUT /v1/agent/service/deregister/web-proxy-abc" {
		t.Fatalf("last call %q, want the deregistration; all: %v", last, calls)
	}
	if calls[0] != "PUT /v1/agent/service/register" {
		t.Fatalf("first call %q, want the registration", calls[0])
	}
}

func TestRegisterDeregisterRetries(t *testing.T) {
	t.Parallel()
	f := &fakeRegAgent{deregFailures: 1}
	cancel, done := runRegister(t, f, &Register{Service: "db", Port: 21001})
	testutil.Eventually(t, "the registration", func() bool { _, regs := f.snapshot(); return len(regs) >= 1 })
	cancel()
	waitDone(t, done)
	calls, _ := f.snapshot()
	n := 0
	for _, c := range calls {
		if c == "PUT /v1/agent/service/deregister/db-proxy" {
			n++
		}
	}
	if n != 2 {
		t.Fatalf("deregistration attempts %d, want 2 (one failure, one retry); calls %v", n, calls)
	}
}
