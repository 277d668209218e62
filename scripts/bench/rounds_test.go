package main

import (
	"strings"
	"testing"
)

func TestSummarize(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		in   []float64
		want stats
	}{
		{[]float64{4}, stats{med: 4, lo: 4, hi: 4, n: 1}},
		{[]float64{6.5, 5.9}, stats{med: 6.2, lo: 5.9, hi: 6.5, n: 2}},
		{[]float64{6.5, 5.9, 6.23}, stats{med: 6.23, lo: 5.9, hi: 6.5, n: 3}},
		{[]float64{1, 100, 2, 3}, stats{med: 2.5, lo: 1, hi: 100, n: 4}},
		{[]float64{3, 1, 2, 5, 4}, stats{med: 3, lo: 1, hi: 5, n: 5}},
	} {
		in := append([]float64(nil), tc.in...)
		got := summarize(tc.in)
		if d := got.med - tc.want.med; d > 1e-9 || d < -1e-9 || got.lo != tc.want.lo || got.hi != tc.want.hi || got.n != tc.want.n {
			t.Errorf("summarize(%v) = %+v, want %+v", in, got, tc.want)
		}
		for i := range in {
			if tc.in[i] != in[i] {
				t.Fatalf("summarize sorted its input: %v, was %v", tc.in, in)
			}
		}
	}
}

func TestOverlapsAndRatioCell(t *testing.T) {
	t.Parallel()
	a := stats{med: 6.2, lo: 5.9, hi: 6.5}
	for _, tc := range []struct {
		b       stats
		overlap bool
	}{
		{stats{med: 7, lo: 6.6, hi: 7.4}, false},  // above
		{stats{med: 5, lo: 4.5, hi: 5.8}, false},  // below
		{stats{med: 7, lo: 6.5, hi: 7.4}, true},   // touching
		{stats{med: 6.1, lo: 6.0, hi: 6.2}, true}, // inside
		{stats{med: 6, lo: 1, hi: 10}, true},      // around
	} {
		if got := a.overlaps(tc.b); got != tc.overlap {
			t.Errorf("%+v overlaps %+v = %v, want %v", a, tc.b, got, tc.overlap)
		}
		if got := tc.b.overlaps(a); got != tc.overlap {
			t.Errorf("overlaps is not symmetric for %+v, %+v", a, tc.b)
		}
		cell := ratioCell(a, tc.b, true)
		if strings.HasPrefix(cell, "≈") != tc.overlap {
			t.Errorf("ratioCell(%+v, %+v) = %q: ≈ should be %v", a, tc.b, cell, tc.overlap)
		}
	}
	// The ratio is of the medians; without rounds to judge, no marker.
	if got := ratioCell(stats{med: 3, lo: 1, hi: 9}, stats{med: 2, lo: 1, hi: 9}, false); got != "1.50×" {
		t.Errorf("ratioCell unjudged = %q, want 1.50×", got)
	}
	if got := ratioCell(stats{med: 3, lo: 1, hi: 9}, stats{med: 2, lo: 1, hi: 9}, true); got != "≈1.50×" {
		t.Errorf("ratioCell judged = %q, want ≈1.50×", got)
	}
}

func TestRangeCell(t *testing.T) {
	t.Parallel()
	if got := (stats{lo: 5.9, hi: 6.5}).rangeCell(f2); got != "5.90–6.50" {
		t.Errorf("range = %q", got)
	}
	if got := (stats{lo: 6.501, hi: 6.499}).rangeCell(f2); got != "6.50" {
		t.Errorf("a range that formats to one value = %q, want 6.50", got)
	}
}

// TestReportMediansAndNoise renders a two-topology, three-round report and
// checks that the main table shows medians, the range table min–max, and
// the ratio row the ratio of the medians, marked ≈ only where the ranges
// overlap.
func TestReportMediansAndNoise(t *testing.T) {
	t.Parallel()
	round := func(name string, n int, bulk1, rr1 float64) *result {
		r := &result{name: name, label: name + " pair", round: n}
		r.set("bulk1", bulk1)
		r.set("rr1", rr1)
		return r
	}
	strait := &outcome{name: "strait", label: "strait pair", rounds: []*result{
		round("strait", 1, 6.5, 5000), round("strait", 2, 5.9, 6000), round("strait", 3, 6.2, 7000),
	}}
	builtin := &outcome{name: "builtin", label: "builtin pair", rounds: []*result{
		round("builtin", 1, 7.4, 5500), round("builtin", 2, 7.0, 6500), round("builtin", 3, 6.6, 6000),
	}}
	skipped := &outcome{name: "haproxy", label: "HAProxy mTLS pair", skipped: "haproxy not installed"}
	rep := &report{o: &options{rounds: 3}, results: []*outcome{strait, builtin, skipped}}
	rep.finish()
	cols := []column{
		{key: "bulk1", head: "bulk", format: f2, ratio: true},
		{key: "rr1", head: "rr", format: f0, ratio: true},
	}

	rows := tableRows(t, rep.table(cols))
	want := [][]string{
		{"topology", "bulk", "rr"},
		{"strait pair", "6.20", "6000"},
		{"builtin pair", "7.00", "6000"},
		{"HAProxy mTLS pair (skipped: haproxy not installed)", "", ""},
		{"*strait / built-in*", "0.89×", "≈1.00×"},
	}
	checkRows(t, "medians", rows, want)

	rows = tableRows(t, rep.rangeTable(cols))
	want = [][]string{
		{"topology", "bulk", "rr"},
		{"strait pair", "5.90–6.50", "5000–7000"},
		{"builtin pair", "6.60–7.40", "5500–6500"},
		{"HAProxy mTLS pair (skipped: haproxy not installed)", "", ""},
	}
	checkRows(t, "ranges", rows, want)

	// One round: no spread to judge, so no ≈ even where values are equal.
	one := &report{o: &options{rounds: 1}, results: []*outcome{
		{name: "strait", label: "strait pair", rounds: []*result{round("strait", 1, 7, 6000)}},
		{name: "builtin", label: "builtin pair", rounds: []*result{round("builtin", 1, 7, 6000)}},
	}}
	one.finish()
	rows = tableRows(t, one.table(cols))
	checkRows(t, "one round", rows[3:], [][]string{{"*strait / built-in*", "1.00×", "1.00×"}})
}

func TestReportFailedRounds(t *testing.T) {
	t.Parallel()
	ok := &result{name: "haproxy", label: "HAProxy", round: 2, optional: true}
	ok.set("bulk1", 5)
	out := &outcome{name: "haproxy", label: "HAProxy", rounds: []*result{
		{name: "haproxy", label: "HAProxy", round: 1, optional: true, setupErr: errString("boom")}, ok,
	}}
	never := &outcome{name: "builtin", label: "built-in", rounds: []*result{
		{name: "builtin", label: "built-in", round: 1, setupErr: errString("no agent")},
	}}
	rep := &report{o: &options{rounds: 2}, results: []*outcome{out, never}}
	rep.finish()
	rows := tableRows(t, rep.table([]column{{key: "bulk1", head: "bulk", format: f2, ratio: true}}))
	checkRows(t, "failed rounds", rows, [][]string{
		{"topology", "bulk"},
		{"HAProxy", "5.00"},
		{"built-in (setup failed, see notes)", ""},
	})
	fails := rep.failures()
	if len(fails) != 1 || fails[0] != "built-in: round 1: setup: no agent" {
		t.Errorf("failures = %q, want only the built-in's setup (HAProxy is optional)", fails)
	}
	if n := countMeasured(out); n != 1 {
		t.Errorf("countMeasured = %d, want 1", n)
	}
}

type errString string

func (e errString) Error() string { return string(e) }

// tableRows parses a rendered markdown table into trimmed cells, dropping
// the separator line.
func tableRows(t *testing.T, md string) [][]string {
	t.Helper()
	var rows [][]string
	for i, line := range strings.Split(strings.TrimSpace(md), "\n") {
		if i == 1 {
			continue
		}
		cells := strings.Split(strings.Trim(line, "|"), "|")
		for j := range cells {
			cells[j] = strings.TrimSpace(cells[j])
		}
		rows = append(rows, cells)
	}
	return rows
}

func checkRows(t *testing.T, what string, got, want [][]string) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d rows, want %d:\n%q", what, len(got), len(want), got)
	}
	for i := range want {
		if strings.Join(got[i], "|") != strings.Join(want[i], "|") {
			t.Errorf("%s row %d = %q, want %q", what, i, got[i], want[i])
		}
	}
}
