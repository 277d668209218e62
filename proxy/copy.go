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

// An idle direction holds no buffer (sockets, tunnel streams) or a small
// one (TLS); a large one is borrowed only while data keeps coming in full
// reads (see idleReader). bigSize is two TLS records of plaintext (a
// tls.Conn read returns at most one record) less a tunnel frame header (12
// bytes), so that a full read leaves as exactly two records both on a
// classic TLS connection and in a tunnel frame (see tunnel's coalescer);
// with 32 KiB, each tunnel frame needed a third, 12-byte record and a
// third write system call.
const (
	smallSize = 2 << 10
	bigSize   = 2*16384 - 12
)

// streamBigSize is the burst buffer for data going into a tunnel stream:
// eight TLS records less a frame header, so each frame is eight full
// records. Larger frames mean fewer hand-offs between the copy loop and the
// tunnel's send and receive loops per byte, which is what a tunnel costs
// over a plain TLS connection.
const streamBigSize = 8*16384 - 12

var (
	smallPool     = sync.Pool{New: func() any { b := make([]byte, smallSize); return &b }}
	bigPool       = sync.Pool{New: func() any { b := make([]byte, bigSize); return &b }}
	streamBigPool = sync.Pool{New: func() any { b := make([]byte, streamBigSize); return &b }}
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
		// Unblock the other direction now rather than at its next deadline,
		// and make the close a reset (RST, not FIN), so that neither peer
		// takes an aborted connection for a finished one.
		abortive(p.a)
		abortive(p.b)
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

// abortive makes Close on c send a TCP reset: SO_LINGER 0 on the socket
// (under TLS too). Tunnel streams cannot be reset (yamux has no public
// RST); their peer reads EOF.
func abortive(c net.Conn) {
	for {
		nc, ok := c.(interface{ NetConn() net.Conn })
		if !ok {
			break
		}
		c = nc.NetConn()
	}
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
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
	rd := newIdleReader(src, dst)
	defer rd.release()
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
		buf, nr, rerr := rd.read()
		if nr > 0 {
			nw, werr := dst.Write(buf[:nr])
			count.Add(int64(nw))
			if werr != nil {
				return werr
			}
		}
		rd.done(nr)
		if rerr != nil {
			if rerr == io.EOF {
				return nil
			}
			return rerr
		}
	}
}

// readWaiter is a connection that can wait for data without a buffer
// (tunnel streams).
type readWaiter interface {
	// WaitRead blocks until a Read would return data, EOF or an error.
	WaitRead() error
}

// idleReader reads one direction's source so that an idle connection
// holds no buffer, or only a small one:
//   - sockets (the app side, TCP or unix) are read with the raw
//     descriptor: a pooled big buffer is taken for the read attempt and
//     given back at once when the socket has nothing (EAGAIN); the
//     runtime then waits for readability with no buffer held;
//   - tunnel streams wait with WaitRead, then read into a pooled buffer;
//   - anything else (TLS) waits on a small pooled buffer and borrows a
//     big one only while reads come back full.
//
// In a burst (a read filled the big buffer) the big buffer is kept for the
// next read.
type idleReader struct {
	src    net.Conn
	raw    syscall.RawConn
	waiter readWaiter
	small  *[]byte
	big    *[]byte
	cur    *[]byte    // the buffer of the last read
	pool   *sync.Pool // of big buffers

	// The raw read callback and its results, kept here so that a read
	// allocates nothing (a closure would escape to the heap per read).
	rawFn   func(fd uintptr) bool
	rawN    int
	rawErrn error
}

func newIdleReader(src, dst net.Conn) *idleReader {
	r := &idleReader{src: src, pool: &bigPool}
	if _, ok := dst.(readWaiter); ok {
		r.pool = &streamBigPool
	}
	if w, ok := src.(readWaiter); ok {
		r.waiter = w
		return r
	}
	switch c := src.(type) {
	case *net.TCPConn, *net.UnixConn:
		if raw, err := c.(syscall.Conn).SyscallConn(); err == nil {
			r.raw = raw
			r.rawFn = r.rawAttempt
			return r
		}
	}
	r.small = smallPool.Get().(*[]byte)
	return r
}

// read returns the buffer read into and what the read returned.
func (r *idleReader) read() ([]byte, int, error) {
	switch {
	case r.big != nil:
		r.cur = r.big
		n, err := r.src.Read(*r.big)
		return *r.big, n, err
	case r.raw != nil:
		return r.readRaw()
	case r.waiter != nil:
		if err := r.waiter.WaitRead(); err != nil {
			return nil, 0, err
		}
		r.big = r.pool.Get().(*[]byte)
		r.cur = r.big
		n, err := r.src.Read(*r.big)
		return *r.big, n, err
	default:
		r.cur = r.small
		n, err := r.src.Read(*r.small)
		return *r.small, n, err
	}
}

// readRaw reads the socket into a big buffer held only while data is
// there. The runtime calls rawAttempt again once the socket is readable
// when it returns false, and honours the read deadline meanwhile.
func (r *idleReader) readRaw() ([]byte, int, error) {
	if err := r.raw.Read(r.rawFn); err != nil { // the deadline, or the connection was closed
		return nil, 0, err
	}
	r.cur = r.big
	switch {
	case r.rawErrn != nil:
		return *r.big, 0, os.NewSyscallError("read", r.rawErrn)
	case r.rawN == 0:
		return *r.big, 0, io.EOF
	}
	return *r.big, r.rawN, nil
}

// rawAttempt is one non-blocking read; false means "nothing yet, wait".
func (r *idleReader) rawAttempt(fd uintptr) bool {
	if r.big == nil {
		r.big = r.pool.Get().(*[]byte)
	}
	var err error
	for {
		r.rawN, err = syscall.Read(int(fd), *r.big)
		if err != syscall.EINTR {
			break
		}
	}
	if err == syscall.EAGAIN {
		r.pool.Put(r.big)
		r.big = nil
		return false
	}
	r.rawErrn = err
	return true
}

// done is called after the data of a read was written: a big buffer that
// the read did not fill goes back to the pool; a full small read starts a
// burst in a big one.
func (r *idleReader) done(n int) {
	switch {
	case r.cur == r.small && r.small != nil && n == smallSize:
		r.big = r.pool.Get().(*[]byte)
	case r.cur == r.big && r.big != nil && n < len(*r.big):
		r.pool.Put(r.big)
		r.big = nil
	}
	r.cur = nil
}

func (r *idleReader) release() {
	if r.big != nil {
		r.pool.Put(r.big)
		r.big = nil
	}
	if r.small != nil {
		smallPool.Put(r.small)
		r.small = nil
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
