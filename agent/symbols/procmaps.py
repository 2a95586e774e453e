"""Reading ``/proc/PID/maps`` and a process's identity.

Identity is (pid, start time in clock ticks): a recycled PID gets a new start time, so
caches keyed by identity never attribute one process's addresses to another's maps.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass


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


def parse_maps(text: str, executable_only: bool = False) -> list[MapEntry]:
    """Parse the text of /proc/PID/maps (lines we cannot parse are skipped).

    ``executable_only`` skips other mappings before parsing them: three in four lines of a
    typical process (data, heap, stacks, read-only segments), and every new process on the
    host has its maps read by the symbolizer, the unwinder and the CPython probe."""
    entries = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5 or (executable_only and "x" not in parts[1]):
            continue
        try:
            lo, hi = parts[0].split("-")
            entries.append(MapEntry(int(lo, 16), int(hi, 16), parts[1], int(parts[2], 16), int(parts[4]),
                                    parts[5].strip() if len(parts) > 5 else "", parts[3]))
        except ValueError:
            continue
    entries.sort(key=lambda e: e.start)
    return entries


def read_maps(pid: int) -> list[MapEntry]:
    """Executable mappings of a live process; raises OSError when it is gone or unreadable."""
    with open(f"/proc/{pid}/maps") as f:
        return parse_maps(f.read(), executable_only=True)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Processes younger than this may still exec or map libraries (fork, exec and ld.so come
# first): caches about them are re-checked sooner.
YOUNG_PROCESS_S = 10.0


def start_time(pid: int, proc: str = "/proc") -> int:
    """Process start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    with open(f"{proc}/{pid}/stat", "rb") as f:
        data = f.read()
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = data[data.rindex(b")") + 2 :].split()
    return int(rest[19])


def age_s(start_ticks: int) -> float:
    """Seconds since a process with this start time (from :func:`start_time`) started."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / _CLOCK_TICKS


def read_comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()
