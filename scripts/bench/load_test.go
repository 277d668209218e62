package main

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// serve runs handle for every connection on a loopback listener.
func serve(t *testing.T, handle func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() { handle(c) })
		}
	})
	return ln.Addr().String()
}

// faultyRelay forwards to target, passing at most limit bytes upstream
// (then closing everything) and flipping the first byte of every
// downstream chunk if flip is set.
func faultyRelay(t *testing.T, target string, limit int64, flip bool) string {
	return serve(t, func(in net.Conn) {
		defer in.Close()
		out, err := net.Dial("tcp", target)
		if err != nil {
			return
		}
		defer out.Close()
		go func() {
			buf := make([]byte, 4096)
			for {
				n, err := out.Read(buf)
				if n > 0 && flip {
					buf[0] ^= 0xff
				}
				if _, werr := in.Write(buf[:n]); werr != nil || err != nil {
					in.Close()
					return
				}
			}
		}()
		_, _ = io.Copy(out, io.LimitReader(in, limit))
	})
}

func TestLoadThroughBackend(t *testing.T) {
	ctx := context.Background()
	addr := serve(t, serveBackend)
	d := 200 * time.Millisecond

	if r := upload(ctx, addr, 3, d); r.errs.count() != 0 || r.bytes == 0 {
		t.Errorf("upload: %d bytes, errors %v", r.bytes, r.errs.notes)
	}
	if r := download(ctx, addr, d); r.errs.count() != 0 || r.bytes == 0 {
		t.Errorf("download: %d bytes, errors %v", r.bytes, r.errs.notes)
	}
	if r := requestResponse(ctx, addr, 2, d); r.errs.count() != 0 || r.ops == 0 || r.h.n != uint64(r.ops) {
		t.Errorf("rr: %d ops, %d samples, errors %v", r.ops, r.h.n, r.errs.notes)
	}
	if r := connRate(ctx, addr, 2, d); r.errs.count() != 0 || r.ops == 0 {
		t.Errorf("conn rate: %d ops, errors %v", r.ops, r.errs.notes)
	}
	conns, err := openIdle(ctx, addr, 50)
	if err != nil {
		t.Fatalf("openIdle: %v", err)
	}
	closeAll(conns)
}

func TestLoadDetectsFaults(t *testing.T) {
	ctx := context.Background()
	backend := serve(t, serveBackend)
	d := 200 * time.Millisecond

	cut := faultyRelay(t, backend, 1<<20, false)
	if r := upload(ctx, cut, 1, d); r.errs.count() == 0 {
		t.Errorf("upload through a relay that cuts after 1 MiB: no error (%d bytes acknowledged)", r.bytes)
	}
	flip := faultyRelay(t, backend, 1<<62, true)
	r := requestResponse(ctx, flip, 1, d)
	if r.errs.count() == 0 || !strings.Contains(r.errs.notes[0], "differs") {
		t.Errorf("rr through a corrupting relay: errors %v, want an echo mismatch", r.errs.notes)
	}
	if err := oneShot(ctx, flip, connReqSize); err == nil {
		t.Error("oneShot through a corrupting relay: no error")
	}
}

func TestRelayHalfClose(t *testing.T) {
	backend := serve(t, serveBackend)
	addr := serve(t, func(c net.Conn) { relay(c.(*net.TCPConn), backend, false) })
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("Ehello")); err != nil {
		t.Fatal(err)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	// The echo still arrives after our half-close, then EOF.
	got, err := io.ReadAll(c)
	if err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	if string(got) != "hello" {
		t.Errorf("echo after half-close = %q, want %q", got, "hello")
	}
}
