//go:build !linux

package ktls

import "syscall"

// Probe reports that kTLS exists only on Linux.
func Probe() error { return ErrUnsupported }

// install is unsupported off Linux.
func install(syscall.RawConn, *cryptoInfo, *cryptoInfo) error { return ErrUnsupported }
