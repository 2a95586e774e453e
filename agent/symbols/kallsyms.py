"""Kernel symbols from /proc/kallsyms, for kernel stack frames.

A kernel has ~100,000+ text symbols. Held as Python ints and strings that is ~15 MB of
objects for the agent's whole life; held as two arrays and one blob of names it is ~3 MB,
and a lookup decodes only the one name it returns.
"""

from __future__ import annotations

import bisect
import logging
from array import array

from agent.symbols.packed_names import PackedNames

log = logging.getLogger(__name__)


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
        rows: list[tuple[int, bytes]] = []
        with open(path, "rb") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3 or parts[1] not in (b"t", b"T", b"w", b"W"):
                    continue
                addr = int(parts[0], 16)
                if parts[2] == b"_stext":
                    self.text_start = addr
                elif parts[2] == b"_etext":
                    self.text_end = addr
                if addr:
                    rows.append((addr, parts[2] if len(parts) == 3 else parts[2] + b" " + parts[3]))
        rows.sort()
        self.addresses = array("Q", (a for a, _ in rows))
        self._names = PackedNames(n for _, n in rows)
        # Without CAP_SYSLOG (or with kptr_restrict) every address reads as 0.
        self.usable = bool(rows)
        if not self.usable:
            log.warning("/proc/kallsyms shows no addresses (kptr_restrict?): kernel frames stay unsymbolized")

    def lookup(self, address: int) -> str:
        i = bisect.bisect_right(self.addresses, address) - 1
        return self._names[i] if i >= 0 else ""
