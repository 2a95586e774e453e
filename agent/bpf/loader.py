"""Compiling and loading BPF programs with bcc, with errors that say what to do.

bcc compiles C at run time with clang (seconds, and LLVM's memory): each actor compiles
its program once per start, in a worker thread so the event loop keeps running.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

import bpf as bpf_sources

log = logging.getLogger(__name__)


class BpfUnavailable(RuntimeError):
    """The kernel or this machine cannot run our BPF programs; the message says why and what to do."""


def _include_dir() -> str:
    return str(Path(bpf_sources.__file__).parent)


def check_environment() -> None:
    """Fail early with an actionable message when BPF cannot work here."""
    if os.geteuid() != 0:
        try:
            caps = int(_status_field("CapEff"), 16)
        except (OSError, ValueError):
            caps = 0
        cap_bpf, cap_perfmon = 1 << 39, 1 << 38
        if not (caps & cap_bpf and caps & cap_perfmon):
            raise BpfUnavailable(
                "the agent needs root or CAP_BPF+CAP_PERFMON (+CAP_SYS_PTRACE to read other "
                "processes' memory maps); run it as root or grant these capabilities"
            )
    release = os.uname().release
    if not Path(f"/lib/modules/{release}/build/include").exists():
        raise BpfUnavailable(
            f"kernel headers for {release} not found under /lib/modules/{release}/build: "
            "run scripts/setup.sh (it installs headers and links them there)"
        )
    if not Path("/sys/kernel/tracing/events").exists() and not Path("/sys/kernel/debug/tracing/events").exists():
        raise BpfUnavailable("tracefs is not mounted: mount -t tracefs nodev /sys/kernel/tracing")


def _status_field(name: str) -> str:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split()[1]
    raise ValueError(name)


_LOCAL_INCLUDE = re.compile(r'^#include "([A-Za-z0-9_.]+\.h)"\s*$', re.MULTILINE)


def expand_local_includes(text: str, seen: set[str] | None = None) -> str:
    """Inline our own ``#include "x.h"`` headers into the program text.

    bcc rewrites map operations (``map.lookup()`` etc.) only in the main source, not in
    included files, so a header helper that touches a map would compile to an invalid call.
    Inlining makes every line part of the main source. System headers are left to clang.
    """
    seen = set() if seen is None else seen

    def inline(match: re.Match[str]) -> str:
        header = match.group(1)
        if header in seen:
            return ""
        seen.add(header)
        return expand_local_includes(bpf_sources.source(header), seen)

    return _LOCAL_INCLUDE.sub(inline, text)


# bcc is not safe to use from several threads at once while compiling and loading (seen:
# "Could not open ring buffer" when three actors started together), so every load, attach
# and ring-buffer setup runs under this lock. Polling and map reads do not need it.
BCC_LOCK = threading.Lock()


def cleanup_program(bpf: Any) -> None:
    """Detach and close a program, under ``BCC_LOCK``. Blocking.

    bcc's module teardown is not safe against another teardown or a compile running in a
    parallel thread (it crashes the process), so all of them hold the one lock.
    """
    with BCC_LOCK:
        bpf.cleanup()


def load_program(name: str, defines: dict[str, int | str]) -> Any:
    """Compile ``bpf/<name>`` with ``-D`` defines; raises BpfUnavailable on failure. Blocking.

    Callers that attach or open ring buffers afterwards should hold ``BCC_LOCK`` around the
    whole sequence (it is reentrant-safe to call this while holding it: see RingBufferActor).
    """
    try:
        from bcc import BPF
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise BpfUnavailable(
            "the bcc Python module is missing: install Debian's python3-bpfcc and use a venv "
            "created with --system-site-packages (scripts/setup.sh does both)"
        ) from exc
    check_environment()
    cflags = [f"-I{_include_dir()}", "-Wno-macro-redefined"]
    cflags += [f"-D{k}={v}" for k, v in defines.items()]
    try:
        return BPF(text=expand_local_includes(bpf_sources.source(name)), cflags=cflags)
    except Exception as exc:
        raise BpfUnavailable(f"compiling/loading {name} failed: {exc}") from exc


def read_percpu_counters(table: Any) -> list[int]:
    """Sum a BPF_PERCPU_ARRAY of u64 counters across CPUs (cheap: a handful of entries)."""
    out = []
    for _key, per_cpu in table.items():
        out.append(int(sum(per_cpu)))
    return out
