"""Kernel symbols from /proc/kallsyms, for kernel stack frames."""

from __future__ import annotations

import bisect
import logging

log = logging.getLogger("stackfleet.symbols")


class KernelSymbols:
    """Sorted kernel text symbols; ``lookup`` finds the function containing an address."""

    def __init__(self, path: str = "/proc/kallsyms") -> None:
        self.addresses: list[int] = []
        self.names: list[str] = []
        self.usable = False
        try:
            self._load(path)
        except OSError as exc:
            log.warning("cannot read %s: %s (kernel frames stay unsymbolized)", path, exc)

    def _load(self, path: str) -> None:
        rows = []
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3 or parts[1] not in "tTwW":
                    continue
                addr = int(parts[0], 16)
                if addr:
                    name = parts[2] if len(parts) == 3 else f"{parts[2]} {parts[3]}"
                    rows.append((addr, name))
        rows.sort()
        self.addresses = [a for a, _ in rows]
        self.names = [n for _, n in rows]
        # Without CAP_SYSLOG (or with kptr_restrict) every address reads as 0.
        self.usable = bool(rows)
        if not self.usable:
            log.warning("/proc/kallsyms shows no addresses (kptr_restrict?): kernel frames stay unsymbolized")

    def lookup(self, address: int) -> str:
        i = bisect.bisect_right(self.addresses, address) - 1
        return self.names[i] if i >= 0 else ""
