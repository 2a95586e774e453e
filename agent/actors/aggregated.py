"""Actors whose BPF programs aggregate in kernel maps (bpf/stack_agg.h): wall and lock.

Switch-heavy hosts produce thousands of off-CPU intervals and futex waits a second; one
ring-buffer record (4 KiB with stacks) per event, parsed and symbolized in Python, cost the
agent ~20 % of a core. Here BPF adds each event to a (pid, tid, stack id, label) entry and
stores each distinct stack once. The actor's record source is :class:`AggregationMaps`, not
a ring buffer; once per flush interval

1. flips ``agg_generation`` so BPF writes the other of the two aggregation maps,
2. waits for programs already past the flip (they run for microseconds),
3. reads and deletes the quiet map in one batch syscall (agent/bpf/map_drain.py),
   (steps 1-3: the source's ``drain``),
4. the actor shares out the sums of events not captured (``spread``) and copies the stacks
   it has not symbolized yet out of the LRU stacks map (``prepare``),
5. turns each entry into one sample whose values are the entry's sums, symbolizing each
   stack id once and caching the frames (agent/stacks/frame_cache.py: an LRU, emptied every minute so stacks of reused
   pids and newly loaded symbols are picked up).

Double buffering, not delete-after-read, because BPF increments entries in place: an
increment between our read and our delete of the same entry would be lost.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, ClassVar

from agent.actors.base import ActorContext, BpfActor
from agent.actors.parts import ProgramPart
from agent.actors.sources import RecordSource
from agent.bpf.layouts import WEIGHT_SHIFT, AggCounter, AggKey, AggValue, struct_format
from agent.bpf.map_drain import HashMapDrainer
from agent.bpf.records import EVENT_SIZE, parse_stack_event
from agent.process.procmaps import read_proc_file
from agent.stacks.frame_cache import FrameCache
from shared.model import Frame

log = logging.getLogger(__name__)

AGG_KEY = struct_format(AggKey)  # pid, tid, stack_id, label
# count, total_ns, first_ts, last_ts, cpu, on_cpu_count, weighted_ns, weighted_count, on_cpu_ns,
# on_cpu_first_ts, on_cpu_last_ts
AGG_VALUE = struct_format(AggValue)
# How long after flipping the generation we wait before reading the quiet map: BPF
# programs do not sleep and finish within microseconds of reading the generation.
GENERATION_GRACE_S = 0.002


@dataclass(slots=True, frozen=True)
class AggregatedEntry:
    """One (pid, tid, stack, label) aggregate of a flush window."""

    pid: int
    tid: int
    stack_id: int
    label: int
    count: int
    total_ns: int
    first_ts_mono_ns: int
    last_ts_mono_ns: int
    cpu: int
    # Captured events: the sums of each event's ns and of 1 (in 1/2^16ths) divided by the
    # probability it was captured (bpf/event_capture.h); 0 in sums of events not captured.
    weighted_ns: int
    weighted_count: int = 0


# How an entry takes part in spread_uncaptured: (its stratum, True if it is the stratum's sum of
# events not captured), or None if it is left as it is.
Stratum = Callable[[AggregatedEntry], "tuple[Hashable, bool] | None"]


def spread_uncaptured_by(entries: list[AggregatedEntry], stratum_of: Stratum, spread_counts: bool = False,
                         earlier: dict[Hashable, list[AggregatedEntry]] | None = None,
                         waiting: dict[Hashable, list[AggregatedEntry]] | None = None) -> list[AggregatedEntry]:
    """Each stratum's sum of events not captured, shared out over its captured entries.

    In a stratum (e.g. one thread's long off-CPU blocks in one task state, or its waits on
    one lock, in one window) with ``C`` ns captured and ``U`` ns not, the exact total ``C + U``
    is divided among the captured entries in proportion to their ``weighted_ns`` (each event's
    ns divided by the probability it had of being captured): a ratio of Horvitz-Thompson
    estimates, so a stack whose events were less likely to be captured gets its share back.
    With ``spread_counts`` the event counts are shared the same way by ``weighted_count``.
    Rounded so the stratum's totals stay exact. Strata with nothing uncaptured are left alone.

    A stratum with nothing captured in this window keeps its uncaptured entry (reported
    without a stack), unless ``earlier`` (kept by the caller from window to window) holds the
    captured entries of that stratum's latest window with captures: then the sum is shared
    over those stacks by their weights (an estimate from an earlier window; with a tight
    capture budget a thread's waits on one lock can go a window without a capture).
    ``earlier`` is updated with this window's captured entries.

    With neither, and ``waiting`` given (kept by the caller too), the uncaptured entry waits
    there for the stratum's next window with captures and is then shared over those stacks,
    keeping its own timestamps: a thread's first windows, before anything of it was captured,
    would otherwise stay stackless (the caller releases what waited too long:
    release_waiting).
    """
    uncaptured: dict[Hashable, int] = {}
    captured: dict[Hashable, list[int]] = {}
    for i, entry in enumerate(entries):
        role = stratum_of(entry)
        if role is None:
            continue
        stratum, is_uncaptured = role
        if is_uncaptured:
            uncaptured[stratum] = i
        else:
            captured.setdefault(stratum, []).append(i)
    out: list[AggregatedEntry | None] = list(entries)
    added: list[AggregatedEntry] = []
    if waiting:
        for stratum in [s for s in waiting if s in captured]:
            stacks = [entries[i] for i in captured[stratum]]
            for rest in waiting.pop(stratum):
                added.extend(e for e in _spread_over(rest, stacks, spread_counts) if e.total_ns or e.count)
    for stratum, u in uncaptured.items():
        rest = entries[u]
        indexes = captured.get(stratum, [])
        base = [entries[i] for i in indexes]
        if not base and earlier is not None and stratum in earlier:
            base = _stand_ins(rest, earlier[stratum])
        # weighted >= exact (probabilities <= 1) but for BPF's rounding down: max() keeps that true.
        weights = [max(e.weighted_ns, e.total_ns) for e in base]
        if sum(weights) <= 0:  # nothing captured in this stratum and window
            if waiting is not None:
                waiting.setdefault(stratum, []).append(rest)
                out[u] = None
            continue  # else reported as it is
        ns = shares(rest.total_ns + sum(e.total_ns for e in base), weights)
        counts = [e.count for e in base]
        if spread_counts:
            count_weights = [max(e.weighted_count, e.count << WEIGHT_SHIFT, 1) for e in base]
            counts = shares(rest.count + sum(counts), count_weights)
        spread = [dataclasses.replace(e, total_ns=share, count=count)
                  for e, share, count in zip(base, ns, counts, strict=True)]
        if indexes:
            for i, e in zip(indexes, spread, strict=True):
                out[i] = e
        else:
            added.extend(e for e in spread if e.total_ns or e.count)
        out[u] = None
    if earlier is not None:
        for stratum, indexes in captured.items():
            earlier[stratum] = [entries[i] for i in indexes]
    return [e for e in out if e is not None] + added


def _stand_ins(rest: AggregatedEntry, stacks: list[AggregatedEntry]) -> list[AggregatedEntry]:
    """Those stacks again, with no time of their own: only their weights, and ``rest``'s times."""
    return [dataclasses.replace(e, count=0, total_ns=0, first_ts_mono_ns=rest.first_ts_mono_ns,
                                last_ts_mono_ns=rest.last_ts_mono_ns, cpu=rest.cpu) for e in stacks]


def _spread_over(rest: AggregatedEntry, stacks: list[AggregatedEntry], spread_counts: bool) -> list[AggregatedEntry]:
    """``rest`` (an uncaptured sum) divided over another window's captured ``stacks`` by weight."""
    base = _stand_ins(rest, stacks)
    weights = [max(e.weighted_ns, e.total_ns) for e in base]
    if sum(weights) <= 0:
        return [rest]
    ns = shares(rest.total_ns, weights)
    counts = [0] * len(base)
    if spread_counts:
        counts = shares(rest.count, [max(e.weighted_count, e.count << WEIGHT_SHIFT, 1) for e in base])
    return [dataclasses.replace(e, total_ns=share, count=count)
            for e, share, count in zip(base, ns, counts, strict=True)]


def release_waiting(waiting: dict[Hashable, list[AggregatedEntry]], now_ns: int, max_age_ns: int,
                    everything: bool = False) -> list[AggregatedEntry]:
    """The uncaptured sums that waited more than ``max_age_ns`` (all of them with
    ``everything``: the actor is stopping) for a window with captures of their stratum, taken
    out of ``waiting``; the caller reports them without a stack."""
    released: list[AggregatedEntry] = []
    for stratum in list(waiting):
        kept = [e for e in waiting[stratum] if not everything and now_ns - e.last_ts_mono_ns <= max_age_ns]
        released += [e for e in waiting[stratum] if e not in kept]
        if kept:
            waiting[stratum] = kept
        else:
            del waiting[stratum]
    return released


def prune_earlier(earlier: dict[Hashable, list[AggregatedEntry]], now_ns: int, max_age_ns: int,
                  capacity: int) -> None:
    """Drop the strata of ``earlier`` whose latest capture is more than ``max_age_ns`` old, then
    the oldest ones beyond ``capacity``.

    Each stratum ages on its own: emptied all at once (with the stack cache, every minute),
    every stratum without a capture in the next window lost its stacks, and its time stayed
    stackless (docs/design/wall-and-lock.md, "Carried-over stacks")."""
    def latest(stratum: Hashable) -> int:
        return max(e.last_ts_mono_ns for e in earlier[stratum])

    for stratum in [s for s in earlier if now_ns - latest(s) > max_age_ns]:
        del earlier[stratum]
    if len(earlier) > capacity:
        for stratum in sorted(earlier, key=latest)[: len(earlier) - capacity]:
            del earlier[stratum]


def shares(total: int, weights: list[int]) -> list[int]:
    """``total`` divided in proportion to ``weights`` (sum > 0), the rest of rounding to the last."""
    weight_sum = sum(weights)
    parts = [total * w // weight_sum for w in weights[:-1]]
    return [*parts, total - sum(parts)]


# A thread's carried on-CPU spans in one window: [count, ns, first span's start, last span's
# start, the CPU of the entry carrying the last one].
Carried = list[int]


def fold_carried_on_cpu(entries: list[AggregatedEntry], carried: dict[tuple[int, int], Carried],
                        label: int) -> list[AggregatedEntry]:
    """Each thread's on-CPU spans that other entries carried (bpf/wall.bpf.c puts the span ending
    at a switch-out in the update of the long block it closes, and a thread's pending spans in
    the update of its short blocks' sum) added to
    its own ``label`` entry (pid, tid, stack 0) of the window, made if the window has none: one
    entry per thread, with the sum BPF measured, stamped with the first and last span's start."""
    out = list(entries)
    for i, e in enumerate(out):
        if e.label == label and not e.stack_id and (e.pid, e.tid) in carried:
            count, ns, first, last, cpu = carried.pop((e.pid, e.tid))
            out[i] = dataclasses.replace(e, count=e.count + count, total_ns=e.total_ns + ns,
                                         first_ts_mono_ns=min(e.first_ts_mono_ns, first),
                                         last_ts_mono_ns=max(e.last_ts_mono_ns, last),
                                         cpu=e.cpu if e.last_ts_mono_ns >= last else cpu)
    out += [AggregatedEntry(pid, tid, 0, label, count, ns, first, last, cpu, 0)
            for (pid, tid), (count, ns, first, last, cpu) in carried.items()]
    return out


class AggregationMaps(RecordSource[AggregatedEntry]):
    """The record source of programs including bpf/stack_agg.h: the double-buffered
    aggregation maps ``agg0``/``agg1``, drained once per flush (no thread of its own).
    ``on_cpu_label``: the label of the per-thread on-CPU sums that the values' ``on_cpu_*``
    fields are added to (wall), read here so no entry object carries them."""

    def __init__(self, ctx: ActorContext, on_cpu_label: int | None = None) -> None:
        self.settings = ctx.settings
        self.on_cpu_label = on_cpu_label
        self._bpf: Any = None
        self.stopped = False
        self._drainers: list[HashMapDrainer] = []
        self._generation = 0

    def defines(self) -> dict[str, int | str]:
        return {"AGG_ENTRIES": self.settings.agg_map_entries, "STACK_ENTRIES": self.settings.agg_stack_entries}

    def ready(self, bpf: Any) -> None:
        self._drainers = [HashMapDrainer(bpf[name], AGG_KEY, AGG_VALUE) for name in ("agg0", "agg1")]
        stack_leaf = ctypes.sizeof(bpf["stacks"].Leaf)
        if stack_leaf != EVENT_SIZE:
            raise RuntimeError(f"stacks map value is {stack_leaf} bytes, agent expects {EVENT_SIZE}")
        self._bpf = bpf

    def resume(self, bpf: Any) -> None:
        """Continue from the generation BPF writes now, for maps that outlive this source (the
        lock maps the wall program writes): the first drain then reads the map being written."""
        self._generation = int(bpf["agg_generation"][ctypes.c_int(0)].value)

    def stop(self) -> None:
        # What BPF adds to the maps until the program is detached is read by the last drain (not
        # what a wall thread still has pending in its task storage: bpf/wall.bpf.c).
        self.stopped = True

    def drain(self) -> list[AggregatedEntry]:
        """Swap the aggregation maps and read the one BPF just stopped writing."""
        if self._bpf is None:
            return []
        old = self._generation
        self._generation = old + 1
        self._bpf["agg_generation"][ctypes.c_int(0)] = ctypes.c_uint32(self._generation & 0xFFFFFFFF)
        time.sleep(GENERATION_GRACE_S)
        rows = self._drainers[old & 1].drain()
        entries = []
        carried: dict[tuple[int, int], Carried] = {}
        for (pid, tid, stack_id, label), (count, total, first, last, cpu, on_cpu_count, weighted, weighted_count,
                                          on_cpu_ns, on_cpu_first, on_cpu_last) in rows:
            entries.append(AggregatedEntry(pid, tid, stack_id, label, count, total, first, last, cpu, weighted,
                                           weighted_count))
            if on_cpu_ns:
                sums = carried.get((pid, tid))
                if sums is None:
                    carried[(pid, tid)] = [on_cpu_count, on_cpu_ns, on_cpu_first, on_cpu_last, cpu]
                    continue
                sums[0] += on_cpu_count
                sums[1] += on_cpu_ns
                sums[2] = min(sums[2], on_cpu_first)
                if on_cpu_last > sums[3]:
                    sums[3], sums[4] = on_cpu_last, cpu
        if not carried:
            return entries
        if self.on_cpu_label is None:
            raise RuntimeError("the program carried on-CPU time but its actor has no label for it")
        return fold_carried_on_cpu(entries, carried, self.on_cpu_label)


class AggregatingActor(BpfActor[AggregatedEntry]):
    """Base for actors whose program includes bpf/stack_agg.h (records: AggregationMaps)."""

    # The aggregation maps (agg_map_entries each) are sized for one-second windows: a longer
    # flush interval would fill them on busy hosts, so these actors drain at least this often.
    MAX_FLUSH_INTERVAL_S: ClassVar[float | None] = 1.0

    STACK_CACHE_ENTRIES: ClassVar[int] = 16384
    STACK_CACHE_TTL_S: ClassVar[float] = 60.0
    # How old an earlier window's captures may be to stand in for a window without any: the
    # stack cache's TTL, the bound on how long a stack id is trusted (reused pids).
    EARLIER_MAX_AGE_S: ClassVar[float] = STACK_CACHE_TTL_S
    # How long a stratum's uncaptured sum, with no capture of that stratum yet, waits for one
    # before it is reported without a stack (its samples are that much later, not later stamped).
    WAITING_MAX_S: ClassVar[float] = 2.0
    THREAD_NAME_TTL_S: ClassVar[float] = 10.0
    # The label of the per-thread on-CPU sums the maps' carried on-CPU time joins (wall only).
    ON_CPU_TIME_LABEL: ClassVar[int | None] = None

    def __init__(self, ctx: ActorContext, *parts: ProgramPart) -> None:
        self._maps = AggregationMaps(ctx, self.ON_CPU_TIME_LABEL)
        super().__init__(ctx, self._maps, *parts)
        self._stack_frames: FrameCache[tuple[tuple[Frame, ...], str]] = FrameCache(self.STACK_CACHE_ENTRIES,
                                                                                  self.STACK_CACHE_TTL_S)
        self._thread_names: dict[tuple[int, int], str] = {}
        self._thread_names_started = time.monotonic()
        self._stack_buffer = ctypes.create_string_buffer(EVENT_SIZE)
        self._raw_stacks: dict[tuple[int, int], bytes] = {}  # read this flush, not yet symbolized
        self._agg_seen: list[int] = []
        self._earlier: dict[Hashable, list[AggregatedEntry]] = {}
        self._waiting: dict[Hashable, list[AggregatedEntry]] = {}

    def bpf_defines(self) -> dict[str, int | str]:
        return {**super().bpf_defines(), "CAPTURE_RATE_HZ": self.capture_rate_hz(),
                "CAPTURE_BUDGET_HZ": self.ctx.settings.capture_budget_per_cpu_hz}

    def capture_rate_hz(self) -> int:
        """Per-thread stack captures a second (bpf/event_capture.h); 0: every event."""
        return 0

    # -- draining ------------------------------------------------------------------------
    def prepare(self, entries: list[AggregatedEntry]) -> list[AggregatedEntry]:
        """The drained entries, spread, with the stacks not symbolized yet copied out and their
        processes announced (announce_python)."""
        if self.bpf is None:
            return []
        self._stack_frames.expire_if_due()  # before any id is looked up in this window
        prune_earlier(self._earlier, time.monotonic_ns(), int(self.EARLIER_MAX_AGE_S * 1e9), self.STACK_CACHE_ENTRIES)
        entries = self.spread(entries)
        last = self._maps.stopped or len(self._waiting) > self.STACK_CACHE_ENTRIES
        entries += release_waiting(self._waiting, time.monotonic_ns(), int(self.WAITING_MAX_S * 1e9), everything=last)
        self._fetch_new_stacks(entries)
        self.announce_python(dict.fromkeys(pid for pid, _stack_id in self._raw_stacks))
        return entries

    def spread(self, entries: list[AggregatedEntry]) -> list[AggregatedEntry]:
        """Share out the window's sums of events not captured (spread_uncaptured_by); runs
        before the stacks are fetched, so a stack carried over from an earlier window is read."""
        return entries

    def earlier_captures(self) -> dict[Hashable, list[AggregatedEntry]]:
        """Per stratum, the captured entries of its latest window with captures (bounded by
        age and number: prune_earlier, at the start of each window)."""
        return self._earlier

    def waiting_sums(self) -> dict[Hashable, list[AggregatedEntry]]:
        """Per stratum, uncaptured sums waiting for the stratum's first captures (released after
        WAITING_MAX_S, or all at the last drain: prepare)."""
        return self._waiting

    def _fetch_new_stacks(self, entries: list[AggregatedEntry]) -> None:
        """Copy the raw records of stacks not cached yet, before any symbolization: stacks is
        an LRU map, and on a busy host a stack read seconds later may have aged out. Every id
        of the window is then cached or read (the cache expires only at the start of prepare())."""
        from bcc.libbcc import lib

        self._raw_stacks.clear()
        missing = self._stack_frames.begin_window((entry.pid, entry.stack_id) for entry in entries if entry.stack_id)
        fd = self.bpf["stacks"].map_fd
        key = ctypes.c_uint64()
        for cache_key in missing:
            key.value = cache_key[1]
            if lib.bpf_lookup_elem(fd, ctypes.byref(key), self._stack_buffer) == 0:
                self._raw_stacks[cache_key] = self._stack_buffer.raw

    def count_aggregation(self, deltas: list[int]) -> None:
        """Fold bpf/stack_agg.h's and bpf/event_capture.h's slots (the first of the program's
        counters) into ours: map overflow, stacks stored, and events captured, not captured by
        the draw, and not drawn because the CPU's window hit its hard cap (the one source of
        bias: logged)."""
        if len(deltas) < len(AggCounter):
            return
        full, full_ns = deltas[AggCounter.MAP_FULL], deltas[AggCounter.MAP_FULL_NS]
        store_failed, stored = deltas[AggCounter.STACK_STORE_FAILED], deltas[AggCounter.STACKS_STORED]
        type_name = self.profile_type.value
        if full:
            self.ctx.counters.inc("events_dropped", full, type=type_name, reason="agg_map_full")
            self.ctx.counters.inc("agg_map_full_ns", full_ns, type=type_name)
            log.warning("%s: aggregation map full, %d events (%d ns) dropped", type_name, full, full_ns)
        if store_failed:
            self.ctx.counters.inc("stack_store_failed", store_failed, type=type_name)
        if stored:
            self.ctx.counters.inc("agg_stacks_stored", stored, type=type_name)
        for slot, result in ((AggCounter.CAPTURED, "captured"), (AggCounter.SAMPLED_OUT, "sampled_out"),
                             (AggCounter.CAPPED, "capped")):
            if deltas[slot]:
                self.ctx.counters.inc("stack_captures", deltas[slot], type=type_name, result=result)
        if deltas[AggCounter.CAPPED]:
            log.info("%s: %d events over the per-CPU capture budget's hard cap", type_name, deltas[AggCounter.CAPPED])

    # -- per-entry lookups, cached ---------------------------------------------------------
    def stack_frames(self, pid: int, stack_id: int) -> tuple[tuple[Frame, ...], str]:
        """The symbolized frames stored under ``stack_id`` and the comm of the thread that
        stored it; ((), "") and counted if the stack aged out of the map before we read it."""
        key = (pid, stack_id)
        cached = self._stack_frames.get(key)
        if cached is not None:
            return cached
        read = self._read_stack(pid, stack_id)
        if read is None:
            self.ctx.counters.inc("stack_missing", type=self.profile_type.value)
            return (), ""
        self._stack_frames.put(key, read)
        return read

    def _read_stack(self, pid: int, stack_id: int) -> tuple[tuple[Frame, ...], str] | None:
        raw = self._raw_stacks.pop((pid, stack_id), None)
        if raw is None:
            return None
        try:
            ev = parse_stack_event(raw)
        except ValueError:
            self.ctx.counters.inc("events_dropped", type=self.profile_type.value, reason="malformed_record")
            return None
        if ev.pid != pid:
            return None  # a 64-bit hash collision across processes: never attribute it
        return self.frames(ev), ev.thread_name

    def thread_name(self, pid: int, tid: int, fallback: str = "") -> str:
        """The thread's current name (from /proc, cached a few seconds), else ``fallback``."""
        now = time.monotonic()
        if now - self._thread_names_started > self.THREAD_NAME_TTL_S:
            self._thread_names.clear()
            self._thread_names_started = now
        name = self._thread_names.get((pid, tid))
        if name is None:
            name = self._thread_names[(pid, tid)] = read_thread_name(pid, tid)
        return name or fallback

    def sample_time_ns(self, entry: AggregatedEntry) -> int:
        """Wall-clock time of the entry's first event in the flush window."""
        return self.ctx.clock.to_unix_ns(entry.first_ts_mono_ns)


def read_thread_name(tgid: int, tid: int) -> str:
    """A thread's comm from /proc ("" once the thread is gone)."""
    try:
        return read_proc_file(f"/proc/{tgid}/task/{tid}/comm").decode(errors="replace").strip()
    except OSError:
        return ""
