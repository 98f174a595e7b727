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
	got := merge(old, fresh, "run of T1")
	want := "# Benchmark results\n\nheader of the full run\n\n## 1. Compute\n\nold one\n\n## 8. Status\n\nold eight\n\n## 10. Data plane\n\n" +
		"_This section: run of T1 (`-only dataplane -update`); the header's date and commands are the last full run's._\n\nnew ten\n"
	if got != want {
		t.Errorf("merge:\n%s\nwant:\n%s", got, want)
	}
	// A second update replaces section 10 in place, with its new time.
	again := merge(got, strings.Replace(fresh, "new ten", "newer ten", 1), "run of T2")
	if !strings.Contains(again, "newer ten") || strings.Contains(again, "new ten\n") || strings.Count(again, "## 10.") != 1 ||
		!strings.Contains(again, "run of T2") || strings.Contains(again, "run of T1") {
		t.Errorf("second merge:\n%s", again)
	}
	if !strings.Contains(again, "old eight") {
		t.Errorf("second merge lost section 8:\n%s", again)
	}
	// A section the old file lacks goes in its place by number, not at the end.
	*only = "keys"
	nine := merge(again, "# B\n\n## 9. Keys\n\nnew nine\n", "run of T3")
	if i9, i10 := strings.Index(nine, "## 9."), strings.Index(nine, "## 10."); i9 < 0 || i9 > i10 || !strings.Contains(nine, "`-only keys -update`") {
		t.Errorf("merge of a new section 9:\n%s", nine)
	}
}
