"""Compiling and loading BPF programs with bcc, with errors that say what to do.

bcc compiles C at run time with clang (seconds, and LLVM's memory): each actor compiles
its program once per start, in a worker thread so the event loop keeps running.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import bpf as bpf_sources
from agent.bpf import contract

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


def load_program(name: str, defines: dict[str, int | str]) -> Any:
    """Compile ``bpf/<name>`` with ``-D`` defines and the C<->Python contract's assertions
    (agent/bpf/contract.py). Raises ContractMismatch, naming the struct and field, when the C
    and agent/bpf/layouts.py disagree, BpfUnavailable on any other failure. Blocking.

    Callers that attach or open ring buffers afterwards should hold ``BCC_LOCK`` around the
    whole sequence (it is reentrant-safe to call this while holding it: see BpfActor in agent/actors/base.py).
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
    text = program_text(name)
    try:
        return BPF(text=text, cflags=cflags)
    except Exception as exc:
        if "compile" not in str(exc):
            raise BpfUnavailable(f"compiling/loading {name} failed: {exc}") from exc
        errors = compiler_errors(BPF, text, cflags)
        mismatched = contract.mismatches(errors)
        if mismatched:
            raise contract.ContractMismatch(
                f"{name}: the C program and agent/bpf/layouts.py disagree (edit both sides together, see "
                f"docs/design/bpf-contract.md): " + "; ".join(mismatched)) from exc
        first = [line for line in errors.splitlines() if "error:" in line][:3]
        raise BpfUnavailable(f"compiling {name} failed: {' | '.join(first) or exc}") from exc


def program_text(name: str) -> str:
    """``bpf/<name>`` with our headers inlined and the contract's static assertions appended."""
    inlined: set[str] = set()
    text = expand_local_includes(bpf_sources.source(name), inlined)
    return text + contract.assertions([name, *inlined])


def compiler_errors(bpf_class: Any, text: str, cflags: list[str]) -> str:
    """Compile ``text`` again with file descriptor 2 captured, for clang's diagnostics.

    bcc prints them to stderr and raises only "Failed to compile BPF module"; the capture runs
    on the failure path alone, and what it took is written to stderr afterwards. Blocking."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        try:
            os.dup2(capture.fileno(), 2)
            try:
                bpf_class(text=text, cflags=cflags).cleanup()  # pragma: no cover - it failed once already
            except Exception:
                pass
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        output = capture.read()
    os.write(2, output)
    return output.decode("utf-8", "replace")


def read_percpu_counters(table: Any) -> list[int]:
    """Sum a BPF_PERCPU_ARRAY of u64 counters across CPUs (cheap: a handful of entries)."""
    out = []
    for _key, per_cpu in table.items():
        out.append(int(sum(per_cpu)))
    return out
