"""CPU workload for the CPython-frames test: main -> handler -> compute, spinning in compute.

Spins briefly in ``warm_up`` first (so the agent meets the process and loads what it
needs for it), prints "ready", then runs main -> handler -> compute for argv[1] seconds
after reading a line on stdin (the test's go signal: the test measures steady state, not
how fast a new process is discovered).
"""

import sys
import time


def compute(deadline: float) -> int:
    total = 0
    while time.monotonic() < deadline:
        for i in range(2000):
            total += i * i
    return total


def handler(seconds: float) -> int:
    return compute(time.monotonic() + seconds)


def warm_up() -> None:
    compute(time.monotonic() + 0.3)


def main() -> None:
    warm_up()
    print("ready", flush=True)
    sys.stdin.readline()
    handler(float(sys.argv[1]))


if __name__ == "__main__":
    main()
