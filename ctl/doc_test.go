package ctl

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestOperatingDoc: every output block of docs/operating.md marked
// <!-- golden: NAME --> is exactly testdata/NAME (after its "$ command" line), so the
// README section shows real output of these tests.
func TestOperatingDoc(t *testing.T) {
	doc, err := os.ReadFile(filepath.Join("..", "docs", "operating.md"))
	if err != nil {
		t.Fatal(err)
	}
	re := regexp.MustCompile("(?s)<!-- golden: ([^ ]+) -->\n```\n(.*?)```\n")
	blocks := re.FindAllStringSubmatch(string(doc), -1)
	if len(blocks) < 8 {
		t.Fatalf("docs/operating.md has %d golden blocks, want at least 8", len(blocks))
	}
	for _, b := range blocks {
		name, body := b[1], b[2]
		if !strings.HasPrefix(body, "$ ") {
			t.Errorf("block %s does not start with the command line", name)
			continue
		}
		body = body[strings.Index(body, "\n")+1:]
		want, err := os.ReadFile(filepath.Join("testdata", name))
		if err != nil {
			t.Errorf("block %s: %v", name, err)
			continue
		}
		if w := strings.ReplaceAll(string(want), "SAMPLE", "300ms"); body != w {
			t.Errorf("docs/operating.md block %s differs from testdata/%s:\n--- doc\n%s\n--- golden\n%s", name, name, body, w)
		}
	}
}
