"""Measurement helpers for the benchmark suite: process CPU, BPF program CPU, NATS bytes.

Everything here reads counters the kernel or the NATS server keeps (CPU time, BPF
run_time_ns, /connz bytes) rather than timing with wall clocks, because this machine is
noisy: counters of work done are stable where durations are not.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all threads included (whole clock ticks)."""
    own_ticks, _reaped = parse_cpu_ticks(Path(f"/proc/{pid}/stat").read_text(errors="surrogateescape"))
    return own_ticks / CLOCK_TICKS


def process_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# enum bpf_prog_type in include/uapi/linux/bpf.h: the types our tools and bcc's load.
BPF_PROG_TYPE_NAMES = {2: "kprobe", 5: "tracepoint", 7: "perf_event", 17: "raw_tracepoint", 26: "tracing"}
BPF_PROG_TYPE_PERF_EVENT = 7


@dataclass(frozen=True)
class BpfProgStats:
    """One loaded BPF program's identity and its kernel-kept run statistics.

    ``run_time_ns`` and ``run_cnt`` grow only while ``kernel.bpf_stats_enabled`` is 1. A
    program reached by a tail call is not counted on its own: its runs and time are inside
    the program that called it, so summing every program of a process counts each run once.
    """

    prog_id: int
    prog_type: int
    run_time_ns: int
    run_cnt: int

    @property
    def type_name(self) -> str:
        return BPF_PROG_TYPE_NAMES.get(self.prog_type, str(self.prog_type))


def parse_bpf_prog_fdinfo(text: str) -> BpfProgStats | None:
    """The program statistics in a ``/proc/PID/fdinfo/FD`` text, or None for any other fd.

    The kernel writes one ``key:<tab>value`` line per field; a BPF program's fdinfo has
    ``prog_type``, ``prog_id``, ``run_time_ns`` and ``run_cnt`` (bpf_prog_show_fdinfo).
    A program fd without them (an older kernel without bpf_stats) is reported as None too.
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    try:
        return BpfProgStats(prog_id=int(fields["prog_id"]), prog_type=int(fields["prog_type"]),
                            run_time_ns=int(fields["run_time_ns"]), run_cnt=int(fields["run_cnt"]))
    except (KeyError, ValueError):
        return None


def bpf_programs(pids: Iterable[int]) -> dict[int, BpfProgStats]:
    """The BPF programs whose fds any of ``pids`` holds, by program id (one entry per program,
    however many fds and processes hold it). Unreadable processes and fds are skipped: a
    process can exit, or close an fd, between listing and reading."""
    programs: dict[int, BpfProgStats] = {}
    for pid in pids:
        try:
            infos = list(Path(f"/proc/{pid}/fdinfo").iterdir())
        except OSError:
            continue
        for info in infos:
            try:
                text = info.read_text()
            except OSError:
                continue
            prog = parse_bpf_prog_fdinfo(text)
            if prog is not None:
                programs[prog.prog_id] = prog
    return programs


def bpf_runtime_ns(pid: int) -> int:
    """Total time the kernel spent running BPF programs whose fds ``pid`` holds.

    Needs ``kernel.bpf_stats_enabled=1`` (see :func:`enable_bpf_stats`); the kernel then
    reports ``run_time_ns`` in each program fd's fdinfo.
    """
    return sum(p.run_time_ns for p in bpf_programs([pid]).values())


def parse_ppid(stat_text: str) -> int:
    """The parent pid from a ``/proc/PID/stat`` line (the comm field may hold spaces and ')')."""
    return int(stat_text.rsplit(")", 1)[1].split()[1])


def process_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant (by each process's parent pid in /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            children.setdefault(parse_ppid((entry / "stat").read_text()), []).append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, ()))
    return tree


def parse_cpu_ticks(stat_text: str) -> tuple[int, int]:
    """(utime + stime, cutime + cstime) in clock ticks from a ``/proc/PID/stat`` line: the
    process's own CPU and that of the children it has waited for."""
    fields = stat_text.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def process_cpu_clock_s(pid: int) -> float:
    """CPU seconds of ``pid`` (every thread, exited ones included) from its CPU-time clock,
    in nanoseconds: the runtime the scheduler accounted, where /proc's stat gives whole clock
    ticks (10 ms: ~7 % of what a quiet agent spends in a 90 s window at 99 Hz). Raises
    OSError when the process is gone."""
    # The clock id of another process's CPU time, as glibc's clock_getcpuclockid builds it:
    # (~pid << 3) | CPUCLOCK_SCHED (include/linux/posix-timers.h).
    return time.clock_gettime((~pid << 3) | 2)


def process_tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid``, its live descendants and the children they
    reaped: each live process's CPU-time clock (ns), plus the whole clock ticks of the
    children they waited for (only /proc's stat has those)."""
    total = 0.0
    for p in process_tree(pid):
        try:
            own_ticks, reaped_ticks = parse_cpu_ticks(Path(f"/proc/{p}/stat").read_text())
            try:
                own_s = process_cpu_clock_s(p)
            except OSError:
                own_s = own_ticks / CLOCK_TICKS
            total += own_s + reaped_ticks / CLOCK_TICKS
        except (OSError, ValueError, IndexError):
            continue
    return total


def process_tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its live descendants."""
    total = 0
    for p in process_tree(pid):
        try:
            total += process_rss_bytes(p)
        except OSError:
            continue
    return total


def proc_stat_counter(proc_stat_text: str, name: str) -> int:
    """The value of the one-number line ``name`` of ``/proc/stat`` (``ctxt``, ``processes``)."""
    for line in proc_stat_text.splitlines():
        if line.startswith(name + " "):
            return int(line.split()[1])
    raise ValueError(f"no {name} line in /proc/stat")


def parse_context_switches(proc_stat_text: str) -> int:
    """The host's context switches since boot: the ``ctxt`` line of ``/proc/stat``."""
    return proc_stat_counter(proc_stat_text, "ctxt")


def host_context_switches() -> int:
    return parse_context_switches(Path("/proc/stat").read_text())


def parse_processes_started(proc_stat_text: str) -> int:
    """Processes and threads the host has created since boot: the ``processes`` line of
    ``/proc/stat`` (forks and clones alike)."""
    return proc_stat_counter(proc_stat_text, "processes")


def host_processes_started() -> int:
    """Processes and threads created on this host since boot."""
    return parse_processes_started(Path("/proc/stat").read_text())


BPF_STATS_ENABLED = Path("/proc/sys/kernel/bpf_stats_enabled")


def set_bpf_stats(on: bool) -> None:
    """Turn the kernel's per-program run time and run count on or off (root only)."""
    BPF_STATS_ENABLED.write_text("1" if on else "0")


def enable_bpf_stats() -> bool:
    try:
        set_bpf_stats(True)
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
