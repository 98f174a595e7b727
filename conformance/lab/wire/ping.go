package wire

// PingReport is what the guest's echo stream tool (conformance/lab/guest/labping) writes
// when it ends: every request it sent, by sequence number, with its send time and the
// kernel's receive time of its first reply. Times are the guest's CLOCK_REALTIME in Unix
// nanoseconds (the clock of `ping -D`).
//
// Request i (1-based sequence number) is at index i-1 of Sent and Reply.
type PingReport struct {
	// Dst is the echo target, ID the ICMP identifier of the stream.
	Dst string `json:"dst"`
	ID  int    `json:"id"`
	// IntervalNs is the pace (one request per interval), LingerNs the longest wait for
	// replies after sending stopped.
	IntervalNs int64 `json:"interval_ns"`
	LingerNs   int64 `json:"linger_ns"`
	// Stopped is when sending stopped (a signal, or the count reached); End when the
	// report was written: every request answered, or the linger over.
	Stopped int64 `json:"stopped"`
	End     int64 `json:"end"`
	// Sent holds each request's send time; 0 when the send failed (see SendErrors).
	Sent []int64 `json:"sent"`
	// Reply holds the receive time of each request's first reply; 0 when none came.
	Reply []int64 `json:"reply"`
	// SendErrors are the local errors of failed sends, by sequence number.
	SendErrors map[int]string `json:"send_errors,omitempty"`
	// ICMPErrors are ICMP errors (unreachable, time exceeded, …) that quote one of our
	// requests, by sequence number: who refused it and why.
	ICMPErrors map[int]string `json:"icmp_errors,omitempty"`
	// Duplicates counts replies to a request already answered.
	Duplicates int `json:"duplicates,omitempty"`
	// Reordered counts replies that arrived after the reply to a later request.
	Reordered int `json:"reordered,omitempty"`
	// SocketDrops is the kernel's count of packets dropped on the stream's socket because
	// its receive queue was full (SO_RXQ_OVFL).
	SocketDrops uint32 `json:"socket_drops,omitempty"`
}
