package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"
)

// proc is a subprocess whose output goes to a log file in the temp dir.
type proc struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	done    chan struct{} // closed when the process has been waited for
	waitErr error
}

// procSet records every process started so that all of them are stopped
// (by PID) on exit, whatever path the run takes.
type procSet struct {
	mu    sync.Mutex
	procs []*proc
}

// start runs bin with args in dir, stdout and stderr to <dir>/<name>.log.
// The child gets its own process group, so a Ctrl-C on the terminal reaches
// only the harness, which then stops it by PID; and it is killed if the
// harness dies without cleaning up.
func (s *procSet) start(name, dir, bin string, args ...string) (*proc, error) {
	logPath := filepath.Join(dir, name+".log")
	f, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("creating log for %s: %w", name, err)
	}
	defer f.Close() // the child holds its own copy
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s (%s): %w", name, bin, err)
	}
	p := &proc{name: name, cmd: cmd, logPath: logPath, done: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.done)
	}()
	s.mu.Lock()
	s.procs = append(s.procs, p)
	s.mu.Unlock()
	return p, nil
}

// stopAll stops every process still running, newest first.
func (s *procSet) stopAll() {
	s.mu.Lock()
	ps := s.procs
	s.procs = nil
	s.mu.Unlock()
	for i := len(ps) - 1; i >= 0; i-- {
		ps[i].stop(5 * time.Second)
	}
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) alive() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// stop sends SIGTERM to the process (by PID), waits up to grace, then
// SIGKILLs it. It is idempotent.
func (p *proc) stop(grace time.Duration) {
	if !p.alive() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return
	case <-time.After(grace):
	}
	_ = p.cmd.Process.Kill()
	<-p.done
}

func (p *proc) output() string {
	b, _ := os.ReadFile(p.logPath)
	return string(b)
}

// tail returns the last n lines of the process's log, for error messages.
func (p *proc) tail(n int) string {
	lines := strings.Split(strings.TrimRight(p.output(), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "  | " + strings.Join(lines, "\n  | ")
}

// exitedErr describes a process that exited when it should be running.
func (p *proc) exitedErr() error {
	return fmt.Errorf("%s exited (%v); last log lines:\n%s", p.name, p.waitErr, p.tail(15))
}

// waitLog waits until the process's log matches re and returns the first
// submatch (or the whole match).
func (p *proc) waitLog(ctx context.Context, re *regexp.Regexp, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		if m := re.FindSubmatch([]byte(p.output())); m != nil {
			return string(m[len(m)-1]), nil
		}
		if !p.alive() {
			return "", p.exitedErr()
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("%s: no log line matching %q after %s; last log lines:\n%s", p.name, re, timeout, p.tail(15))
		}
		if err := sleepCtx(ctx, 50*time.Millisecond); err != nil {
			return "", err
		}
	}
}

var listeningRE = regexp.MustCompile(`listening on (\S+)`)

// startSelf runs this binary in one of its helper modes (backend, relay),
// which print "listening on ADDR" once bound, and returns that address.
func startSelf(ctx context.Context, s *procSet, self, dir, name string, args ...string) (*proc, string, error) {
	p, err := s.start(name, dir, self, args...)
	if err != nil {
		return nil, "", err
	}
	addr, err := p.waitLog(ctx, listeningRE, 10*time.Second)
	if err != nil {
		return p, "", err
	}
	return p, addr, nil
}

// freePorts returns n distinct free TCP ports on 127.0.0.1. The listeners
// are held until all are picked; another process could still take one
// before it is bound, which is acceptable here.
func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("finding a free port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// waitDialable waits until addr accepts TCP connections.
func waitDialable(ctx context.Context, addr string, p *proc, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if p != nil && !p.alive() {
			return p.exitedErr()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not accepting connections after %s: %w", addr, timeout, err)
		}
		if err := sleepCtx(ctx, 50*time.Millisecond); err != nil {
			return err
		}
	}
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// commandOutput runs a short command and returns its trimmed first line.
func commandOutput(bin string, args ...string) (string, error) {
	out, err := exec.Command(bin, args...).Output()
	if err != nil {
		return "", fmt.Errorf("%s %s: %w", bin, strings.Join(args, " "), err)
	}
	line, _, _ := bytes.Cut(bytes.TrimSpace(out), []byte("\n"))
	if len(line) == 0 {
		return "", fmt.Errorf("%s %s: no output", bin, strings.Join(args, " "))
	}
	return string(line), nil
}

// skipError marks a topology that cannot run here (not a failure).
type skipError struct{ reason string }

func (e skipError) Error() string { return "skipped: " + e.reason }
