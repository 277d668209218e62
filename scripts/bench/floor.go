package main

import (
	"crypto/aes"
	"crypto/cipher"
	"fmt"
	"runtime"
	"strings"
	"syscall"
	"time"
)

// sealOpenPerGB measures, on this machine, the CPU seconds that sealing and
// opening 10⁹ bytes cost in full TLS 1.3 records (16 KiB of plaintext,
// AES-128-GCM: the suite crypto/tls picks on CPUs with AES instructions):
// the crypto every TLS proxy pair pays once per byte (A seals, B opens).
// It runs on one locked thread for about d and reads that thread's CPU
// time, so the load generator's idle goroutines do not count.
func sealOpenPerGB(d time.Duration) (float64, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	block, err := aes.NewCipher(make([]byte, 16))
	if err != nil {
		return 0, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return 0, err
	}
	const record = 16 << 10
	buf := make([]byte, record, record+aead.Overhead())
	nonce := make([]byte, aead.NonceSize())
	hdr := []byte{23, 3, 3, 0x40, 0x11}
	start := threadCPU()
	deadline := time.Now().Add(d)
	var n int64
	for time.Now().Before(deadline) {
		for range 64 {
			nonce[11]++
			sealed := aead.Seal(buf[:0], nonce, buf, hdr)
			opened, err := aead.Open(sealed[:0], nonce, sealed, hdr)
			if err != nil {
				return 0, fmt.Errorf("open: %w", err)
			}
			buf = opened
			n += record
		}
	}
	cpu := threadCPU() - start
	return cpu.Seconds() / (float64(n) / 1e9), nil
}

func threadCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(1 /* RUSAGE_THREAD */, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// floorSection is the report's account of the floor: what moving a byte
// through any user-space TLS proxy pair costs on this machine (the copy
// relay's CPU per GB plus one seal and one open), and how far each TLS
// pair is above it.
func (r *report) floorSection() string {
	if len(r.crypto) == 0 {
		return ""
	}
	byName := map[string]*outcome{}
	for _, o := range r.results {
		byName[o.name] = o
	}
	cp := byName["relay-copy"]
	if cp == nil || !cp.measured() {
		return ""
	}
	relay, ok := cp.agg["cpu_per_gb"]
	if !ok {
		return ""
	}
	crypto := summarize(r.crypto)
	floor := relay.med + crypto.med
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w("## The floor\n\n")
	w("What a byte costs any proxy pair that terminates TLS in user space on this machine (no kTLS): ")
	w("the **copy relay pair**'s CPU per GB (bulk 1: each proxy reads and writes every byte through a 32 KiB buffer, no splice) ")
	w("plus sealing and opening it once (AES-128-GCM in 16 KiB records, measured in the harness on one thread, once per round).\n\n")
	w("| | s/GB |\n|---|---:|\n")
	w("| copy relay pair (bulk 1, A+B) | %.2f (%s) |\n", relay.med, relay.rangeCell(f2))
	w("| seal + open | %.2f (%s) |\n", crypto.med, crypto.rangeCell(f2))
	w("| **floor** | **%.2f** |\n", floor)
	for _, o := range r.results {
		if o.name == "relay" || o.name == "relay-copy" || !o.measured() {
			continue
		}
		if v, ok := o.agg["cpu_per_gb"]; ok {
			w("| %s | %.2f = %.2f× the floor |\n", o.label, v.med, v.med/floor)
		}
	}
	w("\n")
	return b.String()
}
