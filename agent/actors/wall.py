"""Wall actor: elapsed time per thread and stack, on-CPU plus off-CPU (bpf/wall.bpf.c).

On-CPU time comes from sampling (value = period); off-CPU time from sched_switch, with the
stack the thread blocked in and why (its task state). Both are aggregated in BPF per
(thread, stack, state) and drained every flush (agent/actors/aggregated.py): one sample per
aggregate, stamped with its first event's time. Off-CPU periods shorter than
``wall_min_block_ns`` are summed per thread in the kernel and reported once per flush
without a stack. Values are nanoseconds; per thread they add up to its elapsed time.
"""

from __future__ import annotations

from typing import Any

from agent.actors.aggregated import AggregatingActor
from shared.model import Frame, Sample
from shared.profile_types import ProfileType

# Linux task states as sched_switch reports prev_state (TASK_REPORT bits).
_STATES = {0: "preempted", 0x1: "sleeping", 0x2: "uninterruptible", 0x4: "stopped", 0x8: "traced",
           0x10: "dead", 0x20: "zombie", 0x40: "parked", 0x80: "idle"}
MAX_BLOCKED_THREADS = 16384
# bpf/wall.bpf.c labels: on-CPU samples, per-thread sums of short blocks; others are task states.
ON_CPU_LABEL = 1 << 63
SHORT_OFF_CPU_LABEL = (1 << 63) | 1


# prev_state when the task was preempted inside the kernel (TASK_REPORT_MAX); plain 0 is a
# task rescheduled on its way back to user space (recorded without its kernel stack).
_PREEMPTED_IN_KERNEL = 0x100


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
                "MIN_BLOCK_NS": self.ctx.settings.wall_min_block_ns, "MAX_BLOCKED_THREADS": MAX_BLOCKED_THREADS}

    def attach(self, bpf: Any) -> None:
        from bcc import PerfSWConfig, PerfType

        bpf.attach_perf_event(ev_type=PerfType.SOFTWARE, ev_config=PerfSWConfig.CPU_CLOCK,
                              fn_name="on_cpu_sample", sample_freq=self.ctx.settings.frequency_hz)

    def read_bpf_counters(self) -> None:
        self.count_drops(self.counter_deltas(), {2: "blocked_map_full"})

    def to_samples(self, records: list[bytes]) -> list[Sample]:
        symbolizer = self.ctx.symbolizer
        out = []
        for entry in self.drain():
            if entry.label == SHORT_OFF_CPU_LABEL:
                frames: tuple[Frame, ...] = ()
                thread_name = self.thread_name(entry.pid, entry.tid)
                attributes = {"wall.state": "short-off-cpu", "wall.blocks": str(entry.count)}
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
