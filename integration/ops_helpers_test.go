package integration

// Helpers for the operational tests (agent loss, drain under load, hostile
// input, connection scale): a verified long-lived stream, paced digest
// transfers, process inspection through /proc and strait's -pprof-addr,
// file-descriptor limits, and an echo app running as a process of its own.

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/signal"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// ---------------------------------------------------------------------------
// a long-lived, verified echo stream

// echoStream writes a seeded pseudo-random stream on one connection at a
// steady pace and checks every echoed byte (XOR key) against the same
// stream.
type echoStream struct {
	c                 net.Conn
	written, verified atomic.Int64
	stopOnce          sync.Once
	stop              chan struct{}
	writeDone         chan error
	readDone          chan error

	mu  sync.Mutex
	err error // first writer/reader failure, sticky
}

// startEchoStream dials addr and streams chunk bytes every interval.
func startEchoStream(t testing.TB, addr string, key byte, chunk int, interval time.Duration) *echoStream {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("stream: dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	s := &echoStream{c: c, stop: make(chan struct{}), writeDone: make(chan error, 1), readDone: make(chan error, 1)}
	seed := rand.Uint64()
	go func() {
		src := rand.New(rand.NewPCG(seed, 7))
		buf := make([]byte, chunk)
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for {
			select {
			case <-s.stop:
				s.writeDone <- c.(*net.TCPConn).CloseWrite()
				return
			case <-tick.C:
			}
			for i := range buf {
				buf[i] = byte(src.Uint32())
			}
			_ = c.SetWriteDeadline(time.Now().Add(30 * time.Second))
			if _, err := c.Write(buf); err != nil {
				s.writeDone <- fmt.Errorf("write after %d bytes: %w", s.written.Load(), err)
				return
			}
			s.written.Add(int64(len(buf)))
		}
	}()
	go func() {
		want := rand.New(rand.NewPCG(seed, 7))
		buf := make([]byte, 32*1024)
		for {
			_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
			n, err := c.Read(buf)
			for i := 0; i < n; i++ {
				if exp := byte(want.Uint32()) ^ key; buf[i] != exp {
					s.readDone <- fmt.Errorf("stream byte %d: got %#x, want %#x", s.verified.Load()+int64(i), buf[i], exp)
					return
				}
			}
			s.verified.Add(int64(n))
			if err != nil {
				if errors.Is(err, io.EOF) {
					s.readDone <- nil
				} else {
					s.readDone <- fmt.Errorf("read after %d bytes verified: %w", s.verified.Load(), err)
				}
				return
			}
		}
	}()
	return s
}

// alive returns the first failure of the writer or reader, if any.
func (s *echoStream) alive() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return s.err
	}
	select {
	case err := <-s.writeDone:
		s.err = fmt.Errorf("stream writer stopped: %v", err)
	case err := <-s.readDone:
		s.err = fmt.Errorf("stream reader stopped early: %v", err)
	default:
	}
	return s.err
}

// progress waits until at least min more bytes have been verified than when
// it was called; the stream must stay alive meanwhile.
func (s *echoStream) progress(t testing.TB, min int64, what string) {
	t.Helper()
	mark := s.verified.Load()
	eventually(t, 30*time.Second, func() error {
		if err := s.alive(); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if v := s.verified.Load(); v < mark+min {
			return fmt.Errorf("stream stalled %s: %d bytes verified (%d when asked), %d written", what, v, mark, s.written.Load())
		}
		return nil
	})
}

// finish half-closes the stream and checks that every byte written came
// back, then EOF.
func (s *echoStream) finish(t testing.TB) {
	t.Helper()
	if err := s.alive(); err != nil {
		t.Fatal(err)
	}
	s.stopOnce.Do(func() { close(s.stop) })
	if err := <-s.writeDone; err != nil {
		t.Fatalf("stream writer: %v", err)
	}
	select {
	case err := <-s.readDone:
		if err != nil {
			t.Fatalf("stream reader: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("stream reader saw no EOF: %d of %d bytes verified", s.verified.Load(), s.written.Load())
	}
	if w, v := s.written.Load(), s.verified.Load(); w != v {
		t.Fatalf("stream: wrote %d bytes, got back %d", w, v)
	}
}

// ---------------------------------------------------------------------------
// paced digest transfers (against modeDigest apps)

// digestTransfer sends size pseudo-random bytes on a connection to addr in
// chunks of chunk bytes every interval, half-closes, and checks that the
// app's "<count> <sha256>" reply matches what was sent and is followed by
// EOF. sent (may be nil) counts the bytes written.
func digestTransfer(addr string, size, chunk int, interval time.Duration, sent *atomic.Int64) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	defer c.Close()
	h := newDigest()
	src := rand.New(rand.NewPCG(rand.Uint64(), 3))
	buf := make([]byte, chunk)
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for left := size; left > 0; left -= chunk {
		<-tick.C
		n := min(chunk, left)
		for i := range buf[:n] {
			buf[i] = byte(src.Uint32())
		}
		h.Write(buf[:n])
		_ = c.SetWriteDeadline(time.Now().Add(30 * time.Second))
		if _, err := c.Write(buf[:n]); err != nil {
			return fmt.Errorf("write after %d of %d bytes: %w", size-left, size, err)
		}
		if sent != nil {
			sent.Add(int64(n))
		}
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		return fmt.Errorf("half-close: %w", err)
	}
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	reply, err := io.ReadAll(c)
	if err != nil {
		return fmt.Errorf("reading the digest (got %q): %w", reply, err)
	}
	if want := h.String() + "\n"; string(reply) != want {
		return fmt.Errorf("app received %q, client sent %q", strings.TrimSpace(string(reply)), strings.TrimSpace(want))
	}
	return nil
}

// ---------------------------------------------------------------------------
// process inspection

// fdCount is the number of open file descriptors of pid.
func fdCount(pid int) (int, error) {
	ents, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/fd")
	if err != nil {
		return 0, err
	}
	return len(ents), nil
}

// nofileLimits returns pid's RLIMIT_NOFILE from /proc/<pid>/limits.
func nofileLimits(pid int) (soft, hard uint64, err error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/limits")
	if err != nil {
		return 0, 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.HasPrefix(line, "Max open files") {
			continue
		}
		f := strings.Fields(strings.TrimPrefix(line, "Max open files"))
		if len(f) < 2 {
			break
		}
		parse := func(s string) (uint64, error) {
			if s == "unlimited" {
				return ^uint64(0), nil
			}
			return strconv.ParseUint(s, 10, 64)
		}
		if soft, err = parse(f[0]); err == nil {
			hard, err = parse(f[1])
		}
		return soft, hard, err
	}
	return 0, 0, fmt.Errorf("no 'Max open files' line in /proc/%d/limits", pid)
}

// raiseNoFile raises this process's soft RLIMIT_NOFILE to the hard limit
// (children started afterwards inherit it) and returns the new soft limit.
func raiseNoFile(t testing.TB) uint64 {
	t.Helper()
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatalf("getrlimit: %v", err)
	}
	if lim.Cur < lim.Max {
		lim.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			t.Fatalf("setrlimit NOFILE %d: %v", lim.Max, err)
		}
	}
	return lim.Cur
}

var goroutineTotal = regexp.MustCompile(`goroutine profile: total (\d+)`)

// goroutinesWith reads the goroutine count of a strait started with
// -pprof-addr addr.
func goroutinesWith(c *http.Client, addr string) (int, error) {
	resp, err := c.Get("http://" + addr + "/debug/pprof/goroutine?debug=1")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	line, err := bufio.NewReader(resp.Body).ReadString('\n')
	if err != nil {
		return 0, fmt.Errorf("goroutine profile: %w", err)
	}
	m := goroutineTotal.FindStringSubmatch(line)
	if m == nil {
		return 0, fmt.Errorf("goroutine profile header %q", line)
	}
	return strconv.Atoi(m[1])
}

// ---------------------------------------------------------------------------
// latency statistics

// percentile returns the p-th percentile (0 < p <= 100, nearest rank) of
// ds, which it sorts.
func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	rank := int(float64(len(ds))*p/100+0.999999) - 1
	return ds[max(0, min(rank, len(ds)-1))]
}

// ---------------------------------------------------------------------------
// the echo app as a separate process

// echoAppEnv, when set in the environment of the test binary, makes it an
// echo server instead of running tests: it listens on 127.0.0.1:0, prints
// "echo-app listening <addr>", writes back every byte XOR the key given as
// the variable's value (decimal), and exits on SIGTERM. echoAppAddrEnv,
// when set, is the address to listen on instead.
const (
	echoAppEnv     = "STRAIT_IT_ECHO_APP_KEY"
	echoAppAddrEnv = "STRAIT_IT_ECHO_APP_ADDR"
)

func echoAppMain() int {
	key, err := strconv.Atoi(os.Getenv(echoAppEnv))
	if err != nil || key < 0 || key > 255 {
		fmt.Fprintln(os.Stderr, "echo app: bad key", os.Getenv(echoAppEnv))
		return 2
	}
	addr := os.Getenv(echoAppAddrEnv)
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "echo app:", err)
		return 1
	}
	var accepted, active atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				fmt.Fprintln(os.Stderr, "echo app: accept:", err)
				time.Sleep(10 * time.Millisecond) // EMFILE and the like: do not spin
				continue
			}
			accepted.Add(1)
			active.Add(1)
			go func() {
				defer active.Add(-1)
				defer c.Close()
				buf := make([]byte, 4096)
				for {
					n, err := c.Read(buf)
					for i := range buf[:n] {
						buf[i] ^= byte(key)
					}
					if n > 0 {
						if _, werr := c.Write(buf[:n]); werr != nil {
							return
						}
					}
					if err != nil {
						if err == io.EOF {
							closeWrite(c)
						}
						return
					}
				}
			}()
		}
	}()
	fmt.Printf("echo-app listening %s\n", ln.Addr())
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	<-sigs
	fmt.Printf("echo-app stopping: accepted %d, active %d\n", accepted.Load(), active.Load())
	return 0
}

var echoAppListening = regexp.MustCompile(`echo-app listening (\S+)`)

// startEchoProcess runs the echo app as a child process (the test binary
// re-executed) and returns it with its address.
func startEchoProcess(t testing.TB, key byte) (*proc, string) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	p := startProc(t, "echo-app", exe, nil, cleanEnv(echoAppEnv+"="+strconv.Itoa(int(key))), false)
	var addr string
	eventually(t, 30*time.Second, func() error {
		if p.exited() {
			t.Fatalf("echo app exited: %v\n%s", p.waitErr, p.Output())
		}
		m := echoAppListening.FindStringSubmatch(p.Output())
		if m == nil {
			return errors.New("echo app not listening yet")
		}
		addr = m[1]
		return nil
	})
	return p, addr
}

// ---------------------------------------------------------------------------
// strait under a low soft RLIMIT_NOFILE

// execNoFileEnv, when set in the environment of the test binary, makes it
// set its soft RLIMIT_NOFILE to the variable's value and exec the program
// named by execBinEnv with the same arguments, in place (same pid). It
// stands in for a service manager's low default (systemd: 1024 soft).
const (
	execNoFileEnv = "STRAIT_IT_EXEC_NOFILE"
	execBinEnv    = "STRAIT_IT_EXEC_BIN"
)

func execWithNoFile() int {
	soft, err := strconv.ParseUint(os.Getenv(execNoFileEnv), 10, 64)
	bin := os.Getenv(execBinEnv)
	if err != nil || bin == "" {
		fmt.Fprintf(os.Stderr, "exec wrapper: bad %s=%q or %s=%q\n", execNoFileEnv, os.Getenv(execNoFileEnv), execBinEnv, bin)
		return 2
	}
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		fmt.Fprintln(os.Stderr, "exec wrapper: getrlimit:", err)
		return 2
	}
	lim.Cur = min(soft, lim.Max)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		fmt.Fprintln(os.Stderr, "exec wrapper: setrlimit:", err)
		return 2
	}
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, execNoFileEnv+"=") && !strings.HasPrefix(kv, execBinEnv+"=") {
			env = append(env, kv)
		}
	}
	err = syscall.Exec(bin, append([]string{bin}, os.Args[1:]...), env)
	fmt.Fprintln(os.Stderr, "exec wrapper: exec", bin, err)
	return 2
}

// startStraitNoFile is startStrait with strait exec'd under a soft
// RLIMIT_NOFILE of soft (the hard limit unchanged).
func startStraitNoFile(t testing.TB, a *agent, soft uint64, args ...string) *proc {
	t.Helper()
	requireStrait(t)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	args, admin := withAdmin(t, append([]string{"-http-addr", a.httpAddr}, args...))
	env := cleanEnv(execNoFileEnv+"="+strconv.FormatUint(soft, 10), execBinEnv+"="+straitBin)
	p := startProc(t, "strait", exe, args, env, true)
	p.adminAddr = admin
	waitReady(t, p)
	return p
}

// ---------------------------------------------------------------------------
// strait's admin endpoint (-admin-bind)

// adminReadiness is the body of GET /ready.
type adminReadiness struct {
	Ready    bool     `json:"ready"`
	Reason   string   `json:"reason"`
	Degraded []string `json:"degraded"`
}

// adminStats is the part of GET /stats the tests read.
type adminStats struct {
	Goroutines   int `json:"goroutines"`
	OpenFDs      int `json:"open_fds"`
	RlimitNofile *struct {
		Soft uint64 `json:"soft"`
		Hard uint64 `json:"hard"`
	} `json:"rlimit_nofile"`
	ActiveConnections int `json:"active_connections"`
}

// adminClient makes one request per connection, so that polling the admin
// endpoint leaves no idle connection (and descriptor) in strait.
var adminClient = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

// adminGetJSON GETs path from p's admin endpoint and decodes the JSON body
// into v; it returns the status code.
func adminGetJSON(p *proc, path string, v any) (int, error) {
	if p.adminAddr == "" {
		return 0, fmt.Errorf("strait pid %d has no admin endpoint", p.Pid())
	}
	resp, err := adminClient.Get("http://" + p.adminAddr + path)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, err
	}
	if err := json.Unmarshal(body, v); err != nil {
		return resp.StatusCode, fmt.Errorf("GET %s: status %d, body %q: %w", path, resp.StatusCode, tail(string(body), 300), err)
	}
	return resp.StatusCode, nil
}

func adminReady(p *proc) (int, adminReadiness, error) {
	var r adminReadiness
	code, err := adminGetJSON(p, "/ready", &r)
	return code, r, err
}

func adminGetStats(p *proc) (adminStats, error) {
	var s adminStats
	code, err := adminGetJSON(p, "/stats", &s)
	if err == nil && code != http.StatusOK {
		err = fmt.Errorf("GET /stats: status %d", code)
	}
	return s, err
}

var promLine = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)`)

// promSeries returns the samples of every series in p's /metrics whose
// name ends with suffix (a metrics prefix may come first), keyed by the
// rendered labels ("" or `{a="b",...}`).
func promSeries(p *proc, suffix string) (map[string]float64, error) {
	if p.adminAddr == "" {
		return nil, fmt.Errorf("strait pid %d has no admin endpoint", p.Pid())
	}
	resp, err := adminClient.Get("http://" + p.adminAddr + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /metrics: status %d", resp.StatusCode)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	for sc.Scan() {
		m := promLine.FindStringSubmatch(sc.Text())
		if m == nil || !strings.HasSuffix(m[1], suffix) {
			continue
		}
		v, err := strconv.ParseFloat(m[3], 64)
		if err != nil {
			return nil, fmt.Errorf("/metrics line %q: %w", sc.Text(), err)
		}
		out[m[2]] += v
	}
	return out, sc.Err()
}

// promLabel returns label name's value in rendered labels, or "".
func promLabel(labels, name string) string {
	m := regexp.MustCompile(`[{,]` + regexp.QuoteMeta(name) + `="([^"]*)"`).FindStringSubmatch(labels)
	if m == nil {
		return ""
	}
	return m[1]
}
