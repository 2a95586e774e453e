"""Actors whose BPF programs aggregate in kernel maps (bpf/stack_agg.h): wall and lock.

Switch-heavy hosts produce thousands of off-CPU intervals and futex waits a second; one
ring-buffer record (4 KiB with stacks) per event, parsed and symbolized in Python, cost the
agent ~20 % of a core. Here BPF adds each event to a (pid, tid, stack id, label) entry and
stores each distinct stack once; once per flush interval the actor

1. flips ``agg_generation`` so BPF writes the other of the two aggregation maps,
2. waits for programs already past the flip (they run for microseconds),
3. reads and deletes the quiet map in one batch syscall (agent/bpf/map_drain.py),
4. turns each entry into one sample whose values are the entry's sums, symbolizing each
   stack id once and caching the frames (an LRU, emptied every minute so stacks of reused
   pids and newly loaded symbols are picked up).

Double buffering, not delete-after-read, because BPF increments entries in place: an
increment between our read and our delete of the same entry would be lost.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar

from agent.actors.base import RingBufferActor
from agent.bpf.layouts import AggCounter, AggKey, AggValue, struct_format
from agent.bpf.map_drain import HashMapDrainer
from agent.bpf.records import EVENT_SIZE, parse_stack_event
from shared.model import Frame

log = logging.getLogger("stackfleet.agent")

AGG_KEY = struct_format(AggKey)  # pid, tid, stack_id, label
AGG_VALUE = struct_format(AggValue)  # count, total_ns, first_ts, last_ts, cpu, weighted_ns
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
    # Sum of each event's ns divided by the probability it was captured (wall's capture
    # rate, bpf/wall.bpf.c); equal to total_ns where every event is captured.
    weighted_ns: int


class AggregatingActor(RingBufferActor):
    """Base for actors whose program includes bpf/stack_agg.h."""

    ring_buffer = False
    STACK_CACHE_ENTRIES: ClassVar[int] = 16384
    STACK_CACHE_TTL_S: ClassVar[float] = 60.0
    THREAD_NAME_TTL_S: ClassVar[float] = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._drainers: list[HashMapDrainer] = []
        self._generation = 0
        self._stack_frames: OrderedDict[tuple[int, int], tuple[tuple[Frame, ...], str]] = OrderedDict()
        self._stack_cache_started = time.monotonic()
        self._thread_names: dict[tuple[int, int], str] = {}
        self._thread_names_started = time.monotonic()
        self._stack_buffer = ctypes.create_string_buffer(EVENT_SIZE)
        self._raw_stacks: dict[tuple[int, int], bytes] = {}  # read this flush, not yet symbolized

    def bpf_defines(self) -> dict[str, int | str]:
        return {**super().bpf_defines(), "AGG_ENTRIES": self.ctx.settings.agg_map_entries,
                "STACK_ENTRIES": self.ctx.settings.agg_stack_entries}

    def _load_and_attach(self) -> None:
        super()._load_and_attach()
        try:
            self._drainers = [HashMapDrainer(self.bpf[name], AGG_KEY, AGG_VALUE) for name in ("agg0", "agg1")]
            stack_leaf = ctypes.sizeof(self.bpf["stacks"].Leaf)
            if stack_leaf != EVENT_SIZE:
                raise RuntimeError(f"stacks map value is {stack_leaf} bytes, agent expects {EVENT_SIZE}")
        except Exception:
            bpf, self.bpf = self.bpf, None  # layouts disagree: detach before failing
            bpf.cleanup()
            raise

    # -- draining ------------------------------------------------------------------------
    def drain(self) -> list[AggregatedEntry]:
        """Swap the aggregation maps and read the one BPF just stopped writing."""
        if self.bpf is None or not self._drainers:
            return []
        old = self._generation
        self._generation = old + 1
        self.bpf["agg_generation"][ctypes.c_int(0)] = ctypes.c_uint32(self._generation & 0xFFFFFFFF)
        time.sleep(GENERATION_GRACE_S)
        rows = self._drainers[old & 1].drain()
        entries = [AggregatedEntry(pid, tid, stack_id, label, count, total, first, last, cpu, weighted)
                   for (pid, tid, stack_id, label), (count, total, first, last, cpu, weighted) in rows]
        self._fetch_new_stacks(entries)
        return entries

    def _fetch_new_stacks(self, entries: list[AggregatedEntry]) -> None:
        """Copy the raw records of stacks not cached yet, before any symbolization: stacks is
        an LRU map, and on a busy host a stack read seconds later may have aged out."""
        from bcc.libbcc import lib

        self._raw_stacks.clear()
        fd = self.bpf["stacks"].map_fd
        key = ctypes.c_uint64()
        for entry in entries:
            cache_key = (entry.pid, entry.stack_id)
            if cache_key in self._stack_frames or cache_key in self._raw_stacks:
                continue
            key.value = entry.stack_id
            if lib.bpf_lookup_elem(fd, ctypes.byref(key), self._stack_buffer) == 0:
                self._raw_stacks[cache_key] = self._stack_buffer.raw

    def count_aggregation(self, deltas: list[int]) -> None:
        """Fold bpf/stack_agg.h's slots (the first of the program's counters) into ours."""
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

    # -- per-entry lookups, cached ---------------------------------------------------------
    def stack_frames(self, pid: int, stack_id: int) -> tuple[tuple[Frame, ...], str]:
        """The symbolized frames stored under ``stack_id`` and the comm of the thread that
        stored it; ((), "") and counted if the stack aged out of the map before we read it."""
        now = time.monotonic()
        if now - self._stack_cache_started > self.STACK_CACHE_TTL_S:
            self._stack_frames.clear()
            self._stack_cache_started = now
        key = (pid, stack_id)
        cached = self._stack_frames.get(key)
        if cached is not None:
            self._stack_frames.move_to_end(key)
            return cached
        read = self._read_stack(pid, stack_id)
        if read is None:
            self.ctx.counters.inc("stack_missing", type=self.profile_type.value)
            return (), ""
        self._stack_frames[key] = read
        if len(self._stack_frames) > self.STACK_CACHE_ENTRIES:
            self._stack_frames.popitem(last=False)
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
        with open(f"/proc/{tgid}/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""
