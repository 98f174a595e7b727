package budget

import (
	"strings"
	"testing"
)

func TestBudgetTable(t *testing.T) {
	cases := []struct {
		ext, icv              int
		documented, exact, bu int
	}{
		{1500, 8, 1452, 1454, 1452},  // documented is the tighter one
		{1450, 8, 1404, 1402, 1402},  // documented overruns by 2: not 1404
		{1499, 8, 1452, 1450, 1450},  // mod 4 = 3: documented overruns by 1
		{1498, 8, 1452, 1450, 1450},  // mod 4 = 2
		{1497, 8, 1448, 1450, 1448},  // mod 4 = 1: documented safe
		{9001, 8, 8952, 8954, 8952},  // jumbo (AWS)
		{9000, 8, 8952, 8954, 8952},  // jumbo
		{1460, 8, 1412, 1414, 1412},  // GCE
		{1500, 12, 1452, 1450, 1450}, // ICV 12
		{1500, 16, 1452, 1446, 1446}, // ICV 16
		{1450, 16, 1404, 1394, 1394},
		{576, 8, 528, 530, 528},
		{576, 16, 528, 522, 522},
		{65535, 8, 65488, 65486, 65486},
	}
	for _, c := range cases {
		doc, err := Documented(c.ext)
		if err != nil || doc != c.documented {
			t.Errorf("Documented(%d) = %d, %v; want %d", c.ext, doc, err, c.documented)
		}
		exact, err := KernelExact(c.ext, c.icv)
		if err != nil || exact != c.exact {
			t.Errorf("KernelExact(%d, %d) = %d, %v; want %d", c.ext, c.icv, exact, err, c.exact)
		}
		b, err := Budget(c.ext, c.icv)
		if err != nil || b != c.bu {
			t.Errorf("Budget(%d, %d) = %d, %v; want %d", c.ext, c.icv, b, err, c.bu)
		}
	}
}

func TestRejectsNonsense(t *testing.T) {
	cases := []struct {
		ext, icv int
		want     string
	}{
		{575, 8, "external mtu 575 out of range"},
		{0, 8, "external mtu 0 out of range"},
		{-1500, 8, "external mtu -1500 out of range"},
		{65536, 8, "external mtu 65536 out of range"},
		{1500, 0, "icv length 0 bytes unsupported"},
		{1500, 4, "icv length 4 bytes unsupported"},
		{1500, 10, "icv length 10 bytes unsupported"},
		{1500, 32, "icv length 32 bytes unsupported"},
	}
	for _, c := range cases {
		b, err := Budget(c.ext, c.icv)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Budget(%d, %d) = %d, %v; want error containing %q", c.ext, c.icv, b, err, c.want)
		}
		if b != 0 {
			t.Errorf("Budget(%d, %d) returned %d alongside an error", c.ext, c.icv, b)
		}
		if _, err := KernelExact(c.ext, c.icv); err == nil {
			t.Errorf("KernelExact(%d, %d) accepted nonsense", c.ext, c.icv)
		}
	}
	if _, err := Documented(575); err == nil {
		t.Error("Documented(575) accepted an external mtu below 576")
	}
	if _, err := Documented(65536); err == nil {
		t.Error("Documented(65536) accepted an external mtu above 65535")
	}
}

// TestWireSizeProof recomputes the ESP wire size for every external MTU in 576..9216 and
// every ICV and proves: the budget fits, budget+4 does not (so the budget wastes less than
// one alignment unit), KernelExact is exactly the largest fitting inner size, and the
// documented rule fits precisely when EXTMTU mod 4 is 0 or 1 with an 8-byte ICV.
func TestWireSizeProof(t *testing.T) {
	for _, icv := range []int{8, 12, 16} {
		for ext := 576; ext <= 9216; ext++ {
			b, err := Budget(ext, icv)
			if err != nil {
				t.Fatalf("Budget(%d, %d): %v", ext, icv, err)
			}
			if w := WireSize(b, icv); w > ext {
				t.Fatalf("ext=%d icv=%d: budget %d puts %d bytes on the wire", ext, icv, b, w)
			}
			if w := WireSize(b+4, icv); w <= ext {
				t.Fatalf("ext=%d icv=%d: budget+4=%d still fits (%d bytes): budget too small", ext, icv, b+4, w)
			}

			// Brute force the largest inner size that fits and compare with KernelExact.
			largest := 0
			for inner := 1; WireSize(inner, icv) <= ext; inner++ {
				largest = inner
			}
			exact, _ := KernelExact(ext, icv)
			if exact != largest {
				t.Fatalf("ext=%d icv=%d: KernelExact=%d, brute force largest=%d", ext, icv, exact, largest)
			}

			doc, _ := Documented(ext)
			docFits := WireSize(doc, icv) <= ext
			if icv == 8 {
				wantFits := ext%4 == 0 || ext%4 == 1
				if docFits != wantFits {
					t.Fatalf("ext=%d: documented %d fits=%v, want %v", ext, doc, docFits, wantFits)
				}
			}
			if b > doc {
				t.Fatalf("ext=%d icv=%d: budget %d exceeds documented %d", ext, icv, b, doc)
			}
		}
	}
}

func TestValidICV(t *testing.T) {
	for icv := -1; icv <= 32; icv++ {
		want := icv == 8 || icv == 12 || icv == 16
		if ValidICV(icv) != want {
			t.Errorf("ValidICV(%d) = %v", icv, !want)
		}
	}
}
