// Command dockerfile-froms prints the base images of a Dockerfile's build stage (the
// one its runtime stage copies from) and of its runtime stage, one a line, with ARG
// defaults substituted, for hack/buildah-dockerfile.sh (which tags local stand-ins
// with these names).
package main

import (
	"fmt"
	"os"

	"github.com/secureoverlay/secureoverlay/conformance/image"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: dockerfile-froms DOCKERFILE")
		os.Exit(2)
	}
	df, err := image.ParseDockerfileFile(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	rt, err := df.Runtime()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(rt.BuildBase)
	fmt.Println(rt.Base)
}
