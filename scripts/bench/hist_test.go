package main

import (
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

func TestBucketRoundTrip(t *testing.T) {
	for _, v := range []uint64{0, 1, 127, 128, 255, 256, 257, 1000, 123456, 1 << 40, 1<<62 + 12345} {
		i := bucketOf(v)
		lo, hi := bucketLow(i), bucketLow(i+1)
		if v < lo || v >= hi {
			t.Errorf("value %d in bucket %d = [%d, %d)", v, i, lo, hi)
		}
	}
	for i := 1; i < 40<<subBits; i++ {
		if bucketLow(i) <= bucketLow(i-1) {
			t.Fatalf("bucket bounds not increasing at %d", i)
		}
		if bucketOf(bucketLow(i)) != i {
			t.Fatalf("bucketOf(bucketLow(%d)) = %d", i, bucketOf(bucketLow(i)))
		}
	}
}

func TestQuantileAccuracy(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	var h, a, b hist
	var samples []time.Duration
	for i := range 100000 {
		d := time.Duration(r.ExpFloat64() * float64(80*time.Microsecond))
		samples = append(samples, d)
		if i%2 == 0 {
			a.record(d)
		} else {
			b.record(d)
		}
	}
	h.merge(&a)
	h.merge(&b)
	slices.Sort(samples)
	for _, q := range []float64{0.5, 0.9, 0.99, 0.999} {
		want := samples[int(q*float64(len(samples)))-1]
		got := h.quantile(q)
		if diff := float64(got-want) / float64(want); diff > 0.01 || diff < -0.01 {
			t.Errorf("q%.3f = %v, exact %v (%.2f%% off)", q, got, want, 100*diff)
		}
	}
	if h.quantile(1) != slices.Max(samples) {
		t.Errorf("q1 = %v, max %v", h.quantile(1), slices.Max(samples))
	}
}
