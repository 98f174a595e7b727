package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/secureoverlay/secureoverlay/conformance/lab"
)

// PreviousRelease is the release the upgrade scenario starts from: 0.1, whose agents
// report in the Node annotation and whose Secret holds every generation's root
// (hack/tools-release.sh builds it from this repository's history).
const PreviousRelease = "0.1"

// guestReleaseDir is where the guest sees Config.Release.
const guestReleaseDir = "/opt/secureoverlay/release"

// ReleaseBinDir returns the directory of PreviousRelease's secureoverlay-agent and
// secureoverlay-master (`make tools`: <cache>/release-0.1/bin), or why it has none.
func ReleaseBinDir() (dir, unavailable string) {
	base := filepath.Join(lab.CacheDir(), "release-"+PreviousRelease)
	if b, err := os.ReadFile(filepath.Join(base, "unavailable")); err == nil {
		return "", "release " + PreviousRelease + ": " + strings.TrimSpace(string(b))
	}
	dir = filepath.Join(base, "bin")
	for _, b := range []string{"secureoverlay-agent", "secureoverlay-master"} {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			return "", fmt.Sprintf("release %s: %s missing in %s (run `make tools`)", PreviousRelease, b, dir)
		}
	}
	return dir, ""
}
