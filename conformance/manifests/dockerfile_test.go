package manifests

import (
	"os/exec"
	"path/filepath"
	"testing"
)

// TestDockerfileShipsTheBinaries runs hack/check-dockerfile.sh (also run by make
// lint): the image's build loop and COPY lines match the Makefile's BINARIES, each
// has a cmd/ directory, the default user is not root, and every binary the
// manifest runs is in the image. No container engine is needed.
func TestDockerfileShipsTheBinaries(t *testing.T) {
	if _, err := exec.LookPath("make"); err != nil {
		requireOrSkip(t, "make not installed")
	}
	cmd := exec.Command("bash", filepath.Join(repoRoot(t), "hack", "check-dockerfile.sh"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("hack/check-dockerfile.sh: %v\n%s", err, out)
	}
	t.Logf("%s", out)
}
