"""CPU workload for the CPython-frames test: main -> handler -> compute, spinning in compute.

Prints "ready" and spins in ``warm_up`` until a line arrives on stdin (so the agent meets
the process and loads what it needs for it: the test sends that line once the agent's
profile shows ``warm_up`` as a Python frame), then runs main -> handler -> compute for
argv[1] seconds at most, or until SIGUSR1 (the test sends it once the agent has exported
enough samples, so a loaded machine runs it longer and an idle one shorter). The test
measures steady state, not how fast a new process is discovered.
"""

import select
import signal
import sys
import time

STOP = False


def _stop(signum: int, frame: object) -> None:
    global STOP
    STOP = True


def compute(deadline: float) -> int:
    total = 0
    while not STOP and time.monotonic() < deadline:
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
    signal.signal(signal.SIGUSR1, _stop)
    print("ready", flush=True)
    warm_up()
    handler(float(sys.argv[1]))


if __name__ == "__main__":
    main()
