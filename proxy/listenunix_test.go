package proxy

import (
	"bufio"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestListenUnixLiveSocket: a socket another listener serves is not taken
// over; that listener keeps its path and its clients.
func TestListenUnixLiveSocket(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "up.sock")
	other, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()

	ln, err := listenUnix(path, 0)
	if err == nil {
		ln.Close()
		t.Fatal("listenUnix took over a live socket")
	}
	if !strings.Contains(err.Error(), "address in use by another process") || !strings.Contains(err.Error(), path) {
		t.Fatalf("error %q: want the path and \"address in use by another process\"", err)
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("the other listener lost its path: %v", err)
	}
	defer c.Close()
	a, err := other.Accept()
	if err != nil {
		t.Fatal(err)
	}
	a.Close()
}

// TestListenUnixStaleSocket: a socket file nobody listens on (left by a
// process that died) is replaced.
func TestListenUnixStaleSocket(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "up.sock")
	old, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	old.SetUnlinkOnClose(false)
	old.Close()
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("stale socket file not left behind: %v", err)
	}

	ln, err := listenUnix(path, 0)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	defer ln.Close()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
}

// TestListenUnixNotASocket: a regular file at the path is never removed.
func TestListenUnixNotASocket(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "data")
	if err := os.WriteFile(path, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	if ln, err := listenUnix(path, 0); err == nil {
		ln.Close()
		t.Fatal("listenUnix bound over a regular file")
	}
	if b, err := os.ReadFile(path); err != nil || string(b) != "keep" {
		t.Fatalf("regular file changed: %q %v", b, err)
	}
}

// TestListenUnixMode: local_bind_socket_mode is applied; unset, the socket
// keeps what the umask gives (0777 &^ umask), as Envoy leaves it.
func TestListenUnixMode(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	for _, tc := range []struct {
		mode, want os.FileMode
	}{{0, 0o777 &^ umask(t)}, {0o660, 0o660}, {0o600, 0o600}} {
		path := filepath.Join(dir, strconv.FormatUint(uint64(tc.mode), 8)+".sock")
		ln, err := listenUnix(path, tc.mode)
		if err != nil {
			t.Fatal(err)
		}
		fi, err := os.Lstat(path)
		ln.Close()
		if err != nil {
			t.Fatal(err)
		}
		if got := fi.Mode().Perm(); got != tc.want {
			t.Errorf("mode %#o: socket is %#o, want %#o", tc.mode, got, tc.want)
		}
	}
}

// umask reads the process umask without changing it (changing it would
// race with parallel tests creating files).
func umask(t *testing.T) os.FileMode {
	t.Helper()
	f, err := os.Open("/proc/self/status")
	if err != nil {
		t.Fatalf("umask unknown: %v", err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), "Umask:"); ok {
			m, err := strconv.ParseUint(strings.TrimSpace(v), 8, 32)
			if err != nil {
				t.Fatal(err)
			}
			return os.FileMode(m)
		}
	}
	t.Fatal("umask unknown: no Umask line in /proc/self/status")
	return 0
}
