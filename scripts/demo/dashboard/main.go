// Command dashboard is the demo's client: every -interval it GETs its
// upstream (the local strait upstream listener for "counting") and prints
// one line per request:
//
//	dashboard: count=17
//	dashboard: connection refused/reset: <error>
//
// Keep-alives are disabled, so every request opens a new TCP connection
// through the sidecars; strait evaluates intentions per new connection, so a
// deny intention shows up on the next request.
//
// Without -wait-for/-expect it just prints (forever with -n 0). For the smoke
// test in scripts/demo.sh it can also check outcomes:
//
//	-wait-for ok|refused   first poll (printing each line) until one request
//	                       has that outcome; exit 2 after -wait-timeout
//	-n N -expect ok|refused then make N more requests; exit 1 if any of them
//	                       has another outcome
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"
)

type outcome string

const (
	ok      outcome = "ok"
	refused outcome = "refused"
	other   outcome = "other"
)

func main() {
	upstream := flag.String("upstream", "http://127.0.0.1:9001/", "URL of the counting service through the local sidecar upstream")
	interval := flag.Duration("interval", 500*time.Millisecond, "time between requests")
	n := flag.Int("n", 0, "requests to make (after -wait-for, if set); 0 means until killed")
	waitFor := flag.String("wait-for", "", "first poll until a request has this outcome: ok or refused")
	waitTimeout := flag.Duration("wait-timeout", 10*time.Second, "give up on -wait-for after this long")
	expect := flag.String("expect", "", "exit 1 if any of the -n requests has another outcome: ok or refused")
	timeout := flag.Duration("timeout", 3*time.Second, "per-request timeout")
	flag.Parse()
	for _, v := range []string{*waitFor, *expect} {
		if v != "" && v != string(ok) && v != string(refused) {
			fmt.Fprintf(os.Stderr, "dashboard: -wait-for/-expect must be %q or %q, not %q\n", ok, refused, v)
			os.Exit(64)
		}
	}

	client := &http.Client{
		Timeout:   *timeout,
		Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil},
	}

	if *waitFor != "" {
		deadline := time.Now().Add(*waitTimeout)
		for {
			if get(client, *upstream) == outcome(*waitFor) {
				break
			}
			if time.Now().After(deadline) {
				fmt.Printf("dashboard: no %s request within %s\n", *waitFor, *waitTimeout)
				os.Exit(2)
			}
			time.Sleep(*interval)
		}
	}

	failed := 0
	for i := 0; *n == 0 || i < *n; i++ {
		if i > 0 || *waitFor != "" {
			time.Sleep(*interval)
		}
		if got := get(client, *upstream); *expect != "" && got != outcome(*expect) {
			fmt.Printf("dashboard:   ^ expected %s\n", *expect)
			failed++
		}
	}
	if failed > 0 {
		os.Exit(1)
	}
}

// get makes one request, prints its line and classifies it.
func get(client *http.Client, url string) outcome {
	resp, err := client.Get(url)
	if err != nil {
		// Whatever the transport saw (refused, reset, EOF, timeout): the
		// mesh did not let the request through.
		fmt.Printf("dashboard: connection refused/reset: %v\n", err)
		return refused
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	if err != nil {
		fmt.Printf("dashboard: connection refused/reset: reading body: %v\n", err)
		return refused
	}
	var v struct {
		Count    *int64 `json:"count"`
		Hostname string `json:"hostname"`
	}
	if resp.StatusCode != http.StatusOK || json.Unmarshal(body, &v) != nil || v.Count == nil {
		fmt.Printf("dashboard: unexpected response: %s %q\n", resp.Status, body)
		return other
	}
	fmt.Printf("dashboard: count=%d\n", *v.Count)
	return ok
}
