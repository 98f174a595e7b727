package main

import (
	"strings"
	"testing"
)

func TestMergeReplacesOnlyTheSectionsThatRan(t *testing.T) {
	old := "# Benchmark results\n\nheader of the full run\n\n## 1. Compute\n\nold one\n\n## 8. Status\n\nold eight\n"
	fresh := "# Benchmark results\n\nheader of this run\n\n## 1. Compute\n\n| — |\n\n## 8. Status\n\n| — |\n\n## 10. Data plane\n\nnew ten\n"
	*only = "dataplane"
	defer func() { *only = "" }()
	got := merge(old, fresh)
	want := "# Benchmark results\n\nheader of the full run\n\n## 1. Compute\n\nold one\n\n## 8. Status\n\nold eight\n\n## 10. Data plane\n\nnew ten\n"
	if got != want {
		t.Errorf("merge:\n%s\nwant:\n%s", got, want)
	}
	// A second update replaces section 10 in place.
	again := merge(got, strings.Replace(fresh, "new ten", "newer ten", 1))
	if !strings.Contains(again, "newer ten") || strings.Contains(again, "new ten\n") || strings.Count(again, "## 10.") != 1 {
		t.Errorf("second merge:\n%s", again)
	}
	if !strings.Contains(again, "old eight") {
		t.Errorf("second merge lost section 8:\n%s", again)
	}
}
