"""Reading another process's memory: ``pread`` on ``/proc/PID/mem``, one open file per process.

The Go readers (goroutine stacks, runtime profiles) and the CPython code-object reader all read
a live process's memory this way. Every failure, including a read cut short at the end of a
mapping, is an :class:`UnreadableMemory` (an ``OSError``), so callers count and drop it.
"""

from __future__ import annotations

import os
import struct

_WORD = struct.Struct("<Q")


class UnreadableMemory(OSError):
    """A read of another process's memory failed or came back short."""


class ProcessMemory:
    """One process's memory, opened once and read with ``pread`` (no seek, thread-safe)."""

    def __init__(self, pid: int, mem_path: str | None = None) -> None:
        """``mem_path`` replaces /proc/PID/mem (tests read a memory image from a file)."""
        self.pid = pid
        self.fd = os.open(mem_path or f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)

    def read(self, address: int, size: int) -> bytes:
        """Exactly ``size`` bytes at ``address``."""
        try:
            data = os.pread(self.fd, size, address)
        except (OSError, OverflowError) as exc:  # OverflowError: an address past 2**63 (a torn pointer)
            raise UnreadableMemory(f"unreadable {size} bytes at {address:#x}: {exc}") from exc
        if len(data) != size:
            raise UnreadableMemory(f"short read at {address:#x}")
        return data

    def word(self, address: int) -> int:
        """The unsigned 64-bit little-endian word at ``address``."""
        return int(_WORD.unpack(self.read(address, 8))[0])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def closed(self) -> bool:
        return self.fd < 0
