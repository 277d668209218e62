package proxy

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Each direction waits for data with a small buffer and borrows a large one
// only while data keeps coming in full reads, so an idle connection holds
// 2 KiB per direction instead of a bulk-sized buffer. bigSize is two TLS
// records of plaintext (a tls.Conn read returns at most one record).
const (
	smallSize = 2 << 10
	bigSize   = 32 << 10
)

var (
	smallPool = sync.Pool{New: func() any { b := make([]byte, smallSize); return &b }}
	bigPool   = sync.Pool{New: func() any { b := make([]byte, bigSize); return &b }}
)

// DefaultHalfCloseTimeout is how long a connection may stay idle after one
// direction has finished before it is reaped.
const DefaultHalfCloseTimeout = 5 * time.Minute

// Result is what one proxied connection moved.
type Result struct {
	// AToB and BToA count bytes written to b and to a.
	AToB, BToA int64
	// Err is the first error that ended a direction abnormally (nil when
	// both sides finished with EOF). It names the direction.
	Err error
}

// Pipe copies a->b and b->a until both directions are done and then closes
// both connections. EOF on one side becomes a half-close (CloseWrite, which
// for TLS sends close_notify) on the other, and the opposite direction keeps
// running: a client that shuts its write side still receives the whole
// reply. Once one direction has finished, the other is reaped if it stays
// idle for halfCloseIdle (<= 0 means DefaultHalfCloseTimeout). An error in
// either direction closes both connections at once, so the peer sees a reset
// as it would without a proxy.
//
// Pipe blocks; see Start for the form the listeners use.
func Pipe(a, b net.Conn, halfCloseIdle time.Duration) Result {
	ch := make(chan Result, 1)
	Start(a, b, halfCloseIdle, func(r Result) { ch <- r })
	return <-ch
}

// Start is Pipe without blocking: it runs each direction on a goroutine of
// its own and calls done from whichever finishes last, after both
// connections are closed. A connection therefore costs exactly two
// goroutines, both started fresh with small stacks: the goroutine that ran
// the TLS handshake (whose stack grew deep in crypto code) can exit instead
// of idling for the connection's lifetime.
func Start(a, b net.Conn, halfCloseIdle time.Duration, done func(Result)) {
	StartCounted(a, b, halfCloseIdle, nil, done)
}

// Counters are the live byte counts of one connection, for a reader that
// wants them before it ends (the proxy's shared metrics flush). Each
// direction adds to its own counter after every write: one uncontended
// atomic per write of up to 32 KiB, no lock. On the splice path (plain
// TCP or unix to TCP, no TLS) the kernel moves the bytes and the count is
// only known, and added, when the direction ends.
type Counters struct {
	AToB atomic.Int64
	_    [56]byte // keep the two directions' counters on separate cache lines
	BToA atomic.Int64
}

// StartCounted is Start with live counters: ctr (nil means none kept by the
// caller) is updated while the connection runs, and done's Result carries
// the final counts.
func StartCounted(a, b net.Conn, halfCloseIdle time.Duration, ctr *Counters, done func(Result)) {
	if halfCloseIdle <= 0 {
		halfCloseIdle = DefaultHalfCloseTimeout
	}
	p := &pipe{a: a, b: b, idle: halfCloseIdle, oneDone: make(chan struct{}), done: done, ctr: ctr}
	if p.ctr == nil {
		p.ctr = &p.own
	}
	p.left.Store(2)
	go p.run(b, a, &p.ctr.AToB, "downstream->upstream")
	go p.run(a, b, &p.ctr.BToA, "upstream->downstream")
}

type pipe struct {
	a, b    net.Conn
	idle    time.Duration
	oneDone chan struct{}
	once    sync.Once
	errOnce sync.Once
	left    atomic.Int32
	res     Result
	done    func(Result)
	ctr     *Counters
	own     Counters
}

// run copies src to dst; the direction that finishes second closes both
// connections and reports.
func (p *pipe) run(dst, src net.Conn, count *atomic.Int64, dir string) {
	err := copyHalf(dst, src, p.oneDone, p.idle, count)
	if err != nil {
		p.errOnce.Do(func() { p.res.Err = dirErr(dir, err) })
		// Unblock the other direction now rather than at its next deadline.
		p.a.Close()
		p.b.Close()
	}
	// When the first direction ends, the other one's reads get an idle
	// deadline: set once here (that is all the splice path gets) and
	// refreshed per read by the buffered path. The other direction reads
	// from dst.
	p.once.Do(func() {
		close(p.oneDone)
		dst.SetReadDeadline(time.Now().Add(p.idle))
	})
	if p.left.Add(-1) == 0 {
		p.a.Close()
		p.b.Close()
		p.res.AToB, p.res.BToA = p.ctr.AToB.Load(), p.ctr.BToA.Load()
		p.done(p.res)
	}
}

type dirError struct {
	dir string
	err error
}

func (e *dirError) Error() string { return e.dir + ": " + e.err.Error() }
func (e *dirError) Unwrap() error { return e.err }

func dirErr(dir string, err error) error { return &dirError{dir, err} }

// copyHalf copies src to dst, adding what it writes to count. On EOF it
// half-closes dst. Once otherDone is closed, every read gets an idle
// deadline.
func copyHalf(dst, src net.Conn, otherDone <-chan struct{}, idle time.Duration, count *atomic.Int64) error {
	var err error
	if spliceable(dst, src) {
		var n int64
		n, err = dst.(*net.TCPConn).ReadFrom(src)
		count.Add(n)
	} else {
		err = copyBuffered(dst, src, otherDone, idle, count)
	}
	if err != nil {
		return err
	}
	if err := closeWrite(dst); err != nil && !isClosed(err) {
		return err
	}
	closeRead(src)
	return nil
}

func copyBuffered(dst, src net.Conn, otherDone <-chan struct{}, idle time.Duration, count *atomic.Int64) error {
	small := smallPool.Get().(*[]byte)
	defer smallPool.Put(small)
	var big *[]byte
	defer func() {
		if big != nil {
			bigPool.Put(big)
		}
	}()
	halfOpen := false
	for {
		if !halfOpen {
			select {
			case <-otherDone:
				halfOpen = true
			default:
			}
		}
		if halfOpen {
			src.SetReadDeadline(time.Now().Add(idle))
		}
		buf := *small
		if big != nil {
			buf = *big
		}
		nr, rerr := src.Read(buf)
		if nr > 0 {
			nw, werr := dst.Write(buf[:nr])
			count.Add(int64(nw))
			if werr != nil {
				return werr
			}
		}
		switch {
		case big == nil && nr == smallSize:
			big = bigPool.Get().(*[]byte) // a burst: read the rest in bulk
		case big != nil && nr < smallSize:
			bigPool.Put(big) // the burst is over; wait on the small buffer
			big = nil
		}
		if rerr != nil {
			if rerr == io.EOF {
				return nil
			}
			return rerr
		}
	}
}

// spliceable reports whether the kernel can move bytes from src to dst
// without copying them through user space (TCP or unix to TCP: splice(2)).
func spliceable(dst, src net.Conn) bool {
	if _, ok := dst.(*net.TCPConn); !ok {
		return false
	}
	switch src.(type) {
	case *net.TCPConn, *net.UnixConn:
		return true
	}
	return false
}

type closeWriter interface{ CloseWrite() error }
type closeReader interface{ CloseRead() error }

var (
	_ closeWriter = (*net.TCPConn)(nil)
	_ closeWriter = (*net.UnixConn)(nil)
)

func closeWrite(c net.Conn) error {
	if cw, ok := c.(closeWriter); ok {
		return cw.CloseWrite()
	}
	return c.Close()
}

// closeRead shuts the read side of plain sockets. For TLS it does nothing:
// closing the read side of a tls.Conn closes the whole connection, which
// would kill the opposite, still live direction.
func closeRead(c net.Conn) {
	if cr, ok := c.(closeReader); ok {
		cr.CloseRead()
	}
}

// isClosed reports errors that mean "the peer or we already closed": routine
// at the end of a connection, not worth a warning.
func isClosed(err error) bool {
	return errors.Is(err, net.ErrClosed) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.EOF) ||
		errors.Is(err, os.ErrDeadlineExceeded)
}
