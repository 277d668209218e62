package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// clockTicks is sysconf(_SC_CLK_TCK), the unit of utime/stime in
// /proc/<pid>/stat, read once via getconf (100 on Linux).
func clockTicks() (int64, error) {
	s, err := commandOutput("getconf", "CLK_TCK")
	if err != nil {
		return 0, fmt.Errorf("reading CLK_TCK: %w", err)
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("getconf CLK_TCK: unexpected %q", s)
	}
	return n, nil
}

// cpuTicks returns utime+stime of pid, in clock ticks.
func cpuTicks(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("reading cpu time: %w", err)
	}
	// The command name (field 2) is in parentheses and may contain spaces;
	// fields after it start with field 3 (state). utime and stime are
	// fields 14 and 15.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no ')'", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields after the name", pid, len(f))
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: bad utime/stime %q %q", pid, f[11], f[12])
	}
	return utime + stime, nil
}

// sumCPUTicks adds cpuTicks over pids.
func sumCPUTicks(pids []int) (int64, error) {
	var sum int64
	for _, pid := range pids {
		t, err := cpuTicks(pid)
		if err != nil {
			return 0, err
		}
		sum += t
	}
	return sum, nil
}

// rssKiB returns VmRSS of pid in KiB.
func rssKiB(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("reading rss: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			// "VmRSS:	   12345 kB"
			num, _, _ := strings.Cut(strings.TrimSpace(rest), " ")
			n, err := strconv.ParseInt(num, 10, 64)
			if err != nil {
				return 0, fmt.Errorf("/proc/%d/status: bad VmRSS %q", pid, rest)
			}
			return n, nil
		}
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("/proc/%d/status: %w", pid, err)
	}
	return 0, fmt.Errorf("/proc/%d/status: no VmRSS", pid)
}

func sumRSSKiB(pids []int) (int64, error) {
	var sum int64
	for _, pid := range pids {
		r, err := rssKiB(pid)
		if err != nil {
			return 0, err
		}
		sum += r
	}
	return sum, nil
}

// raiseNoFile raises the open-file soft limit to the hard limit: the
// idle-connection test holds thousands of sockets in this process. Children
// inherit the raised limit.
func raiseNoFile() error {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return fmt.Errorf("getrlimit NOFILE: %w", err)
	}
	if lim.Cur < lim.Max {
		lim.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			return fmt.Errorf("setrlimit NOFILE to %d: %w", lim.Max, err)
		}
	}
	return nil
}

// noFileLimit returns the current open-file soft limit.
func noFileLimit() uint64 {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0
	}
	return lim.Cur
}

// cpuModel is the first "model name" of /proc/cpuinfo.
func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "unknown"
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

// loadAvg is the 1, 5 and 15 minute load averages from /proc/loadavg.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}
