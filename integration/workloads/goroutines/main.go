// Goroutine workload with a known answer. After "go" on stdin it starts exactly 100
// goroutines in worker (blocked on a channel) and 10 in ticker, then prints
// runtime.NumGoroutine(). After "close" it closes the channel (workers exit) and prints the
// count again; "exit" ends it.
package main

import (
	"bufio"
	"fmt"
	"os"
	"runtime"
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
		case "exit":
			close(done)
			return
		}
	}
}
