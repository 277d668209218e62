//go:build unix

package admin

import "syscall"

func rlimitNofile() *Rlimit {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return nil
	}
	return &Rlimit{Soft: uint64(rl.Cur), Hard: uint64(rl.Max)}
}
