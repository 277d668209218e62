//go:build !unix

package admin

func rlimitNofile() *Rlimit { return nil }
