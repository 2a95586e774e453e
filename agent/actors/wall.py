"""Wall actor: elapsed time per thread and stack, on-CPU plus off-CPU (bpf/wall.bpf.c).

On-CPU time comes from sampling (value = period); off-CPU time from sched_switch, with the
stack the thread blocked in and why (its task state). Both are aggregated in BPF per
(thread, stack, state) and drained every flush (agent/actors/aggregated.py): one sample per
aggregate, stamped with its first event's time. Off-CPU periods shorter than
``wall_min_block_ns`` are summed per thread in the kernel and reported once per flush
without a stack. Values are nanoseconds; per thread they add up to its elapsed time.
Threads switching out faster than ``wall_capture_rate_hz`` have only some switch-out
stacks captured; the kernel sums their other long blocks per (thread, task state) and each
such sum is shared out over the captured blocks of the same thread, state and window in
proportion to their inverse-probability weights (``spread_uncaptured``): per-thread and
per-state totals stay exact, the split between stacks is an unbiased-ratio estimate.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from agent.actors.aggregated import AggregatedEntry, AggregatingActor, spread_uncaptured_by
from agent.actors.base import ActorContext
from agent.actors.parts import PythonFrames, TargetFilter
from agent.bpf.layouts import (
    WALL_ON_CPU_LABEL,
    WALL_SHORT_OFF_CPU_LABEL,
    WALL_UNCAPTURED_LABEL,
    AggCounter,
    WallCounter,
)
from agent.unwind import ActorUnwinding, chain_stages
from shared.model import Frame, Sample
from shared.profile_types import ProfileType

# Linux task states as sched_switch reports prev_state (TASK_REPORT bits).
_STATES = {0: "preempted", 0x1: "sleeping", 0x2: "uninterruptible", 0x4: "stopped", 0x8: "traced",
           0x10: "dead", 0x20: "zombie", 0x40: "parked", 0x80: "idle"}
# bpf/wall.bpf.c labels: on-CPU samples, per-thread sums of short blocks; others are task states.
ON_CPU_LABEL = WALL_ON_CPU_LABEL
SHORT_OFF_CPU_LABEL = WALL_SHORT_OFF_CPU_LABEL
UNCAPTURED_LABEL = WALL_UNCAPTURED_LABEL  # | the task state the uncaptured blocks had


# prev_state when the task was preempted inside the kernel (TASK_REPORT_MAX); plain 0 is a
# task rescheduled on its way back to user space (recorded without its kernel stack).
_PREEMPTED_IN_KERNEL = 0x100


def is_uncaptured(label: int) -> bool:
    return label & UNCAPTURED_LABEL == UNCAPTURED_LABEL


def uncaptured_state(label: int) -> int:
    return label & ~UNCAPTURED_LABEL


def wall_stratum(entry: AggregatedEntry) -> tuple[Hashable, bool] | None:
    """Off-CPU blocks are spread per (thread, task state); on-CPU and short blocks are exact."""
    if is_uncaptured(entry.label):
        return (entry.pid, entry.tid, uncaptured_state(entry.label)), True
    if entry.label in (ON_CPU_LABEL, SHORT_OFF_CPU_LABEL):
        return None
    return (entry.pid, entry.tid, entry.label), False


def spread_uncaptured(entries: list[AggregatedEntry],
                      earlier: dict[Hashable, list[AggregatedEntry]] | None = None) -> list[AggregatedEntry]:
    """Each (thread, task state)'s uncaptured off-CPU sum, shared out over its captured entries.

    A thread's long off-CPU blocks in one task state and window form a stratum; its exact total
    is divided among the captured stacks by inverse-probability weights
    (aggregated.spread_uncaptured_by). A stratum with nothing captured keeps its entry,
    reported without a stack, unless ``earlier`` has its stacks from an earlier window.
    """
    return spread_uncaptured_by(entries, wall_stratum, earlier=earlier)


def task_state_name(state: int) -> str:
    if state == _PREEMPTED_IN_KERNEL:
        return "preempted_in_kernel"
    return _STATES.get(state & 0xFF, f"state-{state:#x}")


class WallActor(AggregatingActor):
    """Samples on-CPU stacks and traces off-CPU intervals of target processes."""

    profile_type = ProfileType.WALL
    bpf_source = "wall.bpf.c"

    def __init__(self, ctx: ActorContext) -> None:
        super().__init__(ctx, TargetFilter(ctx), PythonFrames(ctx, self.profile_type))
        self.unwinding = ActorUnwinding(ctx.unwinding, ctx.counters, self.profile_type.value)

    def period(self) -> int:
        return 1_000_000_000 // self.ctx.settings.frequency_hz

    def bpf_defines(self) -> dict[str, int | str]:
        return {**super().bpf_defines(), "SAMPLE_PERIOD_NS": self.period(),
                "MIN_BLOCK_NS": self.ctx.settings.wall_min_block_ns}

    def capture_rate_hz(self) -> int:
        return self.ctx.settings.wall_capture_rate_hz

    def attach(self, bpf: Any) -> None:
        from bcc import BPF, PerfSWConfig, PerfType

        if self.unwinding.active:  # stages 2 and 3 of each event (bpf/wall.bpf.c)
            chain_stages(bpf, "on_cpu_stages", [("wall_on_cpu_unwind", BPF.PERF_EVENT),
                                                ("wall_on_cpu_record", BPF.PERF_EVENT)])
            chain_stages(bpf, "switch_out_stages", [("wall_switch_out_unwind", BPF.TRACEPOINT),
                                                    ("wall_switch_out_record", BPF.TRACEPOINT)])
        bpf.attach_perf_event(ev_type=PerfType.SOFTWARE, ev_config=PerfSWConfig.CPU_CLOCK,
                              fn_name="on_cpu_sample", sample_freq=self.ctx.settings.frequency_hz)

    def read_bpf_counters(self) -> None:
        deltas = self.counter_deltas()
        if len(deltas) < len(WallCounter) + len(AggCounter):
            return
        self.count_aggregation(deltas)
        self.count_drops(deltas, {WallCounter.THREAD_STATE_UNAVAILABLE: "thread_state_unavailable",
                                  WallCounter.RECORD_TAIL_CALL_FAILED: "tail_call_failed",
                                  WallCounter.INTERVAL_END_UNSEEN: "interval_end_unseen"})
        if deltas[WallCounter.UNWIND_TAIL_CALL_FAILED]:
            self.ctx.counters.inc("unwind_tail_call_failed", deltas[WallCounter.UNWIND_TAIL_CALL_FAILED],
                                  type=self.profile_type.value)
        # Not drops: switch-outs not captured (to bound the cost), and of their blocks those long
        # enough to need a stack, whose time spread_uncaptured puts on the captured stacks.
        for slot, name in ((WallCounter.NOT_CAPTURED, "wall_switch_outs_not_captured"),
                           (WallCounter.UNCAPTURED_LONG, "wall_blocks_estimated")):
            if slot < len(deltas) and deltas[slot]:
                self.ctx.counters.inc(name, deltas[slot])

    def spread(self, entries: list[AggregatedEntry]) -> list[AggregatedEntry]:
        return spread_uncaptured(entries, self.earlier_captures())

    def to_samples(self, records: list[AggregatedEntry]) -> list[Sample]:
        symbolizer = self.ctx.symbolizer
        out = []
        for entry in self.prepare(records):
            if entry.label == SHORT_OFF_CPU_LABEL or is_uncaptured(entry.label):
                frames: tuple[Frame, ...] = ()
                thread_name = self.thread_name(entry.pid, entry.tid)
                attributes = {"wall.state": "short-off-cpu", "wall.blocks": str(entry.count)}
                if entry.label != SHORT_OFF_CPU_LABEL:
                    attributes = {"wall.state": "off-cpu-not-captured", "wall.blocks": str(entry.count),
                                  "wall.task_state": task_state_name(uncaptured_state(entry.label))}
            else:
                frames, comm = self.stack_frames(entry.pid, entry.stack_id)
                thread_name = self.thread_name(entry.pid, entry.tid, comm)
                state = "on-cpu" if entry.label == ON_CPU_LABEL else task_state_name(entry.label)
                attributes = {"wall.state": state}
            out.append(Sample(
                timestamp_ns=self.sample_time_ns(entry),
                cpu=entry.cpu, pid=entry.pid, tid=entry.tid, thread_name=thread_name,
                process_name=symbolizer.process_name(entry.pid) or thread_name,
                frames=frames,
                values=(entry.total_ns,),
                attributes=attributes,
            ))
        return out
