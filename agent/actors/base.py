"""The actor contract and the common machinery of BPF ring-buffer actors.

An actor owns one profile type: it loads its BPF program, drains events, symbolizes them
while the processes are alive, and hands symbolized samples to the publisher. The
supervisor runs each actor as its own asyncio task and restarts it when it fails.

Threads and the event loop: waiting for ring-buffer data blocks (in epoll), so each BPF
actor runs one poll thread that takes every committed record of a wakeup in one batch
(agent/bpf/ring_reader.py: no Python call per record) into a bounded deque. The
event loop wakes once per flush interval, swaps the deque out and sends the batch to the
shared symbolization thread. Nothing blocking runs on the loop, and an idle host costs one
epoll wake-up per poll timeout.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, ClassVar

from agent.bpf.compiler_memory import TRIM_INTERVAL_S, release_compiler_memory
from agent.bpf.loader import BCC_LOCK, cleanup_program, load_program, read_percpu_counters
from agent.bpf.records import EVENT_SIZE, RawStackEvent, parse_stack_event
from agent.bpf.ring_reader import RingReader
from agent.clock import MonotonicToUnix
from agent.process.selectors import ProcessSelector, sync_targets
from agent.runtimes.python import PythonProcesses, PythonStacks
from agent.runtimes.python.frames import UNKNOWN_FRAME
from agent.settings import AgentSettings
from agent.stacks.assembly import event_frames
from agent.symbols import Symbolizer
from agent.unwind.sharing import ActorUnwinding, SharedUnwinding
from shared.counters import Counters
from shared.model import Frame, Sample
from shared.profile_types import ProfileType

SWEEP_INTERVAL_S = 10.0  # how often the shared caches drop exited processes
# Symbolized stacks kept per actor by their raw addresses (cleared at once when full: hot
# stacks come back within a flush; ~1 KB each with the key).
RAW_STACK_CACHE_ENTRIES = 4096

log = logging.getLogger(__name__)


class SampleSink:
    """Where actors deliver samples (the publisher implements it)."""

    async def submit(self, profile_type: ProfileType, samples: list[Sample], period: int) -> None:
        raise NotImplementedError


@dataclass
class ActorContext:
    """What every actor shares: settings, the symbolizer and its thread, the sink, counters."""

    settings: AgentSettings
    symbolizer: Symbolizer
    symbol_executor: Executor
    sink: SampleSink
    counters: Counters
    clock: MonotonicToUnix
    python: PythonProcesses = field(default_factory=PythonProcesses)
    # The native unwinder's maps and worker, shared by the actors that unwind (None: off).
    unwinding: SharedUnwinding | None = None
    _swept: float = field(default_factory=time.monotonic)
    _trimmed: float = field(default_factory=time.monotonic)

    def sweep_exited_processes(self, interval_s: float = SWEEP_INTERVAL_S) -> None:
        """Forget exited processes in the shared caches, at most every ``interval_s``.

        Called on the symbolization thread (the caches' only user), after a flush."""
        now = time.monotonic()
        if now - self._swept < interval_s:
            return
        self._swept = now
        forgotten = self.symbolizer.sweep_exited() + self.python.sweep_exited()
        if forgotten:
            self.counters.inc("exited_processes_forgotten", forgotten)
        idle = self.symbolizer.sweep_idle_files()
        if idle:
            self.counters.inc("symbol_files_closed_idle", idle)
        if now - self._trimmed >= TRIM_INTERVAL_S:  # what the caches freed, back to the system
            self._trimmed = now
            release_compiler_memory()
            self.counters.inc("heap_trims")


class ProfileActor(ABC):
    """One profile type's collector. ``run`` returns only when cancelled (or raises on failure)."""

    profile_type: ClassVar[ProfileType]

    def __init__(self, ctx: ActorContext) -> None:
        self.ctx = ctx

    @abstractmethod
    async def run(self) -> None:
        """Collect until cancelled; on cancellation detach everything and flush the last batch."""


class RingBufferActor(ProfileActor):
    """Base for actors whose BPF program writes records to a ring buffer named ``events``."""

    bpf_source: ClassVar[str]
    poll_timeout_ms: ClassVar[int] = 250
    # Actors whose program includes bpf/targets.h: the process selectors apply to them.
    uses_targets: ClassVar[bool] = False
    # New processes matching a selector are traced from the next scan on (at most this late).
    TARGET_SCAN_INTERVAL_S: ClassVar[float] = 1.0
    # Programs whose stacks get CPython frames (bpf/python.h through stack_event.h).
    python_frames: ClassVar[bool] = True
    # False for programs that aggregate in BPF maps (agent/actors/aggregated.py): no ring
    # buffer to open and no poll thread; the flush drains the maps instead.
    ring_buffer: ClassVar[bool] = True

    def __init__(self, ctx: ActorContext) -> None:
        super().__init__(ctx)
        self._pending: deque[bytes] = deque(maxlen=ctx.settings.max_pending_events)
        self._stop_polling = threading.Event()
        self.bpf: Any = None
        self._ring: RingReader | None = None
        self._ring_counts_seen = (0, 0)  # the reader's (malformed, discarded) already counted
        s = ctx.settings
        self.selector = ProcessSelector(list(s.target_pids), s.target_comm, s.target_cgroup)
        self._targets: set[int] = set()
        self._targets_synced = 0.0
        self.python: PythonStacks | None = None
        self._symbolized_stacks: dict[tuple[Any, ...], tuple[Frame, ...]] = {}
        # Actors whose programs unwind user stacks in BPF replace this with an active one.
        self.unwinding = ActorUnwinding(None, ctx.counters, self.profile_type.value)

    # -- hooks for subclasses -------------------------------------------------------------
    def bpf_defines(self) -> dict[str, int | str]:
        pages = _pow2(self.ctx.settings.ringbuf_pages)
        defines: dict[str, int | str] = {"RINGBUF_PAGES": pages, "WAKEUP_EVERY": wakeup_every(pages * PAGE_SIZE)}
        if self.python_frames:
            defines["PYTHON_FRAMES"] = 1
        if self.uses_targets:
            defines["AGENT_TGID"] = os.getpid()
            defines["TARGET_FILTER"] = int(self.selector.filters)
        return defines | self.unwinding.defines()

    @abstractmethod
    def attach(self, bpf: Any) -> None:
        """Attach the loaded program's events (blocking; runs in a worker thread)."""

    @abstractmethod
    def to_samples(self, records: list[bytes]) -> list[Sample]:
        """Turn raw records into symbolized samples (runs on the symbolization thread)."""

    @abstractmethod
    def period(self) -> int:
        """The sampling period reported with each batch, in the type's period unit."""

    def read_bpf_counters(self) -> None:
        """Fold in-kernel counters into ``ctx.counters`` (called on the symbolization thread)."""

    def counter_deltas(self) -> list[int]:
        """How much each slot of the program's ``counters`` array grew since the last call."""
        if self.bpf is None:
            return []
        now = read_percpu_counters(self.bpf["counters"])
        seen = getattr(self, "_counters_seen", [0] * len(now))
        self._counters_seen = now
        return [n - s for n, s in zip(now, seen, strict=False)]

    def count_drops(self, deltas: list[int], reasons: dict[int, str]) -> None:
        """Count in-kernel drops: ``reasons`` maps a counters slot to its drop reason."""
        for slot, reason in reasons.items():
            if slot < len(deltas) and deltas[slot]:
                self.ctx.counters.inc("events_dropped", deltas[slot], type=self.profile_type.value, reason=reason)

    def frames(self, ev: RawStackEvent) -> tuple[Frame, ...]:
        """The event's symbolized stack, leaf first, with Python frames spliced in.

        A hot loop yields the same raw stack sample after sample: the symbolized result is
        kept per (process identity, raw addresses), so a repeat costs one dict lookup instead
        of a symbolizer lookup per frame. Events carrying a stack copy (frames to recover by
        scanning, different every time) or a stack error (counted per event) are not cached.
        """
        symbolizer = self.ctx.symbolizer
        key = None
        if not ev.stack_copy and not ev.user_error and not ev.kernel_error:
            identity = symbolizer.process_identity(ev.pid)
            if identity is not None:
                key = (identity, tuple(ev.user), tuple(ev.kernel), ev.python, ev.py_status)
                cached = self._symbolized_stacks.get(key)
                if cached is not None:
                    if self.python is not None:
                        self.python.note_repeat(ev.pid, ev.py_status)
                    return cached
        frames = event_frames(ev, symbolizer, self.ctx.counters, self.profile_type.value, self.python)
        # Only complete results: a frame left unknown may be named once the process's maps
        # or code objects are read again (a new process still mapping its libraries).
        if key is not None and all((f.function or f.mapping is not None) and f.function != UNKNOWN_FRAME
                                   for f in frames):
            if len(self._symbolized_stacks) >= RAW_STACK_CACHE_ENTRIES:
                self._symbolized_stacks.clear()
            self._symbolized_stacks[key] = frames
        return frames

    def parsed(self, records: list[bytes]) -> Iterator[RawStackEvent]:
        """Decode records, counting (not raising on) malformed ones."""
        for raw in records:
            try:
                yield parse_stack_event(raw)
            except ValueError:
                self.ctx.counters.inc("events_dropped", type=self.profile_type.value, reason="malformed_record")

    # -- machinery ---------------------------------------------------------------------------
    def _take_records(self, reader: RingReader) -> None:
        """Move every committed record into the pending deque (the oldest go when it is full)."""
        records = reader.drain()
        pending, name = self._pending, self.profile_type.value
        overflow = len(pending) + len(records) - (pending.maxlen or 0)
        if overflow > 0:
            self.ctx.counters.inc("events_dropped", overflow, type=name, reason="agent_queue_full")
        pending.extend(records)  # one C call: atomic against the flush's popleft
        stats, (malformed, discarded) = reader.stats, self._ring_counts_seen
        if (stats.malformed, stats.discarded) != self._ring_counts_seen:
            self._ring_counts_seen = (stats.malformed, stats.discarded)
            if stats.malformed > malformed:  # logged by the reader
                self.ctx.counters.inc("events_dropped", stats.malformed - malformed, type=name,
                                      reason="malformed_ring_record")
            if stats.discarded > discarded:  # the program's choice (bpf_ringbuf_discard), not a loss
                self.ctx.counters.inc("ring_records_discarded", stats.discarded - discarded, type=name)

    def _poll_loop(self) -> None:
        # BPF wakes this thread only every WAKEUP_EVERY records per CPU (bpf/ring_wakeup.h):
        # what came in without a wakeup is taken when the wait times out.
        reader = self._ring
        assert reader is not None
        while not self._stop_polling.is_set():
            reader.wait(self.poll_timeout_ms)
            self._take_records(reader)

    def _load_and_attach(self) -> None:
        if not self.unwinding.active:
            return self._load_and_attach_once()
        try:
            self._load_and_attach_once()
        except Exception as exc:
            self.unwinding.give_up(exc)
            self._load_and_attach_once()

    def _load_and_attach_once(self) -> None:
        with BCC_LOCK:
            self.unwinding.hold()  # the shared unwind maps exist before a program declares them extern
            bpf = load_program(self.bpf_source, self.bpf_defines())
            reader = None
            try:
                if self.ring_buffer:
                    reader = RingReader.from_bcc(bpf["events"], name=f"{self.profile_type.value} ring")
                self.attach(bpf)
            except Exception:
                if reader is not None:
                    reader.close()
                bpf.cleanup()
                raise
            # Under the lock: a concurrent compile would fault the pages straight back in.
            release_compiler_memory()
        self.bpf, self._ring = bpf, reader
        if self.python_frames:
            self.python = PythonStacks(self.ctx.python, bpf["py_procs"], self.ctx.counters, self.profile_type.value)
        if self.uses_targets and self.selector.filters:
            self._targets = sync_targets(self.selector, bpf["targets"], set(), self.ctx.counters)
            self._targets_synced = time.monotonic()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        name = self.profile_type.value
        load = asyncio.ensure_future(asyncio.to_thread(self._load_and_attach))
        try:
            await asyncio.shield(load)
        except asyncio.CancelledError:
            # The compile thread cannot be interrupted: let it finish, then undo what it attached.
            await asyncio.gather(load, return_exceptions=True)
            await asyncio.shield(asyncio.to_thread(self._teardown, self.bpf))
            raise
        log.info("%s actor: BPF program %s attached", name, self.bpf_source)
        self.ctx.counters.inc("actor_started", type=name)
        poller = threading.Thread(target=self._poll_loop, name=f"poll-{name}", daemon=True)
        if self.ring_buffer:
            poller.start()
        flushing: asyncio.Future[None] | None = None
        try:
            while True:
                await asyncio.sleep(self.ctx.settings.flush_interval_s)
                # Shielded: a cancellation must not discard a batch already taken off the
                # ring buffer or out of the BPF maps; the finally block waits for it.
                flushing = asyncio.ensure_future(self._flush(loop))
                await asyncio.shield(flushing)
        finally:
            self._stop_polling.set()
            if poller.is_alive():
                await asyncio.shield(asyncio.to_thread(poller.join))
            if self._ring is not None:  # records that came without a wakeup
                await asyncio.shield(asyncio.to_thread(self._take_records, self._ring))
            if flushing is not None and not flushing.done():
                await asyncio.shield(asyncio.gather(flushing, return_exceptions=True))
            try:
                await asyncio.shield(self._flush(loop))
            finally:
                bpf, self.bpf = self.bpf, None
                await asyncio.shield(asyncio.to_thread(self._teardown, bpf))
                log.info("%s actor: BPF detached", name)

    def _teardown(self, bpf: Any) -> None:
        """Detach the program, then let go of the shared unwinder: one blocking call, so a
        second cancellation of the actor cannot leave the release undone."""
        try:
            reader, self._ring = self._ring, None
            if reader is not None:
                reader.close()
            if bpf is not None:
                cleanup_program(bpf)
        finally:
            self.unwinding.drop()

    async def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        # popleft is atomic against the poll thread's append: nothing slips between read and clear.
        pending = self._pending
        records = [pending.popleft() for _ in range(len(pending))]
        self.ctx.clock.refresh()
        samples = await loop.run_in_executor(self.ctx.symbol_executor, self._convert, records)
        if samples:
            await self.ctx.sink.submit(self.profile_type, samples, self.period())

    def _convert(self, records: list[bytes]) -> list[Sample]:
        if self.uses_targets and self.selector.filters and self.bpf is not None:
            now = time.monotonic()
            if now - self._targets_synced >= self.TARGET_SCAN_INTERVAL_S:
                self._targets = sync_targets(self.selector, self.bpf["targets"], self._targets, self.ctx.counters)
                self._targets_synced = now
        self.unwinding.check()  # a failed worker: raise, the supervisor restarts this actor
        self.read_bpf_counters()
        samples = self.to_samples(records)
        self.ctx.counters.inc("samples_collected", len(samples), type=self.profile_type.value)
        self.ctx.sweep_exited_processes()
        return samples


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


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
