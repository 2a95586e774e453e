"""Reading a BPF ring buffer map (``BPF_MAP_TYPE_RINGBUF``) straight from its memory mapping.

Hand-written because bcc offers only ``open_ring_buffer(callback)``: libbpf's consumer calls
a ctypes Python callback once per record (each one a GIL acquisition and a ctypes
round-trip). This reader takes every committed record of a wakeup in one pass instead: it
walks the 8-byte record headers, copies each record once straight out of the mapping into
its own ``bytes`` and then moves the consumer position past them all.

The layout (kernel/bpf/ringbuf.c, libbpf's ringbuf.c, Documentation/bpf/ringbuf.rst):

- mmap offset 0, one page, read-write: the consumer position (u64 at the page's start);
- mmap offset one page, read-only: the producer position page, followed by the data area
  (``max_entries`` bytes, a power of two) mapped twice in a row, so a record that wraps
  around the ring's end is contiguous in the mapping;
- positions are byte counters that only grow; a record sits at ``pos & (size - 1)``;
- each record starts with an 8-byte header: u32 length (bit 31: busy, still being written;
  bit 30: discarded) and a u32 the kernel uses for itself; the record takes
  ``roundup(length + 8, 8)`` bytes.

Memory ordering: the kernel publishes the producer position with a release store and
commits a record by clearing its busy bit with an atomic exchange; a consumer must read the
producer position, then the headers, then the data (acquire), and store the consumer
position only after it copied the data (release). CPython has no atomics, but on x86-64
(the only architecture the agent supports: see docs/design/overhead.md) aligned 8- and
4-byte loads and stores are single instructions, loads are not reordered with loads and
stores are not reordered with earlier loads (TSO), so doing those accesses in that program
order is enough. The constructor refuses other architectures rather than read torn data.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import platform
import select
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

HEADER_BYTES = 8
BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
LENGTH_MASK = DISCARD_BIT - 1
# Architectures whose memory model makes the plain loads and stores above correctly ordered.
TSO_MACHINES = frozenset({"x86_64", "amd64"})


def _leading_copies(items: bytes, item: bytes) -> int:
    """How many leading ``len(item)``-byte items of ``items`` equal ``item``: the whole
    run compared at once, else a binary search over prefixes (each comparison a memcmp)."""
    width = len(item)
    n = len(items) // width
    if items == item * n:
        return n
    lo, hi = 0, n  # items[:lo] all equal item; items[:hi] not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if items[: mid * width] == item * mid:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True, slots=True)
class SlotRun:
    """``count`` consecutive committed records of one length, as they lay in the ring: each in
    a ``slot``-byte slot that starts with its 8-byte ring header, the record right after it.

    :meth:`RingReader.drain_batch` hands a run of fixed-size records over as one copy of its
    slots instead of one ``bytes`` per record: a reader of their fields takes them with
    strided views over ``slots`` (agent/bpf/sample_records.py), so no step of the poll thread,
    the pending queue or the decoder is per record."""

    slots: bytes
    count: int
    record_size: int

    @property
    def slot(self) -> int:
        """Bytes from one record's header to the next one's."""
        return len(self.slots) // self.count

    def records(self) -> list[bytes]:
        """The records, each as its own ``bytes`` (for callers that want one per record)."""
        slot, size = self.slot, self.record_size
        return [self.slots[at + HEADER_BYTES : at + HEADER_BYTES + size] for at in range(0, len(self.slots), slot)]


# What a batch of ring records holds: single records, and runs of fixed-size ones.
RingItem = bytes | SlotRun


def ring_records(items: Sequence[RingItem]) -> list[bytes]:
    """Every record of ``items`` as its own ``bytes``, in order."""
    out: list[bytes] = []
    for item in items:
        if isinstance(item, SlotRun):
            out.extend(item.records())
        else:
            out.append(item)
    return out


def record_count(items: Sequence[RingItem]) -> int:
    """How many records ``items`` hold."""
    return sum(item.count if isinstance(item, SlotRun) else 1 for item in items)


class RingReaderUnsupported(RuntimeError):
    """This machine's memory model needs barriers that Python cannot issue."""


@dataclass
class RingStats:
    """What the reader skipped, cumulative: the actor folds the growth into its counters."""

    records: int = 0  # records returned
    discarded: int = 0  # records the BPF program discarded (bpf_ringbuf_discard): skipped
    malformed: int = 0  # headers whose length cannot be right: the rest of that batch dropped
    malformed_bytes: int = 0  # how many ring bytes those drops skipped


class RingView:
    """The three regions of a ring: consumer position, producer position, data (mapped twice).

    Built from a map fd by :meth:`map`; tests build one over plain memory to write headers
    the kernel never would (busy, malformed).
    """

    def __init__(self, consumer: memoryview, producer: memoryview, data: memoryview, size: int,
                 closers: tuple[Any, ...] = ()) -> None:
        if size <= 0 or size & (size - 1) or size % HEADER_BYTES:
            raise ValueError(f"ring size {size} is not a power of two of at least 8 bytes")
        if len(data) < 2 * size:
            raise ValueError(f"ring data region of {len(data)} bytes, expected {2 * size} (mapped twice)")
        self.consumer = consumer.cast("B").cast("Q")  # [0]: consumer position
        self.producer = producer.cast("B").cast("Q")  # [0]: producer position
        self.data = data
        self.words = data.cast("B").cast("I")  # record headers, read as aligned u32 loads
        self.size = size
        self.mask = size - 1
        self._closers = closers

    @classmethod
    def map(cls, map_fd: int, size: int) -> RingView:
        """Map a ring buffer map's fd (``size``: its max_entries, the data area in bytes)."""
        if platform.machine().lower() not in TSO_MACHINES:
            raise RingReaderUnsupported(
                f"reading BPF ring buffers from Python needs x86-64's memory ordering; this is {platform.machine()}")
        page = mmap.PAGESIZE
        consumer_map = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        try:
            producer_map = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except BaseException:
            consumer_map.close()
            raise
        consumer, producer = memoryview(consumer_map), memoryview(producer_map)
        return cls(consumer[:8], producer[:8], producer[page:], size, (consumer, producer, consumer_map, producer_map))

    def close(self) -> None:
        """Release the views and unmap (the views must go first: an exported mmap cannot close)."""
        for view in (self.consumer, self.producer, self.words, self.data):
            view.release()
        for closer in self._closers:
            if isinstance(closer, memoryview):
                closer.release()
            else:
                closer.close()
        self._closers = ()


class RingReader:
    """Batches of records from one BPF ring buffer map, without a Python call per record.

    ``drain()`` returns every record committed so far, in order, each as its own ``bytes``
    (one copy out of the ring; any record size); ``wait()`` blocks in
    epoll on the map's fd until the kernel signals new data or the timeout passes. Both run
    on the actor's poll thread, never on the event loop. Not thread-safe: one consumer.
    """

    def __init__(self, view: RingView, map_fd: int | None = None, name: str = "ring") -> None:
        self.view = view
        self.name = name
        self.stats = RingStats()
        self._epoll: select.epoll | None = None
        self._interrupt_fd: int | None = None  # an eventfd that ends a wait (``interrupt``)
        if map_fd is not None:
            self._epoll = select.epoll()
            self._epoll.register(map_fd, select.EPOLLIN)
            self._interrupt_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._epoll.register(self._interrupt_fd, select.EPOLLIN)

    @classmethod
    def open(cls, map_fd: int, size: int, name: str = "ring") -> RingReader:
        """A reader over the ring buffer map ``map_fd`` whose data area is ``size`` bytes."""
        return cls(RingView.map(map_fd, size), map_fd, name)

    @classmethod
    def from_bcc(cls, table: Any, name: str = "ring") -> RingReader:
        """A reader over a bcc ``RingBuf`` table (its ``map_fd`` and ``max_entries``).

        Do not also call the table's ``open_ring_buffer``: two consumers would race."""
        return cls.open(table.map_fd, int(table.max_entries), name)

    def wait(self, timeout_ms: int | None) -> bool:
        """Block until the kernel wakes the ring's waiters, :meth:`interrupt` is called or
        ``timeout_ms`` passes (None: no timeout); True if woken.

        The BPF programs skip most wakeups (bpf/ring_wakeup.h): records may wait in the ring
        without one, for the next :meth:`drain`."""
        if self._epoll is None:
            return False
        try:
            events = self._epoll.poll(-1 if timeout_ms is None else timeout_ms / 1000.0, 2)
        except InterruptedError:
            return False
        for fd, _ in events:
            if fd == self._interrupt_fd:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(fd)
        return bool(events)

    def interrupt(self) -> None:
        """End the current (or next) :meth:`wait` now, from any thread."""
        if self._interrupt_fd is not None:
            os.eventfd_write(self._interrupt_fd, 1)

    def drain(self) -> list[bytes]:
        """Every record committed since the last drain, oldest first; advances the consumer.

        A busy record (reserved, not yet submitted) ends the batch: it and what follows come
        with a later drain. Discarded records are skipped and counted. A header whose length
        cannot be right (longer than the ring, or past the producer position) is a counted,
        logged drop of everything up to the producer position, so the reader never loops on
        it or reads outside the ring.
        """
        view = self.view
        positions = self._pending()
        if positions is None:
            return []
        consumer, producer = positions
        words, mask, size = view.words, view.mask, view.size
        spans: list[tuple[int, int]] = []  # (offset from the consumer position, length)
        pos = consumer
        discarded = 0
        while pos < producer:
            header = words[(pos & mask) >> 2]
            if header & BUSY_BIT:
                break
            length = header & LENGTH_MASK
            step = (length + HEADER_BYTES + 7) & ~7
            if step > size or pos + step > producer:
                self._malformed(pos, producer, length, "record")
                pos = producer
                break
            if header & DISCARD_BIT:
                discarded += 1
            else:
                spans.append((pos - consumer + HEADER_BYTES, length))
            pos += step
        start = consumer & mask
        data = view.data
        # One copy per record, straight out of the mapping (records wrapping around the end
        # are contiguous there). Measured against copying the whole region once and slicing
        # it: equal for small records, and no large temporary for 4 KiB stack records.
        records = [data[start + at : start + at + length].tobytes() for at, length in spans]
        view.consumer[0] = pos  # release: after the copy above
        self.stats.records += len(records)
        self.stats.discarded += discarded
        return records

    def drain_batch(self, fixed_size: int) -> list[RingItem]:
        """Like :meth:`drain` (the same records, in ring order), for a ring whose records are
        mostly ``fixed_size`` bytes long, without a Python step or object per such record.

        Runs of committed records of exactly that length (their headers: the length, neither
        busy nor discarded) are found by comparing the run's header words, read with one
        strided slice of the mapping, against the expected value; a run is copied as one
        block of ring slots and handed over as one :class:`SlotRun`. Any other header (another
        length, busy, discarded, malformed) is handled one record at a time exactly as
        :meth:`drain` does, and such a record comes as its own ``bytes``. Headers are read
        before the data they cover, and the consumer position is stored after the copies.
        """
        view = self.view
        positions = self._pending()
        if positions is None:
            return []
        consumer, producer = positions
        words, mask, size, data = view.words, view.mask, view.size, view.data
        slot = (fixed_size + HEADER_BYTES + 7) & ~7
        header_word = fixed_size.to_bytes(4, "little")
        stride = slot >> 2
        items: list[RingItem] = []
        records = 0
        pos = consumer
        discarded = 0
        while pos < producer:
            at = pos & mask
            fits = (producer - pos) // slot
            if fits:
                first = at >> 2
                heads = words[first : first + fits * stride : stride].tobytes()  # one load per header
                run = _leading_copies(heads, header_word)
                if run:
                    items.append(SlotRun(data[at : at + run * slot].tobytes(), run, fixed_size))
                    records += run
                    pos += run * slot
                    continue
            header = words[at >> 2]
            if header & BUSY_BIT:
                break
            length = header & LENGTH_MASK
            step = (length + HEADER_BYTES + 7) & ~7
            if step > size or pos + step > producer:
                self._malformed(pos, producer, length, "record")
                pos = producer
                break
            if header & DISCARD_BIT:
                discarded += 1
            else:
                items.append(data[at + HEADER_BYTES : at + HEADER_BYTES + length].tobytes())
                records += 1
            pos += step
        view.consumer[0] = pos  # release: after the copies above
        self.stats.records += records
        self.stats.discarded += discarded
        return items

    def _pending(self) -> tuple[int, int] | None:
        """(consumer, producer) positions when records are waiting, else None. Positions
        further apart than the ring (the kernel never lets them be) are a counted, logged drop
        of everything up to the producer position."""
        view = self.view
        consumer = view.consumer[0]
        producer = view.producer[0]  # acquire: the headers are read after this load
        if producer == consumer:
            return None
        if not 0 < producer - consumer <= view.size:
            self._malformed(consumer, producer, producer - consumer, "positions")
            view.consumer[0] = producer
            return None
        return consumer, producer

    def _malformed(self, pos: int, producer: int, length: int, what: str) -> None:
        self.stats.malformed += 1
        self.stats.malformed_bytes += max(0, producer - pos)
        log.warning("%s: %s at ring position %d claims %d bytes (ring %d bytes, producer at %d): "
                    "dropping everything up to the producer position",
                    self.name, what, pos, length, self.view.size, producer)

    def close(self) -> None:
        """Stop waiting and unmap; the map itself belongs to the BPF object."""
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        if self._interrupt_fd is not None:
            os.close(self._interrupt_fd)
            self._interrupt_fd = None
        self.view.close()
