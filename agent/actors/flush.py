"""When an actor flushes: at the latest every flush interval, earlier when records pile up.

Each flush has a fixed cost whatever it carries (a hop to the symbolization thread, reading
the program's counters, encoding, one NATS publication and its acknowledgement), which at a
low sample rate is most of what the agent spends (docs/design/overhead.md, "Fixed work per
second"). So the interval is long (``flush_interval_s``, the longest a sample waits before it
is published), and a source whose records arrive faster than that asks for an early flush
once ``backlog`` bytes of records wait, so that the bounded queue in front of the symbolizer never
fills at high rates and batches stay about the same size. No record is dropped or reordered
by the policy: it only decides when the next drain happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


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
