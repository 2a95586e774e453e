"""Kernel symbols from /proc/kallsyms, for kernel stack frames.

A kernel has ~100,000+ text symbols. Held as Python ints and strings that is ~15 MB of
objects for the agent's whole life; held as two arrays and one blob of names it is ~3 MB,
and a lookup decodes only the one name it returns.

It is built the same way: lines go straight into the arrays and the blob, and the few
stretches out of address order (kallsyms is nearly sorted) are merged lazily, so no list of
a row per symbol exists even while loading. Such a list (~120,000 tuples, ~20 MB of small
objects made at once) left ~20 of Python's 1 MiB allocator arenas resident after it was
freed, pinned by the few objects other threads made meanwhile (measured with a thread
making objects beside the load: 8 -> 29 arenas for the same live data).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import logging
from array import array
from collections.abc import Iterator

from agent.symbols.packed_names import PackedNames

log = logging.getLogger(__name__)

_TEXT_TYPES = (b"t", b"T", b"w", b"W")
# More ascending stretches than this (not what a kernel writes) are sorted as a list instead.
MAX_MERGED_RUNS = 64


class KernelSymbols:
    """Sorted kernel text symbols; ``lookup`` finds the function containing an address."""

    def __init__(self, path: str = "/proc/kallsyms") -> None:
        self.addresses: array[int] = array("Q")
        self._names = PackedNames()
        self.usable = False
        # The kernel image's text, [_stext, _etext), 0 when unknown: kernel frames are given
        # as offsets into it (the same for every boot of a build, whatever KASLR chose).
        self.text_start = 0
        self.text_end = 0
        try:
            self._load(path)
        except OSError as exc:
            log.warning("cannot read %s: %s (kernel frames stay unsymbolized)", path, exc)

    def __len__(self) -> int:
        return len(self.addresses)

    def _load(self, path: str) -> None:
        addresses, starts, blob = array("Q"), array("I"), bytearray()
        runs = [0]  # where each stretch in (address, name) order starts
        previous = (0, b"")
        with open(path, "rb") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3 or parts[1] not in _TEXT_TYPES:
                    continue
                addr = int(parts[0], 16)
                if parts[2] == b"_stext":
                    self.text_start = addr
                elif parts[2] == b"_etext":
                    self.text_end = addr
                if addr:
                    name = parts[2] if len(parts) == 3 else parts[2] + b" " + parts[3]
                    if (addr, name) < previous:
                        runs.append(len(addresses))
                    previous = (addr, name)
                    addresses.append(addr)
                    starts.append(len(blob))
                    blob += name
        starts.append(len(blob))
        if len(runs) == 1:
            self.addresses, self._names = addresses, PackedNames(
                bytes(blob[starts[i] : starts[i + 1]]) for i in range(len(addresses)))
        else:
            self.addresses, self._names = _sorted(addresses, starts, blob, runs)
        # Without CAP_SYSLOG (or with kptr_restrict) every address reads as 0.
        self.usable = bool(addresses)
        if not self.usable:
            log.warning("/proc/kallsyms shows no addresses (kptr_restrict?): kernel frames stay unsymbolized")

    def lookup(self, address: int) -> str:
        i = bisect.bisect_right(self.addresses, address) - 1
        return self._names[i] if i >= 0 else ""


def _sorted(addresses: array[int], starts: array[int], blob: bytearray,
            runs: list[int]) -> tuple[array[int], PackedNames]:
    """The symbols in (address, name) order: the ascending stretches merged one row at a
    time (each row's objects freed before the next is made), or, for input far from sorted,
    one sort of a list."""
    bounds = [*runs, len(addresses)]

    def rows(lo: int, hi: int) -> Iterator[tuple[int, bytes]]:
        for i in range(lo, hi):
            yield addresses[i], bytes(blob[starts[i] : starts[i + 1]])

    if len(runs) <= MAX_MERGED_RUNS:
        ordered: Iterator[tuple[int, bytes]] = heapq.merge(*(rows(lo, hi) for lo, hi in itertools.pairwise(bounds)))
    else:
        ordered = iter(sorted(rows(0, len(addresses))))
    out = array("Q")

    def names() -> Iterator[bytes]:
        for addr, name in ordered:
            out.append(addr)
            yield name

    packed = PackedNames(names())
    return out, packed
