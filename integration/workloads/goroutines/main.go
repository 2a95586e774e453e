// Goroutine workload with a known answer. After "go" on stdin it starts exactly 100
// goroutines in worker (blocked on a channel) and 10 in ticker, then prints
// runtime.NumGoroutine(). After "close" it closes the channel (workers exit) and prints the
// count again; "exit" ends it. "frames" then main.worker's link-time address (hex) on the
// next line reads hex PCs (link-time addresses), one a line, until "end", and prints for each
// the frames runtime.CallersFrames expands there: the runtime's own view of inlining, the
// ground truth for the symbolization tests (PIE builds run away from their link-time
// addresses: the offset is worker's run-time address minus the one given).
package main

import (
	"bufio"
	"fmt"
	"os"
	"reflect"
	"runtime"
	"strconv"
	"strings"
	"time"
)

//go:noinline
func worker(ch chan struct{}) { <-ch }

//go:noinline
func ticker(done chan struct{}) {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-t.C:
		case <-done:
			return
		}
	}
}

//go:noinline
func startWorkers(ch chan struct{}) {
	for i := 0; i < 100; i++ {
		go worker(ch)
	}
}

//go:noinline
func startTickers(done chan struct{}) {
	for i := 0; i < 10; i++ {
		go ticker(done)
	}
}

// printFrames answers "frames": one line per PC, frames innermost first, "|"-separated.
// CallersFrames takes return addresses, so it is given pc+1 to look up the instruction at pc.
func printFrames(in *bufio.Scanner) {
	out := bufio.NewWriterSize(os.Stdout, 1<<16)
	in.Scan()
	linked, _ := strconv.ParseInt(in.Text(), 16, 64)
	bias := int64(reflect.ValueOf(worker).Pointer()) - linked
	sentinel := reflect.ValueOf(main).Pointer() + 1
	for in.Scan() && in.Text() != "end" {
		pc, _ := strconv.ParseUint(in.Text(), 16, 64)
		// CallersFrames expands the inlined callers of a PC only while more PCs follow:
		// main's entry is one that never belongs to the expansion (dropped below).
		frames := runtime.CallersFrames([]uintptr{uintptr(int64(pc)+bias) + 1, sentinel})
		var parts []string
		for {
			f, more := frames.Next()
			if !more {
				break
			}
			parts = append(parts, fmt.Sprintf("%s %s %d", f.Function, f.File, f.Line))
		}
		fmt.Fprintln(out, strings.Join(parts, "|"))
	}
	out.Flush()
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	ch, done := make(chan struct{}), make(chan struct{})
	fmt.Printf("ready %d\n", os.Getpid())
	for in.Scan() {
		switch in.Text() {
		case "go":
			startWorkers(ch)
			startTickers(done)
			time.Sleep(100 * time.Millisecond)
			fmt.Printf("count %d\n", runtime.NumGoroutine())
		case "close":
			close(ch)
			time.Sleep(100 * time.Millisecond)
			fmt.Printf("count %d\n", runtime.NumGoroutine())
		case "frames":
			printFrames(in)
		case "exit":
			close(done)
			return
		}
	}
}
