package authz

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// fakeAgent serves the two endpoints the Authorizer uses. Unit tests only:
// it is not evidence that the proxy works against a real agent.
type fakeAgent struct {
	t   *testing.T
	srv *httptest.Server

	mu         sync.Mutex
	index      uint64
	ixns       []*api.Intention
	changed    chan struct{} // closed and replaced on every change
	matchFail  bool          // answer the match endpoint with 500
	answer     api.AgentAuthorize
	status     int           // authorize status; 0 means 200
	hold       chan struct{} // when non-nil, authorize waits for it
	authCalls  map[string]int
	authReqs   []api.AgentAuthorizeParams
	authHdrs   []http.Header
	authURLs   []string
	matchCalls int
	matchURLs  []string
	failures   int // failed match answers

	started chan struct{} // one value per authorize request that reached hold
	aborted chan struct{} // one value per held request whose context ended
	down    chan struct{}
	once    sync.Once
}

func newFakeAgent(t *testing.T, index uint64, ixns ...*api.Intention) *fakeAgent {
	f := &fakeAgent{
		t:         t,
		index:     index,
		ixns:      ixns,
		changed:   make(chan struct{}),
		answer:    api.AgentAuthorize{Authorized: true, Reason: "Default behavior configured by ACLs"},
		authCalls: map[string]int{},
		started:   make(chan struct{}, 1000),
		aborted:   make(chan struct{}, 1000),
		down:      make(chan struct{}),
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/connect/intentions/match", f.match)
	mux.HandleFunc("POST /v1/agent/connect/authorize", f.authorize)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		t.Errorf("fake agent: unexpected %s %s", r.Method, r.URL)
		http.NotFound(w, r)
	})
	f.srv = httptest.NewServer(mux)
	t.Cleanup(f.stop)
	return f
}

// stop makes the agent go away: held requests return and new connections
// are refused.
func (f *fakeAgent) stop() {
	f.once.Do(func() {
		close(f.down)
		f.srv.Close()
	})
}

func (f *fakeAgent) config() *api.Config {
	return &api.Config{Address: f.srv.Listener.Addr().String(), Token: "test-token"}
}

func (f *fakeAgent) client() *api.Client {
	c, err := api.NewClient(f.config())
	if err != nil {
		f.t.Fatal(err)
	}
	return c
}

// set installs a new intention set at index and wakes blocked queries.
func (f *fakeAgent) set(index uint64, ixns ...*api.Intention) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.index, f.ixns = index, ixns
	close(f.changed)
	f.changed = make(chan struct{})
}

func (f *fakeAgent) setMatchFail(fail bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.matchFail = fail
	close(f.changed)
	f.changed = make(chan struct{})
}

func (f *fakeAgent) setAuthorize(status int, answer api.AgentAuthorize, hold chan struct{}) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.status, f.answer, f.hold = status, answer, hold
}

func (f *fakeAgent) calls(uri string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.authCalls[uri]
}

func (f *fakeAgent) totalAuthCalls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, c := range f.authCalls {
		n += c
	}
	return n
}

func (f *fakeAgent) counts() (match, failures int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.matchCalls, f.failures
}

func (f *fakeAgent) match(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	index, _ := strconv.ParseUint(q.Get("index"), 10, 64)
	f.mu.Lock()
	f.matchCalls++
	f.matchURLs = append(f.matchURLs, r.URL.String())
	if index > 0 && index >= f.index && !f.matchFail {
		ch := f.changed
		f.mu.Unlock()
		select {
		case <-ch:
		case <-r.Context().Done():
			return
		case <-f.down:
			http.Error(w, "shutting down", http.StatusServiceUnavailable)
			return
		case <-time.After(10 * time.Second): // the agent's wait, shortened
		}
		f.mu.Lock()
	}
	if f.matchFail {
		f.failures++
		f.mu.Unlock()
		http.Error(w, "rpc error: no cluster leader", http.StatusInternalServerError)
		return
	}
	body := map[string][]*api.Intention{}
	for _, name := range q["name"] {
		body[name] = f.ixns
	}
	w.Header().Set("X-Consul-Index", strconv.FormatUint(f.index, 10))
	f.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(body)
}

func (f *fakeAgent) authorize(w http.ResponseWriter, r *http.Request) {
	var req api.AgentAuthorizeParams
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields() // as Consul does
	if err := dec.Decode(&req); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	f.mu.Lock()
	f.authCalls[req.ClientCertURI]++
	f.authReqs = append(f.authReqs, req)
	f.authHdrs = append(f.authHdrs, r.Header.Clone())
	f.authURLs = append(f.authURLs, r.URL.String())
	hold, status, answer := f.hold, f.status, f.answer
	f.mu.Unlock()
	if hold != nil {
		f.started <- struct{}{}
		select {
		case <-hold:
		case <-r.Context().Done():
			f.aborted <- struct{}{}
			return
		case <-f.down:
			return
		}
	}
	if status != 0 && status != http.StatusOK {
		http.Error(w, "Permission denied", status)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(answer)
}
