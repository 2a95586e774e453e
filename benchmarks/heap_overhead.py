"""Cost of heap profiling: per-call uprobe cost and slowdown of an allocation-heavy loop.

    sudo .venv/bin/python -m benchmarks.heap_overhead [--repeats 3] [--calls 2000000]

Runs the same malloc/free loop (benchmarks/workloads/alloc_loop.c) alternately without and
with the agent's heap actor probing it, in one run, and prints the time per malloc+free
pair both ways, the added cost per call, and the slowdown ratio (median of the repeats).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.run import STACKFLEET
from stackfleet.nats_server import NatsServer

ROOT = Path(__file__).resolve().parents[1]


def timed_pairs(exe: Path, calls: int, wait_s: float = 0.0) -> float:
    proc = subprocess.Popen([str(exe), str(calls)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin and proc.stdout
    proc.stdout.readline()
    time.sleep(wait_s)
    out, _ = proc.communicate("go\n")
    return float(out.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, NatsServer() as nats:
        exe = Path(tmp) / "alloc_loop"
        subprocess.run(["gcc", "-O2", "-o", str(exe), str(ROOT / "benchmarks/workloads/alloc_loop.c")], check=True)
        agent = subprocess.Popen([STACKFLEET, "agent", "--nats", nats.url, "--types", "heap", "--log-level", "WARNING"],
                                 env={"STACKFLEET_TARGET_COMM": "^alloc_loop$", "PATH": "/usr/bin:/bin"},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(6)  # compile + first target scan
            off, on = [], []
            for _ in range(args.repeats):
                # Without: a process the selector does not match (renamed copy) — same binary code.
                plain = Path(tmp) / "plain_loop"
                plain.write_bytes(exe.read_bytes())
                plain.chmod(0o755)
                off.append(timed_pairs(plain, args.calls))
                on.append(timed_pairs(exe, args.calls, wait_s=2.5))  # probed by the heap actor
        finally:
            agent.terminate()
            agent.wait(30)
    off_ns, on_ns = statistics.median(off), statistics.median(on)
    print(f"malloc+free pair without heap profiling: {off_ns:8.1f} ns  (runs {off})")
    print(f"malloc+free pair with heap profiling:    {on_ns:8.1f} ns  (runs {on})")
    print(f"added cost per call (2 calls a pair):     {(on_ns - off_ns) / 2:8.1f} ns")
    print(f"slowdown of the allocation loop:          {on_ns / off_ns:8.2f}x")


if __name__ == "__main__":
    sys.exit(main())
