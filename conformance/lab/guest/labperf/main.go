// Command labperf is the lab guest's request/response and packet-rate tool for the data-plane
// benchmark (bench/dataplane, `make bench-dataplane`); iperf3 measures TCP throughput. Each
// client prints one JSON line (Result) when it ends.
//
//	labperf rr-server ADDR             echo every byte of every TCP connection back (until killed)
//	labperf rr -t DUR ADDR             TCP_RR: 1-byte request, wait for the 1-byte response, repeat
//	labperf udp-sink [-idle D] ADDR    count UDP datagrams; ends IDLE after the last one, prints a Result
//	labperf udp -t DUR -s SIZE ADDR    send SIZE-byte UDP payloads to ADDR as fast as the socket takes them
//
// The sink writes "ready" to stderr once bound, so a script can wait for it. It ends when no
// datagram has arrived for -idle (default 1 s) after the first one, or after -max (default
// 120 s) in any case.
//
// Invariants: nothing is paced (the emulated CPU is the limit being measured); send errors
// (ENOBUFS, ECONNREFUSED from an ICMP error) are counted, not fatal, so the sender runs for
// its whole duration.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"time"
)

// Result is what a client (rr, udp) or the sink prints.
type Result struct {
	// Ops: transactions (rr), datagrams sent (udp) or received (udp-sink).
	Ops    uint64  `json:"ops"`
	Bytes  uint64  `json:"bytes"`
	Errors uint64  `json:"errors"`
	Secs   float64 `json:"seconds"`
}

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	dur := fs.Duration("t", 3*time.Second, "duration (rr, udp)")
	size := fs.Int("s", 64, "UDP payload bytes (udp)")
	idle := fs.Duration("idle", time.Second, "end after this long without a datagram (udp-sink)")
	maxT := fs.Duration("max", 2*time.Minute, "end after this long in any case (udp-sink)")
	_ = fs.Parse(os.Args[2:])
	if fs.NArg() != 1 {
		usage()
	}
	addr := fs.Arg(0)
	var (
		r   Result
		err error
	)
	switch os.Args[1] {
	case "rr-server":
		err = rrServer(addr)
	case "rr":
		r, err = rr(addr, *dur)
	case "udp-sink":
		r, err = udpSink(addr, *idle, *maxT)
	case "udp":
		r, err = udpSend(addr, *dur, *size)
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "labperf:", err)
		os.Exit(1)
	}
	_ = json.NewEncoder(os.Stdout).Encode(r)
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: labperf rr-server ADDR | rr [-t DUR] ADDR | udp-sink [-idle D] [-max D] ADDR | udp [-t DUR] [-s SIZE] ADDR")
	os.Exit(2)
}

func rrServer(addr string) error {
	l, err := net.Listen("tcp4", addr)
	if err != nil {
		return err
	}
	fmt.Fprintln(os.Stderr, "ready")
	for {
		c, err := l.Accept()
		if err != nil {
			return err
		}
		_ = c.(*net.TCPConn).SetNoDelay(true)
		go func() {
			defer c.Close()
			_, _ = io.Copy(c, c)
		}()
	}
}

func rr(addr string, d time.Duration) (Result, error) {
	c, err := net.DialTimeout("tcp4", addr, 10*time.Second)
	if err != nil {
		return Result{}, err
	}
	defer c.Close()
	tc := c.(*net.TCPConn)
	_ = tc.SetNoDelay(true)
	var r Result
	b := []byte{'x'}
	start := time.Now()
	end := start.Add(d)
	for time.Now().Before(end) {
		if _, err := tc.Write(b); err != nil {
			return r, err
		}
		if _, err := io.ReadFull(tc, b); err != nil {
			return r, err
		}
		r.Ops++
	}
	r.Secs = time.Since(start).Seconds()
	r.Bytes = 2 * r.Ops
	return r, nil
}

func udpSink(addr string, idle, maxT time.Duration) (Result, error) {
	ua, err := net.ResolveUDPAddr("udp4", addr)
	if err != nil {
		return Result{}, err
	}
	c, err := net.ListenUDP("udp4", ua)
	if err != nil {
		return Result{}, err
	}
	defer c.Close()
	_ = c.SetReadBuffer(4 << 20)
	fmt.Fprintln(os.Stderr, "ready")
	var (
		r           Result
		first, last time.Time
	)
	buf := make([]byte, 65536)
	deadline := time.Now().Add(maxT)
	for {
		wait := deadline
		if !last.IsZero() && last.Add(idle).Before(wait) {
			wait = last.Add(idle)
		}
		_ = c.SetReadDeadline(wait)
		n, err := c.Read(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				break
			}
			r.Errors++
			continue
		}
		last = time.Now()
		if first.IsZero() {
			first = last
		}
		r.Ops++
		r.Bytes += uint64(n)
	}
	if !first.IsZero() {
		r.Secs = last.Sub(first).Seconds()
	}
	return r, nil
}

func udpSend(addr string, d time.Duration, size int) (Result, error) {
	c, err := net.Dial("udp4", addr)
	if err != nil {
		return Result{}, err
	}
	defer c.Close()
	var r Result
	buf := make([]byte, size)
	start := time.Now()
	end := start.Add(d)
	for i := 0; ; i++ {
		if i&63 == 0 && !time.Now().Before(end) {
			break
		}
		n, err := c.Write(buf)
		if err != nil {
			r.Errors++
			continue
		}
		r.Ops++
		r.Bytes += uint64(n)
	}
	r.Secs = time.Since(start).Seconds()
	return r, nil
}
