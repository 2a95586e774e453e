"""Per-record cost of taking records off a BPF ring buffer: bcc's callback vs the mmap reader.

    sudo .venv/bin/python -m benchmarks.ring_read [--rounds 20] [--burst 200]

One real ring buffer (256 pages, the agent's default) is filled by a tracepoint program,
``--burst`` records per round (one ``getpriority()`` call of this process each), then
emptied into a bounded deque the way the agent's poll thread does it, alternating:

- ``bcc callback``: ``open_ring_buffer`` + ``ring_buffer_consume()``, one ctypes call into
  Python per record copying it with ``ctypes.string_at`` (the agent before the reader);
- ``mmap reader``: agent/bpf/ring_reader.py ``drain()`` (one copy of the batch, a slice per
  record) and one ``deque.extend``.

With ``--contended`` a second Python thread spins meanwhile (as the agent's event loop and
symbolization thread do during a flush): each ctypes callback then has to win the GIL back,
so the wall time per record is printed beside the CPU time.

Both consume the same ring in turns (the consumer position lives in the kernel's page, so
each sees only its own round's records). The cost is the consuming thread's CPU time
(``time.thread_time``) per record, median over the rounds, for the stack record of today's
programs (agent/bpf/layouts.py StackEvent) and a 56-byte record (a stack-id record). The
machine is shared: compare the two columns of one run, not runs with each other.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import threading
import time
from collections import deque
from typing import Any

from agent.bpf.records import EVENT_SIZE
from agent.bpf.ring_reader import RingReader

RING_PAGES = 256
MARKER = 0x5F000000
PROGRAM = """
struct pattern { u8 bytes[8192]; };
BPF_RINGBUF_OUTPUT(events, RING_PAGES);
BPF_ARRAY(pattern, struct pattern, 1);

TRACEPOINT_PROBE(syscalls, sys_enter_getpriority)
{
    u64 which = args->which;
    if ((bpf_get_current_pid_tgid() >> 32) != TEST_TGID || (which & 0xff000000) != MARKER)
        return 0;
    u32 zero = 0;
    u32 len = which & 8191;
    struct pattern *p = pattern.lookup(&zero);
    if (p)
        events.ringbuf_output(&p->bytes[0], len, BPF_RB_NO_WAKEUP);
    return 0;
}
"""
SIZES = (("stack record", EVENT_SIZE), ("56-byte id record", 56))


def emit(length: int, n: int) -> None:
    which = MARKER | length
    for _ in range(n):
        try:
            os.getpriority(which, 0)
        except OSError:
            pass  # EINVAL: the marker is no valid ``which``; the tracepoint has run


class Spinner(threading.Thread):
    """A thread running Python code until stopped: the GIL is wanted by someone else."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stopping = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stopping.is_set():
            n = (n + 1) % 1_000_003


def measure(rounds: int, burst: int, contended: bool = False) -> dict[str, dict[str, float]]:
    from bcc import BPF

    bpf = BPF(text=PROGRAM, cflags=[f"-DTEST_TGID={os.getpid()}", f"-DMARKER={MARKER:#x}",
                                    f"-DRING_PAGES={RING_PAGES}"])
    pending: deque[bytes] = deque(maxlen=100_000)

    def on_record(_ctx: Any, data: Any, size: int) -> int:  # the agent's former callback
        pending.append(ctypes.string_at(data, size))
        return 0

    try:
        table = bpf["pattern"]
        table[ctypes.c_int(0)] = table.Leaf.from_buffer_copy(bytes(range(256)) * 32)
        bpf["events"].open_ring_buffer(on_record)
        reader = RingReader.from_bcc(bpf["events"], name="bench")
        results: dict[str, dict[str, float]] = {}
        for label, size in SIZES:
            costs: dict[str, list[float]] = {"bcc callback": [], "mmap reader": []}
            walls: dict[str, list[float]] = {"bcc callback": [], "mmap reader": []}
            spinner = Spinner()
            if contended:
                spinner.start()
            for _ in range(rounds):
                for method in costs:
                    pending.clear()
                    emit(size, burst)
                    started, started_wall = time.thread_time(), time.perf_counter()
                    if method == "bcc callback":
                        bpf.ring_buffer_consume()
                    else:
                        pending.extend(reader.drain())
                    costs[method].append((time.thread_time() - started) / burst * 1e6)
                    walls[method].append((time.perf_counter() - started_wall) / burst * 1e6)
                    if len(pending) != burst or len(pending[-1]) != size:
                        raise RuntimeError(f"{method}: {len(pending)} records of {burst} taken")
            spinner.stopping.set()
            if contended:
                spinner.join()
            results[label] = {m: statistics.median(c) for m, c in costs.items()}
            results[label] |= {f"{m} wall": statistics.median(c) for m, c in walls.items()}
        reader.close()
        return results
    finally:
        bpf.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--burst", type=int, default=200, help="records per round (the ring holds ~250 stack records)")
    parser.add_argument("--contended", action="store_true", help="a second Python thread spins meanwhile")
    args = parser.parse_args()
    results = measure(args.rounds, args.burst, args.contended)
    print(f"µs per record{' (another Python thread spinning)' if args.contended else ''}: "
          "CPU of the consuming thread, and wall time")
    print(f"{'record':20} {'bcc callback':>14} {'mmap reader':>12} {'ratio':>6}   "
          f"{'bcc wall':>9} {'reader wall':>12}")
    for label, row in results.items():
        print(f"{label:20} {row['bcc callback']:>14.2f} {row['mmap reader']:>12.2f} "
              f"{row['bcc callback'] / row['mmap reader']:>6.1f}   {row['bcc callback wall']:>9.2f} "
              f"{row['mmap reader wall']:>12.2f}")
    print(f"load average {os.getloadavg()[0]:.1f} (the machine is shared: compare columns of this run)")


if __name__ == "__main__":
    main()
