"""Converting BPF timestamps (CLOCK_MONOTONIC, from bpf_ktime_get_ns) to Unix time."""

from __future__ import annotations

import time


class MonotonicToUnix:
    """Offset between CLOCK_REALTIME and CLOCK_MONOTONIC, refreshed on demand.

    The offset drifts only when the wall clock is stepped (NTP), so refreshing it once per
    flush interval keeps timestamps right without a syscall per sample.
    """

    def __init__(self) -> None:
        self.offset_ns = 0
        self.refresh()

    def refresh(self) -> None:
        self.offset_ns = time.time_ns() - time.monotonic_ns()

    def to_unix_ns(self, mono_ns: int) -> int:
        return mono_ns + self.offset_ns
