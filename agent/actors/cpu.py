"""CPU actor: on-CPU stacks of every process, sampled at a fixed frequency on every CPU.

BPF side: bpf/cpu.bpf.c on a software ``cpu-clock`` perf event (hardware counters are not
assumed to exist, e.g. in VMs). Each sample's value is the sampling period in nanoseconds,
so summed values are CPU time.
"""

from __future__ import annotations

from typing import Any

from agent.actors.base import RingBufferActor
from agent.bpf_events import parse_stack_event
from agent.bpf_loader import read_percpu_counters
from agent.stacks import event_frames
from shared.model import Sample
from shared.profile_types import ProfileType


class CpuActor(RingBufferActor):
    """Samples on-CPU stacks with a perf_event BPF program."""

    profile_type = ProfileType.CPU
    bpf_source = "cpu.bpf.c"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ring_full_seen = 0

    def period(self) -> int:
        return 1_000_000_000 // self.ctx.settings.frequency_hz

    def bpf_defines(self) -> dict[str, int | str]:
        return {**super().bpf_defines(), "SAMPLE_PERIOD_NS": self.period()}

    def attach(self, bpf: Any) -> None:
        from bcc import PerfSWConfig, PerfType

        bpf.attach_perf_event(
            ev_type=PerfType.SOFTWARE,
            ev_config=PerfSWConfig.CPU_CLOCK,
            fn_name="on_cpu_sample",
            sample_freq=self.ctx.settings.frequency_hz,
        )

    def read_bpf_counters(self) -> None:
        if self.bpf is None:
            return
        _seen, ring_full, *_ = read_percpu_counters(self.bpf["counters"])
        if ring_full > self._ring_full_seen:
            self.ctx.counters.inc("events_dropped", ring_full - self._ring_full_seen, type="cpu",
                                  reason="ringbuf_full")
            self._ring_full_seen = ring_full

    def to_samples(self, records: list[bytes]) -> list[Sample]:
        ctx = self.ctx
        out = []
        for raw in records:
            try:
                ev = parse_stack_event(raw)
            except ValueError:
                ctx.counters.inc("events_dropped", type="cpu", reason="malformed_record")
                continue
            frames = event_frames(ev, ctx.symbolizer, ctx.counters, "cpu")
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
