"""Lock actor: user-space lock contention from futex waits (bpf/lock.bpf.c).

Each contended wait (longer than ``lock_min_wait_ns``) arrives with its waiting stack and
lock address; values are ``contentions`` (1) and ``delay`` (ns), like pprof's mutex
profile. Shorter waits are counted, not profiled.

Coverage: glibc/musl pthread mutexes, rwlocks, condition variables and anything else that
parks on a futex. Go's sync.Mutex parks goroutines inside the Go runtime scheduler without
a futex per wait (only idle Ms sleep on futexes), so Go lock contention is *not* seen here;
see docs/design/wall-and-lock.md.
"""

from __future__ import annotations

from typing import Any

from agent.actors.base import RingBufferActor
from shared.model import Sample
from shared.profile_types import ProfileType


class LockActor(RingBufferActor):
    """Futex wait tracing via syscall tracepoints."""

    profile_type = ProfileType.LOCK
    bpf_source = "lock.bpf.c"
    uses_targets = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)

    def period(self) -> int:
        return 1  # every contended wait is recorded: one contention per event

    def bpf_defines(self) -> dict[str, int | str]:
        return {**super().bpf_defines(), "MIN_WAIT_NS": self.ctx.settings.lock_min_wait_ns}

    def attach(self, bpf: Any) -> None:
        pass  # TRACEPOINT_PROBE programs are attached by bcc when loaded

    def read_bpf_counters(self) -> None:
        delta = self.counter_deltas()
        if not delta:
            return
        self.count_drops(delta, {1: "ringbuf_full"})
        c = self.ctx.counters
        if delta[2]:
            c.inc("lock_short_waits", delta[2])
            c.inc("lock_short_wait_ns", delta[3])

    def to_samples(self, records: list[bytes]) -> list[Sample]:
        ctx = self.ctx
        out = []
        for ev in self.parsed(records):
            out.append(Sample(
                timestamp_ns=ctx.clock.to_unix_ns(ev.ts_mono_ns),
                cpu=ev.cpu, pid=ev.pid, tid=ev.tid, thread_name=ev.thread_name,
                process_name=ctx.symbolizer.process_name(ev.pid) or ev.thread_name,
                frames=self.frames(ev),
                values=(1, ev.value),
                attributes={"lock.address": f"0x{ev.aux:x}"},
            ))
        return out
