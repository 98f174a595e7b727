// Package budget computes the MTU budget of a pod (and of Calico's IPIP tunnel)
// when the node's IPIP traffic is carried in ESP transport mode with AES-GCM.
//
// ESP transport mode on an IPIP packet puts on the wire
//
//	20 (outer IPv4) + 8 (SPI+seq) + 8 (IV) + ALIGN4(inner + 2) + ICV
//
// where inner is the pod's IP packet (at most the pod/tunnel MTU), the 2 bytes are the
// ESP trailer (pad length, next header) and ALIGN4 is the 4-byte alignment that
// rfc4106(gcm(aes)) imposes on the encrypted payload. Three rules follow:
//
//   - Documented: the product documentation's rule EXTMTU - 46 - ((EXTMTU - 46) mod 4),
//     i.e. a fixed 26-byte ESP overhead (an 8-byte ICV) plus the 20-byte IPIP header.
//   - KernelExact: the largest inner size the kernel lets through without fragmenting
//     (esp4_get_mtu minus the IPIP header): ((EXTMTU - 36 - ICV) &^ 3) - 2.
//   - Budget: the minimum of the two. The documented rule overruns the wire by 1 or 2
//     bytes when EXTMTU mod 4 is 3 or 2 (1450 → 1404, the kernel allows 1402), and is
//     too generous for 12- and 16-byte ICVs; the kernel-exact rule alone would exceed
//     what the documentation promises operators (1500 → 1454 instead of 1452).
//
// The node's EXTMTU is the smallest MTU among its up external links (SmallestMTU, pure);
// Links and DetectExternalMTU are the thin netlink shell that feeds it.
//
// Invariants: every function except Links and DetectExternalMTU is pure; inputs outside the supported range (EXTMTU not in
// [MinExternalMTU, MaxExternalMTU], ICV not 8, 12 or 16) yield an error, never a
// negative or otherwise meaningless number; for every accepted input,
// WireSize(Budget) <= EXTMTU < WireSize(Budget+4).
package budget

import (
	"fmt"
)

// Limits on the external MTU we accept. 576 is the minimum IPv4 datagram every host must
// accept (RFC 791); 65535 is the largest IPv4 total length.
const (
	MinExternalMTU = 576
	MaxExternalMTU = 65535
)

// DefaultICV is the default AES-GCM integrity check value length in bytes; it matches the
// documented 26-byte ESP overhead.
const DefaultICV = 8

// Fixed parts of the wire size.
const (
	outerIPv4  = 20 // the IPIP header, which stays the outer header in transport mode
	espHeader  = 8  // SPI + sequence number
	gcmIV      = 8  // explicit IV of rfc4106
	espTrailer = 2  // pad length + next header
)

// ValidICV reports whether icv is a supported AES-GCM ICV length (8, 12 or 16 bytes).
func ValidICV(icv int) bool {
	return icv == 8 || icv == 12 || icv == 16
}

func checkExternal(ext int) error {
	if ext < MinExternalMTU || ext > MaxExternalMTU {
		return fmt.Errorf("external mtu %d out of range [%d, %d]", ext, MinExternalMTU, MaxExternalMTU)
	}
	return nil
}

func checkICV(icv int) error {
	if !ValidICV(icv) {
		return fmt.Errorf("icv length %d bytes unsupported (want 8, 12 or 16)", icv)
	}
	return nil
}

// Documented returns the product documentation's limit for the IPIP tunnel (and pod) MTU:
// EXTMTU - 46 - ((EXTMTU - 46) mod 4).
func Documented(ext int) (int, error) {
	if err := checkExternal(ext); err != nil {
		return 0, err
	}
	return ext - 46 - ((ext - 46) % 4), nil
}

// KernelExact returns the largest pod/tunnel MTU whose ESP packets fit in ext bytes with
// the given ICV length: ((EXTMTU - 36 - ICV) &^ 3) - 2.
func KernelExact(ext, icv int) (int, error) {
	if err := checkExternal(ext); err != nil {
		return 0, err
	}
	if err := checkICV(icv); err != nil {
		return 0, err
	}
	return ((ext - outerIPv4 - espHeader - gcmIV - icv) &^ 3) - espTrailer, nil
}

// Budget returns the enforced pod/tunnel MTU budget: min(Documented, KernelExact).
func Budget(ext, icv int) (int, error) {
	doc, err := Documented(ext)
	if err != nil {
		return 0, err
	}
	exact, err := KernelExact(ext, icv)
	if err != nil {
		return 0, err
	}
	return min(doc, exact), nil
}

// WireSize returns the size on the wire of the ESP packet carrying one pod packet of
// inner bytes through the IPIP tunnel: 20 + 8 + 8 + ALIGN4(inner+2) + ICV.
// It does not validate its inputs; it is the reference the rules above are proved against.
func WireSize(inner, icv int) int {
	return outerIPv4 + espHeader + gcmIV + align4(inner+espTrailer) + icv
}

func align4(n int) int {
	return (n + 3) &^ 3
}
