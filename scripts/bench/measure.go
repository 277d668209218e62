package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// Phases, in run order; each is timed for proxy CPU. The idle-connections
// phase is last, so it runs on a pair that has already carried bulk,
// request/response and thousands of short connections: a connection slot
// or memory leak in those would not show on a fresh pair.
const (
	phaseBulk1 = "bulk1"
	phaseBulk8 = "bulk8"
	phaseDown1 = "down1"
	phaseRR1   = "rr1"
	phaseRR32  = "rr32"
	phaseConn  = "conn"
	phaseIdle  = "idle"

	connWorkers      = 8
	connErrTolerance = 0.001 // failed fraction of the connection-rate test
	settle           = 500 * time.Millisecond
)

var phases = []string{phaseBulk1, phaseBulk8, phaseDown1, phaseRR1, phaseRR32, phaseConn, phaseIdle}

// measureAll warms a running pair up and runs every measurement through
// it, filling res. A failed measurement is recorded and the others still
// run, unless a proxy died.
func measureAll(ctx context.Context, e *env, o *options, pr *pair, res *result) {
	pids := pr.pids()
	logf("%s: proxies A pid %d, B pid %d; entry %s; warming up", res.label, pids[0], pids[1], pr.entry)
	if err := warmup(ctx, pr.entry, o.warmup); err != nil {
		res.fail("warmup: %v", err)
		return
	}
	if rss, err := sumRSSKiB(pids); err == nil {
		res.set("rss_base", float64(rss)/1024)
	}

	// cpu runs fn and records the CPU seconds the proxies (and, for
	// context, the agent) used meanwhile.
	cpu := func(phase string, fn func() error) (float64, error) {
		stopProf := profile(ctx, e, pr, res.name, phase, o.duration)
		defer stopProf()
		before, err1 := sumCPUTicks(pids)
		agentBefore, err2 := cpuTicks(e.agent.proc.pid())
		ferr := fn()
		after, err3 := sumCPUTicks(pids)
		agentAfter, err4 := cpuTicks(e.agent.proc.pid())
		for _, err := range []error{err1, err2, err3, err4} {
			if err != nil {
				return 0, fmt.Errorf("%s: %w", phase, err)
			}
		}
		sec := float64(after-before) / float64(e.tck)
		res.set("cpu_"+phase, sec)
		res.set("agentcpu_"+phase, float64(agentAfter-agentBefore)/float64(e.tck))
		return sec, ferr
	}

	steps := []struct {
		phase string
		run   func() error
	}{
		{phaseBulk1, func() error {
			r := upload(ctx, pr.entry, 1, o.duration)
			res.set("bulk1", r.gbps())
			res.set("bulk1_gb", float64(r.bytes)/1e9)
			return r.errs.err("bulk 1 stream")
		}},
		{phaseBulk8, func() error {
			r := upload(ctx, pr.entry, 8, o.duration)
			res.set("bulk8", r.gbps())
			return r.errs.err("bulk 8 streams")
		}},
		{phaseDown1, func() error {
			r := download(ctx, pr.entry, o.duration)
			res.set("down1", r.gbps())
			return r.errs.err("download 1 stream")
		}},
		{phaseRR1, func() error { return rrStats(res, "rr1", requestResponse(ctx, pr.entry, 1, o.duration)) }},
		{phaseRR32, func() error { return rrStats(res, "rr32", requestResponse(ctx, pr.entry, 32, o.duration)) }},
		{phaseConn, func() error {
			r := connRate(ctx, pr.entry, connWorkers, o.duration)
			res.set("conn", r.rate())
			res.set("conn_ops", float64(r.ops))
			res.set("conn_p50", us(r.h.quantile(0.50)))
			res.set("conn_p99", us(r.h.quantile(0.99)))
			n := r.errs.count()
			res.set("conn_err", float64(n))
			total := r.ops + n
			if frac := float64(n) / float64(max(total, 1)); n > 0 {
				res.note("%d of %d connections failed (%.3f%%), first: %s", n, total, 100*frac, r.errs.notes[0])
				if frac > connErrTolerance {
					return fmt.Errorf("connection rate: %d of %d connections failed (over %.1f%%)", n, total, 100*connErrTolerance)
				}
			}
			if r.ops == 0 {
				return fmt.Errorf("connection rate: no connection succeeded")
			}
			return nil
		}},
		{phaseIdle, func() error { return measureIdle(ctx, pr, o.idleConns, res) }},
	}
	for _, s := range steps {
		if ctx.Err() != nil {
			return
		}
		sec, err := cpu(s.phase, s.run)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			res.fail("%v", err)
		}
		if s.phase == phaseBulk1 {
			if gb := res.m["bulk1_gb"]; gb > 0 {
				res.set("cpu_per_gb", sec/gb)
			}
		}
		logf("%s: %-5s %s (proxy CPU %.2fs)", res.label, s.phase, res.summary(s.phase), sec)
		for _, p := range []*proc{pr.a, pr.b} {
			if !p.alive() {
				res.fail("%v", p.exitedErr())
				return
			}
		}
		_ = sleepCtx(ctx, settle)
	}
}

// warmup waits until a round trip goes through (discovery and certificates
// may still be settling), then does n round trips on one connection and a
// few new connections.
func warmup(ctx context.Context, addr string, n int) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := oneShot(ctx, addr, connReqSize)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no round trip through the pair after 30s: %w", err)
		}
		if err := sleepCtx(ctx, 200*time.Millisecond); err != nil {
			return err
		}
	}
	if _, err := rrConn(ctx, addr, time.Now().Add(time.Minute), int64(n), new(hist)); err != nil {
		return err
	}
	for range 20 {
		if err := oneShot(ctx, addr, connReqSize); err != nil {
			return err
		}
	}
	return nil
}

// measureIdle opens n connections, reads both proxies' VmRSS before and
// after (after a short settle), and closes them.
func measureIdle(ctx context.Context, pr *pair, n int, res *result) error {
	pids := pr.pids()
	before, err := sumRSSKiB(pids)
	if err != nil {
		return err
	}
	conns, err := openIdle(ctx, pr.entry, n)
	if err != nil {
		return fmt.Errorf("idle connections: %w", err)
	}
	defer closeAll(conns)
	_ = sleepCtx(ctx, time.Second)
	after, err := sumRSSKiB(pids)
	if err != nil {
		return err
	}
	res.set("rss_conn", float64(after-before)/float64(n))
	return nil
}

func rrStats(res *result, key string, r *latResult) error {
	res.set(key, r.rate())
	res.set(key+"_ops", float64(r.ops))
	res.set(key+"_p50", us(r.h.quantile(0.50)))
	res.set(key+"_p99", us(r.h.quantile(0.99)))
	res.set(key+"_p999", us(r.h.quantile(0.999)))
	if r.ops == 0 && r.errs.count() == 0 {
		return fmt.Errorf("%s: no round trip completed", key)
	}
	return r.errs.err(key)
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// err summarises the list as one error (nil if empty).
func (e *errList) err(test string) error {
	n := e.count()
	if n == 0 {
		return nil
	}
	return fmt.Errorf("%s: %d transfer error(s), first: %s", test, n, e.notes[0])
}

// profile fetches CPU profiles of both proxies for the phases worth one
// (bulk 1, bulk 8, new conns) while the phase runs, when -profile is set
// and the pair serves pprof; the returned func waits for them.
func profile(ctx context.Context, e *env, pr *pair, name, phase string, d time.Duration) (wait func()) {
	if e.profile == "" || pr.pprofA == "" || (phase != phaseBulk1 && phase != phaseBulk8 && phase != phaseRR32 && phase != phaseConn) {
		return func() {}
	}
	var wg sync.WaitGroup
	for side, addr := range map[string]string{"A": pr.pprofA, "B": pr.pprofB} {
		wg.Go(func() {
			sec := max(1, int(d/time.Second)-1)
			url := fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", addr, sec)
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
			if err != nil {
				return
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				logf("%s: profile %s: %v", name, side, err)
				return
			}
			defer resp.Body.Close()
			path := filepath.Join(e.profile, fmt.Sprintf("%s-%s-%s.pprof", name, side, phase))
			f, err := os.Create(path)
			if err != nil {
				logf("%s: profile: %v", name, err)
				return
			}
			defer f.Close()
			io.Copy(f, resp.Body)
		})
	}
	return wg.Wait
}
