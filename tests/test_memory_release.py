"""The compiler's library pages leave the agent's resident set after a BPF compile.

Whoever else maps the same libraries: the read-only views of the files are unmapped from
the agent (``MADV_DONTNEED``), which ``MADV_PAGEOUT`` alone did not do for pages another
process shares. The probe compiles a program in a fresh interpreter and reads the compiler
mappings' resident pages from /proc/self/smaps before and after the release.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from agent.actors.base import ActorContext, SampleSink
from agent.bpf.compiler_memory import TRIM_INTERVAL_S, LibraryMapping, parse_smaps
from agent.clock import MonotonicToUnix
from agent.settings import AgentSettings
from agent.symbols import Symbolizer
from shared.counters import Counters

PROBE = r"""
from bcc import BPF
from agent.bpf.compiler_memory import parse_smaps, release_compiler_memory

def resident_kib():
    file_view = other = 0
    current = None
    views = {(m.start, m.end) for m in parse_smaps(open("/proc/self/smaps").read()) if m.file_view}
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            current = (start, end) if len(fields) >= 6 and any(
                lib in fields[5] for lib in ("libLLVM", "libclang", "libbcc")) else None
        elif current is not None and fields[0] == "Rss:":
            if current in views:
                file_view += int(fields[1])
            else:
                other += int(fields[1])
    return file_view, other

b = BPF(text="int probe(void *ctx) { return 0; }")  # clang/LLVM run in this process
b.load_func("probe", BPF.KPROBE)
view_before, other_before = resident_kib()
advised = release_compiler_memory()
view_after, other_after = resident_kib()
print(view_before, other_before, view_after, other_after, advised)
"""


def test_compiler_pages_leave_the_resident_set_after_a_compile() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    view_before, other_before, view_after, other_after, advised = (int(x) for x in out.stdout.split())
    assert advised >= 3, out.stdout  # libLLVM, libclang-cpp and libbcc each have several mappings
    assert view_before > 20 * 1024, out.stdout  # tens of MB of compiler code and read-only data were resident
    assert view_after < 512, out.stdout  # gone from this process, shared with others or not
    assert other_after <= other_before, out.stdout  # written data is paged out at most, never dropped


SMAPS = """\
7f0000000000-7f0000200000 r--p 00000000 fe:01 1234 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Size:               2048 kB
Rss:                1024 kB
Anonymous:             0 kB
7f0000200000-7f0000400000 r-xp 00200000 fe:01 1234 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Rss:                2048 kB
Anonymous:             0 kB
7f0000400000-7f0000500000 r--p 00400000 fe:01 1234 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Rss:                1024 kB
Anonymous:           512 kB
7f0000500000-7f0000510000 rw-p 00500000 fe:01 1234 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Rss:                  64 kB
Anonymous:             0 kB
7f0000600000-7f0000700000 r-xp 00000000 fe:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                 512 kB
Anonymous:             0 kB
7f0000800000-7f0000900000 rw-p 00000000 00:00 0
Rss:                 512 kB
Anonymous:           512 kB
"""


def test_only_unwritten_views_of_the_file_count_as_droppable() -> None:
    mappings = parse_smaps(SMAPS)
    assert [(m.start, m.permissions, m.file_view) for m in mappings] == [
        (0x7F0000000000, "r--p", True),   # read-only data as in the file
        (0x7F0000200000, "r-xp", True),   # code
        (0x7F0000400000, "r--p", False),  # relocated (RELRO): private copies that the file does not have
        (0x7F0000500000, "rw-p", False),  # writable data, even while unwritten
    ]
    assert all(isinstance(m, LibraryMapping) and "libLLVM" in m.path for m in mappings)  # libc, anonymous left alone


def test_heap_trims_come_early_then_every_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start-up leaves freed heap behind: the first trims come 10, 20 and 40 s apart, then
    every TRIM_INTERVAL_S; a sweep between them does not trim."""
    import agent.actors.base as base

    ctx = ActorContext(AgentSettings(), Symbolizer(), ThreadPoolExecutor(1), SampleSink(), Counters(),
                       MonotonicToUnix())
    start = time.monotonic()  # the context's clocks started a moment ago
    clock = [start]
    trims: list[float] = []
    monkeypatch.setattr(base.time, "monotonic", lambda: clock[0])

    def release() -> int:
        trims.append(clock[0])
        return 0

    monkeypatch.setattr(base, "release_compiler_memory", release)
    for _ in range(300):  # a sweep every second for five minutes
        clock[0] += 1.0
        ctx.sweep_exited_processes(interval_s=1.0)
    assert [round(t - start) for t in trims] == [10, 30, 70, 130, 190, 250]
    assert TRIM_INTERVAL_S == 60.0
    assert ctx.counters.get("heap_trims") == len(trims)
