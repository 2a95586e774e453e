"""Reading ``/proc/PID/maps``, and the keys that name a file's content and a process instance.

:data:`FileKey` names a file's bytes; :class:`ProcessKey` names one process instance (pid,
start time, executable): a recycled pid gets a new start time and an exec a new executable,
so caches keyed by it never attribute one process's addresses to another's maps.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

V = TypeVar("V")

# A file seen in some process's maps (same device, inode and path) is not stat'ed again for
# this long: every new process maps the same libraries, and two syscalls per mapping of each
# short-lived process would be a visible part of the agent's CPU. Compilers, linkers and package
# managers replace a file (new inode); one rewritten in place (cp over it) is noticed by the
# stat (size, mtime) once this has passed.
FILE_STAT_TTL_S = 10.0

# A file's content identity: the same device, inode, size and mtime (ns) means the same bytes.
# Everything derived from a file's bytes (symbols, unwind tables, Go runtime facts) is keyed by it.
FileKey = tuple[int, int, int, int]


def file_key(st: os.stat_result) -> FileKey:
    """The content identity (:data:`FileKey`) of a stat'ed file."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def executable_key(pid: int, proc: str = "/proc") -> FileKey | None:
    """The :data:`FileKey` of the process's executable; None when it has none (kernel threads,
    zombies) or it cannot be stat'ed."""
    try:
        return file_key(os.stat(f"{proc}/{pid}/exe"))
    except OSError:
        return None


class ProcessKey(NamedTuple):
    """One process instance: what "this process" means to every cache that outlives a sample.

    The pid alone is reused; the start time tells a recycled pid apart; the executable tells
    a process apart from what it was before an exec (same pid, same start time), including a
    child seen between fork and exec.

    Immutable like a frozen dataclass, but a tuple: it is part of the symbolizer's per-frame
    cache key, and a tuple's hash and comparison run in C (a dict lookup by a key holding it
    measured 173 ns, against 387 ns with a frozen dataclass).
    """

    pid: int
    start_ticks: int  # clock ticks since boot (field 22 of /proc/PID/stat)
    exe: FileKey | None  # None for kernel threads (no executable)

    @classmethod
    def read(cls, pid: int, proc: str = "/proc") -> ProcessKey:
        """The key of the process running as ``pid`` now; raises OSError (or ValueError /
        IndexError for a malformed stat line) when it is gone or unreadable."""
        return cls(pid, start_time(pid, proc), executable_key(pid, proc))


@dataclass(frozen=True, slots=True)
class MapEntry:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str
    device: str = ""  # "major:minor" of the file's filesystem, with inode the file's identity

    @property
    def executable(self) -> bool:
        return "x" in self.perms

    @property
    def file_backed(self) -> bool:
        return self.inode != 0 and self.path.startswith("/")


def _parse_lines(lines: Iterable[str]) -> list[MapEntry]:
    """Parse lines of /proc/PID/maps (lines we cannot parse are skipped)."""
    entries = []
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        try:
            lo, hi = parts[0].split("-")
            entries.append(MapEntry(int(lo, 16), int(hi, 16), parts[1], int(parts[2], 16), int(parts[4]),
                                    parts[5].strip() if len(parts) > 5 else "", parts[3]))
        except ValueError:
            continue
    entries.sort(key=lambda e: e.start)
    return entries


# Parsed executable mappings by the exact text of a maps file's executable lines. Forked
# children that have not exec'd (workers, shells' subshells, short jobs of a busy parent) map
# the same code at the same addresses as their parent, and the symbolizer, the unwinder and
# the CPython probe each read every new process's maps: the parse is done once per distinct
# set of code mappings. Bounded; dict get/set are atomic, and those three run on different
# threads.
_PARSED: dict[tuple[str, ...], list[MapEntry]] = {}
_MAX_PARSED = 128


def _executable_lines(text: str) -> tuple[str, ...]:
    """The lines whose permissions (the second field, e.g. ``r-xp``) include x: three in four
    lines of a typical process (data, heap, stacks, read-only segments) are not parsed."""
    out = []
    for line in text.splitlines():
        space = line.find(" ")
        if space > 0 and line[space + 3 : space + 4] == "x":
            out.append(line)
    return tuple(out)


def read_maps(pid: int) -> list[MapEntry]:
    """Executable mappings of a live process; raises OSError when it is gone or unreadable.

    The list may be shared with other callers and processes: do not modify it."""
    with open(f"/proc/{pid}/maps") as f:
        lines = _executable_lines(f.read())
    entries = _PARSED.get(lines)
    if entries is None:
        entries = _parse_lines(lines)
        if len(_PARSED) >= _MAX_PARSED:
            _PARSED.clear()
        _PARSED[lines] = entries
    return entries


def map_files_path(pid: int, entry: MapEntry) -> str:
    """The mapped file through /proc/PID/map_files: works for files inside containers and for
    deleted-but-mapped files (needs more privilege than the root view)."""
    return f"/proc/{pid}/map_files/{entry.start:x}-{entry.end:x}"


def root_view_path(pid: int, path: str) -> str:
    """``path`` as the process sees it (its mount namespace), through /proc/PID/root."""
    return f"/proc/{pid}/root{path}"


class RecentFileStats(Generic[V]):
    """What stat'ing a mapped file told us, per (device, inode, path) of its maps line, for
    FILE_STAT_TTL_S; the symbolizer and the unwinder each keep one. Bounded LRU; lines
    without a device (vDSO, anonymous) are never kept."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[tuple[str, int, str], tuple[V, float]] = OrderedDict()

    def get(self, entry: MapEntry) -> V | None:
        key = (entry.device, entry.inode, entry.path)
        hit = self._seen.get(key) if entry.device else None
        if hit is None or time.monotonic() - hit[1] >= FILE_STAT_TTL_S:
            return None
        self._seen.move_to_end(key)
        return hit[0]

    def put(self, entry: MapEntry, value: V) -> None:
        if not entry.device:
            return
        key = (entry.device, entry.inode, entry.path)
        self._seen[key] = (value, time.monotonic())
        self._seen.move_to_end(key)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def __len__(self) -> int:
        return len(self._seen)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Processes younger than this may still exec or map libraries (fork, exec and ld.so come
# first): caches about them are re-checked sooner.
YOUNG_PROCESS_S = 10.0


# One read takes a whole small file (a stat line is ~300 bytes); larger ones are read on.
_PROC_READ_BYTES = 65536


def read_proc_file(path: str) -> bytes:
    """The bytes of a /proc file (stat, comm, loadavg: small ones); raises OSError.

    Written by hand: Python's buffered ``open`` costs nine system calls per file here (fstat
    twice, a terminal check, two seeks) against four (open, read, the empty read that ends
    the file, close), and these files are read for every process at every scan and flush:
    20 against 10 µs a file measured. Reads go on until the empty one: a /proc file may hand
    out less than asked before its end (whole lines of a maps file)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return b"".join(iter(lambda: os.read(fd, _PROC_READ_BYTES), b""))
    finally:
        os.close(fd)


def start_time(pid: int, proc: str = "/proc") -> int:
    """Process start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    data = read_proc_file(f"{proc}/{pid}/stat")
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = data[data.rindex(b")") + 2 :].split()
    return int(rest[19])


def stat_identity(pid: int, proc: str = "/proc") -> tuple[int, str]:
    """(start time in clock ticks since boot, comm) of ``pid`` from one read of /proc/PID/stat:
    a name with what tells a recycled pid apart, without reading the process's maps."""
    data = read_proc_file(f"{proc}/{pid}/stat")
    close = data.rindex(b")")
    comm = data[data.index(b"(") + 1 : close].decode(errors="replace").strip()  # as read_comm
    return int(data[close + 2 :].split()[19]), comm


def age_s(start_ticks: int) -> float:
    """Seconds since a process with this start time (from :func:`start_time`) started."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / CLOCK_TICKS


def read_comm(pid: int) -> str:
    return read_proc_file(f"/proc/{pid}/comm").decode(errors="replace").strip()
