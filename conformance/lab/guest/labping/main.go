// Command labping is the lab guest's echo stream: ICMP echo requests from the network
// namespace it runs in to one address, one per interval, each numbered and timestamped,
// and the kernel's receive time of each reply (SO_TIMESTAMPNS). It writes one JSON
// wire.PingReport when it ends (to -o, else stdout).
//
// It ends on acknowledged sequence numbers: on SIGINT or SIGTERM, or once -c requests
// are out, it stops *sending*, then waits until every request it sent has its reply (or
// was refused: a local send error, an ICMP error quoting it), or until -W has passed
// since the last send. A reply still on its way when the stream is
// told to stop is therefore counted as a reply, not as a loss. (iputils ping, stopped by
// a signal, stops receiving at once; with -c it waits only twice the largest round trip
// seen for the last replies — on an emulated CPU that stalls, both count packets that
// were merely late as lost.)
//
//	labping [-c COUNT] [-i INTERVAL] [-W LINGER] [-s SIZE] [-M do] [-o FILE] DST
//
// -M do sets DF and never fragments locally (IP_PMTUDISC_DO, as ping -M do): a request
// larger than the path MTU the kernel knows fails with "message too long", and one larger
// than a hop's MTU comes back as an ICMP "fragmentation needed" naming that MTU; both are
// in the report, per request.
//
// Invariants: at most one request per interval (a stalled sender skips ticks instead of
// bursting); every request sent appears in the report, answered or not; replies are
// matched by ICMP identifier, a random per-stream token in the payload and the source
// address, so streams sharing a namespace never see each other's replies.
package main

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/secureoverlay/secureoverlay/conformance/lab/wire"
)

const (
	icmpEchoReply    = 0
	icmpUnreachable  = 3
	icmpEcho         = 8
	icmpTimeExceeded = 11
	// maxSeq: sequence numbers are 16 bits and are never reused within a stream.
	maxSeq = 0xffff
	// minPayload holds the stream token (8 bytes) and the send time (8 bytes).
	minPayload = 16
)

// StartedLine begins the line labping writes to stderr once it catches SIGINT and SIGTERM
// and is about to send its first request.
const StartedLine = "labping: streaming to"

func main() {
	count := flag.Int("c", 0, "send this many requests, then wait for their replies (0: until SIGINT or SIGTERM)")
	interval := flag.Duration("i", 50*time.Millisecond, "one request every interval")
	linger := flag.Duration("W", 5*time.Second, "after sending stops, wait at most this long after the last send for outstanding replies")
	size := flag.Int("s", 56, "ICMP payload bytes (at least 16)")
	out := flag.String("o", "", "write the JSON report to this file (atomically); default stdout")
	pmtu := flag.String("M", "", `"do": set DF and never fragment locally (IP_PMTUDISC_DO)`)
	flag.Parse()
	if *pmtu != "" && *pmtu != "do" {
		fmt.Fprintf(os.Stderr, "labping: -M %q: only \"do\" is supported\n", *pmtu)
		os.Exit(2)
	}
	if err := run(flag.Args(), *count, *interval, *linger, *size, *pmtu == "do", *out); err != nil {
		fmt.Fprintf(os.Stderr, "labping: %v\n", err)
		os.Exit(1)
	}
}

func run(args []string, count int, interval, linger time.Duration, size int, df bool, out string) error {
	if len(args) != 1 {
		return errors.New("usage: labping [-c COUNT] [-i INTERVAL] [-W LINGER] [-s SIZE] [-M do] [-o FILE] DST")
	}
	dst := net.ParseIP(args[0]).To4()
	switch {
	case dst == nil:
		return fmt.Errorf("destination %q is not an IPv4 address", args[0])
	case interval < time.Millisecond || linger < 0 || count < 0 || count > maxSeq:
		return errors.New("need -i >= 1ms, -W >= 0 and 0 <= -c <= 65535")
	case size < minPayload || size > 65000:
		return fmt.Errorf("-s %d: want %d..65000", size, minPayload)
	}
	// Signals are caught before the first request, so none can end the stream unreported.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)

	s, err := newStream([4]byte(dst), interval, linger)
	if err != nil {
		return err
	}
	if df {
		if err := unix.SetsockoptInt(s.fd, unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_DO); err != nil {
			return fmt.Errorf("setsockopt IP_MTU_DISCOVER: %w", err)
		}
	}
	go s.receive()
	// The signals are caught from here on: a stream stopped before this line would lose
	// its SIGINT (a background job of a non-interactive shell starts with SIGINT ignored,
	// and Go keeps it ignored until Notify), so starters wait for it (lab.StartEchoStream).
	fmt.Fprintf(os.Stderr, "%s %s, ICMP id %d\n", StartedLine, args[0], s.id)
	s.send(count, interval, size, sigs)
	s.awaitReplies(linger)
	return s.write(out)
}

type stream struct {
	fd    int
	dst   [4]byte
	id    uint16
	token [8]byte

	mu          sync.Mutex
	rep         wire.PingReport
	settled     []bool        // by sequence number - 1: answered, refused by an ICMP error, or not sent
	nSettled    int           // how many are settled
	highest     int           // highest sequence number answered so far
	replied     chan struct{} // a request was settled (capacity 1)
	stopped     chan struct{} // closed when sending stops
	lastSentMon time.Time     // monotonic time of the last send
	closed      bool          // the report is written: later packets are ignored
}

func newStream(dst [4]byte, interval, linger time.Duration) (*stream, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP)
	if err != nil {
		return nil, fmt.Errorf("raw ICMP socket (needs root): %w", err)
	}
	// Only echo replies and the errors that may quote a request reach the socket (a raw
	// ICMP socket otherwise gets a copy of every ICMP message of the namespace).
	pass := uint32(1<<icmpEchoReply | 1<<icmpUnreachable | 1<<icmpTimeExceeded)
	for _, o := range []struct {
		level, name, value int
		what               string
	}{
		{unix.SOL_RAW, unix.ICMP_FILTER, int(int32(^pass)), "ICMP_FILTER"},
		{unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 4 << 20, "SO_RCVBUFFORCE"},
		{unix.SOL_SOCKET, unix.SO_TIMESTAMPNS, 1, "SO_TIMESTAMPNS"},
		{unix.SOL_SOCKET, unix.SO_RXQ_OVFL, 1, "SO_RXQ_OVFL"},
	} {
		if err := unix.SetsockoptInt(fd, o.level, o.name, o.value); err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("setsockopt %s: %w", o.what, err)
		}
	}
	s := &stream{fd: fd, dst: dst, id: uint16(os.Getpid()), replied: make(chan struct{}, 1), stopped: make(chan struct{})}
	if _, err := rand.Read(s.token[:]); err != nil {
		return nil, err
	}
	s.rep = wire.PingReport{Dst: net.IP(dst[:]).String(), ID: int(s.id), IntervalNs: interval.Nanoseconds(), LingerNs: linger.Nanoseconds()}
	return s, nil
}

// send sends request 1, 2, … one per tick until count requests are out (count > 0), a
// signal arrives, or the sequence numbers run out.
func (s *stream) send(count int, interval time.Duration, size int, sigs <-chan os.Signal) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	pkt := make([]byte, 8+size)
	for seq := 1; seq <= maxSeq && (count == 0 || seq <= count); seq++ {
		select {
		case <-sigs:
			s.stop()
			return
		default:
		}
		now := time.Now()
		pkt[0], pkt[1] = icmpEcho, 0
		binary.BigEndian.PutUint16(pkt[4:], s.id)
		binary.BigEndian.PutUint16(pkt[6:], uint16(seq))
		copy(pkt[8:], s.token[:])
		binary.BigEndian.PutUint64(pkt[16:], uint64(now.UnixNano()))
		pkt[2], pkt[3] = 0, 0
		binary.BigEndian.PutUint16(pkt[2:], checksum(pkt))
		// The request's slot exists before it is sent: on a fast path its reply is
		// received before Sendto returns.
		s.mu.Lock()
		s.rep.Sent = append(s.rep.Sent, now.UnixNano())
		s.rep.Reply = append(s.rep.Reply, 0)
		s.settled = append(s.settled, false)
		s.lastSentMon = now
		s.mu.Unlock()
		err := unix.Sendto(s.fd, pkt, 0, &unix.SockaddrInet4{Addr: s.dst})
		s.mu.Lock()
		if err != nil {
			if s.rep.SendErrors == nil {
				s.rep.SendErrors = map[int]string{}
			}
			s.rep.SendErrors[seq] = err.Error()
			s.settle(seq)
		}
		s.mu.Unlock()
		if count > 0 && seq == count {
			break
		}
		select {
		case <-tick.C:
		case <-sigs:
			s.stop()
			return
		}
	}
	s.stop()
}

func (s *stream) stop() {
	s.mu.Lock()
	s.rep.Stopped = time.Now().UnixNano()
	s.mu.Unlock()
	close(s.stopped)
}

// settle marks request seq as needing no more waiting (the caller holds s.mu).
func (s *stream) settle(seq int) {
	if s.settled[seq-1] {
		return
	}
	s.settled[seq-1] = true
	s.nSettled++
	select {
	case s.replied <- struct{}{}:
	default:
	}
}

// awaitReplies returns once every request sent is answered, refused by an ICMP error or
// failed to send, or linger after the last send.
func (s *stream) awaitReplies(linger time.Duration) {
	s.mu.Lock()
	deadline := time.NewTimer(time.Until(s.lastSentMon.Add(linger)))
	s.mu.Unlock()
	defer deadline.Stop()
	for {
		s.mu.Lock()
		done := s.nSettled >= len(s.rep.Sent)
		s.mu.Unlock()
		if done {
			return
		}
		select {
		case <-s.replied:
		case <-deadline.C:
			return
		}
	}
}

// receive matches replies and ICMP errors to requests until the process exits.
func (s *stream) receive() {
	buf := make([]byte, 1<<16)
	oob := make([]byte, 256)
	for {
		n, oobn, _, from, err := unix.Recvmsg(s.fd, buf, oob, 0)
		if err != nil {
			if errors.Is(err, unix.EINTR) || errors.Is(err, unix.EAGAIN) {
				continue
			}
			fmt.Fprintf(os.Stderr, "labping: receive: %v\n", err)
			return
		}
		at := time.Now().UnixNano()
		var drops uint32
		if cms, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
			for _, c := range cms {
				switch {
				case c.Header.Level != unix.SOL_SOCKET:
				case c.Header.Type == unix.SCM_TIMESTAMPNS && len(c.Data) >= int(unsafe.Sizeof(unix.Timespec{})):
					ts := (*unix.Timespec)(unsafe.Pointer(&c.Data[0]))
					at = ts.Nano()
				case c.Header.Type == unix.SO_RXQ_OVFL && len(c.Data) >= 4:
					drops = binary.NativeEndian.Uint32(c.Data)
				}
			}
		}
		src, _ := from.(*unix.SockaddrInet4)
		s.handle(buf[:n], src, at, drops)
	}
}

// handle takes one IPv4 packet with an ICMP message.
func (s *stream) handle(p []byte, from *unix.SockaddrInet4, at int64, drops uint32) {
	icmp := ipPayload(p)
	if len(icmp) < 8 || from == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	s.rep.SocketDrops = max(s.rep.SocketDrops, drops)
	switch icmp[0] {
	case icmpEchoReply:
		if from.Addr != s.dst || len(icmp) < 8+minPayload || binary.BigEndian.Uint16(icmp[4:]) != s.id || [8]byte(icmp[8:16]) != s.token {
			return
		}
		seq := int(binary.BigEndian.Uint16(icmp[6:]))
		if seq < 1 || seq > len(s.rep.Reply) {
			return
		}
		if s.rep.Reply[seq-1] != 0 {
			s.rep.Duplicates++
			return
		}
		s.rep.Reply[seq-1] = at
		if seq < s.highest {
			s.rep.Reordered++
		}
		s.highest = max(s.highest, seq)
		s.settle(seq)
	case icmpUnreachable, icmpTimeExceeded:
		// The error quotes our request's IP header and the first 8 bytes of its ICMP header.
		inner := icmp[8:]
		q := ipPayload(inner)
		if len(inner) < 20 || inner[9] != unix.IPPROTO_ICMP || [4]byte(inner[16:20]) != s.dst ||
			len(q) < 8 || q[0] != icmpEcho || binary.BigEndian.Uint16(q[4:]) != s.id {
			return
		}
		seq := int(binary.BigEndian.Uint16(q[6:]))
		if seq < 1 || seq > len(s.rep.Sent) {
			return
		}
		what := fmt.Sprintf("ICMP type %d code %d from %s", icmp[0], icmp[1], net.IP(from.Addr[:]))
		if icmp[0] == icmpUnreachable && icmp[1] == 4 {
			what += fmt.Sprintf(" (fragmentation needed, mtu %d)", binary.BigEndian.Uint16(icmp[6:]))
		}
		if s.rep.ICMPErrors == nil {
			s.rep.ICMPErrors = map[int]string{}
		}
		if _, dup := s.rep.ICMPErrors[seq]; !dup {
			s.rep.ICMPErrors[seq] = what
		}
		s.settle(seq) // refused: no reply will come
	}
}

// ipPayload returns what follows the IPv4 header of p (nil if p is not one).
func ipPayload(p []byte) []byte {
	if len(p) < 20 || p[0]>>4 != 4 {
		return nil
	}
	ihl := int(p[0]&0x0f) * 4
	if ihl < 20 || len(p) < ihl {
		return nil
	}
	return p[ihl:]
}

func checksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// finish closes the report: what arrives after this no longer counts.
func (s *stream) finish() wire.PingReport {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	s.rep.End = time.Now().UnixNano()
	return s.rep
}

// write writes the report, to out atomically (a temporary file in the same directory,
// then rename) or to stdout.
func (s *stream) write(out string) error {
	b, err := json.Marshal(s.finish())
	if err != nil {
		return err
	}
	b = append(b, '\n')
	if out == "" {
		_, err = os.Stdout.Write(b)
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(out), ".labping-*")
	if err != nil {
		return err
	}
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return err
	}
	if err := tmp.Close(); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	return os.Rename(tmp.Name(), out)
}
