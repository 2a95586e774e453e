"""Python cost per CPU sample of a repeated stack: a 4.4 KiB ``struct stack_event`` record
(parsed, then the raw-address cache of RingBufferActor.frames) against a 56-byte id record
(bpf/stack_dedup.h, CpuActor.to_samples), same 20-frame stack of a live process, 2,000
records per pass, best of 5 passes with ``time.thread_time`` after a warm-up pass.

    .venv/bin/python -m benchmarks.cpu_record_decode
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agent.actors.base import ActorContext
from agent.bpf.layouts import DedupFlags
from agent.clock import MonotonicToUnix
from agent.settings import AgentSettings
from agent.symbols import Symbolizer
from shared.counters import Counters
from shared.model import Sample
from tests.test_stack_dedup import FakeKernelCpuActor, header, stack_event
from tests.test_symbols import Target, build

RECORDS = 2000


def _best(fn: Callable[[list[bytes]], Any], records: list[bytes]) -> float:
    fn(records)
    times = []
    for _ in range(5):
        start = time.thread_time()
        fn(records)
        times.append(time.thread_time() - start)
    return min(times) / len(records) * 1e6


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        target = Target(build(Path(tmp)))
        try:
            pid = target.pid
            user = [target.truth["leaf_function"][0]] + [target.truth["caller_function"][0] + 1] * 19
            ctx = ActorContext(AgentSettings(cpu_stack_dedup=True), Symbolizer(), ThreadPoolExecutor(1),
                       None,  # type: ignore[arg-type]
                               Counters(), MonotonicToUnix())
            actor = FakeKernelCpuActor(ctx)

            def whole_records(records: list[bytes]) -> list[Sample]:
                out = []
                for ev in actor.parsed(records):
                    frames = actor.frames(ev)
                    out.append(Sample(ctx.clock.to_unix_ns(ev.ts_mono_ns), ev.cpu, ev.pid, ev.tid, ev.thread_name,
                                      ctx.symbolizer.process_name(ev.pid) or ev.thread_name, frames, (ev.value,)))
                return out

            actor.to_samples([header(0, 9, 1, pid, pid, 0, DedupFlags.NEW, b"t") + stack_event(pid, pid, user)])
            whole = _best(whole_records, [stack_event(pid, pid, user)] * RECORDS)
            ids = _best(actor.to_samples, [header(i, 9, 1, pid, pid, 0, DedupFlags.ID_ONLY, b"t")
                                           for i in range(RECORDS)])
            print(f"4.4 KiB record, parsed + raw-address cache: {whole:.2f} us per sample")
            print(f"56-byte id record, CpuActor.to_samples:      {ids:.2f} us per sample")
        finally:
            target.stop()


if __name__ == "__main__":
    main()
