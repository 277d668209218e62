package tlsutil

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/internal/testutil"
)

// fakeCAAgent serves the agent's CA roots and leaf endpoints with Consul's
// index blocking: a request whose ?index= is below the current index is
// answered at once, otherwise it is held until the value changes or hold
// elapses (then answered with the unchanged index).
type fakeCAAgent struct {
	t       *testing.T
	service string
	hold    time.Duration

	mu         sync.Mutex
	changed    chan struct{} // closed and replaced on every change
	roots      *api.CARootList
	rootsIndex uint64
	rootsFail  bool // answer roots with 500
	leaf       *testutil.Leaf
	leafIndex  uint64
	requests   map[string]int // by endpoint: "roots", "leaf"
	badPaths   []string
	leafQuery  url.Values // of the last leaf request
	stop       chan struct{}
	srv        *httptest.Server
}

func newFakeCAAgent(t *testing.T, service string) *fakeCAAgent {
	f := &fakeCAAgent{
		t: t, service: service, hold: 200 * time.Millisecond,
		changed: make(chan struct{}), requests: map[string]int{}, stop: make(chan struct{}),
	}
	f.srv = httptest.NewServer(f)
	t.Cleanup(f.close)
	return f
}

func (f *fakeCAAgent) close() {
	f.mu.Lock()
	select {
	case <-f.stop:
	default:
		close(f.stop)
	}
	f.mu.Unlock()
	f.srv.CloseClientConnections()
	f.srv.Close()
}

func (f *fakeCAAgent) client(t *testing.T) *api.Client {
	t.Helper()
	c, err := api.NewClient(&api.Config{Address: strings.TrimPrefix(f.srv.URL, "http://"), Scheme: "http"})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func (f *fakeCAAgent) notifyLocked() {
	close(f.changed)
	f.changed = make(chan struct{})
}

func (f *fakeCAAgent) setRoots(r *api.CARootList) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.roots = r
	f.rootsIndex++
	f.rootsFail = false
	f.notifyLocked()
}

func (f *fakeCAAgent) setLeaf(l *testutil.Leaf) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.leaf = l
	f.leafIndex += 10
	f.notifyLocked()
}

func (f *fakeCAAgent) count(what string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.requests[what]
}

func (f *fakeCAAgent) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var what string
	switch {
	case r.URL.Path == "/v1/agent/connect/ca/roots":
		what = "roots"
	case r.URL.Path == "/v1/agent/connect/ca/leaf/"+f.service:
		what = "leaf"
	default:
		f.mu.Lock()
		f.badPaths = append(f.badPaths, r.URL.Path)
		f.mu.Unlock()
		http.NotFound(w, r)
		return
	}
	var want uint64
	if s := r.URL.Query().Get("index"); s != "" {
		var err error
		if want, err = strconv.ParseUint(s, 10, 64); err != nil {
			http.Error(w, "bad index", http.StatusBadRequest)
			return
		}
	}
	f.mu.Lock()
	f.requests[what]++
	if what == "leaf" {
		f.leafQuery = r.URL.Query()
	}
	f.mu.Unlock()

	timer := time.NewTimer(f.hold)
	defer timer.Stop()
	for {
		f.mu.Lock()
		index, body, fail := f.rootsIndex, any(f.roots), f.rootsFail || f.roots == nil
		if what == "leaf" {
			index, fail = f.leafIndex, f.leaf == nil
			if l := f.leaf; l != nil {
				body = &api.LeafCert{
					SerialNumber: l.Serial, CertPEM: l.CertPEM, PrivateKeyPEM: l.KeyPEM,
					Service: f.service, ServiceURI: l.URI, ValidAfter: l.X509.NotBefore, ValidBefore: l.X509.NotAfter,
					CreateIndex: index, ModifyIndex: index,
				}
			}
		}
		changed := f.changed
		f.mu.Unlock()
		if fail {
			http.Error(w, "not available", http.StatusInternalServerError)
			return
		}
		if want < index || want == 0 {
			w.Header().Set("X-Consul-Index", strconv.FormatUint(index, 10))
			w.Header().Set("X-Consul-KnownLeader", "true")
			w.Header().Set("X-Consul-LastContact", "0")
			w.Header().Set("Content-Type", "application/json")
			_ = json.NewEncoder(w).Encode(body)
			return
		}
		select {
		case <-changed:
		case <-timer.C:
			want = 0 // answer with the unchanged value
		case <-r.Context().Done():
			return
		case <-f.stop:
			return
		}
	}
}

func runSource(t *testing.T, s *Source) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("Source.Run did not return after cancel")
		}
	})
}

func waitReady(t *testing.T, s *Source) {
	t.Helper()
	select {
	case <-s.Ready():
	case <-time.After(15 * time.Second):
		t.Fatal("source never became ready")
	}
}

func TestSourceAgainstAgent(t *testing.T) {
	t.Parallel()
	ca := testutil.NewCA(t, testTD)
	f := newFakeCAAgent(t, "db")
	logs := &testutil.Buffer{}
	log := hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Debug})
	s := NewSource(f.client(t), "db", SourceOptions{Logger: log})

	// Leaf first, roots unavailable: not ready.
	leaf1 := ca.Leaf(t, "db", testutil.LeafOptions{})
	f.setLeaf(leaf1)
	f.mu.Lock()
	f.rootsFail = true
	f.mu.Unlock()
	runSource(t, s)
	// A second leaf request means the first answer has been processed.
	testutil.Eventually(t, "the leaf watch to block", func() bool { return f.count("leaf") >= 2 })
	testutil.Eventually(t, "a failed roots request", func() bool { return f.count("roots") >= 1 })
	select {
	case <-s.Ready():
		t.Fatal("ready without roots")
	default:
	}
	if s.Bundle() != nil {
		t.Fatal("bundle without roots")
	}

	f.setRoots(testutil.RootList(testTD, ca))
	waitReady(t, s)
	b := s.Bundle()
	if b == nil || b.LeafSerial != leaf1.Serial {
		t.Fatalf("bundle %+v, want serial %s", b, leaf1.Serial)
	}
	if s.TrustDomain() != testTD {
		t.Fatalf("TrustDomain() = %q", s.TrustDomain())
	}
	if b.Identity != ServiceID(testTD, "", "", "dc1", "db") {
		t.Fatalf("identity %+v", b.Identity)
	}

	// A renewed leaf at a higher index is picked up.
	leaf2 := ca.Leaf(t, "db", testutil.LeafOptions{})
	f.setLeaf(leaf2)
	testutil.Eventually(t, "the renewed leaf", func() bool { return s.Bundle().LeafSerial == leaf2.Serial })

	// CA rotation, leaf first: held back until the roots catch up.
	newCA := testutil.NewCA(t, testTD)
	leaf3 := newCA.Leaf(t, "db", testutil.LeafOptions{})
	n := f.count("leaf")
	f.setLeaf(leaf3)
	testutil.Eventually(t, "the leaf watch to process the new leaf", func() bool { return f.count("leaf") >= n+2 })
	if got := s.Bundle().LeafSerial; got != leaf2.Serial {
		t.Fatalf("bundle serial %s after a leaf from an unknown root, want %s kept", got, leaf2.Serial)
	}
	f.setRoots(testutil.RootList(testTD, newCA, ca))
	testutil.Eventually(t, "the rotated bundle", func() bool {
		b := s.Bundle()
		return b.LeafSerial == leaf3.Serial && len(b.RootIDs) == 2
	})

	// The agent goes away: the last bundle stays.
	last := s.Bundle()
	f.close()
	testutil.Eventually(t, "a failed watch to be logged", func() bool { return strings.Contains(logs.String(), "watch failed") })
	if s.Bundle() != last {
		t.Fatal("bundle changed after the agent went away")
	}
	select {
	case <-s.Ready():
	default:
		t.Fatal("Ready reopened")
	}
	f.mu.Lock()
	bad := f.badPaths
	f.mu.Unlock()
	if len(bad) != 0 {
		t.Fatalf("unexpected requests: %v", bad)
	}
}

func TestSourceReadyAndServes(t *testing.T) {
	t.Parallel()
	ca := testutil.NewCA(t, testTD)
	f := newFakeCAAgent(t, "db")
	f.setRoots(testutil.RootList(testTD, ca))
	dbLeaf := ca.Leaf(t, "db", testutil.LeafOptions{URI: "spiffe://" + testTD + "/ap/part1/ns/team/dc/dc1/svc/db"})
	f.setLeaf(dbLeaf)
	s := NewSource(f.client(t), "db", SourceOptions{Namespace: "team", Partition: "part1"})
	runSource(t, s)
	waitReady(t, s)
	f.mu.Lock()
	q := f.leafQuery
	f.mu.Unlock()
	if q.Get("ns") != "team" || q.Get("partition") != "part1" {
		t.Fatalf("leaf query %v does not carry the namespace and partition", q)
	}

	// The agent-fed source serves mTLS to a peer under the same CA.
	web := newTestSource(t, "web", ca.Leaf(t, "web", testutil.LeafOptions{}), testutil.RootList(testTD, ca))
	auth := &authRecorder{}
	srv := startTLSServer(t, s.ServerConfig(auth.authorize))
	c := mustConnect(t, srv.addr, web.ClientConfig(ServiceID(testTD, "part1", "team", "dc1", "db"), "", ClientOptions{}))
	if r := srv.next(t); r.err != nil {
		t.Fatalf("server handshake: %v", r.err)
	}
	if got := FormatSerial(c.ConnectionState().PeerCertificates[0].SerialNumber.Bytes()); got != dbLeaf.Serial {
		t.Fatalf("served serial %s, want %s", got, dbLeaf.Serial)
	}
}

// TestSourceGeneration: the generation changes with the leaf and with the
// roots, not when the same material is published again.
func TestSourceGeneration(t *testing.T) {
	t.Parallel()
	ca := testutil.NewCA(t, testTD)
	if g := NewSource(nil, "web", SourceOptions{}).Generation(); g != "" {
		t.Fatalf("generation before Ready = %q, want empty", g)
	}
	roots := testutil.RootList(testTD, ca)
	s := newTestSource(t, "web", ca.Leaf(t, "web", testutil.LeafOptions{}), roots)
	g1 := s.Generation()
	if g1 == "" {
		t.Fatal("no generation once ready")
	}
	setMaterial(s, nil, testutil.RootList(testTD, ca)) // the same roots, fetched again
	if g := s.Generation(); g != g1 {
		t.Errorf("generation changed from %q to %q on a refresh of the same material", g1, g)
	}
	renewed := ca.Leaf(t, "web", testutil.LeafOptions{})
	setMaterial(s, &renewed.Cert, nil)
	g2 := s.Generation()
	if g2 == g1 {
		t.Errorf("generation %q unchanged by a renewed leaf", g2)
	}
	other := testutil.NewCA(t, testTD)
	setMaterial(s, nil, testutil.RootList(testTD, ca, other))
	if g := s.Generation(); g == g2 || g == g1 {
		t.Errorf("generation %q unchanged by a new root", g)
	}
}
