"""What the machine was when a benchmark ran: its CPU, kernel, the CPU-bug mitigations that
tax kernel code, and one measured kernel round trip.

BPF programs and bcc's ``profile`` run as kernel code, so their cost per run moves with the
machine under them: on this VM, from one day to the next, bcc's ``profile`` read 1.0 - 1.1
us a sample at 999 Hz, then 1.4 - 1.9 (docs/design/overhead.md, "Figures of the twelfth
round"). Mitigations such as AMD's Safe RET (``spec_rstack_overflow``) make every kernel
return dearer; a syscall's round trip shows it. Each mode's JSON records this, so figures of
different days can be compared knowing whether the kernel ran at the same speed.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

VULNERABILITIES = Path("/sys/devices/system/cpu/vulnerabilities")
# The mitigations that change the cost of kernel entry, return and indirect calls.
KERNEL_PATH_MITIGATIONS = ("spec_rstack_overflow", "retbleed", "spectre_v2", "meltdown")


def cpu_identity(cpuinfo: str) -> dict[str, str]:
    """The first CPU's model name, family, model and stepping from /proc/cpuinfo's text."""
    wanted = {"model name": "model_name", "cpu family": "family", "model": "model", "stepping": "stepping"}
    found: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if found:
                break  # the first processor's block is enough
            continue
        key, _, value = line.partition(":")
        name = wanted.get(key.strip())
        if name and name not in found:
            found[name] = value.strip()
    return found


def mitigations(root: Path = VULNERABILITIES) -> dict[str, str]:
    """The kernel's report on each of KERNEL_PATH_MITIGATIONS it knows."""
    out = {}
    for name in KERNEL_PATH_MITIGATIONS:
        try:
            out[name] = (root / name).read_text().strip()
        except OSError:
            continue
    return out


def syscall_round_trip_ns(calls: int = 100_000, rounds: int = 5) -> float:
    """ns per ``getppid()`` from Python, the best of ``rounds`` (a syscall every call: glibc
    does not cache it), less the same loop's cost around ``int()``, a C builtin that makes no
    syscall (a Python no-op costs more to call and would make the figure read low)."""

    def best(fn: Any) -> float:
        fastest = float("inf")
        for _ in range(rounds):
            start = time.perf_counter_ns()
            for _ in range(calls):
                fn()
            fastest = min(fastest, (time.perf_counter_ns() - start) / calls)
        return fastest

    return max(0.0, best(os.getppid) - best(int))


def describe() -> dict[str, Any]:
    """The machine facts a benchmark's JSON carries."""
    try:
        cpu = cpu_identity(Path("/proc/cpuinfo").read_text())
    except OSError:
        cpu = {}
    return {"cpu": cpu, "cpus": os.cpu_count(), "kernel": platform.release(), "mitigations": mitigations(),
            "syscall_round_trip_ns": round(syscall_round_trip_ns(), 1)}
