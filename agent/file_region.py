"""Random access to a large region of a file, read on demand instead of copied into memory.

A Go binary's pclntab is megabytes (5.8 MB for nats-server; tens of MB for kubelet-sized
binaries), and symbolizing touches a few hundred bytes of it per function: holding a copy
per binary cost the agent that many resident megabytes. ``FileRegion`` reads the bytes it
is asked for with ``pread`` (no shared file position, so threads may share a region),
through a small cache of fixed-size blocks that is emptied when full. ``BytesRegion`` offers
the same reads over bytes already in memory (an in-memory image, such as the vDSO's).

Not ``mmap``: a file rewritten in place (truncated) under a mapping makes the next access
to a page past its new end a SIGBUS, which kills the process; ``pread`` returns a short read
instead, reported here as ``RegionChanged`` (an OSError, as for any failed read). No library
offers a block-cached ``pread`` view with these reads (``struct`` needs a buffer, and the
NUL search spans blocks), so it is written here.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol

BLOCK_BYTES = 4096
# Blocks kept per region (~256 KB): a pc-value table walk and its names stay within a few.
CACHED_BLOCKS = 64
# Bytes read per step when looking for the NUL that ends a string.
_CSTRING_STEP = 128


class RegionChanged(OSError):
    """The file is shorter than the region it was opened with (rewritten in place)."""


class Region(Protocol):
    """Reads of a read-only byte region by offset from its start."""

    def __len__(self) -> int: ...

    def read(self, pos: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``pos`` (fewer only at the region's end)."""
        ...

    def cstring(self, pos: int) -> bytes:
        """The bytes from ``pos`` up to the next NUL (ValueError when there is none)."""
        ...

    def resident_bytes(self) -> int:
        """Bytes of the region this object holds in memory."""
        ...


class BytesRegion:
    """``Region`` over bytes in memory."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def __len__(self) -> int:
        return len(self._data)

    def read(self, pos: int, size: int) -> bytes:
        return self._data[pos:pos + size]

    def cstring(self, pos: int) -> bytes:
        return self._data[pos:self._data.index(b"\0", pos)]

    def resident_bytes(self) -> int:
        return len(self._data)


class FileRegion:
    """``Region`` over ``size`` bytes of a file from ``offset``, with its own descriptor
    (opened from ``fd`` through /proc/self/fd, so it outlives the caller's file object and
    still reads a file deleted or replaced since; closed with the region)."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        self._fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        weakref.finalize(self, os.close, self._fd)
        self._offset, self._size = offset, size
        self._blocks: dict[int, bytes] = {}

    def __len__(self) -> int:
        return self._size

    def resident_bytes(self) -> int:
        return BLOCK_BYTES * len(self._blocks)

    def _block(self, index: int) -> bytes:
        block = self._blocks.get(index)
        if block is None:
            start = index * BLOCK_BYTES
            want = min(BLOCK_BYTES, self._size - start)
            block = os.pread(self._fd, want, self._offset + start)
            if len(block) != want:
                raise RegionChanged(f"file shorter than expected at offset {self._offset + start}")
            if len(self._blocks) >= CACHED_BLOCKS:
                self._blocks.clear()  # a dict's get and set are atomic; an LRU's reordering is not
            self._blocks[index] = block
        return block

    def read(self, pos: int, size: int) -> bytes:
        if pos < 0 or size < 0:
            raise ValueError(f"negative read ({pos}, {size})")
        end = min(pos + size, self._size)
        if pos >= end:
            return b""
        first, last = pos // BLOCK_BYTES, (end - 1) // BLOCK_BYTES
        skip = pos - first * BLOCK_BYTES
        if first == last:
            return self._block(first)[skip:skip + end - pos]
        joined = b"".join(self._block(i) for i in range(first, last + 1))
        return joined[skip:skip + end - pos]

    def cstring(self, pos: int) -> bytes:
        parts: list[bytes] = []
        while True:
            piece = self.read(pos, _CSTRING_STEP)
            if not piece:
                raise ValueError("string runs past the region's end")
            nul = piece.find(b"\0")
            if nul >= 0:
                parts.append(piece[:nul])
                return b"".join(parts)
            parts.append(piece)
            pos += len(piece)
