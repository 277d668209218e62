package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// Load generators. They run as goroutines of the harness and talk to the
// backend (see backend.go for the protocol) through proxy A's listener.
const (
	bulkFrame   = 128 << 10        // payload bytes per sink frame / write
	rrSize      = 64               // request/response payload
	connReqSize = 32               // new-connection test payload
	idleReqSize = 16               // round trip on each idle connection
	dialTimeout = 5 * time.Second  // per dial, and per round trip outside timed loops
	ioSlack     = 30 * time.Second // how long past the end of a test a blocked read/write may take
	maxErrNotes = 3                // error messages kept per test
)

// errList counts errors and keeps the first few messages.
type errList struct {
	mu    sync.Mutex
	n     int64
	notes []string
}

func (e *errList) count() int64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.n
}

func (e *errList) add(err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.n++
	if len(e.notes) < maxErrNotes {
		e.notes = append(e.notes, err.Error())
	}
}

// bulkResult is a throughput test's outcome.
type bulkResult struct {
	bytes   int64 // acknowledged by the sink (upload) or received (download)
	elapsed time.Duration
	errs    errList
}

func (r *bulkResult) gbps() float64 {
	return float64(r.bytes) * 8 / r.elapsed.Seconds() / 1e9
}

// dial connects to addr; ctx cancellation (Ctrl-C) unblocks any I/O on the
// connection through the returned stop function.
func dial(ctx context.Context, addr string, deadline time.Time) (net.Conn, func(), error) {
	d := net.Dialer{Timeout: dialTimeout}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	if !deadline.IsZero() {
		_ = c.SetDeadline(deadline)
	}
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Now()) })
	return c, func() { stop(); c.Close() }, nil
}

// upload runs streams parallel connections to the discard sink for d and
// returns the bytes the sink acknowledged. Elapsed time runs until the last
// acknowledgement, so data still in flight at the deadline is counted with
// the time it took to arrive.
func upload(ctx context.Context, addr string, streams int, d time.Duration) *bulkResult {
	res := &bulkResult{}
	start := time.Now()
	deadline := start.Add(d)
	var wg sync.WaitGroup
	var mu sync.Mutex
	for range streams {
		wg.Go(func() {
			n, err := uploadStream(ctx, addr, deadline)
			if err != nil {
				res.errs.add(err)
			}
			mu.Lock()
			res.bytes += n
			mu.Unlock()
		})
	}
	wg.Wait()
	res.elapsed = time.Since(start)
	return res
}

func uploadStream(ctx context.Context, addr string, deadline time.Time) (int64, error) {
	c, done, err := dial(ctx, addr, deadline.Add(ioSlack))
	if err != nil {
		return 0, err
	}
	defer done()
	frame := make([]byte, frameHeader+bulkFrame)
	binary.BigEndian.PutUint32(frame, bulkFrame)
	fillPattern(frame[frameHeader:])
	if _, err := c.Write([]byte{modeSink}); err != nil {
		return 0, fmt.Errorf("upload: writing mode: %w", err)
	}
	var sent int64
	for time.Now().Before(deadline) && ctx.Err() == nil {
		if _, err := c.Write(frame); err != nil {
			return 0, fmt.Errorf("upload: write after %d bytes: %w", sent, err)
		}
		sent += bulkFrame
	}
	if _, err := c.Write(make([]byte, frameHeader)); err != nil {
		return 0, fmt.Errorf("upload: writing end marker after %d bytes: %w", sent, err)
	}
	var reply [8]byte
	if _, err := io.ReadFull(c, reply[:]); err != nil {
		return 0, fmt.Errorf("upload: reading the sink's count after sending %d bytes: %w", sent, err)
	}
	got := int64(binary.BigEndian.Uint64(reply[:]))
	if got != sent {
		return 0, fmt.Errorf("upload: sink counted %d bytes, %d were sent", got, sent)
	}
	return got, nil
}

// download reads the backend's endless stream on one connection for d.
func download(ctx context.Context, addr string, d time.Duration) *bulkResult {
	res := &bulkResult{}
	start := time.Now()
	deadline := start.Add(d)
	c, done, err := dial(ctx, addr, deadline.Add(ioSlack))
	if err != nil {
		res.errs.add(err)
		res.elapsed = time.Since(start)
		return res
	}
	defer done()
	if _, err := c.Write([]byte{modeSource}); err != nil {
		res.errs.add(fmt.Errorf("download: writing mode: %w", err))
	}
	buf := make([]byte, 2*bufSize)
	for res.errs.count() == 0 && time.Now().Before(deadline) && ctx.Err() == nil {
		n, err := c.Read(buf)
		res.bytes += int64(n)
		if err != nil {
			res.errs.add(fmt.Errorf("download: read after %d bytes: %w", res.bytes, err))
		}
	}
	res.elapsed = time.Since(start)
	return res
}

// latResult is a request/response or connection-rate test's outcome.
type latResult struct {
	ops     int64
	elapsed time.Duration
	h       hist
	errs    errList
}

func (r *latResult) rate() float64 { return float64(r.ops) / r.elapsed.Seconds() }

// requestResponse runs conns persistent connections, each sending a 64-byte
// request and waiting for its echo, back to back, for d.
func requestResponse(ctx context.Context, addr string, conns int, d time.Duration) *latResult {
	res := &latResult{}
	start := time.Now()
	deadline := start.Add(d)
	var wg sync.WaitGroup
	var mu sync.Mutex
	for range conns {
		wg.Go(func() {
			h := new(hist)
			n, err := rrConn(ctx, addr, deadline, 0, h)
			if err != nil {
				res.errs.add(err)
			}
			mu.Lock()
			res.ops += n
			res.h.merge(h)
			mu.Unlock()
		})
	}
	wg.Wait()
	res.elapsed = time.Since(start)
	return res
}

// rrConn does round trips on one connection until deadline or, if
// maxOps > 0, maxOps of them. Each request carries its sequence number, so
// a reordered or stale echo is caught as a mismatch.
func rrConn(ctx context.Context, addr string, deadline time.Time, maxOps int64, h *hist) (int64, error) {
	c, done, err := dial(ctx, addr, deadline.Add(ioSlack))
	if err != nil {
		return 0, err
	}
	defer done()
	req := make([]byte, 1+rrSize)
	req[0] = modeEcho
	fillPattern(req[1:])
	resp := make([]byte, rrSize)
	out := req // the first write carries the mode byte
	var ops int64
	for (maxOps == 0 || ops < maxOps) && time.Now().Before(deadline) && ctx.Err() == nil {
		binary.BigEndian.PutUint64(req[1:], uint64(ops))
		t0 := time.Now()
		if _, err := c.Write(out); err != nil {
			return ops, fmt.Errorf("rr: write of request %d: %w", ops, err)
		}
		if _, err := io.ReadFull(c, resp); err != nil {
			return ops, fmt.Errorf("rr: reading echo %d: %w", ops, err)
		}
		h.record(time.Since(t0))
		if !bytes.Equal(resp, req[1:]) {
			return ops, fmt.Errorf("rr: echo %d differs from the request", ops)
		}
		ops++
		out = req[1:]
	}
	return ops, nil
}

// connRate runs workers loops of dial, 32-byte request, echo, close for d.
// Latency is from the start of the dial to the echo.
func connRate(ctx context.Context, addr string, workers int, d time.Duration) *latResult {
	res := &latResult{}
	start := time.Now()
	deadline := start.Add(d)
	var wg sync.WaitGroup
	var mu sync.Mutex
	for range workers {
		wg.Go(func() {
			h := new(hist)
			var ok int64
			for time.Now().Before(deadline) && ctx.Err() == nil {
				t0 := time.Now()
				if err := oneShot(ctx, addr, connReqSize); err != nil {
					if ctx.Err() == nil {
						res.errs.add(err)
					}
					continue
				}
				h.record(time.Since(t0))
				ok++
			}
			mu.Lock()
			res.ops += ok
			res.h.merge(h)
			mu.Unlock()
		})
	}
	wg.Wait()
	res.elapsed = time.Since(start)
	return res
}

// oneShot opens a connection, does one echo round trip of size bytes and
// closes it.
func oneShot(ctx context.Context, addr string, size int) error {
	c, done, err := dial(ctx, addr, time.Now().Add(dialTimeout+ioSlack))
	if err != nil {
		return err
	}
	defer done()
	return echoOnce(c, size)
}

// echoOnce writes the echo mode byte and size bytes and checks the echo.
func echoOnce(c net.Conn, size int) error {
	msg := make([]byte, 1+size)
	msg[0] = modeEcho
	fillPattern(msg[1:])
	if _, err := c.Write(msg); err != nil {
		return fmt.Errorf("echo: write: %w", err)
	}
	resp := make([]byte, size)
	if _, err := io.ReadFull(c, resp); err != nil {
		return fmt.Errorf("echo: read: %w", err)
	}
	if !bytes.Equal(resp, msg[1:]) {
		return fmt.Errorf("echo: reply differs from the request")
	}
	return nil
}

// openIdle opens n connections through addr, 16 at a time, and does one
// round trip on each so it is established end to end (client -> A -> B ->
// backend). The caller closes them with closeAll.
func openIdle(ctx context.Context, addr string, n int) ([]net.Conn, error) {
	conns := make([]net.Conn, n)
	idx := make(chan int)
	errs := &errList{}
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			for i := range idx {
				d := net.Dialer{Timeout: dialTimeout}
				c, err := d.DialContext(ctx, "tcp", addr)
				if err != nil {
					errs.add(fmt.Errorf("idle conn %d: dial: %w", i, err))
					continue
				}
				_ = c.SetDeadline(time.Now().Add(dialTimeout + ioSlack))
				if err := echoOnce(c, idleReqSize); err != nil {
					c.Close()
					errs.add(fmt.Errorf("idle conn %d: %w", i, err))
					continue
				}
				_ = c.SetDeadline(time.Time{})
				conns[i] = c
			}
		})
	}
	for i := range n {
		if ctx.Err() != nil || errs.count() > 0 {
			break
		}
		idx <- i
	}
	close(idx)
	wg.Wait()
	if errs.count() > 0 {
		closeAll(conns)
		return nil, fmt.Errorf("%d of %d idle connections failed, first: %s", errs.n, n, errs.notes[0])
	}
	if err := ctx.Err(); err != nil {
		closeAll(conns)
		return nil, err
	}
	return conns, nil
}

func closeAll(conns []net.Conn) {
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
}
