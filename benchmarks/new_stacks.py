"""Python cost of a *new* CPU stack (a whole record) of a Python process, captured live, replayed.

    sudo .venv/bin/python -m benchmarks.new_stacks [--seconds 8] [--hz 999] [--before REV]
                                                   [--repeats 3] [--profile]

The CPU profile samples every process, the agent's own (a Python process) and busy Python
services among them: their stacks carry CPython frames whose instruction field, and the native
leaf inside the interpreter, change from sample to sample, so many samples are new stacks.

Capture: the real CPU actor (bpf/cpu.bpf.c, native unwinding, CPython frames) runs for
``--seconds`` at ``--hz`` while this process spins a Python thread and a Python "service"
child (a few known functions) runs; every record the actor converts is kept in ring order.
Replay, in subprocesses while this process and the child stay alive (their memory and code
objects readable): a fresh actor and symbolizer take the first half of the records (caches
fill as in a running agent), then the second half's whole records of the two Python
processes are timed (``time.thread_time``) in batches of ``BATCH``, and timed again through
a fresh actor sharing the filled caches (``_warm``: every address and code object known,
only the stacks are new). Each side (the working tree, and ``--before``, a git revision
exported to a temporary directory) is replayed ``--repeats`` times, alternating. Printed:
records and whole records per process, us of thread CPU per whole record; ``--profile``
adds cProfile (thread CPU as its clock) of one replay per side.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pickle
import pstats
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BATCH = 50  # whole records per to_samples call (a flush brings them with its id records)

WORKLOAD = '''
import json, sys, time, re
def parse(text):
    return json.loads(text)
def render(obj):
    return json.dumps(obj, sort_keys=True)
def match(text):
    return len(re.findall(r"[a-z]+", text))
def arith(n):
    total = 0
    for i in range(n):
        total += i * i % 7
    return total
def handle(doc):
    obj = parse(doc)
    text = render(obj)
    return match(text) + arith(200)
def serve(deadline):
    doc = json.dumps({"k%d" % i: [i, str(i), {"x": i}] for i in range(30)})
    n = 0
    while time.monotonic() < deadline:
        n += handle(doc)
    return n
print("ready", flush=True)
serve(time.monotonic() + float(sys.argv[1]))
'''


def _spin_self(stop: threading.Event) -> None:
    """Keep this (Python) process busy too, as an agent symbolizing would be."""
    import json

    doc = json.dumps({f"k{i}": [i, str(i)] for i in range(50)})
    while not stop.is_set():
        json.loads(doc)
        sum(i * i for i in range(100))


def capture(seconds: float, hz: int) -> list[bytes]:
    from agent.actors.base import ActorContext, SampleSink
    from agent.actors.cpu import CpuActor
    from agent.bpf.ring_reader import RingItem, ring_records
    from agent.clock import MonotonicToUnix
    from agent.settings import AgentSettings
    from agent.symbols import Symbolizer
    from agent.unwind.sharing import SharedUnwinding
    from shared.counters import Counters

    records: list[bytes] = []

    class Sink(SampleSink):
        async def submit(self, profile_type: Any, samples: Any, period: int) -> None:
            pass

    class Actor(CpuActor):
        def to_samples(self, batch: Sequence[RingItem]) -> Any:
            records.extend(ring_records(batch))
            return super().to_samples(batch)

    async def main() -> None:
        counters = Counters()
        settings = AgentSettings(frequency_hz=hz, flush_interval_s=0.5, cpu_stack_dedup=True)
        ctx = ActorContext(settings, Symbolizer(), ThreadPoolExecutor(1), Sink(), counters, MonotonicToUnix(),
                           unwinding=SharedUnwinding(counters, settings.unwind_table_rows))
        actor = Actor(ctx)
        task = asyncio.ensure_future(actor.run())
        while actor.bpf is None and not task.done():
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.0)  # the unwinder reads the processes' tables
        records.clear()
        await asyncio.sleep(seconds)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        print("capture counters:", {k: v for k, v in counters.snapshot().items() if "python" in str(k)})

    asyncio.run(main())
    return records


def replay(records: list[bytes], pids: dict[int, str], profile: bool) -> dict[str, Any]:
    """Replay ``records`` through a fresh actor and symbolizer (the code importable here)."""
    from agent.actors.base import ActorContext
    from agent.bpf.layouts import DedupFlags
    from agent.bpf.sample_records import SAMPLE_RECORD
    from agent.clock import MonotonicToUnix
    from agent.runtimes.python.frames import PythonStacks
    from agent.settings import AgentSettings
    from agent.symbols import Symbolizer
    from shared.counters import Counters
    from tests.test_stack_dedup import FakeKernelCpuActor

    counters = Counters()
    ctx = ActorContext(AgentSettings(cpu_stack_dedup=True), Symbolizer(), ThreadPoolExecutor(1),
                       None,  # type: ignore[arg-type]
                       counters, MonotonicToUnix())
    actor = FakeKernelCpuActor(ctx)
    assert actor.python_frames is not None
    actor.python_frames.stacks = PythonStacks(ctx.python, None, counters, "cpu")

    def kind(raw: bytes) -> tuple[str, bool]:
        _ts, _sid, _serial, pid, _tid, _cpu, flags, _comm = SAMPLE_RECORD.unpack_from(raw)
        return pids.get(pid, "other"), flags != DedupFlags.ID_ONLY

    half = len(records) // 2
    warm, timed = records[:half], records[half:]
    for i in range(0, len(warm), 500):
        actor.to_samples(warm[i : i + 500])
    counts: dict[str, list[int]] = {}
    for raw in records:
        name, whole = kind(raw)
        entry = counts.setdefault(name, [0, 0])
        entry[0 if whole else 1] += 1
    result: dict[str, Any] = {"records": {k: {"whole": v[0], "id": v[1]} for k, v in counts.items()}}
    for name in ("agent", "workload"):
        wholes = [r for r in timed if kind(r) == (name, True)]
        if not wholes:
            continue
        result[name] = _us_per_record(actor, wholes, f"{name}'s whole records" if profile else "")
        result[f"{name}_timed"] = len(wholes)
        # Warm: the same records again through a fresh actor (its stack cache empty) sharing
        # the symbolizer and Python caches, so every address and code object was seen: what
        # a new stack costs when only its combination of known frames is new.
        again = FakeKernelCpuActor(ctx)
        assert again.python_frames is not None
        again.python_frames.stacks = actor.python_frames.stacks
        result[f"{name}_warm"] = _us_per_record(again, wholes, f"{name}'s whole records, warm" if profile else "")
    return result


def _us_per_record(actor: Any, records: list[bytes], profile_title: str) -> float:
    """Thread CPU (not preemption) per record of ``actor.to_samples`` over ``records`` in
    batches; with a title, a cProfile of the same run is printed under it."""
    profiler = cProfile.Profile(time.thread_time) if profile_title else None
    start = time.thread_time()
    if profiler:
        profiler.enable()
    for i in range(0, len(records), BATCH):
        actor.to_samples(records[i : i + BATCH])
    if profiler:
        profiler.disable()
    spent = time.thread_time() - start
    if profiler:
        print(f"--- cProfile, {profile_title} ---")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    return round(spent / len(records) * 1e6, 1)


def _replay_in(code_dir: Path, saved: Path, profile: bool) -> dict[str, Any]:
    """One replay in a subprocess running the code in ``code_dir``."""
    env = {**os.environ, "PYTHONPATH": str(code_dir)}
    out = subprocess.run([sys.executable, "-m", "benchmarks.new_stacks", "--replay-here", str(saved)]
                         + (["--profile"] if profile else []),
                         cwd=code_dir, env=env, check=True, capture_output=True, text=True).stdout
    if profile:
        print(f"=== {code_dir}")
        print("\n".join(out.splitlines()[:-1]))
    return dict(json.loads(out.splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--hz", type=int, default=999)
    parser.add_argument("--before", default="", help="git revision to compare with (default: none)")
    parser.add_argument("--repeats", type=int, default=3, help="replays of each side, alternated")
    parser.add_argument("--profile", action="store_true", help="cProfile (thread CPU) of one replay per side")
    parser.add_argument("--replay-here", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.replay_here:
        records, pids = pickle.loads(Path(args.replay_here).read_bytes())
        print(json.dumps(replay(records, pids, args.profile)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        sides = {"after (working tree)": ROOT}
        if args.before:
            # Imported here: the exported tree runs this file but has no benchmarks/revision.py.
            from benchmarks.revision import export_revision

            before = export_revision(args.before, Path(tmp), Path(__file__))  # measured by this file
            sides = {f"before ({args.before})": before, **sides}
        script = Path(tmp) / "service.py"
        script.write_text(WORKLOAD)
        child = subprocess.Popen([sys.executable, str(script), "3600"], stdout=subprocess.PIPE)
        assert child.stdout is not None
        child.stdout.readline()
        stop = threading.Event()
        spinner = threading.Thread(target=_spin_self, args=(stop,), daemon=True)
        spinner.start()
        load = [os.getloadavg()[0]]
        try:
            records = capture(args.seconds, args.hz)
            stop.set()  # the replays are timed alone; this process and the workload stay alive
            spinner.join()
            saved = Path(tmp) / "records.pickle"
            saved.write_bytes(pickle.dumps((records, {os.getpid(): "agent", child.pid: "workload"})))
            results: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
            for i in range(args.repeats):
                for name, code in sides.items():
                    results[name].append(_replay_in(code, saved, args.profile and i == 0))
        finally:
            stop.set()
            child.kill()
            child.wait()
    load.append(os.getloadavg()[0])
    first = next(iter(results.values()))[0]
    print(f"load average {load[0]:.1f} -> {load[1]:.1f}; records captured at {args.hz} Hz over {args.seconds:g} s "
          f"(whole = new stacks): {first['records']}")
    print("thread CPU per whole record of the replay's second half, us, median (runs); _warm: the same records "
          "again, every address and code object cached")
    for name, runs in results.items():
        cells = []
        for who in ("agent", "workload"):
            for label in (who, f"{who}_warm"):
                values = [r[label] for r in runs if label in r]
                if values:
                    cells.append(f"{label} {statistics.median(values):.1f} ({', '.join(f'{v:.1f}' for v in values)})")
            if who in runs[0]:
                cells.append(f"{runs[0][who + '_timed']} records")
        print(f"  {name:<28}" + "   ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
