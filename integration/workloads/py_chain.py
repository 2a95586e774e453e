"""CPU workload for the CPython-frames test: main -> handler -> compute, spinning in compute.

Prints "ready" and spins in ``warm_up`` until a line arrives on stdin (so the agent meets
the process and loads what it needs for it: the test sends that line once the agent's
profile shows ``warm_up`` as a Python frame), then runs main -> handler -> compute for
argv[1] seconds. The test measures steady state, not how fast a new process is discovered.
"""

import select
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
    while not select.select([sys.stdin], [], [], 0)[0]:
        compute(time.monotonic() + 0.01)
    sys.stdin.readline()


def main() -> None:
    print("ready", flush=True)
    warm_up()
    handler(float(sys.argv[1]))


if __name__ == "__main__":
    main()
