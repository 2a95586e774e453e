// Go allocation churn for the heap overhead benchmark: for SECONDS seconds, allocate
// objects of varied sizes from 64 call paths (so the runtime keeps a few hundred profile
// buckets), keeping a rolling live set of LIVE_MIB, then print the allocations done.
// References runtime.MemProfile so that memory profiling stays on (the linker turns it off
// in programs that never do; servers importing net/http/pprof or runtime/pprof do).
//
// Usage: go_churn SECONDS LIVE_MIB
package main

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"time"
)

var live [][]byte
var slot int

//go:noinline
func leaf(size int) {
	b := make([]byte, size)
	live[slot%len(live)] = b
	slot++
}

//go:noinline
func path(depth, size int) {
	if depth == 0 {
		leaf(size)
		return
	}
	if depth%2 == 0 {
		path(depth-1, size)
	} else {
		pathB(depth-1, size)
	}
}

//go:noinline
func pathB(depth, size int) {
	if depth == 0 {
		leaf(size * 2)
		return
	}
	path(depth-1, size)
}

func main() {
	seconds, _ := strconv.ParseFloat(os.Args[1], 64)
	liveMiB, _ := strconv.Atoi(os.Args[2])
	if len(os.Args) > 3 { // never true: keeps runtime.MemProfile reachable for the linker
		runtime.MemProfile(nil, false)
	}
	live = make([][]byte, liveMiB*1024*1024/1024)
	deadline := time.Now().Add(time.Duration(seconds * float64(time.Second)))
	n := 0
	for time.Now().Before(deadline) {
		for i := 0; i < 1000; i++ {
			path(i%8, 64<<(i%5))
			n++
		}
	}
	fmt.Println("allocations", n)
}
