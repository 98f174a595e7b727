package agent

import (
	"strings"
	"testing"
)

// sampleXfrmStat is /proc/net/xfrm_stat as a 6.1 kernel prints it (values changed).
const sampleXfrmStat = `XfrmInError                     	0
XfrmInBufferError               	0
XfrmInHdrError                  	0
XfrmInNoStates                  	17
XfrmInStateProtoError           	2
XfrmInStateModeError            	0
XfrmInStateSeqError             	0
XfrmInStateExpired              	0
XfrmInStateMismatch             	0
XfrmInStateInvalid              	0
XfrmInTmplMismatch              	5
XfrmInNoPols                    	0
XfrmInPolBlock                  	0
XfrmInPolError                  	0
XfrmOutError                    	0
XfrmOutBundleGenError           	0
XfrmOutBundleCheckError         	0
XfrmOutNoStates                 	18446744073709551615
XfrmOutStateProtoError          	0
XfrmOutStateModeError           	0
XfrmOutStateSeqError            	0
XfrmOutStateExpired             	0
XfrmOutPolBlock                 	0
XfrmOutPolDead                  	0
XfrmOutPolError                 	0
XfrmFwdHdrError                 	0
XfrmOutStateInvalid             	0
XfrmAcquireError                	0
`

func TestParseXfrmStatSample(t *testing.T) {
	got, err := ParseXfrmStat(strings.NewReader(sampleXfrmStat))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 28 {
		t.Fatalf("parsed %d counters, want 28", len(got))
	}
	want := map[string]uint64{"XfrmInNoStates": 17, "XfrmInStateProtoError": 2, "XfrmInTmplMismatch": 5,
		"XfrmOutNoStates": 18446744073709551615, "XfrmInError": 0, "XfrmAcquireError": 0}
	byName := map[string]uint64{}
	for _, s := range got {
		byName[s.Name] = s.Value
	}
	for n, v := range want {
		if g, ok := byName[n]; !ok || g != v {
			t.Errorf("%s = %d (present %v), want %d", n, g, ok, v)
		}
	}
	if got[0].Name != "XfrmInError" || got[27].Name != "XfrmAcquireError" {
		t.Errorf("order not kept: first %s last %s", got[0].Name, got[27].Name)
	}
}

func TestParseXfrmStatErrors(t *testing.T) {
	for _, in := range []string{
		"XfrmInError\n",
		"XfrmInError 1 2\n",
		"XfrmInError -1\n",
		"XfrmInError 0x10\n",
		"XfrmInError 18446744073709551616\n",
	} {
		if _, err := ParseXfrmStat(strings.NewReader(in)); err == nil {
			t.Errorf("ParseXfrmStat(%q): no error", in)
		}
	}
	got, err := ParseXfrmStat(strings.NewReader("\n\nXfrmInError 3\n\n"))
	if err != nil || len(got) != 1 || got[0].Value != 3 {
		t.Errorf("blank lines: %v %v", got, err)
	}
}

func TestXfrmStatCausesNameRealCounters(t *testing.T) {
	got, err := ParseXfrmStat(strings.NewReader(sampleXfrmStat))
	if err != nil {
		t.Fatal(err)
	}
	known := map[string]bool{}
	for _, s := range got {
		known[s.Name] = true
	}
	for n := range XfrmStatCause {
		if !known[n] {
			t.Errorf("cause for %s, which the kernel does not print", n)
		}
	}
}
