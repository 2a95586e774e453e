"""Python cost per CPU sample of the steady state, from ring to wire, before and after a change.

    .venv/bin/python -m benchmarks.cpu_batch_path [--before REV] [--records 2000] [--rounds 9]

The path the CPU profile takes for a repeated stack, with nothing but the BPF program left
out: 56-byte id records (bpf/stack_dedup.h) written with their ring headers into a ring laid
out as the kernel's (agent/bpf/ring_reader.py ``RingView`` over plain memory), then

- ``poll``: the CPU source's poll-thread step (``_take_records``: the ring drain, the
  process-capture hook, the bounded pending queue);
- ``to_samples``: the flush's drain and ``CpuActor.to_samples`` (decode, stack cache);
- ``sink+encode``: the metadata sink (each process's attributes added to its samples, the
  agent's default) and the wire encoder (shared/wire.py), as the publisher runs them.

The records are one flush of the issue's workload at 999 Hz on 2 CPUs (``--records``): two
threads of a live process (real symbolization, real /proc), 8 stacks of 11 - 18 frames
already known. Each part's thread CPU time (``time.thread_time``) per sample, median of
``--rounds`` flushes after one warm-up flush, and how many garbage collections (any
generation) a flush triggered: objects the collector tracks (tuples, ``Sample`` objects)
made per sample set it off, and a collection of the old generations walks every object the
agent holds. Side by side in one run: the code at
``--before`` (a git revision, exported to a temporary directory and run the same way in a
subprocess) and the working tree, alternating, so machine load hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MIN_RING_BYTES = 1 << 20


def ring_bytes_for(nbytes: int) -> int:
    """A ring (a power of two, as the kernel's) that holds ``nbytes`` of records at once: a
    flush's records at 999 Hz (~20,000, 1.3 MB) do not fit the agent's default 1 MiB ring, whose
    poll thread moves them out as they come; here one flush is written in one piece."""
    size = MIN_RING_BYTES
    while size < nbytes:
        size *= 2
    return size
PARTS = ("poll", "to_samples", "sink+encode")


def serial_of(stack_id: int) -> int:
    """The serial BPF would give the stack stored as ``stack_id`` (its first store, on CPU 0)."""
    return stack_id - 99


def measure(records_per_flush: int, rounds: int) -> dict[str, float]:
    """Run the path in this process on the code importable here; us per sample per part."""
    from agent.actors.base import ActorContext, SampleSink
    from agent.bpf.layouts import DedupFlags
    from agent.bpf.ring_reader import RingReader, RingView
    from agent.clock import MonotonicToUnix
    from agent.metadata.resolver import MetadataResolver
    from agent.metadata.sink import MetadataSink
    from agent.settings import AgentSettings
    from agent.symbols import Symbolizer
    from shared.counters import Counters
    from shared.profile_types import ProfileType
    from shared.wire import StreamEncoder
    from tests.test_stack_dedup import FakeKernelCpuActor, header, stack_event
    from tests.test_symbols import Target, build

    class Publish(SampleSink):
        def __init__(self) -> None:
            self.encoder = StreamEncoder("host", ProfileType.CPU, "agent")

        async def submit(self, profile_type: ProfileType, samples: Any, period: int) -> None:
            self.encoder.encode(samples, period)

    with tempfile.TemporaryDirectory() as tmp:
        target = Target(build(Path(tmp)))
        try:
            pid = target.pid
            counters = Counters()
            ctx = ActorContext(AgentSettings(cpu_stack_dedup=True), Symbolizer(), ThreadPoolExecutor(1),
                               None,  # type: ignore[arg-type]
                               counters, MonotonicToUnix())
            actor = FakeKernelCpuActor(ctx)
            source = actor.source
            resolver = MetadataResolver(AgentSettings().metadata, counters)
            sink = MetadataSink(Publish(), resolver, counters)
            leaf, _ = target.truth["leaf_function"]
            caller, _ = target.truth["caller_function"]
            stacks = [(100 + k, [leaf + k % 3] + [caller + 1] * (10 + k)) for k in range(8)]
            # Each stored stack has its own serial, as BPF gives them (bpf/stack_dedup.h).
            actor.to_samples([header(0, sid, serial_of(sid), pid, pid, 0, DedupFlags.NEW, b"spin")
                              + stack_event(pid, pid, user) for sid, user in stacks])
            records = [header(1_000_000 * i, stacks[i % 8][0], serial_of(stacks[i % 8][0]), pid, pid + i % 2, i % 2,
                              DedupFlags.ID_ONLY, b"spin%d" % (i % 2)) for i in range(records_per_flush)]
            ring = b"".join(len(r).to_bytes(4, "little") + bytes(4) + r for r in records)  # 56 + 8: no padding
            ring_bytes = ring_bytes_for(len(ring))
            view = RingView(memoryview(bytearray(8)), memoryview(bytearray(8)), memoryview(bytearray(2 * ring_bytes)),
                            ring_bytes)
            reader = RingReader(view, name="bench")
            source._ring = reader  # type: ignore[attr-defined]
            loop = asyncio.new_event_loop()

            def flush() -> tuple[float, float, float]:
                view.consumer[0] = 0
                view.data[: len(ring)] = ring
                view.producer[0] = len(ring)
                t0 = time.thread_time()
                source._take_records(reader)  # type: ignore[attr-defined]
                t1 = time.thread_time()
                samples = actor.to_samples(source.drain())
                t2 = time.thread_time()
                loop.run_until_complete(sink.submit(ProfileType.CPU, samples, actor.period()))
                t3 = time.thread_time()
                if len(samples) != records_per_flush:
                    raise RuntimeError(f"{len(samples)} samples from {records_per_flush} records")
                return t1 - t0, t2 - t1, t3 - t2

            flush()
            collections = [0]

            def count(phase: str, info: dict[str, int]) -> None:
                collections[0] += phase == "start"

            gc.callbacks.append(count)
            times = [flush() for _ in range(rounds)]
            gc.callbacks.remove(count)
            loop.close()
        finally:
            target.stop()
    per = {part: statistics.median(t[i] for t in times) / records_per_flush * 1e6 for i, part in enumerate(PARTS)}
    per["total"] = sum(per[p] for p in PARTS)
    per["gc_per_flush"] = collections[0] / rounds
    return per


def _run(code_dir: Path, records: int, rounds: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(code_dir)}
    out = subprocess.run([sys.executable, "-m", "benchmarks.cpu_batch_path", "--measure-here",
                          "--records", str(records), "--rounds", str(rounds)],
                         cwd=code_dir, env=env, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out.splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="", help="git revision to compare with (default: none)")
    parser.add_argument("--records", type=int, default=2000, help="records per flush")
    parser.add_argument("--rounds", type=int, default=9, help="timed flushes per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternated")
    parser.add_argument("--measure-here", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_here:
        print(json.dumps(measure(args.records, args.rounds)))
        return 0
    sides = {"after (working tree)": ROOT}
    with tempfile.TemporaryDirectory() as tmp:
        if args.before:
            # Imported here: the exported tree runs this file but has no benchmarks/revision.py.
            from benchmarks.revision import export_revision

            before = export_revision(args.before, Path(tmp), Path(__file__))  # measured by this file
            sides = {f"before ({args.before})": before, **sides}
        results: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
        for _ in range(args.repeats):
            for name, code in sides.items():
                results[name].append(_run(code, args.records, args.rounds))
    print(f"load average {os.getloadavg()[0]:.1f}; us of thread CPU per sample, {args.records} records a flush "
          f"(runs: {args.repeats}, each the median of {args.rounds} flushes)")
    print(f"{'':<28}" + "".join(f"{p:>14}" for p in (*PARTS, "total")))
    for name, runs in results.items():
        print(f"{name:<28}" + "".join(f"{statistics.median(r[p] for r in runs):>14.3f}" for p in (*PARTS, "total")))
        print(f"{'':<28}" + "".join(f"{' / '.join(f'{r[p]:.2f}' for r in runs):>14}" for p in (*PARTS, "total")))
        print(f"{'':<28}garbage collections a flush: {statistics.median(r['gc_per_flush'] for r in runs):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
