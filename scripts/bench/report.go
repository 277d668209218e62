package main

import (
	"fmt"
	"os"
	"runtime"
	"strings"
	"time"
	"unicode/utf8"
)

// result is one topology's outcome in one round: measures by key (see the
// column specs below), failures (which fail the run) and notes.
type result struct {
	name, label string
	round       int // 1-based
	setupErr    error
	optional    bool // a setup error is reported but does not fail the run
	failures    []string
	notes       []string
	m           map[string]float64
	load        string // load average when the topology started
}

// prefix names the round in failures and notes when there are several.
func (r *result) prefix(rounds int) string {
	if rounds > 1 {
		return fmt.Sprintf("round %d: ", r.round)
	}
	return ""
}

func (r *result) set(key string, v float64) {
	if r.m == nil {
		r.m = map[string]float64{}
	}
	r.m[key] = v
}

func (r *result) fail(format string, args ...any) {
	r.failures = append(r.failures, fmt.Sprintf(format, args...))
}

func (r *result) note(format string, args ...any) {
	r.notes = append(r.notes, fmt.Sprintf(format, args...))
}

// summary is a one-line progress message for a finished phase.
func (r *result) summary(phase string) string {
	v := r.m
	switch phase {
	case phaseIdle:
		return fmt.Sprintf("%.1f KiB/idle conn", v["rss_conn"])
	case phaseBulk1, phaseBulk8, phaseDown1:
		return fmt.Sprintf("%.2f Gbit/s", v[phase])
	case phaseRR1, phaseRR32:
		return fmt.Sprintf("%.0f ops/s p50 %.0fµs p99 %.0fµs p99.9 %.0fµs", v[phase], v[phase+"_p50"], v[phase+"_p99"], v[phase+"_p999"])
	case phaseConn:
		return fmt.Sprintf("%.0f conns/s p50 %.0fµs p99 %.0fµs, %.0f errors", v["conn"], v["conn_p50"], v["conn_p99"], v["conn_err"])
	}
	return ""
}

// report is the whole run's output.
type report struct {
	o                          *options
	tck                        int64
	start, end                 time.Time
	goVersion, straitVersion   string
	consulVersion, cpu, kernel string
	cores                      int
	nofile                     uint64
	loadStart, loadEnd         string
	roundLoads                 []string  // load average as each round started
	crypto                     []float64 // seal+open CPU s/GB, once per round
	results                    []*outcome
}

func newReport(o *options, tck int64) *report {
	r := &report{o: o, tck: tck, start: time.Now(), cores: runtime.NumCPU(), cpu: cpuModel(), loadStart: loadAvg(), nofile: noFileLimit()}
	var err error
	if r.goVersion, err = commandOutput("go", "version"); err != nil {
		r.goVersion = runtime.Version() + " (toolchain that built the harness)"
	}
	if r.straitVersion, err = commandOutput(o.strait, "version"); err != nil {
		r.straitVersion = "unknown (" + err.Error() + ")"
	}
	if r.consulVersion, err = commandOutput(o.consul, "version"); err != nil {
		r.consulVersion = "unknown (" + err.Error() + ")"
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		r.kernel = strings.TrimSpace(string(b))
	}
	return r
}

// finish records the end of the run, derives per-operation CPU costs in
// every round and the stats over the rounds.
func (r *report) finish() {
	r.end = time.Now()
	r.loadEnd = loadAvg()
	for _, out := range r.results {
		for _, res := range out.rounds {
			for _, k := range []string{"rr1", "rr32", "conn"} {
				if ops := res.m[k+"_ops"]; ops > 0 {
					res.set("cpuop_"+k, res.m["cpu_"+k]/ops*1e6)
				}
			}
		}
		out.aggregate()
	}
}

// failures lists what makes the run fail.
func (r *report) failures() []string {
	var out []string
	for _, o := range r.results {
		for _, res := range o.rounds {
			p := res.prefix(r.o.rounds)
			if res.setupErr != nil && !res.optional {
				out = append(out, fmt.Sprintf("%s: %ssetup: %v", res.label, p, res.setupErr))
			}
			for _, f := range res.failures {
				out = append(out, res.label+": "+p+f)
			}
		}
	}
	return out
}

// column is one measure in a table; ratio says whether ratio rows show it.
type column struct {
	key, head string
	format    func(float64) string
	ratio     bool
	extra     string // key of a value shown as " (+v)" after the main one
}

func f0(v float64) string { return fmt.Sprintf("%.0f", v) }
func f1(v float64) string { return fmt.Sprintf("%.1f", v) }
func f2(v float64) string { return fmt.Sprintf("%.2f", v) }

// fus formats microseconds: one decimal below 100µs.
func fus(v float64) string {
	if v < 100 {
		return f1(v)
	}
	return f0(v)
}

var mainColumns = []column{
	{key: "bulk1", head: "bulk 1 stream Gbit/s", format: f2, ratio: true},
	{key: "bulk8", head: "bulk 8 streams Gbit/s", format: f2, ratio: true},
	{key: "down1", head: "download 1 stream Gbit/s", format: f2, ratio: true},
	{key: "cpu_per_gb", head: "proxy CPU s/GB (bulk 1)", format: f2, ratio: true},
	{key: "rr1", head: "rr 1 conn ops/s", format: f0, ratio: true},
	{key: "rr1_p50", head: "rr 1 p50 µs", format: fus, ratio: true},
	{key: "rr1_p99", head: "rr 1 p99 µs", format: fus, ratio: true},
	{key: "rr1_p999", head: "rr 1 p99.9 µs", format: fus, ratio: true},
	{key: "rr32", head: "rr 32 conns ops/s", format: f0, ratio: true},
	{key: "rr32_p50", head: "rr 32 p50 µs", format: fus, ratio: true},
	{key: "rr32_p99", head: "rr 32 p99 µs", format: fus, ratio: true},
	{key: "rr32_p999", head: "rr 32 p99.9 µs", format: fus, ratio: true},
	{key: "conn", head: "new conns/s", format: f0, ratio: true},
	{key: "conn_p50", head: "new conn p50 µs", format: fus, ratio: true},
	{key: "conn_p99", head: "new conn p99 µs", format: fus, ratio: true},
	{key: "conn_err", head: "conn errors", format: f0, ratio: false},
	{key: "rss_conn", head: "RSS KiB/idle conn", format: f1, ratio: true},
}

var cpuColumns = func() []column {
	heads := map[string]string{
		phaseIdle: "open idle conns", phaseBulk1: "bulk 1", phaseBulk8: "bulk 8", phaseDown1: "download 1",
		phaseRR1: "rr 1", phaseRR32: "rr 32", phaseConn: "new conns",
	}
	var cols []column
	for _, p := range phases {
		cols = append(cols, column{key: "cpu_" + p, head: heads[p] + " s (+agent)", format: f2, ratio: true, extra: "agentcpu_" + p})
	}
	return append(cols,
		column{key: "cpuop_rr1", head: "µs/op rr 1", format: f1, ratio: true},
		column{key: "cpuop_rr32", head: "µs/op rr 32", format: f1, ratio: true},
		column{key: "cpuop_conn", head: "µs/new conn", format: f1, ratio: true},
		column{key: "rss_base", head: "RSS A+B MiB after warmup", format: f1, ratio: true},
	)
}()

// table renders the medians over the rounds as a markdown table, one row
// per topology, plus the ratio rows (ratios of the medians): strait
// (tunnels, the default) against the built-in pair, the relay and strait's
// classic path, and classic against the built-in.
func (r *report) table(cols []column) string {
	rows := r.topologyRows(cols, func(o *outcome, c column) string {
		st, ok := o.agg[c.key]
		if !ok {
			return "—"
		}
		cell := c.format(st.med)
		if x, ok := o.agg[c.extra]; ok && c.extra != "" {
			cell += fmt.Sprintf(" (+%s)", c.format(x.med))
		}
		return cell
	})
	byName := map[string]*outcome{}
	for _, o := range r.results {
		byName[o.name] = o
	}
	for _, ratio := range []struct{ num, den, label string }{
		{"strait", "builtin", "strait / built-in"},
		{"strait", "relay", "strait / relay"},
		{"strait", "strait-classic", "strait tunnels / classic"},
		{"strait-classic", "builtin", "strait classic / built-in"},
	} {
		s, o := byName[ratio.num], byName[ratio.den]
		if s == nil || o == nil || !s.measured() || !o.measured() {
			continue
		}
		row := []string{"*" + ratio.label + "*"}
		for _, c := range cols {
			sv, ok1 := s.agg[c.key]
			ov, ok2 := o.agg[c.key]
			if !c.ratio || !ok1 || !ok2 || ov.med <= 0 || sv.med < 0 {
				row = append(row, "—")
				continue
			}
			row = append(row, ratioCell(sv, ov, r.o.rounds > 1))
		}
		rows = append(rows, row)
	}
	return renderTable(rows)
}

// rangeTable renders the min–max over the rounds of the same cells (the
// main value only: not the " (+extra)" one).
func (r *report) rangeTable(cols []column) string {
	main := make([]column, len(cols))
	for i, c := range cols {
		main[i] = c
		if c.extra != "" {
			main[i].head = strings.TrimSuffix(c.head, " (+agent)")
		}
	}
	return renderTable(r.topologyRows(main, func(o *outcome, c column) string {
		if st, ok := o.agg[c.key]; ok {
			return st.rangeCell(c.format)
		}
		return "—"
	}))
}

// topologyRows is the header and one row per topology, cells by cell;
// skipped and never-measured topologies get an empty row saying why.
func (r *report) topologyRows(cols []column, cell func(*outcome, column) string) [][]string {
	rows := [][]string{{"topology"}}
	for _, c := range cols {
		rows[0] = append(rows[0], c.head)
	}
	for _, o := range r.results {
		row := []string{o.label}
		switch {
		case o.skipped != "":
			row[0] += " (skipped: " + o.skipped + ")"
		case !o.measured():
			row[0] += " (setup failed, see notes)"
		default:
			for _, c := range cols {
				row = append(row, cell(o, c))
			}
		}
		for len(row) < len(cols)+1 {
			row = append(row, "")
		}
		rows = append(rows, row)
	}
	return rows
}

// renderTable pads the cells so the markdown source reads as a table too.
func renderTable(rows [][]string) string {
	width := make([]int, len(rows[0]))
	for _, row := range rows {
		for i, cell := range row {
			width[i] = max(width[i], utf8.RuneCountInString(cell))
		}
	}
	var b strings.Builder
	line := func(cells []string) {
		b.WriteString("|")
		for i, cell := range cells {
			pad := width[i] - utf8.RuneCountInString(cell)
			if i == 0 {
				fmt.Fprintf(&b, " %s%s |", cell, strings.Repeat(" ", pad))
			} else {
				fmt.Fprintf(&b, " %s%s |", strings.Repeat(" ", pad), cell)
			}
		}
		b.WriteString("\n")
	}
	line(rows[0])
	sep := make([]string, len(width))
	for i, w := range width {
		if i == 0 {
			sep[i] = strings.Repeat("-", w)
		} else {
			sep[i] = strings.Repeat("-", w-1) + ":"
		}
	}
	line(sep)
	for _, row := range rows[1:] {
		line(row)
	}
	return b.String()
}

func (r *report) markdown() string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	o := r.o
	w("# strait benchmarks\n\n")
	w("Generated by `make bench` (`go run ./scripts/bench`); do not edit by hand.\n\n")
	w("| | |\n|---|---|\n")
	w("| date | %s (run took %s) |\n", r.start.UTC().Format("2006-01-02 15:04 MST"), r.end.Sub(r.start).Round(time.Second))
	w("| go | %s |\n", r.goVersion)
	w("| strait | %s |\n", r.straitVersion)
	w("| consul | %s (agent `-dev` and built-in `consul connect proxy`) |\n", r.consulVersion)
	w("| CPU | %s, %d cores |\n", r.cpu, r.cores)
	w("| kernel | Linux %s, open-file limit %d |\n", r.kernel, r.nofile)
	w("| load average (1/5/15 min) | %s at start, %s at end |\n", r.loadStart, r.loadEnd)
	w("| flags | `-rounds %d -duration %s -idle-conns %d -warmup %d -only %s` |\n\n", o.rounds, o.duration, o.idleConns, o.warmup, strings.Join(o.only, ","))

	spread := o.rounds > 1
	w("## Results\n\n")
	w("client → proxy A → proxy B → backend, all on loopback; one row per topology. ")
	if spread {
		w("Each cell is the median over %d interleaved rounds (min–max in the next table); ratio rows divide the medians, ", o.rounds)
		w("and a ratio marked ≈ is inside the noise: the two topologies' min–max ranges overlap.\n\n")
	} else {
		w("One round: no spread, so the ratios say nothing about the noise (`-rounds 3`, the default, does).\n\n")
	}
	w("%s\n", r.table(mainColumns))
	if spread {
		w("Min–max over the %d rounds:\n\n%s\n", o.rounds, r.rangeTable(mainColumns))
	}
	w("## Proxy CPU per measurement\n\n")
	w("CPU seconds (utime+stime, `/proc/<pid>/stat`) of both proxy processes (A+B) during each measurement, ")
	w("with the agent's in the same window in parentheses for context (Consul's built-in proxy asks the agent on every connection); ")
	w("then proxy CPU per operation and the pair's RSS after warmup. Ratio rows compare the A+B figures")
	if spread {
		w("; medians over the rounds, ≈ as above")
	}
	w(".\n\n%s\n", r.table(cpuColumns))
	if spread {
		w("Min–max over the %d rounds (A+B):\n\n%s\n", o.rounds, r.rangeTable(cpuColumns))
	}

	w("%s", r.floorSection())
	w("## Notes\n\n")
	w("- Topologies: **strait pair** (`bin/strait`, B with `-register`; tunnels between the two by default, and the classic one-TLS-connection-per-connection path with `-tunnels=off`), **built-in pair** (`consul connect proxy`, same flags), ")
	w("**plain relay pair** (two `bench relay` processes: accept, dial, `io.Copy` both ways with half-close, splice, no TLS: the no-crypto ceiling), ")
	w("**copy relay pair** (the same with `-copy`: read/write through a 32 KiB buffer instead of splice, the copies a user-space TLS proxy cannot avoid), ")
	w("**HAProxy mTLS pair** (only if `haproxy` is installed: `apt-get install haproxy`; agent-issued certificates, chain verified, no SPIFFE ID check), ")
	w("**stunnel mTLS pair** (only if stunnel is installed: `apt-get install stunnel4`; the same certificates and checks, a thread per connection). ")
	w("Each pair has its own service names (`bench-client-<topology>`, `bench-server-<topology>`); B is listed passing in `/v1/health/connect` before A starts.\n")
	w("- Rounds: %d, interleaved (round 1 runs every topology in order, then round 2 again, ...), so the box's load drift spreads over all topologies; each round starts a fresh pair. ", o.rounds)
	w("A cell is the median over the rounds that produced it (the mean of the middle two for an even count).\n")
	w("- Backend: a separate process, one port, a 1-byte mode header per connection: echo, endless source, or counting sink (framed: the end marker is in-band, since the built-in proxy closes both directions on the first EOF).\n")
	w("- Each pair is warmed up first: %d round trips on one connection and 20 new connections.\n", o.warmup)
	w("- Timed tests run %s each, in this order: **bulk** uploads %d KiB frames to the sink on 1 and 8 connections; Gbit/s counts only bytes the sink acknowledged at the end (compared with bytes sent: a mismatch fails the run), over the time until the last acknowledgement. ", o.duration, bulkFrame>>10)
	w("**download** reads the source's stream on 1 connection. **proxy CPU s/GB** is the A+B CPU time during bulk 1 divided by the GB moved (10⁹ bytes).\n")
	w("- **rr**: %d-byte request, echoed, back to back on 1 and on 32 persistent connections; latency per round trip (log-linear histogram, <1%% bucket error). An echo that differs from its request fails the run.\n", rrSize)
	w("- **new conns**: %d workers each dial, write %d bytes, read the echo, close; latency from dial to echo. More than %.1f%% failed connections fails the run.\n", connWorkers, connReqSize, 100*connErrTolerance)
	w("- **RSS KiB/idle conn** is measured last, on a pair that has already carried the bulk, download, rr and new-connection tests (a connection-slot or memory leak would not show on a fresh pair; any failed idle connection fails the run): ")
	w("VmRSS of A+B (`/proc/<pid>/status`), then %d connections opened with one %d-byte round trip each (established end to end), 1 s settle, VmRSS again; (after − before) / %d. ", o.idleConns, idleReqSize, o.idleConns)
	w("Heap the earlier tests freed but the runtime kept can be reused here, so this can read lower than on a fresh pair.\n")
	w("- Ratios are strait's value divided by the other's: above 1 is better for Gbit/s, ops/s and conns/s, worse for latency, CPU and RSS.\n")
	w("- The load generator, backend, agent and both proxies share the %d cores; numbers are relative to this machine and its load. Load average (1/5/15 min) as each round started: ", r.cores)
	var loads []string
	for i, l := range r.roundLoads {
		loads = append(loads, fmt.Sprintf("round %d %s", i+1, l))
	}
	w("%s.\n", strings.Join(loads, "; "))
	for _, out := range r.results {
		if n := countMeasured(out); out.skipped == "" && n > 0 && n < o.rounds {
			w("- **%s**: medians over the %d of %d rounds that produced a measure.\n", out.label, n, o.rounds)
		}
		for _, res := range out.rounds {
			p := res.prefix(o.rounds)
			if res.setupErr != nil {
				opt := ""
				if res.optional {
					opt = " (optional topology: does not fail the run)"
				}
				w("- **%s** %ssetup failed%s: %s\n", res.label, p, opt, firstLine(res.setupErr.Error()))
			}
			for _, f := range res.failures {
				w("- **%s FAILED**: %s%s\n", res.label, p, firstLine(f))
			}
			for _, n := range res.notes {
				w("- %s: %s%s\n", res.label, p, n)
			}
		}
	}
	return b.String()
}

// countMeasured is the number of rounds of out with any measure.
func countMeasured(out *outcome) int {
	n := 0
	for _, res := range out.rounds {
		if len(res.m) > 0 {
			n++
		}
	}
	return n
}

// firstLine drops the log excerpt some errors carry (it is on stderr).
func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return strings.TrimSuffix(line, "; last log lines:")
}
