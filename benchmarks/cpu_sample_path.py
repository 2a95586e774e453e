"""Per-sample cost of the CPU profile's path, measured in parts (not the bcc comparison,
which is `benchmarks.run`'s): run the CPU actor alone on a workload, then replay what it
received.

1. Live: the CPU actor at ``--hz`` on every CPU for ``--seconds`` while the workload runs.
   Every batch the actor converts is recorded. Reported per sample: the BPF programs' run
   time (``on_cpu_sample``'s fdinfo with ``kernel.bpf_stats_enabled``; tail-called stages
   run inside it) and the CPU time of the
   ring-buffer poll thread (ctypes callbacks and copies), record sizes.
2. Replay: the recorded batches through ``to_samples`` (decode, stack caches, ``Sample``
   objects) and the wire encoder, timed with ``time.thread_time`` over ``--rounds`` passes
   after one warm-up pass (so the symbolizer's caches are warm, as in the steady state),
   while the workload still runs (symbolization reads its /proc files).

    sudo .venv/bin/python -m benchmarks.cpu_sample_path --seconds 10 --hz 999

Writes a JSON summary to stdout (and to ``--out`` if given).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.measure import enable_bpf_stats


def _prog_stats(fd: int) -> tuple[int, int]:
    run_time = run_cnt = 0
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("run_time_ns:"):
            run_time = int(line.split()[1])
        elif line.startswith("run_cnt:"):
            run_cnt = int(line.split()[1])
    return run_time, run_cnt


async def _live(seconds: float, hz: int, dedup: bool) -> tuple[Any, list[list[bytes]], dict[str, float]]:
    from agent.actors.base import ActorContext, SampleSink
    from agent.actors.cpu import CpuActor
    from agent.clock import MonotonicToUnix
    from agent.settings import AgentSettings
    from agent.symbols import Symbolizer
    from agent.unwind.sharing import SharedUnwinding
    from shared.counters import Counters

    class Sink(SampleSink):
        async def submit(self, profile_type: Any, samples: list[Any], period: int) -> None:
            pass

    counters = Counters()
    settings = AgentSettings(frequency_hz=hz, flush_interval_s=1.0, cpu_stack_dedup=dedup)
    ctx = ActorContext(settings, Symbolizer(), ThreadPoolExecutor(1), Sink(), counters, MonotonicToUnix(),
                       unwinding=SharedUnwinding(counters, settings.unwind_table_rows))
    actor = CpuActor(ctx)
    batches: list[list[bytes]] = []
    convert = actor.to_samples

    def to_samples(records: list[bytes]) -> list[Any]:
        batches.append(list(records))
        return convert(records)

    actor.to_samples = to_samples  # type: ignore[method-assign]
    poll_cpu = [0.0]
    poll_loop = actor._poll_loop

    def timed_poll_loop() -> None:
        start = time.thread_time()
        try:
            poll_loop()
        finally:
            poll_cpu[0] = time.thread_time() - start

    actor._poll_loop = timed_poll_loop  # type: ignore[method-assign]
    task = asyncio.ensure_future(actor.run())
    while actor.bpf is None:
        await asyncio.sleep(0.1)
    await asyncio.sleep(3.0)  # tables built, caches warm
    funcs = actor.bpf.funcs
    fd = (funcs.get(b"on_cpu_sample") or funcs.get("on_cpu_sample")).fd
    rt0, cnt0 = _prog_stats(fd)
    await asyncio.sleep(seconds)
    rt1, cnt1 = _prog_stats(fd)
    from agent.bpf.loader import read_percpu_counters

    print("BPF counters", read_percpu_counters(actor.bpf["counters"]), file=sys.stderr)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    records = sum(len(b) for b in batches)
    print({k: v for k, v in counters.snapshot().items() if "drop" in k or "stack" in k}, file=sys.stderr)
    live = {
        "bpf_runs": cnt1 - cnt0,
        "bpf_us_per_run": (rt1 - rt0) / max(1, cnt1 - cnt0) / 1000,
        "records": records,
        "record_bytes_mean": sum(len(r) for b in batches for r in b) / max(1, records),
        "poll_thread_cpu_s_whole_run": poll_cpu[0],
    }
    return actor, batches, live


def _replay(actor: Any, batches: list[list[bytes]], rounds: int, limit: int) -> dict[str, float]:
    from shared.profile_types import ProfileType
    from shared.wire import StreamEncoder

    encoder = StreamEncoder("host", ProfileType.CPU, "agent")
    kept: list[list[bytes]] = []  # the last `limit` records: the steady state
    for batch in reversed(batches):
        if sum(len(b) for b in kept) >= limit:
            break
        kept.insert(0, batch)
    batches = kept
    period = actor.period()

    def one_pass() -> tuple[float, float, int]:
        convert = encode = 0.0
        n = 0
        for batch in batches:
            t0 = time.thread_time()
            samples = actor.to_samples(batch)
            t1 = time.thread_time()
            encoder.encode(samples, period)
            t2 = time.thread_time()
            convert += t1 - t0
            encode += t2 - t1
            n += len(samples)
        return convert, encode, n

    if os.environ.get("CPU_SAMPLE_PATH_PROFILE"):
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        one_pass()
        prof.disable()
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
    t = time.thread_time()
    one_pass()
    print(f"replay warm-up pass: {time.thread_time() - t:.1f} s", file=sys.stderr)
    totals = [one_pass() for _ in range(rounds)]
    samples = sum(t[2] for t in totals)
    import collections
    import struct

    kinds: collections.Counter[tuple[str, str]] = collections.Counter()
    for batch in batches:
        for r in batch:
            if len(r) == 56 or len(r) < 120:
                continue
            pid = struct.unpack_from("<I", r, 24)[0]
            copy_len = struct.unpack_from("<I", r, 56 + 80 + 2 * 127 * 8 + 8)[0] if len(r) > 4000 else -1
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                comm = "?"
            kinds[("copy" if copy_len else "nocopy", "self" if pid == os.getpid() else comm)] += 1
    print("full records by kind:", kinds.most_common(12), file=sys.stderr)
    ids = [[r for r in batch if len(r) == 56] for batch in batches]  # id records alone (56 bytes)
    n_ids = sum(len(b) for b in ids)
    t = time.thread_time()
    for batch in ids:
        actor.to_samples(batch)
    id_us = (time.thread_time() - t) / max(1, n_ids) * 1e6
    return {
        "id_records_replayed": n_ids,
        "to_samples_us_per_id_record": id_us,
        "samples_replayed": samples,
        "to_samples_us_per_sample": sum(t[0] for t in totals) / max(1, samples) * 1e6,
        "encode_us_per_sample": sum(t[1] for t in totals) / max(1, samples) * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--hz", type=int, default=999)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--replay-records", type=int, default=5000)
    parser.add_argument("--dedup", action="store_true", help="the deduplicated program (cpu_stack_dedup)")
    parser.add_argument("--workload", default="", help="executable run with '<seconds> 2' (default: cpu_chain)")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    if not enable_bpf_stats():
        print("cannot enable kernel.bpf_stats_enabled (root needed)", file=sys.stderr)
        return 1
    exe = args.workload
    if not exe:
        from integration.harness import build_c

        out = Path(os.environ.get("TMPDIR", "/tmp")) / f"cpu_sample_path_{os.getpid()}"
        out.mkdir(exist_ok=True)
        exe = str(build_c("cpu_chain.c", out))
    workload = subprocess.Popen([exe, str(args.seconds + 60), "2"], stdout=subprocess.DEVNULL)
    try:
        actor, batches, live = asyncio.run(_live(args.seconds, args.hz, args.dedup))
        replay = _replay(actor, batches, args.rounds, args.replay_records)
    finally:
        workload.kill()
        workload.wait()
    result = {"hz": args.hz, "seconds": args.seconds, **live, **replay,
              "poll_thread_us_per_record": live["poll_thread_cpu_s_whole_run"] * 1e6 / max(1, live["records"])}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
