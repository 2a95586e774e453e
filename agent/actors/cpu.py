"""CPU actor: on-CPU stacks of every process, sampled at a fixed frequency on every CPU.

BPF side: bpf/cpu.bpf.c on a software ``cpu-clock`` perf event (hardware counters are not
assumed to exist, e.g. in VMs). Each sample's value is the sampling period in nanoseconds,
so summed values are CPU time.

With ``native_unwinding`` on, the program also unwinds user stacks from DWARF CFI tables
(bpf/unwind.h) that a :class:`~agent.unwind.NativeUnwinder` worker loads per process.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from agent.actors.base import RingBufferActor
from agent.unwind import BccUnwindMaps, NativeUnwinder
from shared.model import Sample
from shared.profile_types import ProfileType

log = logging.getLogger("stackfleet.agent")


class CpuActor(RingBufferActor):
    """Samples on-CPU stacks with a perf_event BPF program."""

    profile_type = ProfileType.CPU
    bpf_source = "cpu.bpf.c"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unwinder: NativeUnwinder | None = None
        self._unwinding = self.ctx.settings.native_unwinding

    def period(self) -> int:
        return 1_000_000_000 // self.ctx.settings.frequency_hz

    def bpf_defines(self) -> dict[str, int | str]:
        defines = {**super().bpf_defines(), "SAMPLE_PERIOD_NS": self.period()}
        if self._unwinding:
            defines |= {"NATIVE_UNWINDING": 1, "UNWIND_MAX_ROWS": self.ctx.settings.unwind_table_rows,
                        "UNWIND_SELF_TGID": os.getpid()}
        return defines

    def _load_and_attach(self) -> None:
        if not self._unwinding:
            return super()._load_and_attach()
        try:
            super()._load_and_attach()
        except Exception as exc:
            # The unwinder is the largest program we load (a verifier on another kernel may
            # refuse it): CPU profiling carries on with frame pointers rather than not at all.
            if self.unwinder is not None:
                self.unwinder.close()
                self.unwinder = None
            self._unwinding = False
            log.warning("CPU profile without native unwinding (frame pointers only): %s", exc)
            self.ctx.counters.inc("unwind_unavailable")
            super()._load_and_attach()

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            if self.unwinder is not None:
                await asyncio.to_thread(self.unwinder.close)

    def attach(self, bpf: Any) -> None:
        import ctypes

        from bcc import BPF, PerfSWConfig, PerfType

        # Second stage of every sample (see bpf/cpu.bpf.c): loaded and wired before attaching.
        stacks = bpf.load_func("cpu_sample_stacks", BPF.PERF_EVENT)
        bpf["cpu_stages"][ctypes.c_int(0)] = ctypes.c_int(stacks.fd)

        if self._unwinding:
            # Serving requests before the first sample: a process's tables load while it is young.
            self.unwinder = NativeUnwinder(BccUnwindMaps(bpf), self.ctx.counters, self.ctx.settings.unwind_table_rows)
            self.unwinder.start()
        bpf.attach_perf_event(
            ev_type=PerfType.SOFTWARE,
            ev_config=PerfSWConfig.CPU_CLOCK,
            fn_name="on_cpu_sample",
            sample_freq=self.ctx.settings.frequency_hz,
        )

    def read_bpf_counters(self) -> None:
        self.count_drops(self.counter_deltas(), {1: "ringbuf_full", 3: "tail_call_failed"})

    def to_samples(self, records: list[bytes]) -> list[Sample]:
        ctx = self.ctx
        if self.unwinder is not None and self.unwinder.failure is not None:
            raise RuntimeError("native unwinder failed") from self.unwinder.failure  # supervisor restarts us
        out = []
        for ev in self.parsed(records):
            frames = self.frames(ev)
            out.append(Sample(
                timestamp_ns=ctx.clock.to_unix_ns(ev.ts_mono_ns),
                cpu=ev.cpu,
                pid=ev.pid,
                tid=ev.tid,
                thread_name=ev.thread_name,
                process_name=ctx.symbolizer.process_name(ev.pid) or ev.thread_name,
                frames=frames,
                values=(ev.value,),
            ))
        return out
