"""The actor contract, and the BPF actor every profile type is built from.

An actor owns one profile type: it loads its BPF program, drains records, symbolizes them
while the processes are alive, and hands symbolized samples to the publisher. The
supervisor runs each actor as its own asyncio task and restarts it when it fails.

A :class:`BpfActor` is composed of parts (agent/actors/parts.py): one record source (a ring
buffer, agent/actors/sources.py, or the aggregation maps, agent/actors/aggregated.py) and,
as its program needs, a target filter and CPython frames. Once per flush (every flush
interval, earlier when the source's records pile up: agent/actors/flush.py) the event loop
sends one conversion to the shared symbolization thread, which runs, in order:
``track_started_processes`` (discovery and probe attachment), the source's ``drain``,
``to_samples`` (conversion only), ``forget_exited_processes`` (after the last records of
an exited process are converted). Nothing blocking runs on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import InitVar, dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from agent.actors.flush import FlushSignal, PublicationHold
from agent.actors.parts import ProgramPart, PythonFrames, TargetFilter
from agent.actors.sources import RecordSource
from agent.bpf.compiler_memory import TRIM_INTERVAL_S, release_compiler_memory
from agent.bpf.loader import BCC_LOCK, load_program, read_percpu_counters
from agent.bpf.records import RawStackEvent, parse_stack_event
from agent.clock import MonotonicToUnix
from agent.memory_budget import MemoryBudget
from agent.process.selectors import ProcessSelector
from agent.process.watcher import ProcessSubscription, ProcessWatcher
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

    async def submit(self, profile_type: ProfileType, samples: Sequence[Sample], period: int) -> None:
        """Take a batch: a list of samples, or :class:`~shared.model.SampleColumns`."""
        raise NotImplementedError


@dataclass
class ActorContext:
    """What every actor shares: settings, the symbolizer and its thread, the sink, counters,
    the CPython process cache, the native unwinder, and the one /proc watcher."""

    settings: AgentSettings
    symbolizer: Symbolizer
    symbol_executor: Executor
    sink: SampleSink
    counters: Counters
    clock: MonotonicToUnix
    python: PythonProcesses = field(default_factory=PythonProcesses)
    # The native unwinder's maps and worker, shared by the actors that unwind (None: off).
    unwinding: SharedUnwinding | None = None
    # The caches' memory budget (agent/memory_budget.py), shared with the symbolizer, the
    # CPython frames and the publisher.
    budget: MemoryBudget = field(default_factory=MemoryBudget)
    _swept: float = field(default_factory=time.monotonic)
    _trimmed: float = field(default_factory=time.monotonic)
    # Seconds from one periodic heap trim to the next: short at first, when start-up work
    # (the first scan of every process, the first symbolizations, the unwind tables) leaves
    # tens of MB of freed heap behind, doubling up to TRIM_INTERVAL_S.
    _trim_after: float = SWEEP_INTERVAL_S
    # Scans /proc for every actor; the supervisor runs its periodic scan (ProcessWatcher.run).
    # Made from the settings unless given (the agent shares its watcher with the metadata resolver).
    watcher: InitVar[ProcessWatcher | None] = None
    processes: ProcessWatcher = field(init=False)

    def __post_init__(self, watcher: ProcessWatcher | None) -> None:
        self.processes = watcher or ProcessWatcher(self.counters, ProcessSelector.from_settings(self.settings))

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
        if now - self._trimmed >= self._trim_after:  # what the caches freed, back to the system
            self._trimmed = now
            self._trim_after = min(2 * self._trim_after, TRIM_INTERVAL_S)
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


R = TypeVar("R")


class BpfActor(ProfileActor, Generic[R]):
    """An actor whose BPF program yields records of type ``R`` through its ``source``.

    Subclasses name their program (``bpf_source``), pass their source and parts to
    ``__init__``, attach their events, and convert records (``to_samples``: conversion only).
    Processes the actor must attach to or forget go through ``track_started_processes`` and
    ``forget_exited_processes``, which the flush runs before and after the conversion.
    """

    bpf_source: ClassVar[str]
    # The longest this actor waits between flushes whatever ``flush_interval_s`` says (None:
    # no cap); programs whose in-kernel maps are sized for a window of this length set it.
    MAX_FLUSH_INTERVAL_S: ClassVar[float | None] = None
    # Samples such an actor holds for the flush interval at most (agent/actors/flush.py
    # PublicationHold); more are published at once. ~600 bytes each with their values and
    # attributes (tracemalloc, lock samples): ~10 MB at the bound, ~1,000 on the busy mix.
    HELD_SAMPLES_MAX: ClassVar[int] = 16_384

    def __init__(self, ctx: ActorContext, source: RecordSource[R], *parts: ProgramPart) -> None:
        super().__init__(ctx)
        self.source = source
        self.parts: tuple[ProgramPart, ...] = (source, *parts)
        self.targets = next((p for p in parts if isinstance(p, TargetFilter)), None)
        self.python_frames = next((p for p in parts if isinstance(p, PythonFrames)), None)
        self.bpf: Any = None
        self._subscriptions: list[ProcessSubscription] = []
        self._symbolized_stacks: dict[tuple[Any, ...], tuple[Frame, ...]] = {}
        # Actors whose programs unwind user stacks in BPF replace this with an active one.
        self.unwinding = ActorUnwinding(None, ctx.counters, self.profile_type.value)
        interval = ctx.settings.flush_interval_s
        if self.MAX_FLUSH_INTERVAL_S is not None:
            interval = min(interval, self.MAX_FLUSH_INTERVAL_S)
        # A flush comes early once records of half the bytes the source may hold are waiting.
        self.flush_signal = FlushSignal(interval, max(1, ctx.settings.max_pending_bytes // 2))
        # Draining more often than the flush interval, samples still go out at its pace.
        self.hold = PublicationHold(ctx.settings.flush_interval_s, interval, self.HELD_SAMPLES_MAX)

    @property
    def python(self) -> PythonStacks | None:
        """The program's CPython frame splicer, once loaded (None: no Python frames)."""
        return self.python_frames.stacks if self.python_frames is not None else None

    # -- hooks for subclasses -------------------------------------------------------------
    def bpf_defines(self) -> dict[str, int | str]:
        defines: dict[str, int | str] = {}
        for part in self.parts:
            defines |= part.defines()
        return defines | self.unwinding.defines()

    def load(self) -> Any:
        """Compile and load the actor's program (blocking; ``BCC_LOCK`` held): the bcc module
        whose maps the parts open."""
        return load_program(self.bpf_source, self.bpf_defines())

    def program_name(self) -> str:
        """What ``load`` loads, for the log."""
        return f"BPF program {self.bpf_source}"

    def unload(self, bpf: Any) -> None:
        """Detach and close what ``load`` returned (blocking; ``BCC_LOCK`` held: bcc's module
        teardown is not safe against another teardown or a compile in a parallel thread, which
        crashes the process)."""
        bpf.cleanup()

    @abstractmethod
    def attach(self, bpf: Any) -> None:
        """Attach the loaded program's events (blocking; runs in a worker thread)."""

    @abstractmethod
    def to_samples(self, records: list[R]) -> Sequence[Sample]:
        """Turn records into symbolized samples (runs on the symbolization thread); no
        discovery, no probes: those are the two steps below."""

    @abstractmethod
    def period(self) -> int:
        """The sampling period reported with each batch, in the type's period unit."""

    def track_started_processes(self) -> None:
        """Find and attach to new processes, before this flush's records are converted
        (symbolization thread)."""

    def forget_exited_processes(self) -> None:
        """Detach from and forget processes that are gone or no longer wanted, after their
        last records were converted (symbolization thread)."""

    def subscribe_to_processes(self) -> ProcessSubscription:
        """A subscription to the shared process watcher, closed when the actor stops."""
        subscription = self.ctx.processes.subscribe()
        self._subscriptions.append(subscription)
        return subscription

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

    def announce_python(self, pids: Iterable[int]) -> None:
        """Tell the program about a batch's CPython processes before any of its stacks is
        symbolized: BPF reads a process's Python frames only from its announcement on, and a
        first batch on a host can take seconds to symbolize."""
        if self.python is not None:
            for pid in pids:
                self.python.announce(pid)

    def frames(self, ev: RawStackEvent) -> tuple[Frame, ...]:
        """The event's symbolized stack, leaf first, with Python frames spliced in.

        A hot loop yields the same raw stack sample after sample: the symbolized result is
        kept per (process key, raw addresses), so a repeat costs one dict lookup instead
        of a symbolizer lookup per frame. Events carrying a stack copy (frames to recover by
        scanning, different every time) or a stack error (counted per event) are not cached.
        """
        symbolizer = self.ctx.symbolizer
        key = None
        if not ev.stack_copy and not ev.user_error and not ev.kernel_error:
            process_key = symbolizer.process_key(ev.pid)
            if process_key is not None:
                key = (process_key, tuple(ev.user), tuple(ev.kernel), ev.python, ev.py_status)
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
            bpf = self.load()
            try:
                for part in self.parts:
                    part.open(bpf)
                self.attach(bpf)
            except Exception:
                self._close_parts()
                self.unload(bpf)
                raise
            # Under the lock: a concurrent compile would fault the pages straight back in.
            release_compiler_memory()
        try:
            for part in self.parts:
                part.ready(bpf)
        except Exception:  # e.g. a map layout the agent does not expect: detach before failing
            self._close_parts()
            with BCC_LOCK:
                self.unload(bpf)
            raise
        self.bpf = bpf

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
        log.info("%s actor: %s attached", name, self.program_name())
        self.ctx.counters.inc("actor_started", type=name)
        self.flush_signal.bind(loop)
        self.source.start(self.flush_signal.note_buffered)
        flushing: asyncio.Future[None] | None = None
        try:
            while True:
                await self.flush_signal.wait()
                # Shielded: a cancellation must not discard a batch already taken off the
                # ring buffer or out of the BPF maps; the finally block waits for it.
                flushing = asyncio.ensure_future(self._flush(loop))
                await asyncio.shield(flushing)
        finally:
            await asyncio.shield(asyncio.to_thread(self.source.stop))
            if flushing is not None and not flushing.done():
                await asyncio.shield(asyncio.gather(flushing, return_exceptions=True))
            try:
                await asyncio.shield(self._flush(loop, final=True))
            finally:
                for subscription in self._subscriptions:
                    subscription.close()
                bpf, self.bpf = self.bpf, None
                await asyncio.shield(asyncio.to_thread(self._teardown, bpf))
                log.info("%s actor: BPF detached", name)

    def _teardown(self, bpf: Any) -> None:
        """Detach the program, then let go of the shared unwinder: one blocking call, so a
        second cancellation of the actor cannot leave the release undone."""
        try:
            self._close_parts()
            if bpf is not None:
                with BCC_LOCK:  # bcc's teardown is not safe against a parallel compile or teardown
                    self.unload(bpf)
        finally:
            self.unwinding.drop()

    def _close_parts(self) -> None:
        for part in self.parts:
            part.close()

    async def _flush(self, loop: asyncio.AbstractEventLoop, final: bool = False) -> None:
        """Drain and convert; publish what the hold lets go (everything on the ``final``
        flush, even when its own conversion fails)."""
        self.ctx.clock.refresh()
        try:
            samples = await loop.run_in_executor(self.ctx.symbol_executor, self._convert)
        except BaseException:
            if final:
                await self._publish(self.hold.release())
            raise
        await self._publish(self.hold.take(samples, time.monotonic(), final))

    async def _publish(self, batch: Sequence[Sample]) -> None:
        """Hand a batch to the sink (nothing if empty)."""
        if not batch:
            return
        try:
            await self.ctx.sink.submit(self.profile_type, batch, self.period())
        except Exception:
            # Not retried (the sink may have taken part of it): counted, and the actor fails.
            self.ctx.counters.inc("events_dropped", len(batch), type=self.profile_type.value,
                                  reason="publish_failed")
            raise

    def _convert(self) -> Sequence[Sample]:
        if self.bpf is None:  # stopped before the program was loaded
            return []
        if self.targets is not None:
            self.targets.sync()
        self.unwinding.check()  # a failed worker: raise, the supervisor restarts this actor
        self.unwinding.nudge_if_requested()
        self.read_bpf_counters()
        self.track_started_processes()
        samples = self.to_samples(self.source.drain())
        self.forget_exited_processes()
        self.ctx.counters.inc("samples_collected", len(samples), type=self.profile_type.value)
        self.ctx.sweep_exited_processes()
        return samples
