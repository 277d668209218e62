package integration

import (
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// netns is a network namespace made by a test: a veth pair joins it to
// the root namespace on a /30 of 198.18.0.0/15 (outer in the root
// namespace, inner inside); loopback is up; there is no route out.
type netns struct {
	name         string
	outer, inner string // addresses
}

func (n *netns) path() string { return "/var/run/netns/" + n.name }

// requireNetns fails the test unless it can make namespaces and install
// iptables rules (root, ip, iptables: .ci/run installs iptables).
func requireNetns(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("network namespace tests need root")
	}
	for _, bin := range []string{"ip", "iptables", "iptables-save", "nsenter"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("network namespace tests need %s: %v (apt-get install iptables iproute2 util-linux)", bin, err)
		}
	}
}

func sh(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// newNetns makes a namespace and its veth pair, and deletes both at
// cleanup.
func newNetns(t *testing.T) *netns {
	t.Helper()
	id := fmt.Sprintf("%06x", rand.IntN(1<<24))
	n := &netns{name: "strait-it-" + id}
	a, b := rand.IntN(2), rand.IntN(256)
	c := 4 * rand.IntN(64)
	n.outer = fmt.Sprintf("198.%d.%d.%d", 18+a, b, c+1)
	n.inner = fmt.Sprintf("198.%d.%d.%d", 18+a, b, c+2)
	host, peer := "st"+id+"h", "st"+id+"n"
	sh(t, "ip", "netns", "add", n.name)
	t.Cleanup(func() {
		exec.Command("ip", "link", "del", host).Run()
		if out, err := exec.Command("ip", "netns", "del", n.name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v %s", n.name, err, out)
		}
	})
	sh(t, "ip", "link", "add", host, "type", "veth", "peer", "name", peer)
	sh(t, "ip", "link", "set", peer, "netns", n.name)
	sh(t, "ip", "addr", "add", n.outer+"/30", "dev", host)
	sh(t, "ip", "link", "set", host, "up")
	sh(t, "ip", "netns", "exec", n.name, "ip", "addr", "add", n.inner+"/30", "dev", peer)
	sh(t, "ip", "netns", "exec", n.name, "ip", "link", "set", peer, "up")
	sh(t, "ip", "netns", "exec", n.name, "ip", "link", "set", "lo", "up")
	return n
}

// startEchoIn runs the echo app (the test binary re-executed) inside n,
// listening on addr.
func (n *netns) startEchoIn(t *testing.T, name, addr string, key byte) *proc {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	p := startProc(t, name, "ip", []string{"netns", "exec", n.name, exe}, cleanEnv(echoAppEnv+"="+strconv.Itoa(int(key)), echoAppAddrEnv+"="+addr), false)
	eventually(t, 30*time.Second, func() error {
		if p.exited() {
			t.Fatalf("%s exited: %v\n%s", name, p.waitErr, p.Output())
		}
		if !echoAppListening.MatchString(p.Output()) {
			return errors.New(name + " not listening yet")
		}
		return nil
	})
	return p
}

// dial connects to addr from inside n: the socket is made on a thread
// that has joined n for the time of the dial (see do).
func (n *netns) dial(addr string, timeout time.Duration) (net.Conn, error) {
	return n.dialAs(addr, timeout, -1)
}

// dialAs is dial with the socket made under uid (when not negative): the
// thread alone changes its user (raw setresuid, not Go's process-wide
// one), so iptables' owner match sees a workload that is not the proxy.
func (n *netns) dialAs(addr string, timeout time.Duration, uid int) (net.Conn, error) {
	var c net.Conn
	err := n.do(func() error {
		if uid >= 0 {
			// Only the effective and file-system ids: the saved root id
			// lets do's caller switch back.
			if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, ^uintptr(0), uintptr(uid), ^uintptr(0)); e != 0 {
				return fmt.Errorf("setresuid %d: %w", uid, e)
			}
			defer func() {
				if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, ^uintptr(0), 0, ^uintptr(0)); e != 0 {
					panic(fmt.Sprintf("restoring euid 0: %v", e)) // never: the saved id is 0
				}
			}()
		}
		var err error
		c, err = net.DialTimeout("tcp", addr, timeout)
		return err
	})
	return c, err
}

// do runs fn on a thread that has joined n, and then returns the thread
// to the test's own namespace so that Go may reuse it. A thread must not
// simply exit: startProc's children die with the thread that forked them
// (Pdeathsig), and any thread may have forked one before it was locked
// here. Only if the way back fails is the thread left to exit with its
// goroutine.
func (n *netns) do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		home, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer home.Close()
		f, err := os.Open(n.path())
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("setns %s: %w", n.name, err)
			return
		}
		err = fn()
		if unix.Setns(int(home.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		} // else: still locked, the thread exits with the goroutine
		errc <- err
	}()
	return <-errc
}

// natRules is the nat table inside n as iptables-save prints it, without
// counters and comments, for comparison.
func (n *netns) natRules(t *testing.T) string {
	t.Helper()
	out := sh(t, "ip", "netns", "exec", n.name, "iptables-save", "-t", "nat")
	var lines []string
	for _, l := range strings.Split(out, "\n") {
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		if i := strings.Index(l, " ["); strings.HasPrefix(l, ":") && i > 0 {
			l = l[:i]
		}
		lines = append(lines, l)
	}
	return strings.Join(lines, "\n")
}

// forwardInto listens on addr inside n and forwards every connection to
// target in the root namespace: how processes in n reach the agent, which
// the harness binds to the root namespace's loopback. Stopped at cleanup.
func (n *netns) forwardInto(t *testing.T, addr, target string) {
	t.Helper()
	var ln net.Listener
	if err := n.do(func() error {
		var err error
		ln, err = net.Listen("tcp", addr)
		return err
	}); err != nil {
		t.Fatalf("listen on %s in %s: %v", addr, n.name, err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	open := map[net.Conn]struct{}{}
	track := func(c net.Conn) {
		mu.Lock()
		open[c] = struct{}{}
		mu.Unlock()
	}
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			track(c)
			track(up)
			wg.Go(func() { io.Copy(up, c); up.Close() })
			wg.Go(func() { io.Copy(c, up); c.Close() })
		}
	})
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for c := range open {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
}
