"""Lock actor: user-space lock contention from futex waits (bpf/lock.bpf.c).

BPF aggregates contended waits (longer than ``lock_min_wait_ns``) per (thread, waiting
stack, lock address) and the actor drains them every flush (agent/actors/aggregated.py);
each aggregate becomes one sample with values ``contentions`` (waits) and ``delay`` (ns),
like pprof's mutex profile, stamped with its first wait's time. Shorter waits are counted,
not profiled. Waits are captured (their stacks taken) at ``lock_capture_rate_hz`` per thread
within a per-CPU budget (bpf/event_capture.h); the delay and count of waits not captured are
shared out over the captured stacks of the same thread and lock in the same window by
inverse-probability weights (``spread_uncaptured``): per (thread, lock) totals are exact, the
split between stacks is estimated. A (thread, lock) with nothing captured in a window has its
waits shared over its stacks of its latest window with captures; with none, they stay one
sample without a stack, ``lock.stack=not-captured``. Every sample carries
``lock.address`` and ``lock.wait.kind`` (mutex, rwlock, condition, join, semaphore or other:
agent/actors/lock_waits.py); the aggregator's default lock views show the contention kinds only
(shared/lock_waits.py).

With the wall profile on too (``lock_waits_from_wall``), no lock program is loaded: the wall
program takes the waits from its switch-outs and records them in the same maps' layouts
(bpf/lock_from_switch.h, agent/actors/lock_maps.py), which this actor drains the same way; the
stacks then follow the wall's capture rate and budget, and waits that never sleep are not seen.

Coverage: glibc/musl pthread mutexes, rwlocks, condition variables and anything else that
parks on a futex. Go's sync.Mutex parks goroutines inside the Go runtime scheduler without
a futex per wait (only idle Ms sleep on futexes), so Go lock contention is *not* seen here;
see docs/design/wall-and-lock.md.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from agent.actors.aggregated import AggregatedEntry, AggregatingActor, spread_uncaptured_by
from agent.actors.base import ActorContext
from agent.actors.lock_maps import LockMapsView, lock_waits_from_switches, shared_lock_maps
from agent.actors.lock_waits import futex_address, wait_bits, wait_kind
from agent.actors.parts import PythonFrames, TargetFilter
from agent.bpf.layouts import AggCounter, LockCounter
from agent.bpf.loader import read_percpu_counters
from agent.unwind import ActorUnwinding, chain_stages
from shared.lock_waits import LOCK_WAIT_KIND
from shared.model import Sample
from shared.profile_types import ProfileType


def lock_stratum(entry: AggregatedEntry) -> tuple[Hashable, bool]:
    """Waits are spread per (thread, label: lock address and wait bits); stack id 0 holds the
    waits that were not captured (captured stacks never get id 0)."""
    return (entry.pid, entry.tid, entry.label), entry.stack_id == 0


def spread_uncaptured(entries: list[AggregatedEntry],
                      earlier: dict[Hashable, list[AggregatedEntry]] | None = None,
                      waiting: dict[Hashable, list[AggregatedEntry]] | None = None) -> list[AggregatedEntry]:
    """Each (thread, lock)'s uncaptured waits, delay and count, shared out over its captured
    stacks (those of an earlier window in ``earlier`` if this window has none)."""
    return spread_uncaptured_by(entries, lock_stratum, spread_counts=True, earlier=earlier, waiting=waiting)


class LockActor(AggregatingActor):
    """Futex waits aggregated in BPF: from the lock program's system-call tracepoints, or from
    the wall program's switch-outs when the wall profile runs too."""

    profile_type = ProfileType.LOCK
    bpf_source = "lock.bpf.c"

    def __init__(self, ctx: ActorContext) -> None:
        self.from_switches = lock_waits_from_switches(ctx.settings)
        if self.from_switches:  # the wall program's process selection and CPython frames
            super().__init__(ctx, PythonFrames(ctx, self.profile_type, own_program=False))
        else:
            super().__init__(ctx, TargetFilter(ctx), PythonFrames(ctx, self.profile_type))
            self.unwinding = ActorUnwinding(ctx.unwinding, ctx.counters, self.profile_type.value)

    def load(self) -> Any:
        if not self.from_switches:
            return super().load()
        view = LockMapsView(shared_lock_maps(self.ctx.settings))
        # The maps outlive an actor (a restarted one continues where its predecessor left off):
        # drain from the generation being written, count from what the counters hold now.
        self._maps.resume(view)
        self._counters_seen = read_percpu_counters(view["counters"])
        return view

    def program_name(self) -> str:
        if self.from_switches:
            return "the lock maps the wall program writes (lock_waits_from_wall)"
        return super().program_name()

    def unload(self, bpf: Any) -> None:
        if not self.from_switches:  # the shared lock maps stay for the process's lifetime
            super().unload(bpf)

    def period(self) -> int:
        return 1  # values are exact counts of waits, not sampled

    def bpf_defines(self) -> dict[str, int | str]:
        return {**super().bpf_defines(), "MIN_WAIT_NS": self.ctx.settings.lock_min_wait_ns}

    def capture_rate_hz(self) -> int:
        return self.ctx.settings.lock_capture_rate_hz

    def attach(self, bpf: Any) -> None:
        if self.from_switches:
            return  # the wall actor's program writes the maps
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
        # Not a drop: waits not captured keep their delay and count in their thread and lock's
        # uncaptured sum, which spread_uncaptured shares out.
        if delta[LockCounter.NOT_CAPTURED]:
            c.inc("lock_waits_estimated", delta[LockCounter.NOT_CAPTURED])
        self.count_drops(delta, {LockCounter.RECORD_TAIL_CALL_FAILED: "tail_call_failed",
                                 LockCounter.THREAD_STATE_UNAVAILABLE: "thread_state_unavailable"})

    def spread(self, entries: list[AggregatedEntry]) -> list[AggregatedEntry]:
        return spread_uncaptured(entries, self.earlier_captures(), self.waiting_sums())

    def to_samples(self, records: list[AggregatedEntry]) -> list[Sample]:
        symbolizer = self.ctx.symbolizer
        out = []
        for entry in self.prepare(records):
            attributes = {"lock.address": f"0x{futex_address(entry.label):x}"}
            if entry.stack_id:
                frames, comm = self.stack_frames(entry.pid, entry.stack_id)
            else:
                frames, comm = (), ""
                attributes["lock.stack"] = "not-captured"
            attributes[LOCK_WAIT_KIND] = wait_kind(wait_bits(entry.label), frames).value
            thread_name = self.thread_name(entry.pid, entry.tid, comm)
            out.append(Sample(
                timestamp_ns=self.sample_time_ns(entry),
                cpu=entry.cpu, pid=entry.pid, tid=entry.tid, thread_name=thread_name,
                process_name=symbolizer.process_name(entry.pid) or thread_name,
                frames=frames,
                values=(entry.count, entry.total_ns),
                attributes=attributes,
            ))
        return out
