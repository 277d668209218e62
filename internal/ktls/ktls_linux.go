//go:build linux

package ktls

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"syscall"
	"unsafe"
)

var probe = sync.OnceValue(func() error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("ktls probe: %w", err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		return fmt.Errorf("ktls probe: %w", err)
	}
	defer c.Close()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		return err
	}
	return setULP(rc)
})

// Probe reports whether the kernel offers kTLS: it attaches the "tls" upper
// layer protocol to a throwaway loopback connection. The answer is cached.
// An error wraps ErrUnsupported when the kernel simply lacks it.
func Probe() error { return probe() }

// install attaches kTLS to the socket behind rc and installs tx and/or rx
// (nil skips a direction). From then on the kernel encrypts what is written
// to the socket and decrypts what is read from it; crypto/tls must not touch
// the connection again.
func install(rc syscall.RawConn, tx, rx *cryptoInfo) error {
	if err := setULP(rc); err != nil {
		return err
	}
	for _, d := range []struct {
		opt int
		ci  *cryptoInfo
	}{{tlsTX, tx}, {tlsRX, rx}} {
		if d.ci == nil {
			continue
		}
		b := d.ci.Marshal()
		var serr error
		if err := rc.Control(func(fd uintptr) {
			_, _, e := syscall.Syscall6(syscall.SYS_SETSOCKOPT, fd, solTLS, uintptr(d.opt), uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), 0)
			if e != 0 {
				serr = e
			}
		}); err != nil {
			return err
		}
		if serr != nil {
			return fmt.Errorf("ktls: setsockopt SOL_TLS %d: %w", d.opt, serr)
		}
	}
	return nil
}

func setULP(rc syscall.RawConn) error {
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = syscall.SetsockoptString(int(fd), syscall.IPPROTO_TCP, tcpULP, "tls")
	}); err != nil {
		return err
	}
	switch {
	case serr == nil:
		return nil
	case errors.Is(serr, syscall.ENOENT), errors.Is(serr, syscall.ENOPROTOOPT), errors.Is(serr, syscall.EOPNOTSUPP):
		// ENOENT: no "tls" ULP registered (CONFIG_TLS unset or module
		// not loaded).
		return fmt.Errorf("%w: kernel has no TLS upper layer protocol (setsockopt TCP_ULP \"tls\": %v)", ErrUnsupported, serr)
	}
	return fmt.Errorf("ktls: setsockopt TCP_ULP: %w", serr)
}
