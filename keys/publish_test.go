package keys

import (
	"slices"
	"testing"
)

func TestPublishedGenerations(t *testing.T) {
	ring := func(last uint32, gens ...State) *Ring {
		r := NewRing()
		r.LastGeneration = last
		for i, s := range gens {
			r.Generations = append(r.Generations, Generation{Number: last - uint32(len(gens)-1-i), State: s})
		}
		return r
	}
	for _, tc := range []struct {
		name string
		r    *Ring
		want []uint32
	}{
		{"no ring yet", nil, nil},
		{"never enabled", ring(0), []uint32{1}},
		{"one active v1 generation", ring(3, StateActive), []uint32{4}},
		{"rotation in flight (v1 pending)", ring(5, StateActive, StatePending), []uint32{6}},
		{"retiring, active, pending", ring(9, StateRetiring, StateActive, StatePending), []uint32{10}},
		{"disabled: generations gone, numbers kept", ring(12), []uint32{13}},
		{"last number: nothing after it", ring(^uint32(0)), nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := PublishedGenerations(tc.r)
			if !slices.Equal(got, tc.want) {
				t.Fatalf("PublishedGenerations = %v, want %v", got, tc.want)
			}
			if len(got) > MaxPublishedKeys || !slices.IsSorted(got) {
				t.Fatalf("%v: more than %d or not ascending", got, MaxPublishedKeys)
			}
		})
	}
}
