//go:build unix

package lifecycle

import "syscall"

// RaiseNoFile raises the soft limit on open files (RLIMIT_NOFILE) to the
// hard limit and returns both as they are afterwards. Every proxied
// connection holds two descriptors, so the soft limit, often 1024, caps
// the number of connections.
//
// The Go runtime already raises the soft limit at start on Linux (since Go
// 1.19); RaiseNoFile makes the raise explicit, reports the outcome so
// strait can log it, and covers runtimes that did not. The hard limit
// itself is the service manager's to set (LimitNOFILE= in the systemd
// unit, the container runtime's ulimits in Kubernetes).
func RaiseNoFile() (soft, hard uint64, err error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, 0, err
	}
	if lim.Cur < lim.Max {
		raised := lim
		raised.Cur = raised.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &raised); err != nil {
			return uint64(lim.Cur), uint64(lim.Max), err
		}
		lim = raised
	}
	return uint64(lim.Cur), uint64(lim.Max), nil
}
