package proxy

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/straitproxy/strait/internal/testutil"
)

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t testing.TB) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ch := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			ch <- nil
			return
		}
		ch <- c
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server = <-ch
	if server == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// wrapped hides the concrete type so that Pipe takes its buffered path, the
// one used whenever TLS is on either side.
type wrapped struct{ net.Conn }

func (w wrapped) CloseWrite() error { return w.Conn.(*net.TCPConn).CloseWrite() }

// TestPipeHalfClose: the client sends a request, shuts its write side, and
// must still receive the whole reply, which the app only sends after EOF.
func TestPipeHalfClose(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		wrap func(net.Conn) net.Conn
	}{
		{"splice", func(c net.Conn) net.Conn { return c }},
		{"buffered", func(c net.Conn) net.Conn { return wrapped{c} }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			client, proxyDown := tcpPair(t)
			proxyUp, app := tcpPair(t)
			res := make(chan Result, 1)
			go func() { res <- Pipe(tc.wrap(proxyDown), tc.wrap(proxyUp), time.Minute) }()

			req := make([]byte, 1<<20)
			rand.Read(req)
			appGot := make(chan []byte, 1)
			go func() {
				b, _ := io.ReadAll(app) // until the client's half-close arrives as EOF
				sum := sha256.Sum256(b)
				reply := bytes.Repeat(sum[:], 4096) // 128 KiB, sent after EOF
				app.Write(reply)
				app.Close()
				appGot <- b
			}()
			if _, err := client.Write(req); err != nil {
				t.Fatal(err)
			}
			if err := client.(*net.TCPConn).CloseWrite(); err != nil {
				t.Fatal(err)
			}
			reply, err := io.ReadAll(client)
			if err != nil {
				t.Fatalf("reading reply after half-close: %v", err)
			}
			if got := <-appGot; !bytes.Equal(got, req) {
				t.Fatalf("app got %d bytes, want %d identical bytes", len(got), len(req))
			}
			sum := sha256.Sum256(req)
			if want := bytes.Repeat(sum[:], 4096); !bytes.Equal(reply, want) {
				t.Fatalf("client got %d reply bytes, want %d", len(reply), len(want))
			}
			r := <-res
			if r.Err != nil {
				t.Fatalf("Pipe error: %v", r.Err)
			}
			if r.AToB != int64(len(req)) || r.BToA != 32*4096 {
				t.Fatalf("counts a->b %d b->a %d, want %d and %d", r.AToB, r.BToA, len(req), 32*4096)
			}
		})
	}
}

// TestPipeResetPropagates: an abortive close on one side closes the other at
// once instead of leaving it half open.
func TestPipeResetPropagates(t *testing.T) {
	t.Parallel()
	client, proxyDown := tcpPair(t)
	proxyUp, app := tcpPair(t)
	res := make(chan Result, 1)
	go func() { res <- Pipe(wrapped{proxyDown}, wrapped{proxyUp}, time.Minute) }()
	client.Write([]byte("x"))
	buf := make([]byte, 1)
	if _, err := io.ReadFull(app, buf); err != nil {
		t.Fatal(err)
	}
	client.(*net.TCPConn).SetLinger(0)
	client.Close() // RST
	app.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := app.Read(buf)
	if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("app side still open after the client reset: %v", err)
	}
	select {
	case r := <-res:
		if r.Err == nil {
			t.Fatal("Pipe reported no error for a reset")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Pipe did not return after a reset")
	}
}

// TestPipeHalfCloseIdleReaped: once one direction is done, an idle other
// direction is reaped after the half-close timeout.
func TestPipeHalfCloseIdleReaped(t *testing.T) {
	t.Parallel()
	client, proxyDown := tcpPair(t)
	proxyUp, _ := tcpPair(t)
	res := make(chan Result, 1)
	go func() { res <- Pipe(wrapped{proxyDown}, wrapped{proxyUp}, 200*time.Millisecond) }()
	client.(*net.TCPConn).CloseWrite() // the app never answers nor closes
	select {
	case <-res:
	case <-time.After(10 * time.Second):
		t.Fatal("half-closed idle connection was not reaped")
	}
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := client.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("client still open after reaping: %v", err)
	}
}

// TestPipeGoroutines: a proxied connection costs two goroutines (Start),
// and nothing is left behind. It counts the goroutines running the copy
// loop rather than all of them: tcpPair's accept goroutines, and those of
// earlier tests still on their way out, come and go on their own schedule
// and made a whole-process count flaky by one.
func TestPipeGoroutines(t *testing.T) {
	// Not parallel: parallel tests of this package run copy loops too.
	base := pipeGoroutines()
	const n = 50
	var clients []net.Conn
	done := make(chan Result, n)
	for range n {
		c, d := tcpPair(t)
		u, a := tcpPair(t)
		clients = append(clients, c, a)
		Start(wrapped{d}, wrapped{u}, time.Minute, func(r Result) { done <- r })
	}
	// One goroutine per direction.
	deadline := time.Now().Add(5 * time.Second)
	for pipeGoroutines() < base+2*n && time.Now().Before(deadline) {
		runtime.Gosched()
	}
	if got := pipeGoroutines() - base; got != 2*n {
		t.Fatalf("%d copy goroutines for %d connections, want %d", got, n, 2*n)
	}
	for _, c := range clients {
		c.Close()
	}
	for range n {
		<-done
	}
	for time.Now().Before(deadline.Add(5*time.Second)) && pipeGoroutines() > base {
		runtime.Gosched()
	}
	if g := pipeGoroutines(); g > base {
		t.Fatalf("%d copy goroutines left behind", g-base)
	}
}

// pipeGoroutines counts the goroutines started by Start.
func pipeGoroutines() int {
	count := 0
	for _, g := range testutil.Goroutines() {
		if strings.Contains(g, "proxy.(*pipe).run(") {
			count++
		}
	}
	return count
}

func BenchmarkPipeBuffered(b *testing.B) {
	benchPipe(b, func(c net.Conn) net.Conn { return wrapped{c} })
}
func BenchmarkPipeSplice(b *testing.B) { benchPipe(b, func(c net.Conn) net.Conn { return c }) }

func benchPipe(b *testing.B, wrap func(net.Conn) net.Conn) {
	client, d := tcpPair(b)
	u, app := tcpPair(b)
	go Pipe(wrap(d), wrap(u), time.Minute)
	go io.Copy(io.Discard, app)
	buf := make([]byte, 64<<10)
	b.SetBytes(int64(len(buf)))
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if _, err := client.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
}

// TestIdleReaderSocket: a socket source is read through its raw descriptor:
// data arrives intact, the burst buffer goes back to the pool after a
// short read and is kept after a full one, the read deadline is honoured
// and EOF is io.EOF.
func TestIdleReaderSocket(t *testing.T) {
	t.Parallel()
	a, b := tcpPair(t)
	r := newIdleReader(b, a)
	defer r.release()
	if r.raw == nil {
		t.Fatal("TCP source not read through the raw descriptor")
	}
	go a.Write([]byte("hello"))
	buf, n, err := r.read()
	if err != nil || string(buf[:n]) != "hello" {
		t.Fatalf("read %q, %v", buf[:n], err)
	}
	r.done(n)
	if r.big != nil {
		t.Fatal("buffer kept after a short read")
	}
	full := make([]byte, bigSize)
	go a.Write(full)
	got := 0
	for got < bigSize {
		_, n, err := r.read()
		if err != nil {
			t.Fatal(err)
		}
		got += n
		r.done(n)
		if n == bigSize && r.big == nil {
			t.Fatal("buffer given back after a full read")
		}
	}
	b.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	if _, _, err := r.read(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("deadline: %v", err)
	}
	b.SetReadDeadline(time.Time{})
	a.(*net.TCPConn).CloseWrite()
	for {
		_, n, err := r.read()
		r.done(n)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("want EOF, got %v", err)
		}
	}
}

// waitConn is a net.Conn with WaitRead, as tunnel streams have.
type waitConn struct {
	net.Conn
	waits int
}

func (w *waitConn) WaitRead() error {
	w.waits++
	_, err := w.Conn.Read(nil)
	return err
}

// TestIdleReaderWaiter: a source that can wait without a buffer is waited
// on, and data going into a tunnel stream is read in stream-sized bursts.
func TestIdleReaderWaiter(t *testing.T) {
	t.Parallel()
	a, b := tcpPair(t)
	src := &waitConn{Conn: b}
	r := newIdleReader(src, &waitConn{Conn: a})
	defer r.release()
	if r.waiter == nil || r.pool != &streamBigPool {
		t.Fatalf("waiter %v, stream pool %v", r.waiter != nil, r.pool == &streamBigPool)
	}
	go a.Write([]byte("x"))
	buf, n, err := r.read()
	if err != nil || string(buf[:n]) != "x" || src.waits != 1 || len(buf) != streamBigSize {
		t.Fatalf("read %q, %v, waits %d, buffer %d", buf[:n], err, src.waits, len(buf))
	}
	r.done(n)
}

// TestPipeResetIsReset: a reset on one side is a reset (not EOF) on the
// other, on the splice path and on the buffered one.
func TestPipeResetIsReset(t *testing.T) {
	t.Parallel()
	for _, wrap := range []func(net.Conn) net.Conn{
		func(c net.Conn) net.Conn { return c },
		func(c net.Conn) net.Conn { return netConnOf{wrapped{c}} },
	} {
		client, proxyDown := tcpPair(t)
		proxyUp, app := tcpPair(t)
		go Pipe(wrap(proxyDown), wrap(proxyUp), time.Minute)
		client.Write([]byte("x"))
		buf := make([]byte, 1)
		if _, err := io.ReadFull(app, buf); err != nil {
			t.Fatal(err)
		}
		client.(*net.TCPConn).SetLinger(0)
		client.Close()
		app.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := app.Read(buf); !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("app read after the client reset: %v, want ECONNRESET", err)
		}
	}
}

// netConnOf exposes the socket under a wrapper, as tls.Conn does.
type netConnOf struct{ wrapped }

func (n netConnOf) NetConn() net.Conn { return n.wrapped.Conn }

// TestIdleReaderSocketReadDoesNotAllocate: reading the app socket through
// the raw descriptor costs no allocation per read.
func TestIdleReaderSocketReadDoesNotAllocate(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates; make test runs Alloc tests without it")
	}
	a, b := tcpPair(t)
	r := newIdleReader(b, a)
	defer r.release()
	msg := []byte("hello")
	allocs := testing.AllocsPerRun(200, func() {
		a.Write(msg)
		_, n, err := r.read()
		if err != nil || n == 0 {
			t.Fatal(n, err)
		}
		r.done(n)
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per read", allocs)
	}
}
