"""CPU actor: on-CPU stacks of every process, sampled at a fixed frequency on every CPU.

BPF side: bpf/cpu.bpf.c on a software ``cpu-clock`` perf event (hardware counters are not
assumed to exist, e.g. in VMs). Each sample's value is the sampling period in nanoseconds,
so summed values are CPU time.

With ``native_unwinding`` on, the program also unwinds user stacks from DWARF CFI tables
(bpf/unwind.h) that the agent's shared unwinder (agent/unwind/sharing.py) loads per process.
"""

from __future__ import annotations

from typing import Any

from agent.actors.base import ActorContext, BpfActor
from agent.actors.parts import PythonFrames
from agent.actors.sources import RingBufferSource
from agent.bpf.layouts import CpuCounter
from agent.unwind import ActorUnwinding, chain_stages
from shared.model import Sample
from shared.profile_types import ProfileType


class CpuActor(BpfActor[bytes]):
    """Samples on-CPU stacks with a perf_event BPF program; records through a ring buffer."""

    profile_type = ProfileType.CPU
    bpf_source = "cpu.bpf.c"

    def __init__(self, ctx: ActorContext) -> None:
        super().__init__(ctx, RingBufferSource.of(ctx, self.profile_type), PythonFrames(ctx, self.profile_type))
        self.unwinding = ActorUnwinding(ctx.unwinding, ctx.counters, self.profile_type.value)

    def period(self) -> int:
        return 1_000_000_000 // self.ctx.settings.frequency_hz

    def bpf_defines(self) -> dict[str, int | str]:
        return {**super().bpf_defines(), "SAMPLE_PERIOD_NS": self.period()}

    def attach(self, bpf: Any) -> None:
        from bcc import BPF, PerfSWConfig, PerfType

        # Second stage of every sample (see bpf/cpu.bpf.c): loaded and wired before attaching.
        chain_stages(bpf, "cpu_stages", [("cpu_sample_stacks", BPF.PERF_EVENT)])
        bpf.attach_perf_event(
            ev_type=PerfType.SOFTWARE,
            ev_config=PerfSWConfig.CPU_CLOCK,
            fn_name="on_cpu_sample",
            sample_freq=self.ctx.settings.frequency_hz,
        )

    def read_bpf_counters(self) -> None:
        self.count_drops(self.counter_deltas(), {CpuCounter.RING_FULL: "ringbuf_full",
                                                 CpuCounter.TAIL_CALL_FAILED: "tail_call_failed"})

    def to_samples(self, records: list[bytes]) -> list[Sample]:
        ctx = self.ctx
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
