package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"time"
)

// agent is the throwaway `consul agent -dev` every topology registers with.
type agent struct {
	proc     *proc
	httpAddr string
	client   *http.Client
}

// startAgent starts a dev agent on free loopback ports, in dir, and waits
// until it has a leader and Connect CA roots.
func startAgent(ctx context.Context, procs *procSet, consulBin, dir string) (*agent, error) {
	ports, err := freePorts(6)
	if err != nil {
		return nil, err
	}
	p, err := procs.start("consul-agent", dir, consulBin, "agent", "-dev",
		"-log-level=warn", "-node=strait-bench",
		"-bind=127.0.0.1", "-client=127.0.0.1",
		"-http-port="+strconv.Itoa(ports[0]),
		"-grpc-port="+strconv.Itoa(ports[1]),
		"-grpc-tls-port="+strconv.Itoa(ports[2]),
		"-serf-lan-port="+strconv.Itoa(ports[3]),
		"-serf-wan-port="+strconv.Itoa(ports[4]),
		"-server-port="+strconv.Itoa(ports[5]),
		"-dns-port=-1",
	)
	if err != nil {
		return nil, err
	}
	a := &agent{
		proc:     p,
		httpAddr: "127.0.0.1:" + strconv.Itoa(ports[0]),
		// No proxy from the environment: the agent is on loopback.
		client: &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{}},
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		var leader string
		var roots struct{ Roots []json.RawMessage }
		errL := a.get(ctx, "/v1/status/leader", &leader)
		errR := a.get(ctx, "/v1/agent/connect/ca/roots", &roots)
		if errL == nil && errR == nil && leader != "" && len(roots.Roots) > 0 {
			return a, nil
		}
		if !p.alive() {
			return nil, p.exitedErr()
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("consul agent: no leader and Connect CA roots after 60s (leader %q: %v; roots: %v)", leader, errL, errR)
		}
		if err := sleepCtx(ctx, 200*time.Millisecond); err != nil {
			return nil, err
		}
	}
}

// get GETs an agent API path and decodes the JSON answer into v.
func (a *agent) get(ctx context.Context, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+a.httpAddr+path, nil)
	if err != nil {
		return fmt.Errorf("GET %s: %w", path, err)
	}
	resp, err := a.client.Do(req)
	if err != nil {
		return fmt.Errorf("GET %s: %w", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("GET %s: reading body: %w", path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s: %s", path, resp.Status, body)
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("GET %s: decoding: %w", path, err)
	}
	return nil
}

// waitPassing waits until the agent lists a passing Connect-capable
// instance of service (what proxy A's discovery needs).
func (a *agent) waitPassing(ctx context.Context, service string, watch *proc, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	path := "/v1/health/connect/" + url.PathEscape(service) + "?passing=1"
	for {
		var entries []json.RawMessage
		err := a.get(ctx, path, &entries)
		if err == nil && len(entries) > 0 {
			return nil
		}
		if !watch.alive() {
			return watch.exitedErr()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no passing connect instance of %s after %s (last answer: %d entries, %v)", service, timeout, len(entries), err)
		}
		if err := sleepCtx(ctx, 100*time.Millisecond); err != nil {
			return err
		}
	}
}

// leaf returns the agent-issued leaf certificate and key for service, and
// the PEM of every CA root, for topologies that do their own mTLS.
func (a *agent) leaf(ctx context.Context, service string) (certPEM, keyPEM, rootsPEM string, err error) {
	var l struct{ CertPEM, PrivateKeyPEM string }
	if err := a.get(ctx, "/v1/agent/connect/ca/leaf/"+url.PathEscape(service), &l); err != nil {
		return "", "", "", err
	}
	var roots struct {
		Roots []struct {
			RootCert          string
			IntermediateCerts []string
		}
	}
	if err := a.get(ctx, "/v1/agent/connect/ca/roots", &roots); err != nil {
		return "", "", "", err
	}
	for _, r := range roots.Roots {
		rootsPEM += r.RootCert + "\n"
		for _, ic := range r.IntermediateCerts {
			rootsPEM += ic + "\n"
		}
	}
	return l.CertPEM, l.PrivateKeyPEM, rootsPEM, nil
}
