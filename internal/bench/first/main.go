// Command first makes one loopctl call and prints how long it took, in
// nanoseconds: the first call of a new process, which the bench harness
// starts afresh for each measurement. Its main does nothing before the
// call but read which one: the harness's own start-up and earlier work
// would change what a first call costs.
//
//	first list
//	first find FILE
//	first sweep REF
//	first attach FILE     # then detaches, and prints the device's number too
//	first reuse FILE      # Attach with Options.Reuse
package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/loopctl/loopctl"
)

func main() {
	op, arg := os.Args[1], ""
	if len(os.Args) > 2 {
		arg = os.Args[2]
	}
	start := time.Now()
	var d *loopctl.Device
	var err error
	switch op {
	case "list":
		_, err = loopctl.List()
	case "find":
		_, err = loopctl.FindByBackingFile(arg)
	case "sweep":
		_, err = loopctl.Sweep(context.Background(), arg)
	case "attach", "reuse":
		d, err = loopctl.Attach(context.Background(), arg, loopctl.Options{Reuse: op == "reuse"})
	default:
		err = fmt.Errorf("no operation %q", op)
	}
	ns := time.Since(start).Nanoseconds()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if d == nil {
		fmt.Println(ns)
		return
	}
	n := d.Number()
	if err := d.ClearFD(); err != nil {
		fmt.Fprintln(os.Stderr, err)
	}
	d.Close()
	fmt.Println(ns, n)
}
