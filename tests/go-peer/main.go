// Command gopeer times the seed's hot-load mechanism, Go's plugin.Open,
// for the plugvisor benchmarks (`cargo xtask bench`).
//
// Go loads a plugin at most once per process (a second plugin.Open of the
// same plugin returns the first), so each run opens one plugin once, in a
// fresh process, the way the seed loaded each new version; the benchmark
// runs it many times and reports the distribution. It prints one line:
// open_ns (plugin.Open), lookup_ns (Lookup of Handle) and call_ns (one
// call), so the caller can check that the plugin really serves.
package main

import (
	"fmt"
	"os"
	"plugin"
	"time"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: gopeer PLUGIN.so")
		os.Exit(2)
	}
	t0 := time.Now()
	p, err := plugin.Open(os.Args[1])
	open := time.Since(t0)
	if err != nil {
		fmt.Fprintf(os.Stderr, "plugin.Open %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
	t1 := time.Now()
	sym, err := p.Lookup("Handle")
	lookup := time.Since(t1)
	if err != nil {
		fmt.Fprintf(os.Stderr, "Lookup Handle in %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
	handle, ok := sym.(func([]byte) []byte)
	if !ok {
		fmt.Fprintf(os.Stderr, "%s: Handle has type %T\n", os.Args[1], sym)
		os.Exit(1)
	}
	t2 := time.Now()
	out := handle([]byte("ping"))
	call := time.Since(t2)
	fmt.Printf("open_ns=%d lookup_ns=%d call_ns=%d answer=%q\n",
		open.Nanoseconds(), lookup.Nanoseconds(), call.Nanoseconds(), out)
}
