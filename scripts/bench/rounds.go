package main

import (
	"fmt"
	"slices"
)

// stats is one measure over the rounds: the median and the range.
type stats struct {
	med, lo, hi float64
	n           int // rounds that produced the measure
}

// summarize returns the median (the mean of the two middle values for an
// even count) and min–max of vs, which must not be empty.
func summarize(vs []float64) stats {
	s := slices.Clone(vs)
	slices.Sort(s)
	n := len(s)
	med := s[n/2]
	if n%2 == 0 {
		med = (s[n/2-1] + s[n/2]) / 2
	}
	return stats{med: med, lo: s[0], hi: s[n-1], n: n}
}

// overlaps reports whether the two ranges share a value: the difference
// between the medians is then inside the run's noise.
func (s stats) overlaps(o stats) bool { return s.lo <= o.hi && o.lo <= s.hi }

// rangeCell formats the range as "lo–hi", or the single value when the
// range is a point.
func (s stats) rangeCell(format func(float64) string) string {
	lo, hi := format(s.lo), format(s.hi)
	if lo == hi {
		return lo
	}
	return lo + "–" + hi
}

// ratioCell formats num's median over den's. With judge set (more than one
// round), a ratio whose two ranges overlap is marked "≈": the difference
// is inside the noise.
func ratioCell(num, den stats, judge bool) string {
	cell := fmt.Sprintf("%.2f×", num.med/den.med)
	if judge && num.overlaps(den) {
		cell = "≈" + cell
	}
	return cell
}

// outcome is one topology over all rounds: each round's result, and the
// per-measure stats over the rounds that produced the measure.
type outcome struct {
	name, label string
	skipped     string // reason the topology did not run (not a failure)
	rounds      []*result
	agg         map[string]stats
}

// aggregate fills agg from the rounds' measures.
func (o *outcome) aggregate() {
	vals := map[string][]float64{}
	for _, r := range o.rounds {
		for k, v := range r.m {
			vals[k] = append(vals[k], v)
		}
	}
	o.agg = make(map[string]stats, len(vals))
	for k, vs := range vals {
		o.agg[k] = summarize(vs)
	}
}

// measured reports whether any round produced a measure.
func (o *outcome) measured() bool { return len(o.agg) > 0 }
