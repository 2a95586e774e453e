"""The seek and tell bookkeeping of a read-only stream over one section's bytes.

pyelftools reads a debug section only through ``seek``, ``tell`` and ``read``. The agent
hands it views of a section instead of copies: a window onto the file for a section stored
plainly (agent/symbols/section_views.py) and an indexed inflation for a compressed one
(agent/symbols/inflate_index.py). Both are this stream with their own ``read``.
"""

from __future__ import annotations

import io
import os


class SectionStream(io.RawIOBase):
    """A read-only, seekable stream of ``size`` bytes; subclasses implement ``read``."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self._size, self._pos = size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)
