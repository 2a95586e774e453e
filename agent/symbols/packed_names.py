"""Many short names in one bytes blob: what symbol tables hold for the agent's whole life.

A list of 100,000 Python strings costs ~60-80 bytes of object overhead each; one blob plus
an array of offsets costs the names' bytes plus 4 bytes each, and decoding happens only for
the few names a lookup returns (those are cached further up, per address).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable


class PackedNames:
    """An immutable sequence of names; ``names[i]`` decodes one (UTF-8, bad bytes replaced)."""

    __slots__ = ("_blob", "_starts")

    def __init__(self, names: Iterable[bytes] = ()) -> None:
        blob = bytearray()
        starts = array("I")
        for name in names:
            starts.append(len(blob))
            blob += name
        starts.append(len(blob))  # the end of the last name
        self._blob = bytes(blob)
        self._starts = starts

    def __len__(self) -> int:
        return len(self._starts) - 1

    def __getitem__(self, index: int) -> str:
        if not 0 <= index < len(self._starts) - 1:
            raise IndexError(index)
        return self._blob[self._starts[index]:self._starts[index + 1]].decode("utf-8", "replace")

    def nbytes(self) -> int:
        """Memory held: the blob and the offsets (plus small fixed object overhead)."""
        return len(self._blob) + self._starts.itemsize * len(self._starts) + 200
