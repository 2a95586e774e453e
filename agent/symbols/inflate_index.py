"""Random access into a zlib-compressed debug section, without keeping it decompressed.

Debian's debug files compress their DWARF sections (``SHF_COMPRESSED``, zlib). Decoding the
line program of one compilation unit reads a few hundred bytes of ``.debug_info`` (the CU's
header and top DIE), one abbreviation table and the CU's line program, but pyelftools
decompresses every section whole first: for libc's debug file ~8 MB and ~50 ms, each time
the file's DWARF is opened again after a quiet while (agent/symbols/dwarf_lines.py), which
made the largest first-time bursts of a steady agent.

An :class:`InflateIndex` is built in one pass over a section's zlib stream: every
``spacing`` bytes of output it saves a copy of the decompressor's state (its 32 KiB window
and its position in the input, ~40 KB). A read at any offset then resumes from the nearest
saved state at or before it and inflates at most one block. This is the technique of
zlib's own ``examples/zran.c``; Python's ``zlib`` module offers no index of its own, so it
is written here on ``decompressobj().copy()``.
"""

from __future__ import annotations

import bisect
import zlib
from dataclasses import dataclass, field
from typing import IO

from agent.symbols.section_stream import SectionStream

# Decompressed bytes between two saved states: a read inflates at most this much (~1 ms).
SPACING = 128 * 1024
# At most this many states a section (larger sections space them further apart).
MAX_CHECKPOINTS = 32
# A saved state: zlib's inflate state and its 32 KiB window, as zlib allocates them.
CHECKPOINT_BYTES = 40 * 1024
_READ_CHUNK = 64 * 1024


class InflateError(ValueError):
    """The compressed stream is corrupt or does not have the size its header gives."""


class _Inflation:
    """A zlib stream inflated on from one state: reads its input from the file as needed."""

    def __init__(self, base: IO[bytes], start: int, length: int, inflater: zlib._Decompress, consumed: int) -> None:
        self._base, self._start, self._length = base, start, length
        self.inflater = inflater
        self._consumed = consumed  # input read from the file
        self._pending = b""  # read, not yet taken by the inflater
        self.done = False

    @property
    def input_used(self) -> int:
        """Input bytes the inflater has taken: where a copy of its state resumes reading."""
        return self._consumed - len(self._pending)

    def step(self, max_out: int) -> bytes:
        """At most ``max_out`` (>= 1) more bytes of output; sets ``done`` at the stream's end."""
        if not self._pending and self._consumed < self._length:
            self._base.seek(self._start + self._consumed)
            self._pending = self._base.read(min(_READ_CHUNK, self._length - self._consumed))
            if not self._pending:
                raise InflateError(f"the file ends before the compressed stream (at {self._start + self._consumed})")
            self._consumed += len(self._pending)
        try:
            out = self.inflater.decompress(self._pending, max_out)
        except zlib.error as exc:
            raise InflateError(f"corrupt zlib stream: {exc}") from None
        self._pending = self.inflater.unconsumed_tail
        self.done = self.inflater.eof or (not out and not self._pending and self._consumed >= self._length)
        return out


@dataclass(slots=True)
class InflateIndex:
    """Saved decompressor states of one zlib stream: ``outputs[i]`` bytes of output had
    been produced from ``inputs[i]`` bytes of input when ``states[i]`` was saved."""

    size: int  # decompressed size
    length: int  # compressed size
    outputs: list[int] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    states: list[zlib._Decompress] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return CHECKPOINT_BYTES * len(self.states)

    @classmethod
    def build(cls, base: IO[bytes], start: int, length: int, size: int) -> InflateIndex:
        """Inflate the ``length`` compressed bytes at ``start`` of ``base`` once (they must
        give ``size`` bytes), saving a state every ``max(SPACING, size / MAX_CHECKPOINTS)``."""
        spacing = max(SPACING, -(-size // MAX_CHECKPOINTS))
        index = cls(size, length)
        flow = _Inflation(base, start, length, zlib.decompressobj(), 0)
        produced = next_mark = 0
        while not flow.done:
            if next_mark <= produced < size:
                index.outputs.append(produced)
                index.inputs.append(flow.input_used)
                index.states.append(flow.inflater.copy())
                next_mark = produced + spacing
            produced += len(flow.step(max(1, next_mark - produced)))
        if produced != size:
            raise InflateError(f"zlib stream gives {produced} bytes, its header says {size}")
        return index

    def resume(self, base: IO[bytes], start: int, i: int) -> _Inflation:
        """Inflation from saved state ``i`` (a copy: the saved state stays as it was)."""
        return _Inflation(base, start, self.length, self.states[i].copy(), self.inputs[i])


class _Cursor:
    """Inflation resumed from one saved state: the bytes inflated from it so far, extended
    on demand (a read inflates up to what it needs, not the whole block)."""

    def __init__(self, base: IO[bytes], start: int, index: InflateIndex, i: int) -> None:
        self.first = index.outputs[i]
        self.data = bytearray()
        self._size = index.size
        self._flow = index.resume(base, start, i)

    @property
    def end(self) -> int:
        return self.first + len(self.data)

    def extend_to(self, end: int) -> None:
        """Inflate until the data reaches ``end`` (at most the section's size)."""
        end = min(end, self._size)
        while self.end < end and not self._flow.done:
            self.data += self._flow.step(end - self.end)
        if self.end < end:
            raise InflateError(f"zlib stream ended {end - self.end} bytes early (the file changed?)")


class IndexedInflateStream(SectionStream):
    """A read-only, seekable view of a compressed section's decompressed bytes through its
    :class:`InflateIndex`. A read resumes from the last cursor if that is no further from
    it than the nearest saved state, else from that state, and inflates ``READ_AHEAD``
    bytes beyond what it asked for, for the small reads that follow (pyelftools reads a
    DIE or a header a few bytes at a time)."""

    READ_AHEAD = 16 * 1024

    def __init__(self, base: IO[bytes], start: int, index: InflateIndex) -> None:
        super().__init__(index.size)
        self._base, self._start, self._index = base, start, index
        self._cursor: _Cursor | None = None

    def _cursor_for(self, pos: int) -> _Cursor:
        index = self._index
        i = bisect.bisect_right(index.outputs, pos) - 1
        cursor = self._cursor
        if cursor is None or pos < cursor.first or cursor.end < index.outputs[i] \
                or len(cursor.data) > 4 * SPACING:  # bounded: a long sequential read starts over
            cursor = self._cursor = _Cursor(self._base, self._start, index, i)
        return cursor

    def read(self, size: int | None = -1) -> bytes:
        pos = self._pos
        end = self._size if size is None or size < 0 else min(pos + size, self._size)
        if pos >= end:
            return b""
        cursor = self._cursor_for(pos)
        if cursor.end < end:
            cursor.extend_to(max(end, pos + self.READ_AHEAD))
        data = bytes(cursor.data[pos - cursor.first : end - cursor.first])
        self._pos = pos + len(data)
        return data
