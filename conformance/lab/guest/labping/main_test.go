package main

import (
	"encoding/binary"
	"os"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/secureoverlay/secureoverlay/internal/testutil"
)

// echoReply builds an IPv4 packet (header only as far as handle reads it) holding an
// ICMP echo reply for request seq of stream s.
func echoReply(s *stream, seq int, token [8]byte) []byte {
	p := make([]byte, 20+8+minPayload)
	p[0] = 0x45
	icmp := p[20:]
	icmp[0] = icmpEchoReply
	binary.BigEndian.PutUint16(icmp[4:], s.id)
	binary.BigEndian.PutUint16(icmp[6:], uint16(seq))
	copy(icmp[8:], token[:])
	return p
}

func testStream(n int) *stream {
	s := &stream{dst: [4]byte{10, 244, 2, 5}, id: 77, token: [8]byte{1, 2, 3, 4, 5, 6, 7, 8}, replied: make(chan struct{}, 1), stopped: make(chan struct{})}
	for i := 0; i < n; i++ {
		s.rep.Sent = append(s.rep.Sent, int64(1000+i))
		s.rep.Reply = append(s.rep.Reply, 0)
		s.settled = append(s.settled, false)
	}
	return s
}

// Replies are matched by identifier, token and source; duplicates and reordering are
// counted; an ICMP error quoting a request is attributed to it.
func TestHandleMatchesReplies(t *testing.T) {
	s := testStream(4)
	from := &unix.SockaddrInet4{Addr: s.dst}
	s.handle(echoReply(s, 2, s.token), from, 5002, 0)
	s.handle(echoReply(s, 1, s.token), from, 5001, 0)                                            // after 2: reordered
	s.handle(echoReply(s, 1, s.token), from, 5003, 0)                                            // duplicate
	s.handle(echoReply(s, 3, [8]byte{9}), from, 5004, 0)                                         // another stream's token
	s.handle(echoReply(s, 3, s.token), &unix.SockaddrInet4{Addr: [4]byte{10, 0, 0, 1}}, 5005, 0) // wrong source
	s.handle(echoReply(s, 9, s.token), from, 5006, 3)                                            // never sent
	if got := s.rep.Reply; got[0] != 5001 || got[1] != 5002 || got[2] != 0 || got[3] != 0 {
		t.Errorf("replies %v", got)
	}
	if s.nSettled != 2 || s.rep.Duplicates != 1 || s.rep.Reordered != 1 || s.rep.SocketDrops != 3 {
		t.Errorf("settled %d duplicates %d reordered %d drops %d", s.nSettled, s.rep.Duplicates, s.rep.Reordered, s.rep.SocketDrops)
	}

	// Fragmentation needed for request 4, from node 198.18.0.1.
	req := make([]byte, 20+8)
	req[0], req[9] = 0x45, unix.IPPROTO_ICMP
	copy(req[16:20], s.dst[:])
	req[20] = icmpEcho
	binary.BigEndian.PutUint16(req[24:], s.id)
	binary.BigEndian.PutUint16(req[26:], 4)
	p := make([]byte, 20+8)
	p[0] = 0x45
	p[20], p[21] = icmpUnreachable, 4
	binary.BigEndian.PutUint16(p[26:], 1402)
	s.handle(append(p, req...), &unix.SockaddrInet4{Addr: [4]byte{198, 18, 0, 1}}, 6000, 0)
	if got := s.rep.ICMPErrors[4]; got != "ICMP type 3 code 4 from 198.18.0.1 (fragmentation needed, mtu 1402)" || s.nSettled != 3 || s.rep.Reply[3] != 0 {
		t.Errorf("ICMP error for request 4: %q; settled %d (a refused request needs no more waiting)", got, s.nSettled)
	}
	s.finish()
	s.handle(echoReply(s, 3, s.token), from, 7000, 0)
	if s.rep.Reply[2] != 0 {
		t.Error("a reply after the report was closed was counted")
	}
}

func TestChecksum(t *testing.T) {
	// An echo request, id 1 seq 1, no payload: 0x0800 + 0x0001 + 0x0001 = 0x0802 → 0xf7fd.
	if c := checksum([]byte{8, 0, 0, 0, 0, 1, 0, 1}); c != 0xf7fd {
		t.Errorf("checksum %#x, want 0xf7fd", c)
	}
}

// heldResponder answers the echo requests of a namespace whose kernel does not: it calls
// seen with each request's sequence number, holds every reply until release is closed,
// and never answers the requests in drop.
func heldResponder(fd int, seen func(int), release <-chan struct{}, drop map[int]bool) {
	buf := make([]byte, 1500)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			return
		}
		icmp := ipPayload(buf[:n])
		if len(icmp) < 8 || icmp[0] != icmpEcho {
			continue
		}
		seq := int(binary.BigEndian.Uint16(icmp[6:]))
		seen(seq)
		if drop[seq] {
			continue
		}
		r := append([]byte(nil), icmp...)
		r[0], r[2], r[3] = icmpEchoReply, 0, 0
		binary.BigEndian.PutUint16(r[2:], checksum(r))
		go func() {
			<-release
			_ = unix.Sendto(fd, r, 0, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}})
		}()
	}
}

// The stream ends on acknowledged sequence numbers: stopped while every reply is still
// held back, it waits for them; a request never answered is lost after the linger, not
// before.
func TestStopWaitsForOutstandingReplies(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: a network namespace and raw sockets")
	}
	n, err := testutil.LoopbackNS(t)
	if err != nil {
		t.Fatalf("network namespace: %v", err)
	}
	rfd, err := testutil.InNS(n, func() (int, error) {
		if err := os.WriteFile("/proc/sys/net/ipv4/icmp_echo_ignore_all", []byte("1"), 0o644); err != nil {
			return -1, err
		}
		return unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP)
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(rfd) })
	const linger = time.Second
	s, err := testutil.InNS(n, func() (*stream, error) {
		return newStream([4]byte{127, 0, 0, 1}, 20*time.Millisecond, linger)
	})
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(s.fd)
	// Stop once request 5 is on the wire; replies are released only after the stop.
	sigs := make(chan os.Signal, 1)
	go heldResponder(rfd, func(seq int) {
		if seq == 5 {
			sigs <- syscall.SIGINT
		}
	}, s.stopped, map[int]bool{3: true})
	go s.receive()
	start := time.Now()
	s.send(0, 20*time.Millisecond, 56, sigs)
	s.awaitReplies(linger)
	r := s.finish()
	took := time.Since(start)

	// The signal is seen before the next send at the latest.
	if len(r.Sent) < 5 || len(r.Sent) > 6 {
		t.Fatalf("sent %d requests, want 5 or 6 (stopped at request 5)", len(r.Sent))
	}
	for i, at := range r.Reply {
		switch {
		case i+1 == 3 && at != 0:
			t.Errorf("request 3 was never answered, yet has a reply at %d", at)
		case i+1 != 3 && at <= r.Stopped:
			t.Errorf("request %d: reply at %d, want one after the stop at %d", i+1, at, r.Stopped)
		}
	}
	// The linger runs from the last send: the stream waited for request 3 about a second.
	if last := time.Unix(0, r.Sent[len(r.Sent)-1]); time.Unix(0, r.End).Sub(last) < linger {
		t.Errorf("report closed %s after the last send, want at least the linger %s", time.Unix(0, r.End).Sub(last), linger)
	}
	t.Logf("%d sent, stopped %s after the first; every reply after the stop, request 3 lost after the linger; %s in all",
		len(r.Sent), time.Duration(r.Stopped-r.Sent[0]).Round(time.Millisecond), took.Round(time.Millisecond))
}
