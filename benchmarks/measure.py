"""Measurement helpers for the benchmark suite: process CPU, BPF program CPU, NATS bytes.

Everything here reads counters the kernel or the NATS server keeps (CPU ticks, BPF
run_time_ns, /connz bytes) rather than timing with wall clocks, because this machine is
noisy: counters of work done are stable where durations are not.
"""

from __future__ import annotations

import json
import os
import statistics
import urllib.request
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all threads included."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def bpf_runtime_ns(pid: int) -> int:
    """Total time the kernel spent running BPF programs whose fds ``pid`` holds.

    Needs ``kernel.bpf_stats_enabled=1`` (see :func:`enable_bpf_stats`); the kernel then
    reports ``run_time_ns`` in each program fd's fdinfo.
    """
    total = 0
    fd_dir = Path(f"/proc/{pid}/fdinfo")
    for info in fd_dir.iterdir():
        try:
            text = info.read_text()
        except OSError:
            continue
        if "prog_type" not in text:
            continue
        for line in text.splitlines():
            if line.startswith("run_time_ns:"):
                total += int(line.split()[1])
    return total


def enable_bpf_stats() -> bool:
    try:
        Path("/proc/sys/kernel/bpf_stats_enabled").write_text("1")
        return True
    except OSError:
        return False


def connz(monitor_url: str) -> list[dict[str, object]]:
    with urllib.request.urlopen(f"{monitor_url}/connz?limit=1000", timeout=5) as resp:
        data = json.load(resp)
    return list(data.get("connections", []))


def connection_in_bytes(monitor_url: str, name_prefix: str) -> int:
    """Bytes the NATS server received from connections whose name starts with ``name_prefix``."""
    return sum(int(c.get("in_bytes", 0)) for c in connz(monitor_url)  # type: ignore[call-overload]
               if str(c.get("name", "")).startswith(name_prefix))


@dataclass
class Stat:
    """Median and spread of repeated measurements."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def spread(self) -> float:
        return (max(self.values) - min(self.values)) / 2 if len(self.values) > 1 else 0.0

    def __str__(self) -> str:
        return f"{self.median:.3g} ±{self.spread:.2g}"
