package budget

import (
	"regexp"
	"strings"
	"testing"
)

func TestDefaultPatternMatchesCalico(t *testing.T) {
	match := []string{"eth0", "eth1.100", "ens5", "enp0s3", "eno1", "enP2p1s0", "ensx1", "wlan0", "wlp2s0", "wwan0", "wwp0s20", "ibp1s0", "slc0"}
	noMatch := []string{"lo", "cali12345", "tunl0", "docker0", "veth1a2b", "en0", "enz0", "bond0", "br0", "vxlan.calico", "xeth0", "ib", "ib0", "wl0"}
	re := regexp.MustCompile(DefaultInterfacePattern)
	for _, n := range match {
		if !re.MatchString(n) {
			t.Errorf("default pattern does not match %q", n)
		}
	}
	for _, n := range noMatch {
		if re.MatchString(n) {
			t.Errorf("default pattern matches %q", n)
		}
	}
}

func TestUsable(t *testing.T) {
	cases := []struct {
		l    LinkInfo
		want bool
	}{
		{LinkInfo{OperState: OperUp, AdminUp: true, LowerUp: true}, true},
		{LinkInfo{OperState: OperUnknown, AdminUp: true, LowerUp: true}, true},
		{LinkInfo{OperState: OperUnknown, AdminUp: true, LowerUp: false}, false},
		{LinkInfo{OperState: OperUnknown, AdminUp: false, LowerUp: false}, false},
		{LinkInfo{OperState: "down", AdminUp: true}, false},
		{LinkInfo{OperState: "lower-layer-down", AdminUp: true}, false},
		{LinkInfo{OperState: "dormant", AdminUp: true, LowerUp: true}, false},
		{LinkInfo{OperState: "testing", AdminUp: true, LowerUp: true}, false},
		{LinkInfo{OperState: "not-present"}, false},
	}
	for _, c := range cases {
		if got := c.l.Usable(); got != c.want {
			t.Errorf("%+v.Usable() = %v, want %v", c.l, got, c.want)
		}
	}
}

func TestSmallestMTU(t *testing.T) {
	up := func(name string, mtu int) LinkInfo {
		return LinkInfo{Name: name, MTU: mtu, OperState: OperUp, AdminUp: true, LowerUp: true}
	}
	links := []LinkInfo{
		{Name: "lo", MTU: 65536, OperState: OperUnknown, AdminUp: true, LowerUp: true},
		up("eth0", 1500),
		up("ens5", 1450),
		{Name: "eth1", MTU: 1300, OperState: "down", AdminUp: true},
		up("cali1", 1000),
		{Name: "eth9", MTU: 1460, OperState: OperUnknown, AdminUp: true, LowerUp: true},
		up("enp1s0", 1450), // tie with ens5: the name sorting first wins
	}
	mtu, name, err := SmallestMTU(links, nil)
	if err != nil || mtu != 1450 || name != "enp1s0" {
		t.Fatalf("SmallestMTU(default) = %d %q %v; want 1450 enp1s0", mtu, name, err)
	}
	mtu, name, err = SmallestMTU(links, regexp.MustCompile(`^cali`))
	if err != nil || mtu != 1000 || name != "cali1" {
		t.Fatalf("SmallestMTU(^cali) = %d %q %v; want 1000 cali1", mtu, name, err)
	}
	mtu, _, err = SmallestMTU(links, regexp.MustCompile(`^eth9$`))
	if err != nil || mtu != 1460 {
		t.Fatalf("SmallestMTU(^eth9$) = %d %v; want 1460 (unknown with carrier counts)", mtu, err)
	}
	_, _, err = SmallestMTU(links, regexp.MustCompile(`^eth1$`))
	if err == nil || !strings.Contains(err.Error(), "eth1(down)") {
		t.Fatalf("SmallestMTU(^eth1$) error = %v; want it to name eth1(down)", err)
	}
	if _, _, err := SmallestMTU(nil, nil); err == nil {
		t.Fatal("SmallestMTU(no links) succeeded")
	}
}

func TestCompilePattern(t *testing.T) {
	re, err := CompilePattern("")
	if err != nil || re.String() != DefaultInterfacePattern {
		t.Fatalf("CompilePattern(\"\") = %v, %v", re, err)
	}
	if _, err := CompilePattern("^(eth"); err == nil || !strings.Contains(err.Error(), `"^(eth"`) {
		t.Fatalf("CompilePattern(bad) error = %v", err)
	}
}
