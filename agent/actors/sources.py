"""Where a BPF actor's records come from, once per flush: ``drain()``.

A source is a program part (agent/actors/parts.py) with a life of its own: ``start`` once the
program is attached, ``drain`` on every flush (on the symbolization thread), ``stop`` when
the actor stops (blocking; what came in until then is still drained after it).

:class:`RingBufferSource` reads a BPF ring buffer named ``events``: bcc's poll blocks (in
epoll), so one poll thread per source copies each record into a bounded deque, and ``drain``
swaps the deque out. An idle host costs one epoll wake-up per poll timeout. The bcc callback
lives only here: replacing the reader (an mmap reader of the ring) is a change to this class.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections import deque
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from agent.actors.parts import ProgramPart
from agent.bpf.records import EVENT_SIZE
from shared.counters import Counters

if TYPE_CHECKING:
    from agent.actors.base import ActorContext
    from shared.profile_types import ProfileType

R = TypeVar("R")

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class RecordSource(ProgramPart, Generic[R]):
    """A program part that yields the actor's records."""

    def start(self) -> None:
        """Begin collecting (after the program is attached)."""

    def stop(self) -> None:
        """Stop collecting (blocking); records already collected stay for the last ``drain``."""

    def drain(self) -> list[R]:
        """The records collected since the last drain (blocking; the symbolization thread)."""
        raise NotImplementedError


class RingBufferSource(RecordSource[bytes]):
    """Raw records of the program's ``events`` ring buffer, through a bounded deque."""

    POLL_TIMEOUT_MS = 250

    def __init__(self, ring_pages: int, max_pending: int, counters: Counters, type_name: str) -> None:
        self.pages = _pow2(ring_pages)
        self.counters = counters
        self.type_name = type_name
        self._pending: deque[bytes] = deque(maxlen=max_pending)
        self._stop = threading.Event()
        self._bpf: Any = None
        self._poller: threading.Thread | None = None

    @classmethod
    def of(cls, ctx: ActorContext, profile_type: ProfileType) -> RingBufferSource:
        """The ring buffer sized and bounded by the agent's settings."""
        s = ctx.settings
        return cls(s.ringbuf_pages, s.max_pending_events, ctx.counters, profile_type.value)

    def defines(self) -> dict[str, int | str]:
        return {"RINGBUF_PAGES": self.pages, "WAKEUP_EVERY": wakeup_every(self.pages * PAGE_SIZE)}

    def open(self, bpf: Any) -> None:
        bpf["events"].open_ring_buffer(self._on_record)
        self._bpf = bpf

    def start(self) -> None:
        self._poller = threading.Thread(target=self._poll_loop, name=f"poll-{self.type_name}", daemon=True)
        self._poller.start()

    def stop(self) -> None:
        self._stop.set()
        if self._poller is not None and self._poller.is_alive():
            self._poller.join()
        if self._bpf is not None:  # records that came without a wakeup
            self._bpf.ring_buffer_consume()

    def drain(self) -> list[bytes]:
        # popleft is atomic against the poll thread's append: nothing slips between read and clear.
        pending = self._pending
        return [pending.popleft() for _ in range(len(pending))]

    def _on_record(self, _ctx: Any, data: Any, size: int) -> int:
        if len(self._pending) == self._pending.maxlen:
            self.counters.inc("events_dropped", type=self.type_name, reason="agent_queue_full")
        self._pending.append(ctypes.string_at(data, size))
        return 0

    def _poll_loop(self) -> None:
        # BPF wakes this thread only every WAKEUP_EVERY records per CPU (bpf/ring_wakeup.h):
        # what came in without a wakeup is taken when the poll times out.
        while not self._stop.is_set():
            self._bpf.ring_buffer_poll(self.POLL_TIMEOUT_MS)
            self._bpf.ring_buffer_consume()


def wakeup_every(ring_bytes: int, cpus: int | None = None) -> int:
    """Records per CPU between forced wakeups (bpf/ring_wakeup.h): the ring is at most about a
    quarter full when they come, whichever CPUs the records come from."""
    return max(1, ring_bytes // (4 * EVENT_SIZE * max(1, cpus or os.cpu_count() or 1)))


def _pow2(n: int) -> int:
    """Ring buffer sizes must be a power of two pages."""
    p = 1
    while p < n:
        p <<= 1
    return p
