"""When an actor flushes: at the latest every flush interval, earlier when records pile up.

Each flush has a fixed cost whatever it carries (a hop to the symbolization thread, reading
the program's counters, encoding, one NATS publication and its acknowledgement), which at a
low sample rate is most of what the agent spends (docs/design/overhead.md, "Fixed work per
second"). So the interval is long (``flush_interval_s``, the longest a sample waits before it
is published), and a source whose records arrive faster than that asks for an early flush
once ``backlog`` bytes of records wait, so that the bounded queue in front of the symbolizer never
fills at high rates and batches stay about the same size. No record is dropped or reordered
by the policy: it only decides when the next drain happens. An actor that must drain more
often than the interval (its in-kernel maps hold less) holds its samples until the interval
is due and publishes them together (:class:`PublicationHold`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Sequence

from shared.model import Sample


class FlushSignal:
    """An actor's flush timer with an early trigger from its record source's thread."""

    def __init__(self, interval_s: float, backlog: int | None = None) -> None:
        self.interval_s = interval_s
        self.backlog = backlog  # bytes of waiting records; None: only the interval
        self.early_flushes = 0  # flushes the backlog brought forward (for tests and logs)
        self._event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._requested = False  # one wake-up per flush, however many batches arrive meanwhile
        self._lock = threading.Lock()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the actor's flushes run on (before the source starts)."""
        self._loop = loop

    def note_buffered(self, waiting: int) -> None:
        """Called by the source (any thread) with how many bytes of records wait for the next flush."""
        if self.backlog is None or waiting < self.backlog or self._loop is None:
            return
        with self._lock:
            if self._requested:
                return
            self._requested = True
        with contextlib.suppress(RuntimeError):  # the loop closed: the actor is gone
            self._loop.call_soon_threadsafe(self._event.set)

    async def wait(self) -> None:
        """Until the next flush is due: the interval elapsed, or the backlog was reached."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), self.interval_s)
        if self._event.is_set():
            self.early_flushes += 1
        self._event.clear()
        with self._lock:
            self._requested = False


class PublicationHold:
    """Samples of drains that come more often than the flush interval, held until it is due.

    The aggregating actors (wall, lock) drain their in-kernel maps every second, because the
    maps are sized for one second of a busy host. Publishing each second's samples on its own
    paid a publication's fixed cost (the metadata sink, the encoder's per-message work, one
    NATS message and its acknowledgement) ten times as often as the flush interval asks: on a
    busy host most of what those actors cost the event loop (docs/design/overhead.md,
    "Publishing at the flush interval"). Held samples keep their own timestamps; only when they
    leave the agent changes: about ``flush_interval_s`` after their window opened (samples go
    out at a drain, so an interval that is not a whole number of drain intervals is rounded
    up to the next drain). At most ``max_samples`` wait: more go out at once.
    """

    def __init__(self, flush_interval_s: float, drain_interval_s: float, max_samples: int) -> None:
        # A drained window's samples are up to one drain interval old already.
        self.hold_s = max(0.0, flush_interval_s - drain_interval_s)
        self.max_samples = max_samples
        self._samples: list[Sample] = []
        self._since = 0.0  # when the oldest held batch was drained

    def __len__(self) -> int:
        return len(self._samples)

    def take(self, samples: Sequence[Sample], now: float, final: bool = False) -> Sequence[Sample]:
        """What to publish now: nothing while samples wait for the interval; else the held
        samples then ``samples`` (a batch passes through as it is when nothing is held)."""
        if not self._samples:
            if final or self.hold_s <= 0 or len(samples) >= self.max_samples:
                return samples
            if samples:
                self._since = now
                self._samples = list(samples)
            return []
        self._samples.extend(samples)
        if final or now - self._since >= self.hold_s or len(self._samples) >= self.max_samples:
            return self.release()
        return []

    def release(self) -> list[Sample]:
        """Every held sample, in the order drained; the hold is empty after."""
        out, self._samples = self._samples, []
        return out
