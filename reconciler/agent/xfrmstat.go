package agent

import (
	"bufio"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// XfrmStat is one counter of /proc/net/xfrm_stat (e.g. XfrmInNoStates 3).
type XfrmStat struct {
	Name  string
	Value uint64
}

// ParseXfrmStat parses /proc/net/xfrm_stat: one "Name<spaces>Value" line per counter (the
// kernel's Documentation/networking/xfrm_proc.rst). Blank lines are skipped; anything else
// that is not a name and an unsigned decimal is an error naming the line.
func ParseXfrmStat(r io.Reader) ([]XfrmStat, error) {
	var out []XfrmStat
	sc := bufio.NewScanner(r)
	line := 0
	for sc.Scan() {
		line++
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		if len(f) != 2 {
			return nil, fmt.Errorf("xfrm_stat line %d: want a name and a value, got %d fields", line, len(f))
		}
		v, err := strconv.ParseUint(f[1], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("xfrm_stat line %d (%s): %w", line, f[0], err)
		}
		out = append(out, XfrmStat{Name: f[0], Value: v})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read xfrm_stat: %w", err)
	}
	return out, nil
}

// XfrmStatCause maps the counters that matter to an operator to their usual cause here
// (DESIGN.md §8: metrics that map xfrm_stat to causes).
var XfrmStatCause = map[string]string{
	"XfrmInNoStates":        "ESP arrived for an SPI this node does not hold (peer sends with a key not installed here: rotation or reboot race)",
	"XfrmInStateProtoError": "ESP failed authentication (key mismatch between the two ends)",
	"XfrmInNoPols":          "decrypted traffic matched no inbound policy",
	"XfrmInPolBlock":        "inbound policy blocked the packet",
	"XfrmInTmplMismatch":    "plaintext or wrong SA where an inbound policy requires ESP (enforce while the peer sends plaintext)",
	"XfrmInStateSeqError":   "sequence number outside the replay window (reordering larger than the window)",
	"XfrmInStateExpired":    "SA hit its hard lifetime (a missed rotation)",
	"XfrmOutNoStates":       "outbound policy points at an SA that is not installed (packets dropped)",
	"XfrmOutStateSeqError":  "outbound sequence number overflow (a missed rotation)",
	"XfrmOutStateExpired":   "outbound SA hit its hard lifetime (a missed rotation)",
	"XfrmOutPolBlock":       "outbound policy blocked the packet",
	"XfrmInBufferError":     "no buffer for decryption",
	"XfrmInError":           "other inbound error",
	"XfrmOutError":          "other outbound error",
}
