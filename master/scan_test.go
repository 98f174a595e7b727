package master

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/secureoverlay/secureoverlay/conformance/kube"
)

// scannedTests are the tests whose complete output (verbose test log, master logs,
// client-go logs, failure dumps) TestNoKeyBytesInTestOutput scans.
const scannedTests = "^(TestRotationWithSimulatedAgents|TestLaggingAndDeletedNodes|TestLeaderFailoverMidRotation|TestConcurrentControllersNeverDoubleRotate|TestCorruptedSecretRefused|TestHostileRingRefusedWithoutEcho)$"

// TestNoKeyBytesInTestOutput re-runs the real-API-server tests in a child process with
// -test.v, has them record every root key and derived SA key they saw (to a file, never
// to the output), and greps the child's whole stdout+stderr for each key in hex (both
// cases) and base64 (standard, URL, padded or not). It fails if any is found — or if the
// child saw no keys, so it cannot pass vacuously.
func TestNoKeyBytesInTestOutput(t *testing.T) {
	if os.Getenv(envKeyDump) != "" {
		t.Skip("this is the child run being scanned")
	}
	if testing.Short() {
		t.Skip("re-runs the whole real-API-server suite; not in -short mode")
	}
	if _, _, err := kube.FindBinaries(); err != nil {
		if os.Getenv(kube.EnvRequireAll) == "1" {
			t.Fatalf("kube harness: %v", err)
		}
		t.Skipf("kube harness: %v", err)
	}
	dump := filepath.Join(t.TempDir(), "keys")
	cmd := exec.Command(os.Args[0], "-test.run="+scannedTests, "-test.v", "-test.count=1", "-test.short=false")
	cmd.Env = append(os.Environ(), envKeyDump+"="+dump)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child test run failed: %v\n%s", err, tail(out, 80))
	}
	if n := bytes.Count(out, []byte("--- PASS: Test")); n != strings.Count(scannedTests, "|")+1 {
		t.Fatalf("child ran %d passing tests, want %d:\n%s", n, strings.Count(scannedTests, "|")+1, tail(out, 40))
	}
	f, err := os.Open(dump)
	if err != nil {
		t.Fatalf("child recorded no keys: %v", err)
	}
	defer f.Close()
	var secrets [][]byte
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, err := hex.DecodeString(strings.TrimSpace(sc.Text()))
		if err != nil || len(k) < 16 {
			t.Fatalf("key dump line %d is not a hex key", len(secrets)+1)
		}
		secrets = append(secrets, k)
	}
	if len(secrets) < 20 {
		t.Fatalf("only %d keys recorded; the scan would be vacuous", len(secrets))
	}
	found := 0
	for i, k := range secrets {
		for name, enc := range map[string]string{
			"hex": hex.EncodeToString(k), "HEX": strings.ToUpper(hex.EncodeToString(k)),
			"base64": base64.StdEncoding.EncodeToString(k), "raw base64": base64.RawStdEncoding.EncodeToString(k),
			"base64url": base64.URLEncoding.EncodeToString(k), "raw base64url": base64.RawURLEncoding.EncodeToString(k),
			"go bytes": fmt.Sprint(k),
		} {
			if bytes.Contains(out, []byte(enc)) {
				t.Errorf("key #%d (%d bytes) appears in the test output as %s", i, len(k), name)
				found++
			}
		}
	}
	if found == 0 {
		t.Logf("scanned %d bytes of output for %d keys in 7 encodings each: none found", len(out), len(secrets))
	}
}

func tail(b []byte, lines int) string {
	s := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(s) > lines {
		s = s[len(s)-lines:]
	}
	return strings.Join(s, "\n")
}
