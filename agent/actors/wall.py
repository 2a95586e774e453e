"""Wall actor: elapsed time per thread and stack, on-CPU plus off-CPU (bpf/wall.bpf.c).

On-CPU stacks come from sampling, how long each thread ran on a CPU from sched_switch (exact,
shared out over the thread's samples of the window by their counts); off-CPU time from
sched_switch, with the stack the thread blocked in and why (its task state). Both are aggregated in BPF per
(thread, stack, state) and drained every flush (agent/actors/aggregated.py): one sample per
aggregate, stamped with its first event's time. Off-CPU periods shorter than
``wall_min_block_ns`` are summed per thread in the kernel and reported once per flush
without a stack. Values are nanoseconds; per thread they add up to its elapsed time
(exactly: on-CPU and off-CPU time are both measured, only their split between stacks is
estimated).
Threads switching out faster than ``wall_capture_rate_hz`` have only some switch-out
stacks captured; the kernel sums their other long blocks per (thread, task state) and each
such sum is shared out over the captured blocks of the same thread, state and window in
proportion to their inverse-probability weights (``spread_uncaptured``): per-thread and
per-state totals stay exact, the split between stacks is an unbiased-ratio estimate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import Any

from agent.actors.aggregated import AggregatedEntry, AggregatingActor, shares, spread_uncaptured_by
from agent.actors.base import ActorContext
from agent.actors.lock_maps import lock_maps_defines, lock_waits_from_switches, shared_lock_maps
from agent.actors.parts import PythonFrames, TargetFilter
from agent.bpf.layouts import (
    WALL_ON_CPU_LABEL,
    WALL_ON_CPU_TIME_LABEL,
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
# bpf/wall.bpf.c labels: on-CPU samples, per-thread sums of short blocks, per-thread sums of
# exact on-CPU time; others are task states.
ON_CPU_LABEL = WALL_ON_CPU_LABEL
SHORT_OFF_CPU_LABEL = WALL_SHORT_OFF_CPU_LABEL
ON_CPU_TIME_LABEL = WALL_ON_CPU_TIME_LABEL
UNCAPTURED_LABEL = WALL_UNCAPTURED_LABEL  # | the task state the uncaptured blocks had


# prev_state when the task was preempted inside the kernel (TASK_REPORT_MAX); plain 0 is a
# task rescheduled on its way back to user space (recorded without its kernel stack).
_PREEMPTED_IN_KERNEL = 0x100


def is_uncaptured(label: int) -> bool:
    return label & UNCAPTURED_LABEL == UNCAPTURED_LABEL


def uncaptured_state(label: int) -> int:
    return label & ~UNCAPTURED_LABEL


def wall_stratum(entry: AggregatedEntry) -> tuple[Hashable, bool] | None:
    """Off-CPU blocks are spread per (thread, task state), a thread's exact on-CPU time over its
    on-CPU samples (the stratum (pid, tid, ON_CPU_LABEL): task states are below 2^62); short
    blocks are left as they are."""
    if is_uncaptured(entry.label):
        return (entry.pid, entry.tid, uncaptured_state(entry.label)), True
    if entry.label in (ON_CPU_LABEL, ON_CPU_TIME_LABEL):
        return (entry.pid, entry.tid, ON_CPU_LABEL), entry.label == ON_CPU_TIME_LABEL
    if entry.label == SHORT_OFF_CPU_LABEL:
        return None
    return (entry.pid, entry.tid, entry.label), False


def spread_uncaptured(entries: list[AggregatedEntry],
                      earlier: dict[Hashable, list[AggregatedEntry]] | None = None,
                      waiting: dict[Hashable, list[AggregatedEntry]] | None = None) -> list[AggregatedEntry]:
    """Each (thread, task state)'s uncaptured off-CPU sum, shared out over its captured entries,
    and each thread's exact on-CPU time over its on-CPU samples.

    A thread's long off-CPU blocks in one task state and window form a stratum; its exact total
    is divided among the captured stacks by inverse-probability weights
    (aggregated.spread_uncaptured_by). A thread's on-CPU time in the window, measured at its
    switch-outs and samples, replaces the samples' count x period: the samples only divide it
    between stacks (their weights are their periods). A stratum with nothing captured (or
    sampled) keeps its entry, reported without a stack, unless ``earlier`` has its stacks from
    an earlier window or, with ``waiting``, until a later window has some. Samples of a thread
    without measured on-CPU time (switched in before the program attached) keep count x period.

    A thread's preemptions with no capture in the window go on its on-CPU samples of the
    window (preempted_onto_samples) before any earlier window's stacks are considered.
    """
    timed = {(e.pid, e.tid) for e in entries if e.label == ON_CPU_TIME_LABEL}
    entries = [dataclasses.replace(e, total_ns=0) if e.label == ON_CPU_LABEL and (e.pid, e.tid) in timed else e
               for e in entries]
    entries = preempted_onto_samples(entries)
    return spread_uncaptured_by(entries, wall_stratum, earlier=earlier, waiting=waiting)


PREEMPTED_STATES = (0, _PREEMPTED_IN_KERNEL)


def preempted_onto_samples(entries: list[AggregatedEntry]) -> list[AggregatedEntry]:
    """A thread's uncaptured preempted time, in a window where none of its preemptions was
    captured, shared out over its on-CPU samples of the window by their periods.

    Preemptions happen while a thread runs, so where it was preempted is where it runs, and its
    on-CPU samples (not budgeted) are a sample of that. The capture budget does leave such
    strata empty, and not at random: a thread is preempted when its CPU is contended, which is
    when that CPU's window has run into its hard cap (the events after it are not drawn). Left
    stackless, that time fell out of the thread's busy share (4-6 points in
    integration/test_capture_budget.py). Captured preemptions, when a window has any, are used
    as they are (spread_uncaptured_by).
    """
    captured = {(e.pid, e.tid, e.label) for e in entries
                if e.stack_id and e.label in PREEMPTED_STATES}
    samples: dict[tuple[int, int], list[AggregatedEntry]] = {}
    for e in entries:
        if e.label == ON_CPU_LABEL and e.weighted_ns > 0:
            samples.setdefault((e.pid, e.tid), []).append(e)
    out: list[AggregatedEntry] = []
    for e in entries:
        state = uncaptured_state(e.label) if is_uncaptured(e.label) else None
        onto = samples.get((e.pid, e.tid))
        if state not in PREEMPTED_STATES or (e.pid, e.tid, state) in captured or not onto:
            out.append(e)
            continue
        parts = shares(e.total_ns, [s.weighted_ns for s in onto])
        out += [dataclasses.replace(e, stack_id=s.stack_id, label=state, count=0, total_ns=share, weighted_ns=0,
                                    weighted_count=0)
                for s, share in zip(onto, parts, strict=True) if share]
    return out


def task_state_name(state: int) -> str:
    if state == _PREEMPTED_IN_KERNEL:
        return "preempted_in_kernel"
    return _STATES.get(state & 0xFF, f"state-{state:#x}")


class WallActor(AggregatingActor):
    """Samples on-CPU stacks and traces off-CPU intervals of target processes."""

    profile_type = ProfileType.WALL
    bpf_source = "wall.bpf.c"
    ON_CPU_TIME_LABEL = ON_CPU_TIME_LABEL  # the maps' carried on-CPU spans join these sums

    def __init__(self, ctx: ActorContext) -> None:
        super().__init__(ctx, TargetFilter(ctx), PythonFrames(ctx, self.profile_type))
        self.unwinding = ActorUnwinding(ctx.unwinding, ctx.counters, self.profile_type.value)

    def period(self) -> int:
        return 1_000_000_000 // self.ctx.settings.frequency_hz

    def bpf_defines(self) -> dict[str, int | str]:
        settings = self.ctx.settings
        defines = {**super().bpf_defines(), "SAMPLE_PERIOD_NS": self.period(),
                   "MIN_BLOCK_NS": settings.wall_min_block_ns}
        if lock_waits_from_switches(settings):  # bpf/lock_from_switch.h
            defines |= {"LOCK_FROM_SWITCH": 1, "LOCK_MIN_WAIT_NS": settings.lock_min_wait_ns,
                        **lock_maps_defines(settings)}
        return defines

    def load(self) -> Any:
        if lock_waits_from_switches(self.ctx.settings):
            shared_lock_maps(self.ctx.settings)  # exported before the program declares them extern
        return super().load()

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
        return spread_uncaptured(entries, self.earlier_captures(), self.waiting_sums())

    def to_samples(self, records: list[AggregatedEntry]) -> list[Sample]:
        symbolizer = self.ctx.symbolizer
        out = []
        for entry in self.prepare(records):
            if entry.label in (SHORT_OFF_CPU_LABEL, ON_CPU_TIME_LABEL) or is_uncaptured(entry.label):
                frames: tuple[Frame, ...] = ()
                thread_name = self.thread_name(entry.pid, entry.tid)
                if entry.label == SHORT_OFF_CPU_LABEL:
                    attributes = {"wall.state": "short-off-cpu", "wall.blocks": str(entry.count)}
                elif entry.label == ON_CPU_TIME_LABEL:  # no sample of the thread to put it on
                    attributes = {"wall.state": "on-cpu-not-sampled"}
                else:
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
