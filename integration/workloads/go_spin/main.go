// CPU workload for Go symbolization: spins in main.spin for the given seconds, then waits
// until stdin closes (so a profiler can still read its maps and symbols, however late it
// gets to its samples). step is small enough for the compiler to inline into spin (inlined
// frames in CPU stacks).
package main

import (
	"io"
	"os"
	"strconv"
	"time"
)

var sink uint64

func step(x uint64) uint64 {
	return x*6364136223846793005 + 1442695040888963407 // step body
}

//go:noinline
func spin(until time.Time) {
	for time.Now().Before(until) {
		for i := 0; i < 100000; i++ {
			sink = step(sink) // call step
		}
	}
}

func main() {
	seconds, _ := strconv.ParseFloat(os.Args[1], 64)
	spin(time.Now().Add(time.Duration(seconds * float64(time.Second))))
	_, _ = io.Copy(io.Discard, os.Stdin)
}
