package config

import (
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// TestTokenPrecedenceAndReload is not parallel: it sets environment
// variables, as operators do.
func TestTokenPrecedenceAndReload(t *testing.T) {
	var mu sync.Mutex
	var seen []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.Header.Get("X-Consul-Token"))
		mu.Unlock()
		w.Write([]byte(`{}`))
	}))
	defer srv.Close()
	last := func() string {
		mu.Lock()
		defer mu.Unlock()
		return seen[len(seen)-1]
	}
	dir := t.TempDir()
	file := filepath.Join(dir, "tok")
	envFile := filepath.Join(dir, "envtok")
	os.WriteFile(file, []byte("from-file\n"), 0o600)
	os.WriteFile(envFile, []byte("from-env-file"), 0o600)
	t.Setenv("CONSUL_HTTP_TOKEN", "from-env")
	t.Setenv("CONSUL_HTTP_TOKEN_FILE", envFile)

	for _, tc := range []struct {
		name string
		api  API
		want string
	}{
		{"-token-file wins", API{Token: "flag", TokenFile: file}, "from-file"},
		{"-token next", API{Token: "flag"}, "flag"},
		{"env file next", API{}, "from-env-file"},
	} {
		tc.api.Addr = srv.URL
		ag, err := tc.api.Connect()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ag.Client.Agent().Self(); err != nil {
			t.Fatal(err)
		}
		if got := last(); got != tc.want {
			t.Errorf("%s: sent token %q, want %q", tc.name, got, tc.want)
		}
	}

	// SIGHUP path: the file changes, the next request carries the new token.
	ag, err := API{Addr: srv.URL, TokenFile: file}.Connect()
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(file, []byte("rotated"), 0o600)
	if err := ag.ReloadToken(); err != nil {
		t.Fatal(err)
	}
	ag.Client.Agent().Self()
	if got := last(); got != "rotated" {
		t.Fatalf("after reload sent %q, want rotated", got)
	}
	// A broken file keeps the previous token.
	os.WriteFile(file, nil, 0o600)
	if err := ag.ReloadToken(); err == nil {
		t.Fatal("empty token file accepted")
	}
	ag.Client.Agent().Self()
	if got := last(); got != "rotated" {
		t.Fatalf("after failed reload sent %q, want rotated", got)
	}

	t.Setenv("CONSUL_HTTP_TOKEN_FILE", "")
	ag, err = API{Addr: srv.URL}.Connect()
	if err != nil {
		t.Fatal(err)
	}
	ag.Client.Agent().Self()
	if got := last(); got != "from-env" {
		t.Fatalf("env token: sent %q", got)
	}
}
