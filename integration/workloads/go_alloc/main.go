// Go allocation workload with a known answer: after "go" on stdin, allocBlocks makes
// 20000 slices of 4096 bytes (kept in a global so they escape to the heap) and prints the
// bytes it allocated; "exit" ends it.
package main

import (
	"bufio"
	"fmt"
	"os"
)

const blocks, blockSize = 20000, 4096

var kept [blocks][]byte

//go:noinline
func allocBlocks() int {
	total := 0
	for i := 0; i < blocks; i++ {
		kept[i] = make([]byte, blockSize)
		total += blockSize
	}
	return total
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	fmt.Println("ready")
	for in.Scan() {
		switch in.Text() {
		case "go":
			fmt.Printf("allocated %d\n", allocBlocks())
		case "exit":
			return
		}
	}
}
