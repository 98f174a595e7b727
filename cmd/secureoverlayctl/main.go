// Command secureoverlayctl is the operator's CLI for secureoverlay (status, mtu, rotate,
// enable, disable, doctor). Installed as kubectl-secureoverlay it runs as
// "kubectl secureoverlay"; the behaviour is the same. See docs/cli.md.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/secureoverlay/secureoverlay/ctl"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := (&ctl.CLI{Name: ctl.NameFor(os.Args[0])}).Run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
