// Package wire is the lab's command-channel protocol between the host
// (package lab) and the guest helper (conformance/lab/guest/labd).
//
// One TCP connection carries exactly one exchange: the host writes one JSON
// Request, the guest runs it to completion and writes one JSON Response, then
// closes. There is no authentication: the channel is reachable only through
// QEMU's user-mode networking forwarded to the host's loopback interface.
package wire

// GuestPort is the TCP port labd listens on inside the guest.
const GuestPort = 7000

// MaxOutput caps what the guest returns for each of stdout and stderr.
const MaxOutput = 16 << 20

// Request asks the guest to run one command.
type Request struct {
	// Argv is the program and its arguments; PATH is searched.
	Argv []string `json:"argv"`
	// Stdin is fed to the program's standard input.
	Stdin []byte `json:"stdin,omitempty"`
	// Env entries (KEY=VALUE) are added to the guest's base environment.
	Env []string `json:"env,omitempty"`
	// TimeoutMillis kills the program's process group after this long; 0 means 10 minutes.
	TimeoutMillis int64 `json:"timeout_ms,omitempty"`
}

// Response is the result of one Request.
type Response struct {
	Stdout []byte `json:"stdout"`
	Stderr []byte `json:"stderr"`
	// Exit is the program's exit status, or -1 when it did not exit normally.
	Exit int `json:"exit"`
	// Error describes a failure to start or a kill on timeout; empty otherwise.
	Error string `json:"error,omitempty"`
	// Truncated is set when stdout or stderr exceeded MaxOutput.
	Truncated bool `json:"truncated,omitempty"`
}
