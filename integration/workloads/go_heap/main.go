// Go heap workload with a known answer: it keeps a known live set, churns short-lived
// allocations from two other sites, and writes its own runtime/pprof profiles, which the
// heap test compares with what the agent reads from this process's memory.
//
// Usage: go_heap PREFIX. On "go" on stdin it allocates (keepAlive: 24 MiB live in 16 KiB
// blocks; churnSmall: 64 MiB in 512-byte objects; churnLarge: 48 MiB in 96 KiB blocks),
// contends a mutex and blocks on a channel (mutex and block profiles are enabled), runs
// runtime.GC(), writes PREFIX.heap, PREFIX.mutex and PREFIX.block, prints "written" and
// then allocates nothing until "exit".
package main

import (
	"bufio"
	"fmt"
	"os"
	"runtime"
	"runtime/pprof"
	"sync"
	"time"
)

const (
	keepBlocks, keepSize   = 24 * 64, 16 << 10
	smallCount, smallSize  = (64 << 20) / 512, 512
	largeCount, largeSize  = 48 * 1024 / 96, 96 << 10
	contenders, lockRounds = 4, 2000
)

var (
	kept [][]byte
	sink []byte
	mu   sync.Mutex
)

//go:noinline
func keepAlive() {
	kept = make([][]byte, keepBlocks)
	for i := range kept {
		kept[i] = make([]byte, keepSize)
	}
}

//go:noinline
func churnSmall() {
	for i := 0; i < smallCount; i++ {
		sink = make([]byte, smallSize)
	}
}

//go:noinline
func churnLarge() {
	for i := 0; i < largeCount; i++ {
		sink = make([]byte, largeSize)
	}
}

//go:noinline
func holdLock() {
	mu.Lock()
	time.Sleep(20 * time.Microsecond)
	mu.Unlock()
}

//go:noinline
func contend() {
	var wg sync.WaitGroup
	for g := 0; g < contenders; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < lockRounds/contenders; i++ {
				holdLock()
			}
		}()
	}
	wg.Wait()
	ch := make(chan int)
	go func() { time.Sleep(50 * time.Millisecond); ch <- 1 }()
	<-ch
}

func write(path, name string) {
	f, err := os.Create(path)
	if err != nil {
		panic(err)
	}
	if err := pprof.Lookup(name).WriteTo(f, 0); err != nil {
		panic(err)
	}
	f.Close()
}

func main() {
	runtime.MemProfileRate = 64 << 10 // not the default: the agent must read it from memory
	runtime.SetMutexProfileFraction(1)
	runtime.SetBlockProfileRate(1)
	prefix := os.Args[1]
	in := bufio.NewScanner(os.Stdin)
	fmt.Println("ready")
	for in.Scan() {
		switch in.Text() {
		case "go":
			keepAlive()
			churnSmall()
			churnLarge()
			contend()
			runtime.GC()
			write(prefix+".heap", "heap")
			write(prefix+".mutex", "mutex")
			write(prefix+".block", "block")
			fmt.Println("written")
		case "exit":
			return
		}
	}
}
