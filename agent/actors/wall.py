"""Wall actor: elapsed time per thread and stack, on-CPU plus off-CPU (bpf/wall.bpf.c).

On-CPU time comes from sampling (value = period); off-CPU time from sched_switch, with the
stack the thread blocked in and why (its task state). Both are aggregated in BPF per
(thread, stack, state) and drained every flush (agent/actors/aggregated.py): one sample per
aggregate, stamped with its first event's time. Off-CPU periods shorter than
``wall_min_block_ns`` are summed per thread in the kernel and reported once per flush
without a stack. Values are nanoseconds; per thread they add up to its elapsed time.
Threads switching out faster than ``wall_capture_rate_hz`` have only some switch-out
stacks captured; the kernel sums their other long blocks per thread (UNCAPTURED_LABEL) and
that sum is spread over the thread's captured blocks of the same window in proportion
(``spread_uncaptured``): per-thread totals stay exact, the split between stacks is estimated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from agent.actors.aggregated import AggregatedEntry, AggregatingActor
from shared.model import Frame, Sample
from shared.profile_types import ProfileType

# Linux task states as sched_switch reports prev_state (TASK_REPORT bits).
_STATES = {0: "preempted", 0x1: "sleeping", 0x2: "uninterruptible", 0x4: "stopped", 0x8: "traced",
           0x10: "dead", 0x20: "zombie", 0x40: "parked", 0x80: "idle"}
MAX_BLOCKED_THREADS = 16384
# bpf/wall.bpf.c labels: on-CPU samples, per-thread sums of short blocks; others are task states.
ON_CPU_LABEL = 1 << 63
SHORT_OFF_CPU_LABEL = (1 << 63) | 1
UNCAPTURED_LABEL = (1 << 63) | 2


# prev_state when the task was preempted inside the kernel (TASK_REPORT_MAX); plain 0 is a
# task rescheduled on its way back to user space (recorded without its kernel stack).
_PREEMPTED_IN_KERNEL = 0x100


def spread_uncaptured(entries: list[AggregatedEntry]) -> list[AggregatedEntry]:
    """Each thread's uncaptured off-CPU sum, spread over its captured off-CPU entries.

    A captured entry of ``c`` ns in a thread with ``C`` ns captured and ``U`` ns uncaptured
    becomes ``c * (C + U) / C`` (rounded so the thread's total stays exactly ``C + U``).
    Capture is random and blind to the stack, so this is a ratio estimate of where the
    uncaptured time went. A thread with nothing captured in the window keeps its
    uncaptured entry, reported without a stack.
    """
    uncaptured: dict[tuple[int, int], int] = {}
    captured: dict[tuple[int, int], list[int]] = {}
    for i, entry in enumerate(entries):
        if entry.label == UNCAPTURED_LABEL:
            uncaptured[(entry.pid, entry.tid)] = i
        elif entry.label not in (ON_CPU_LABEL, SHORT_OFF_CPU_LABEL):
            captured.setdefault((entry.pid, entry.tid), []).append(i)
    out: list[AggregatedEntry | None] = list(entries)
    for thread, u in uncaptured.items():
        indexes = captured.get(thread, [])
        base = sum(entries[i].total_ns for i in indexes)
        if base <= 0:
            continue  # nothing captured in this window: reported as it is
        extra = remaining = entries[u].total_ns
        for n, i in enumerate(indexes):
            share = remaining if n == len(indexes) - 1 else extra * entries[i].total_ns // base
            remaining -= share
            out[i] = dataclasses.replace(entries[i], total_ns=entries[i].total_ns + share)
        out[u] = None
    return [e for e in out if e is not None]


def task_state_name(state: int) -> str:
    if state == _PREEMPTED_IN_KERNEL:
        return "preempted_in_kernel"
    return _STATES.get(state & 0xFF, f"state-{state:#x}")


class WallActor(AggregatingActor):
    """Samples on-CPU stacks and traces off-CPU intervals of target processes."""

    profile_type = ProfileType.WALL
    bpf_source = "wall.bpf.c"
    uses_targets = True

    def period(self) -> int:
        return 1_000_000_000 // self.ctx.settings.frequency_hz

    def bpf_defines(self) -> dict[str, int | str]:
        return {**super().bpf_defines(), "SAMPLE_PERIOD_NS": self.period(),
                "MIN_BLOCK_NS": self.ctx.settings.wall_min_block_ns, "MAX_BLOCKED_THREADS": MAX_BLOCKED_THREADS,
                "CAPTURE_RATE_HZ": self.ctx.settings.wall_capture_rate_hz}

    def attach(self, bpf: Any) -> None:
        from bcc import PerfSWConfig, PerfType

        bpf.attach_perf_event(ev_type=PerfType.SOFTWARE, ev_config=PerfSWConfig.CPU_CLOCK,
                              fn_name="on_cpu_sample", sample_freq=self.ctx.settings.frequency_hz)

    def read_bpf_counters(self) -> None:
        deltas = self.counter_deltas()
        self.count_drops(deltas, {2: "blocked_map_full"})
        # Not drops: switch-outs not captured (to bound the cost), and of their blocks those long
        # enough to need a stack, whose time spread_uncaptured puts on the captured stacks.
        for slot, name in ((4, "wall_switch_outs_not_captured"), (5, "wall_blocks_estimated")):
            if slot < len(deltas) and deltas[slot]:
                self.ctx.counters.inc(name, deltas[slot])

    def to_samples(self, records: list[bytes]) -> list[Sample]:
        symbolizer = self.ctx.symbolizer
        out = []
        for entry in spread_uncaptured(self.drain()):
            if entry.label in (SHORT_OFF_CPU_LABEL, UNCAPTURED_LABEL):
                frames: tuple[Frame, ...] = ()
                thread_name = self.thread_name(entry.pid, entry.tid)
                state = "short-off-cpu" if entry.label == SHORT_OFF_CPU_LABEL else "off-cpu-not-captured"
                attributes = {"wall.state": state, "wall.blocks": str(entry.count)}
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
