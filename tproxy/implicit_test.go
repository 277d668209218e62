package tproxy

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// fakeConsul answers the three queries Implicit makes, blocking like the
// agent until its state changes.
type fakeConsul struct {
	mu           sync.Mutex
	index        uint64
	changed      chan struct{}
	services     []string
	ixns         []*api.Intention
	defaultAllow bool
	authorized   []api.AgentAuthorizeParams
}

func (f *fakeConsul) set(fn func()) {
	f.mu.Lock()
	fn()
	f.index++
	close(f.changed)
	f.changed = make(chan struct{})
	f.mu.Unlock()
}

func (f *fakeConsul) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/v1/agent/connect/authorize" {
		var p api.AgentAuthorizeParams
		json.NewDecoder(r.Body).Decode(&p)
		f.mu.Lock()
		f.authorized = append(f.authorized, p)
		allow := f.defaultAllow
		f.mu.Unlock()
		json.NewEncoder(w).Encode(api.AgentAuthorize{Authorized: allow, Reason: "Default behavior configured by ACLs"})
		return
	}
	idx, _ := strconv.ParseUint(r.URL.Query().Get("index"), 10, 64)
	f.mu.Lock()
	ch := f.changed
	cur := f.index
	f.mu.Unlock()
	if idx >= cur {
		select {
		case <-ch:
		case <-time.After(time.Second):
		case <-r.Context().Done():
			return
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	w.Header().Set("X-Consul-Index", strconv.FormatUint(f.index, 10))
	switch r.URL.Path {
	case "/v1/catalog/services":
		if r.URL.Query().Get("filter") != typicalServices {
			http.Error(w, "want the typical-services filter", http.StatusBadRequest)
			return
		}
		m := map[string][]string{}
		for _, s := range f.services {
			m[s] = nil
		}
		json.NewEncoder(w).Encode(m)
	case "/v1/connect/intentions/match":
		q := r.URL.Query()
		if q.Get("by") != "source" {
			http.Error(w, "want by=source", http.StatusBadRequest)
			return
		}
		json.NewEncoder(w).Encode(map[string][]*api.Intention{q.Get("name"): f.ixns})
	default:
		http.NotFound(w, r)
	}
}

// TestImplicitFollowsServicesAndIntentions: the implicit upstreams follow
// the catalog and the intentions without a restart, and the default
// decision asked of the agent.
func TestImplicitFollowsServicesAndIntentions(t *testing.T) {
	t.Parallel()
	f := &fakeConsul{index: 5, changed: make(chan struct{}), services: []string{"web", "db", "consul"}, defaultAllow: true}
	srv := httptest.NewServer(f)
	defer srv.Close()
	client, err := api.NewClient(&api.Config{Address: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan []string, 16)
	im := NewImplicit(ImplicitOptions{
		Client: client, Service: "web",
		Self:     func() string { return "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/web" },
		OnChange: func(names []string) { got <- names },
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); im.Run(ctx) }()
	defer func() { cancel(); <-done }()
	// The services, intentions and default decision are separate watches
	// that wake one by one, so one change of the fake can pass through an
	// intermediate set (the new default before the new intentions); what
	// must come is the final one.
	expect := func(want []string) {
		t.Helper()
		timeout := time.After(10 * time.Second)
		var last []string
		for {
			select {
			case names := <-got:
				if reflect.DeepEqual(names, want) {
					return
				}
				last = names
			case <-timeout:
				t.Fatalf("implicit upstreams %v, want %v", last, want)
			}
		}
	}
	expect([]string{"db"})
	f.set(func() { f.services = append(f.services, "cache") })
	expect([]string{"cache", "db"})
	f.set(func() {
		f.ixns = []*api.Intention{{SourceName: "web", DestinationName: "db", Action: api.IntentionActionDeny}}
	})
	expect([]string{"cache"})
	// The default turns to deny (asked again after the intentions changed).
	f.set(func() {
		f.defaultAllow = false
		f.ixns = []*api.Intention{{SourceName: "web", DestinationName: "db", Action: api.IntentionActionAllow}}
	})
	expect([]string{"db"})
	f.mu.Lock()
	p := f.authorized[0]
	f.mu.Unlock()
	if p.Target != "web" || p.ClientCertURI != "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/"+probeService {
		t.Errorf("default decision asked with %+v", p)
	}
}
