"""Random access to a large region of a file, read on demand instead of copied into memory.

A Go binary's pclntab is megabytes (5.8 MB for nats-server; tens of MB for kubelet-sized
binaries), and symbolizing touches a few hundred bytes of it per function: holding a copy
per binary cost the agent that many resident megabytes. ``FileRegion`` reads the bytes it
is asked for with ``pread`` (no shared file position, so threads may share a region),
through a small cache of fixed-size blocks that is emptied when full. ``BytesRegion`` offers
the same reads over bytes already in memory (an in-memory image, such as the vDSO's).

The file is the one opened, whatever happens to its path since (``OpenedFile``: a duplicate
descriptor, shared by the regions of one file). Its content is trusted only while its size
and modification time are those seen at the opening, checked at every block read from the
file: a file rewritten in place (a reinstall over a binary whose processes have gone) gives
``RegionChanged`` (an OSError, as for any failed read) from then on, never the new
content's bytes read as the old layout's. Blocks cached before the change are the old
content, consistent with what was loaded at the opening.

Not ``mmap``: a file truncated under a mapping makes the next access to a page past its new
end a SIGBUS, which kills the process. No library offers a block-cached ``pread`` view with
these reads (``struct`` needs a buffer, and the NUL search spans blocks), so it is written
here.
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
    """The file is no longer what it was when opened (rewritten in place, cut short)."""


class OpenedFile:
    """A file as opened: a duplicate of the caller's descriptor (closed with this object)
    and the size and modification time it had then."""

    def __init__(self, fd: int) -> None:
        self.fd = os.dup(fd)  # not inheritable; pread ignores the offset it shares
        weakref.finalize(self, os.close, self.fd)
        st = os.fstat(self.fd)
        self._identity = (st.st_size, st.st_mtime_ns)
        self.changed = False

    def pread(self, size: int, offset: int) -> bytes:
        """``size`` bytes at ``offset``; RegionChanged when the file changed since it was
        opened (also for every read after that) or is too short for them."""
        if not self.changed:
            st = os.fstat(self.fd)
            self.changed = (st.st_size, st.st_mtime_ns) != self._identity
        if self.changed:
            raise RegionChanged("the file changed since it was opened")
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            self.changed = True
            raise RegionChanged(f"file shorter than expected at offset {offset}")
        return data


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
        """Up to ``size`` bytes from ``pos``; ValueError for a negative one (a corrupt
        offset), which slicing would take from the end."""
        if pos < 0 or size < 0:
            raise ValueError(f"negative read ({pos}, {size})")
        return self._data[pos:pos + size]

    def cstring(self, pos: int) -> bytes:
        """The bytes from ``pos`` up to the next NUL (ValueError when there is none)."""
        if pos < 0:
            raise ValueError(f"negative offset {pos}")
        return self._data[pos:self._data.index(b"\0", pos)]

    def resident_bytes(self) -> int:
        return len(self._data)


class FileRegion:
    """``Region`` over ``size`` bytes of an opened file from ``offset`` (it outlives the
    caller's file object, and still reads a file deleted or replaced by rename since)."""

    def __init__(self, file: OpenedFile, offset: int, size: int) -> None:
        self._file = file
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
            block = self._file.pread(min(BLOCK_BYTES, self._size - start), self._offset + start)
            if len(self._blocks) >= CACHED_BLOCKS:
                self._blocks.clear()  # a dict's get and set are atomic; an LRU's reordering is not
            self._blocks[index] = block
        return block

    def read(self, pos: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``pos`` (fewer only at the region's end)."""
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
        """The bytes from ``pos`` up to the next NUL (ValueError when there is none)."""
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
