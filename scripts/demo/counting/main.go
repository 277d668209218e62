// Command counting is the demo's backend service: an HTTP server on a
// loopback port whose GET / answers {"count":N,"hostname":"..."} with N
// incremented on every request. It is only reachable from other services
// through the strait sidecars (scripts/demo.sh).
package main

import (
	"encoding/json"
	"flag"
	"log"
	"net/http"
	"os"
	"sync/atomic"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:9003", "address to serve HTTP on")
	flag.Parse()
	log.SetPrefix("counting: ")

	host, err := os.Hostname()
	if err != nil {
		host = "unknown"
	}
	var count atomic.Int64
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		n := count.Add(1)
		log.Printf("request %d from %s", n, r.RemoteAddr)
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(struct {
			Count    int64  `json:"count"`
			Hostname string `json:"hostname"`
		}{n, host})
	})
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusOK)
	})
	log.Printf("listening on %s", *listen)
	log.Fatal(http.ListenAndServe(*listen, mux))
}
