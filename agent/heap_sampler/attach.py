"""Finding the processes that loaded the sampler library and probing the library's files.

One uprobe pair per library *file* (device and inode), attached for all processes: the kernel
then fires it in every process that maps that file, including processes started later, and
a process costs nothing until it samples. Files are found in two ways: the library this agent
built (attached at once, so services started with it are covered from their first
allocation) and a scan of the maps of processes not seen before (libraries installed
elsewhere, or inside containers, reached through ``/proc/PID/root``).

Scans run on the symbolization thread, where the heap actor handles its records; attaching
takes ``BCC_LOCK`` (the first attach runs while the program loads, with the lock held).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Set
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from agent.bpf.loader import BCC_LOCK
from agent.heap_sampler import PROBE_ALLOC, PROBE_FREE, is_sampler_library, library_path
from agent.process.procmaps import read_maps, root_view_path
from agent.process.watcher import running_pids
from shared.counters import Counters

log = logging.getLogger(__name__)

SCAN_INTERVAL_S = 2.0  # new processes are looked at within this (their samples are not lost meanwhile)
MAX_SEEN_PIDS = 1 << 16  # bounds the set of already-scanned pids (cleared and rebuilt when full)


@dataclass(frozen=True)
class SamplerFile:
    """One attached copy of the library: what the kernel's uprobe is keyed by, and since when."""

    device: int  # st_dev and st_ino of the file as the agent opens it
    inode: int
    path: str  # as opened by the agent
    attached_ns: int


class SamplerProbes:
    """The library files with probes attached, and which processes map one of them."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.files: dict[tuple[int, int], SamplerFile] = {}
        self.process_files: dict[int, SamplerFile] = {}  # pid -> its library, for scanned pids
        self._seen_pids: set[int] = set()
        self._scanned = 0.0
        self._failed: set[tuple[int, int]] = set()

    def attach_built_library(self, bpf: Any) -> None:
        """Probe the library this agent's checkout built, if it exists (before any scan).

        Called while the program is being attached, with ``BCC_LOCK`` already held."""
        self._attach(bpf, str(library_path()), locked=True)

    def scan(self, bpf: Any, alive: Set[int] | None = None) -> None:
        """Look at processes not seen before (at most every SCAN_INTERVAL_S), of ``alive``
        (the process watcher's latest scan) or of /proc listed now."""
        now = time.monotonic()
        if now - self._scanned < SCAN_INTERVAL_S:
            return
        self._scanned = now
        if alive is None:
            try:
                alive = running_pids()
            except OSError:
                return
        pids = set(alive)
        own = os.getpid()
        for pid in list(self.process_files):
            if pid not in pids:
                del self.process_files[pid]
        self._seen_pids &= pids
        if len(self._seen_pids) >= MAX_SEEN_PIDS:
            self._seen_pids.clear()
        for pid in pids - self._seen_pids:
            self._seen_pids.add(pid)
            if pid != own:
                self._look_at(bpf, pid)

    def library_of(self, pid: int, bpf: Any) -> SamplerFile | None:
        """The attached library ``pid`` maps (scanning it now if it was not yet), else None."""
        if pid not in self._seen_pids:
            self._seen_pids.add(pid)
            self._look_at(bpf, pid)
        return self.process_files.get(pid)

    def _look_at(self, bpf: Any, pid: int) -> None:
        try:
            entries = read_maps(pid)
        except OSError:
            return  # exited, or a kernel thread
        for entry in entries:
            if entry.file_backed and is_sampler_library(entry.path):
                attached = self._attach(bpf, root_view_path(pid, entry.path))
                if attached is not None:
                    self.process_files[pid] = attached
                return

    def _attach(self, bpf: Any, path: str, locked: bool = False) -> SamplerFile | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        key = (st.st_dev, st.st_ino)
        if key in self.files:
            return self.files[key]
        if key in self._failed:
            return None
        try:
            with nullcontext() if locked else BCC_LOCK:
                bpf.attach_uprobe(name=path, sym=PROBE_ALLOC, fn_name="on_sampled_alloc", pid=-1)
                try:
                    bpf.attach_uprobe(name=path, sym=PROBE_FREE, fn_name="on_sampled_free", pid=-1)
                except Exception:
                    bpf.detach_uprobe(name=path, sym=PROBE_ALLOC, pid=-1)
                    raise
        except Exception as exc:  # not the library after all (no probe symbols), unreadable, ...
            self._failed.add(key)
            self.counters.inc("heap_sampler_attach_failed", reason=type(exc).__name__)
            log.warning("heap sampler library %s: cannot attach probes: %s", path, exc)
            return None
        attached = SamplerFile(st.st_dev, st.st_ino, path, time.time_ns())
        self.files[key] = attached
        self.counters.inc("heap_sampler_libraries_attached")
        log.info("heap: sampled mode for every process that maps %s", path)
        return attached
