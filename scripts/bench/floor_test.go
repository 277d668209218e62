package main

import (
	"strings"
	"testing"
	"time"
)

func TestSealOpenPerGB(t *testing.T) {
	v, err := sealOpenPerGB(50 * time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	// AES-GCM runs at 0.5-10 GB/s per core on anything that runs Go.
	if v < 0.05 || v > 5 {
		t.Fatalf("seal+open %.3f s/GB, outside any plausible range", v)
	}
}

func TestFloorSection(t *testing.T) {
	out := func(name, label string, cpu ...float64) *outcome {
		o := &outcome{name: name, label: label}
		for i, v := range cpu {
			r := &result{name: name, round: i + 1}
			r.set("cpu_per_gb", v)
			o.rounds = append(o.rounds, r)
		}
		o.aggregate()
		return o
	}
	r := &report{o: &options{rounds: 3}, crypto: []float64{0.3, 0.2, 0.4}}
	if got := r.floorSection(); got != "" {
		t.Fatalf("no copy relay measured: want no section, got %q", got)
	}
	r.results = []*outcome{out("strait", "strait pair", 1.5, 1.4, 1.6), out("relay-copy", "copy relay pair", 0.9, 0.8, 1.0)}
	got := r.floorSection()
	for _, want := range []string{"| **floor** | **1.20** |", "| strait pair | 1.50 = 1.25× the floor |", "| seal + open | 0.30 (0.20–0.40) |"} {
		if !strings.Contains(got, want) {
			t.Errorf("floor section lacks %q:\n%s", want, got)
		}
	}
}
