"""Lock actor: user-space lock contention from futex waits (bpf/lock.bpf.c).

BPF aggregates contended waits (longer than ``lock_min_wait_ns``) per (thread, waiting
stack, lock address) and the actor drains them every flush (agent/actors/aggregated.py);
each aggregate becomes one sample with values ``contentions`` (waits) and ``delay`` (ns),
like pprof's mutex profile, stamped with its first wait's time. Shorter waits are counted,
not profiled. Every sample carries ``lock.address`` and ``lock.wait.kind`` (mutex, rwlock,
condition, join, semaphore or other: agent/actors/lock_waits.py); the aggregator's default lock
views show the contention kinds only (shared/lock_waits.py).

Coverage: glibc/musl pthread mutexes, rwlocks, condition variables and anything else that
parks on a futex. Go's sync.Mutex parks goroutines inside the Go runtime scheduler without
a futex per wait (only idle Ms sleep on futexes), so Go lock contention is *not* seen here;
see docs/design/wall-and-lock.md.
"""

from __future__ import annotations

from typing import Any

from agent.actors.aggregated import AggregatingActor
from agent.actors.base import ActorContext
from agent.actors.lock_waits import futex_address, wait_bits, wait_kind
from agent.bpf.layouts import AggCounter, LockCounter
from agent.unwind import ActorUnwinding, chain_stages
from shared.lock_waits import LOCK_WAIT_KIND
from shared.model import Sample
from shared.profile_types import ProfileType


class LockActor(AggregatingActor):
    """Futex wait tracing via syscall tracepoints, aggregated in BPF."""

    profile_type = ProfileType.LOCK
    bpf_source = "lock.bpf.c"
    uses_targets = True

    def __init__(self, ctx: ActorContext) -> None:
        super().__init__(ctx)
        self.unwinding = ActorUnwinding(ctx.unwinding, ctx.counters, self.profile_type.value)

    def period(self) -> int:
        return 1  # values are exact counts of waits, not sampled

    def bpf_defines(self) -> dict[str, int | str]:
        return {**super().bpf_defines(), "MIN_WAIT_NS": self.ctx.settings.lock_min_wait_ns}

    def attach(self, bpf: Any) -> None:
        # TRACEPOINT_PROBE programs are attached by bcc when loaded; with unwinding, stages 2
        # and 3 of each wait (bpf/lock.bpf.c) go into the program array.
        if self.unwinding.active:
            from bcc import BPF

            chain_stages(bpf, "lock_stages", [("lock_wait_unwind", BPF.TRACEPOINT),
                                              ("lock_wait_record", BPF.TRACEPOINT)])

    def read_bpf_counters(self) -> None:
        delta = self.counter_deltas()
        if len(delta) < len(AggCounter) + len(LockCounter):
            return
        self.count_aggregation(delta)
        c = self.ctx.counters
        if delta[LockCounter.SHORT_WAITS]:
            c.inc("lock_short_waits", delta[LockCounter.SHORT_WAITS])
            c.inc("lock_short_wait_ns", delta[LockCounter.SHORT_WAIT_NS])
        if delta[LockCounter.UNWIND_TAIL_CALL_FAILED]:
            c.inc("unwind_tail_call_failed", delta[LockCounter.UNWIND_TAIL_CALL_FAILED], type=self.profile_type.value)
        self.count_drops(delta, {LockCounter.RECORD_TAIL_CALL_FAILED: "tail_call_failed"})

    def to_samples(self, records: list[bytes]) -> list[Sample]:
        symbolizer = self.ctx.symbolizer
        out = []
        for entry in self.drain():
            frames, comm = self.stack_frames(entry.pid, entry.stack_id)
            thread_name = self.thread_name(entry.pid, entry.tid, comm)
            out.append(Sample(
                timestamp_ns=self.sample_time_ns(entry),
                cpu=entry.cpu, pid=entry.pid, tid=entry.tid, thread_name=thread_name,
                process_name=symbolizer.process_name(entry.pid) or thread_name,
                frames=frames,
                values=(entry.count, entry.total_ns),
                attributes={"lock.address": f"0x{futex_address(entry.label):x}",
                            LOCK_WAIT_KIND: wait_kind(wait_bits(entry.label), frames).value},
            ))
        return out
