"""What symbolizing a process needs, read when its first record reaches the agent.

The symbolizer reads a process's key (ProcessKey), maps and mapped files lazily, when a record of it
is symbolized. Symbolizing runs behind the kernel (a batch with first-time work, a new
library's symbol table, a loaded host: seconds), so a short process could exit before its
first record was symbolized: its key read then fails as "gone" and every frame of it
comes out unnamed. :class:`ProcessCaptures` closes that gap: the thread that receives records
calls :meth:`ProcessCaptures.note` with each record's pid; the first time (and again after an
exec: the executable's inode changed) it reads the process key, the executable maps, each mapped
file's content key, and opens the main executable (an open file stays readable after the
process exits; libraries are usually in the symbolizer's cache by their key already, from this
or another process). The symbolizer turns to a capture only for a process that is already gone
when it first looks at it.

Cost: a set of the pids of each batch (on the poll thread); a stat of /proc/PID/exe per pid at most every
``RECHECK_S`` (and a maps read while the process is young); a stat per mapped file and one
open per new process or changed maps. Bounded:
``capacity`` processes (the oldest are dropped and their executable closed), so at most that
many open files.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import IO

from agent.process.procmaps import (
    YOUNG_PROCESS_S,
    FileKey,
    MapEntry,
    ProcessKey,
    age_s,
    executable_key,
    file_key,
    map_files_path,
    read_comm,
    read_maps,
)

RECHECK_S = 0.5

log = logging.getLogger(__name__)


@dataclass
class CapturedProcess:
    """A process as read while it was alive: its key, executable maps and open mapped files."""

    key: ProcessKey
    comm: str
    entries: list[MapEntry]
    # Per file-backed mapping (start, end): the file's content key.
    keys: dict[tuple[int, int], FileKey] = field(default_factory=dict)
    # The main executable, open (still readable after the process has exited), and its key.
    executable: IO[bytes] | None = None
    executable_key: FileKey | None = None
    checked: float = 0.0

    def close(self) -> None:
        if self.executable is not None:
            self.executable.close()


def capture(pid: int) -> CapturedProcess | None:
    """Read ``pid`` now; None if it is gone or unreadable."""
    try:
        key = ProcessKey.read(pid)
        entries = read_maps(pid)
        comm = read_comm(pid)
    except (OSError, ValueError, IndexError):
        return None
    captured = CapturedProcess(key, comm, entries, checked=time.monotonic())
    for entry in entries:
        if not entry.file_backed:
            continue
        try:
            if key.exe is not None and entry.inode == key.exe[1] and captured.executable is None:
                captured.executable = open(map_files_path(pid, entry), "rb")  # noqa: SIM115 - kept for the symbolizer
                mapped = captured.executable_key = file_key(os.fstat(captured.executable.fileno()))
            else:
                mapped = file_key(os.stat(map_files_path(pid, entry)))
        except OSError:
            continue  # the symbolizer tries the process's root view itself while it lives
        captured.keys[(entry.start, entry.end)] = mapped
    return captured


class ProcessCaptures:
    """Captures of the processes records arrived for (thread-safe; see the module docstring)."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._processes: OrderedDict[int, CapturedProcess] = OrderedDict()
        self._tried: dict[int, float] = {}  # pid -> when it was last captured or tried
        self._lock = threading.Lock()

    def note(self, pid: int) -> None:
        """A record of ``pid`` arrived: capture it if new; again, at most every RECHECK_S, if
        the last try failed, if it exec'd since, or while it is young (still mapping its
        libraries: a capture taken at exec holds little more than the executable and ld.so)."""
        last = self._tried.get(pid)
        now = time.monotonic()
        if last is not None:
            if now - last < RECHECK_S:
                return
            known = self._processes.get(pid)
            if known is not None:
                try:
                    # Same executable and, for a young process, the same executable maps (the
                    # parsed maps are shared while the text is unchanged): nothing new to read.
                    if executable_key(pid) == known.key.exe and (
                            age_s(known.key.start_ticks) >= YOUNG_PROCESS_S or read_maps(pid) == known.entries):
                        self._tried[pid] = now
                        return
                except OSError:
                    return  # gone: keep what was read while it lived
        self._tried[pid] = now
        captured = capture(pid)
        if captured is not None:
            self._store(pid, captured)
        elif last is None and len(self._tried) > 4 * self.capacity:
            self._tried.clear()  # pids that were gone when first seen: forget them in bulk

    def get(self, pid: int) -> CapturedProcess | None:
        with self._lock:
            return self._processes.get(pid)

    def _store(self, pid: int, captured: CapturedProcess) -> None:
        evicted = []
        with self._lock:
            old = self._processes.pop(pid, None)
            if old is not None:
                evicted.append(old)
            self._processes[pid] = captured
            while len(self._processes) > self.capacity:
                oldest_pid, oldest = self._processes.popitem(last=False)
                self._tried.pop(oldest_pid, None)
                evicted.append(oldest)
        for gone in evicted:
            gone.close()

    def close(self) -> None:
        with self._lock:
            processes, self._processes = self._processes, OrderedDict()
        for captured in processes.values():
            captured.close()
