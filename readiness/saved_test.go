package readiness

import (
	"math/rand/v2"
	"reflect"
	"testing"
)

// TestSavedRoundTrip: what MarshalBinary writes decodes to the same confirmations; a file
// cut anywhere, with a byte more, of another version, or with IDs out of order does not.
func TestSavedRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for n := range 50 {
		s := Saved{Self: K(r.Uint64()), In: map[uint32]K{}, Out: map[uint32]K{}}
		for range r.IntN(n*20 + 1) {
			s.In[r.Uint32()] = K(r.Uint64())
		}
		for range r.IntN(n*20 + 1) {
			s.Out[r.Uint32N(1000)] = K(r.Uint64())
		}
		b, err := s.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		var got Saved
		if err := got.UnmarshalBinary(b); err != nil || !reflect.DeepEqual(got, s) {
			t.Fatalf("round trip %d: %v, %+v", n, err, got)
		}
		if n%10 != 0 {
			continue
		}
		for cut := range len(b) {
			if err := new(Saved).UnmarshalBinary(b[:cut]); err == nil {
				t.Fatalf("cut at %d of %d decoded", cut, len(b))
			}
		}
		if err := new(Saved).UnmarshalBinary(append(b[:len(b):len(b)], 0)); err == nil {
			t.Fatal("a byte after the end decoded")
		}
	}
	v2 := []byte("secureoverlay-readiness-saved v2\n\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00")
	if err := new(Saved).UnmarshalBinary(v2); err == nil {
		t.Error("another version decoded")
	}
	// Two In peers, the second ID not above the first.
	bad := append([]byte(savedMagic), 0, 0, 0, 0, 0, 0, 0, 1, 2, 5, 0, 0, 0, 0, 0, 0, 0, 9, 5, 0, 0, 0, 0, 0, 0, 0, 9, 0)
	if err := new(Saved).UnmarshalBinary(bad); err == nil {
		t.Error("IDs out of order decoded")
	}
}

// TestSaveRestore: an agent's confirmations, saved and restored into a new agent with the
// same key view, answer every pair as before; a peer re-keyed since is not confirmed by
// them; a save made with other keys of this node is not taken. Changes counts only new
// values.
func TestSaveRestore(t *testing.T) {
	mine := Keys{1: 11, 2: 22, 3: 33, 4: 44, 5: 55}
	var a Agent
	a.ID = 1
	if !a.Consider(View{Keys: mine.Digest(nil), NotIn: []uint32{3}, NotOut: []uint32{3, 4}}, mine) {
		t.Fatal("view not taken")
	}
	c := a.Changes()
	if c != 5 { // in: 2, 4, 5; out: 2, 5
		t.Fatalf("changes %d after one view confirming 3 in and 2 out", c)
	}
	a.Consider(View{Keys: mine.Digest(nil), NotIn: []uint32{3}, NotOut: []uint32{3, 4}}, mine)
	if a.Changes() != c {
		t.Errorf("the same view again changed %d confirmations", a.Changes()-c)
	}
	answers := func(x *Agent, ks Keys) (in, out [6]bool) {
		for id := uint32(2); id <= 5; id++ {
			in[id], out[id] = x.SendESP(id, ks), x.DropPlaintext(id, ks)
		}
		return in, out
	}
	wantIn, wantOut := answers(&a, mine)
	if wantIn != [6]bool{false, false, true, false, true, true} || wantOut != [6]bool{false, false, true, false, false, true} {
		t.Fatalf("before the save: in %v out %v", wantIn, wantOut)
	}
	s := a.Save(mine)
	b, _ := s.MarshalBinary()
	var loaded Saved
	if err := loaded.UnmarshalBinary(b); err != nil {
		t.Fatal(err)
	}

	for id := uint32(2); id <= 5; id++ {
		if s.SendESP(1, id, mine) != wantIn[id] || s.DropPlaintext(1, id, mine) != wantOut[id] {
			t.Errorf("the saved set answers peer %d in %v out %v, the agent %v %v", id, s.SendESP(1, id, mine), s.DropPlaintext(1, id, mine), wantIn[id], wantOut[id])
		}
	}

	restored := Agent{ID: 1}
	if !restored.Restore(loaded, mine) {
		t.Fatal("a save of this node's keys not taken")
	}
	if in, out := answers(&restored, mine); in != wantIn || out != wantOut {
		t.Errorf("restored: in %v out %v, want %v %v", in, out, wantIn, wantOut)
	}

	rekeyed := mine.Clone()
	rekeyed[5] = 56
	later := Agent{ID: 1}
	later.Restore(loaded, rekeyed)
	if loaded.SendESP(1, 5, rekeyed) || loaded.DropPlaintext(1, 5, rekeyed) || !loaded.SendESP(1, 2, rekeyed) {
		t.Error("the saved set confirms peer 5's new K, or no longer peer 2's")
	}
	if later.SendESP(5, rekeyed) || later.DropPlaintext(5, rekeyed) || !later.SendESP(2, rekeyed) {
		t.Errorf("peer 5 re-keyed: in %v out %v (want false), peer 2 in %v (want true)",
			later.SendESP(5, rekeyed), later.DropPlaintext(5, rekeyed), later.SendESP(2, rekeyed))
	}
	if s := later.Save(rekeyed); len(s.In) != 2 || len(s.Out) != 1 {
		t.Errorf("a save after peer 5 re-keyed keeps %d in, %d out (want 2, 1: only what holds)", len(s.In), len(s.Out))
	}

	self := mine.Clone()
	self[1] = 12 // this node re-keyed: nothing it confirmed holds
	other := Agent{ID: 1}
	if other.Restore(loaded, self) || other.SendESP(2, self) || other.Changes() != 0 {
		t.Error("a save of this node's earlier keys was taken")
	}
	if loaded.SendESP(1, 2, self) || loaded.DropPlaintext(1, 2, self) {
		t.Error("the saved set answers for this node's other keys")
	}
	if s := a.Save(self); len(s.In)+len(s.Out) != 0 {
		t.Errorf("saving for other keys of this node kept %d confirmations", len(s.In)+len(s.Out))
	}
}
