"""Where a BPF actor's records come from, once per flush: ``drain()``.

A source is a program part (agent/actors/parts.py) with a life of its own: ``start`` once the
program is attached, ``drain`` on every flush (on the symbolization thread), ``stop`` when
the actor stops (blocking; what came in until then is still drained after it).

:class:`RingBufferSource` and :class:`SlotRingSource` read a BPF ring buffer named
``events``: the poll blocks (in epoll), so one poll thread per source moves each wakeup's
records into a deque bounded in bytes, and ``drain`` swaps the deque out. The poll has no
timeout: an idle host costs no wake-up. Records are taken off the ring by
agent/bpf/ring_reader.py (an mmap reader): every committed record of a wakeup in one batch,
no Python call per record; a :class:`SlotRingSource` keeps runs of fixed-size records as one
item each, not one per record.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from agent.actors.parts import ProgramPart
from agent.bpf.records import EVENT_SIZE
from agent.bpf.ring_reader import RingItem, RingReader, SlotRun, record_count
from agent.thread_names import name_os_thread
from shared.counters import Counters

if TYPE_CHECKING:
    from agent.actors.base import ActorContext
    from shared.profile_types import ProfileType

R = TypeVar("R")
# A ring source's items: records as bytes, or also runs of fixed-size ones.
_Item = TypeVar("_Item", bytes, RingItem)

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# What a pending record holds beyond its payload: its bytes object's header and its deque slot;
# and a pending run of records (its SlotRun, its bytes object's header, its deque slot).
RECORD_OVERHEAD_BYTES = sys.getsizeof(b"") + 8
RUN_OVERHEAD_BYTES = sys.getsizeof(SlotRun(b"", 1, 0)) + sys.getsizeof(b"") + 8


class RecordSource(ProgramPart, Generic[R]):
    """A program part that yields the actor's records."""

    def start(self, on_buffered: Callable[[int], None] | None = None) -> None:
        """Begin collecting (after the program is attached). A source that buffers records
        on a thread of its own calls ``on_buffered`` with how many wait, after each batch."""

    def stop(self) -> None:
        """Stop collecting (blocking); records already collected stay for the last ``drain``."""

    def drain(self) -> list[R]:
        """The records collected since the last drain (blocking; the symbolization thread)."""
        raise NotImplementedError


class _RingSource(RecordSource[_Item]):
    """Raw records of the program's ``events`` ring buffer, through a deque bounded in bytes.

    The bound is in bytes, not records: a CPU id record is 56 bytes and a whole record ~4 KiB,
    so a count sized for whole records held a few hundred KiB of id records and, halved as the
    early-flush trigger, flushed a busy host's id records every ~2 s instead of every interval
    (docs/design/overhead.md, "A byte bound for pending records"). Each item is charged its
    payload plus what holding it costs (:func:`item_charge`). A batch is appended whole and the
    oldest items then go until the bound holds, so the deque may exceed it by one batch (at
    most the ring). Subclasses say how a wakeup's records are read (:meth:`_read`).
    """

    # The poll waits for the kernel's wakeup with no timeout: BPF wakes it once records fill
    # a quarter of the ring, or for a record the agent must see soon (bpf/ring_wakeup.h);
    # what comes without a wakeup waits in the ring, where every drain takes it. A timed-out
    # wait would only move those records into the deque early, at ~50-130 µs of CPU a time on
    # a VM: the largest fixed cost of the thread (docs/design/overhead.md).
    POLL_TIMEOUT_MS: int | None = None

    def __init__(self, ring_pages: int, max_pending_bytes: int, counters: Counters, type_name: str,
                 on_records: Callable[[list[_Item]], None] | None = None) -> None:
        self.pages = _pow2(ring_pages)
        # Called with each batch as it leaves the ring (on the poll thread, or in a flush's drain).
        self.on_records: Callable[[list[_Item]], None] | None = on_records
        self.counters = counters
        self.type_name = type_name
        self.max_pending_bytes = max_pending_bytes
        self._pending: deque[_Item] = deque()
        self._pending_bytes = 0  # what ``_pending`` holds, charged as the bound counts it
        self._stop = threading.Event()
        self._ring: RingReader | None = None
        self._ring_counts_seen = (0, 0)  # the reader's (malformed, discarded) already counted
        self._consuming = threading.RLock()  # the ring has one consumer at a time: poll or drain
        self._poller: threading.Thread | None = None
        self.on_buffered: Callable[[int], None] | None = None

    def _read(self, reader: RingReader) -> list[_Item]:
        """Every record committed so far, as this source's items."""
        raise NotImplementedError

    def defines(self) -> dict[str, int | str]:
        return {"RINGBUF_PAGES": self.pages, "WAKEUP_EVERY": wakeup_every(self.ring_bytes)}

    @property
    def ring_bytes(self) -> int:
        return self.pages * PAGE_SIZE

    def open(self, bpf: Any) -> None:
        self._ring = RingReader.from_bcc(bpf["events"], name=f"{self.type_name} ring")

    def start(self, on_buffered: Callable[[int], None] | None = None) -> None:
        self.on_buffered = on_buffered
        self._poller = threading.Thread(target=self._poll_loop, name=f"poll-{self.type_name}", daemon=True)
        self._poller.start()

    def stop(self) -> None:
        self._stop.set()
        if self._ring is not None:
            self._ring.interrupt()  # out of its wait now
        if self._poller is not None and self._poller.is_alive():
            self._poller.join()
        if self._ring is not None:  # records that came without a wakeup
            self._take_records(self._ring)

    def close(self) -> None:
        ring, self._ring = self._ring, None
        if ring is not None:
            ring.close()

    def drain(self) -> list[_Item]:
        # What the ring holds now is taken first (records that came without a wakeup). The
        # deque is swapped for an empty one under the consumer lock, which the poll thread
        # holds while it extends it: nothing slips between the swap and the copy, and the
        # copy is one C call rather than a popleft per record.
        with self._consuming:
            if self._ring is not None:
                self._take_records(self._ring, notify=False)
            pending, self._pending = self._pending, deque()
            self._pending_bytes = 0
        return list(pending)

    def _take_records(self, reader: RingReader, notify: bool = True) -> None:
        """Move every committed record into the pending deque (the oldest go beyond the byte
        bound); ``notify``: the flush signal hears of the backlog in bytes (not when a drain
        takes it right away)."""
        with self._consuming:  # the poll thread and a flush's drain (re-entrant: drain holds it)
            records = self._read(reader)
            if records:
                if self.on_records is not None:
                    self.on_records(records)
                self._pending.extend(records)  # under the lock: a drain swaps the deque out under it too
                self._pending_bytes += sum(map(item_charge, records))
                if self._pending_bytes > self.max_pending_bytes:
                    self.counters.inc("events_dropped", self._drop_oldest(), type=self.type_name,
                                      reason="agent_queue_full")
                if notify and self.on_buffered is not None:
                    self.on_buffered(self._pending_bytes)
            self._count_ring_losses(reader)

    def _drop_oldest(self) -> int:
        """Drop the oldest pending items until the byte bound holds; how many records went."""
        pending, dropped = self._pending, []
        while pending and self._pending_bytes > self.max_pending_bytes:
            dropped.append(pending.popleft())
            self._pending_bytes -= item_charge(dropped[-1])
        return record_count(dropped)

    def _count_ring_losses(self, reader: RingReader) -> None:
        """Count what the reader dropped as malformed and what BPF discarded, since last time."""
        stats, (malformed, discarded), name = reader.stats, self._ring_counts_seen, self.type_name
        if (stats.malformed, stats.discarded) != self._ring_counts_seen:
            self._ring_counts_seen = (stats.malformed, stats.discarded)
            if stats.malformed > malformed:  # logged by the reader
                self.counters.inc("events_dropped", stats.malformed - malformed, type=name,
                                  reason="malformed_ring_record")
            if stats.discarded > discarded:  # the program's choice (bpf_ringbuf_discard), not a loss
                self.counters.inc("ring_records_discarded", stats.discarded - discarded, type=name)

    def _poll_loop(self) -> None:
        # BPF wakes this thread only every WAKEUP_EVERY records per CPU (bpf/ring_wakeup.h);
        # ``stop`` ends the wait through the reader's interrupt.
        name_os_thread()
        reader = self._ring
        assert reader is not None
        while not self._stop.is_set():
            reader.wait(self.POLL_TIMEOUT_MS)
            self._take_records(reader)


class RingBufferSource(_RingSource[bytes]):
    """A ring of records of any size, each handed on as its own ``bytes``."""

    @classmethod
    def of(cls, ctx: ActorContext, profile_type: ProfileType,
           on_records: Callable[[list[bytes]], None] | None = None) -> RingBufferSource:
        """The ring buffer sized and bounded by the agent's settings."""
        s = ctx.settings
        return cls(s.ringbuf_pages, s.max_pending_bytes, ctx.counters, profile_type.value, on_records)

    def _read(self, reader: RingReader) -> list[bytes]:
        return reader.drain()


class SlotRingSource(_RingSource[RingItem]):
    """A ring whose records are mostly ``fixed_size`` bytes (the CPU profile's 56-byte id
    records): runs of those come as one :class:`SlotRun` each (agent/bpf/ring_reader.py
    ``drain_batch``), other records as their own ``bytes``, so no step of the poll thread or
    of the pending queue is per record."""

    def __init__(self, ring_pages: int, max_pending_bytes: int, counters: Counters, type_name: str,
                 fixed_size: int, on_records: Callable[[list[RingItem]], None] | None = None) -> None:
        super().__init__(ring_pages, max_pending_bytes, counters, type_name, on_records)
        self.fixed_size = fixed_size

    @classmethod
    def of(cls, ctx: ActorContext, profile_type: ProfileType, fixed_size: int,
           on_records: Callable[[list[RingItem]], None] | None = None) -> SlotRingSource:
        """The ring buffer sized and bounded by the agent's settings."""
        s = ctx.settings
        return cls(s.ringbuf_pages, s.max_pending_bytes, ctx.counters, profile_type.value, fixed_size, on_records)

    def _read(self, reader: RingReader) -> list[RingItem]:
        return reader.drain_batch(self.fixed_size)


def item_charge(item: bytes | SlotRun) -> int:
    """What a pending item costs the byte bound: its payload and what holding it costs."""
    if isinstance(item, SlotRun):
        return len(item.slots) + RUN_OVERHEAD_BYTES
    return len(item) + RECORD_OVERHEAD_BYTES


def wakeup_bytes(ring_bytes: int, cpus: int | None = None) -> int:
    """Bytes per CPU between forced wakeups (bpf/ring_wakeup.h): the ring is at most about a
    quarter full when they come, whichever CPUs the records come from."""
    return max(EVENT_SIZE, ring_bytes // (4 * max(1, cpus or os.cpu_count() or 1)))


def wakeup_every(ring_bytes: int, cpus: int | None = None) -> int:
    """The same bound in records of EVENT_SIZE bytes, for programs that count records."""
    return wakeup_bytes(ring_bytes, cpus) // EVENT_SIZE


def _pow2(n: int) -> int:
    """Ring buffer sizes must be a power of two pages."""
    p = 1
    while p < n:
        p <<= 1
    return p
