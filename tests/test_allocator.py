"""The services' malloc settings take effect (glibc) and change what a fragmenting pattern keeps."""

from __future__ import annotations

import subprocess
import sys

FRAGMENT = r"""
import ctypes, sys
from shared.allocator import configure_allocator
if sys.argv[1] == "on":
    assert configure_allocator()
# A large temporary freed (raises glibc's dynamic mmap threshold), then large temporaries
# interleaved with small long-lived objects: the pattern of parsing one file after another.
big = bytearray(8 << 20); del big
keep = []
for _ in range(40):
    tmp = bytearray(4 << 20)
    keep.append(bytearray(200))
    del tmp
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(int(status["RssAnon"].split()[0]))
"""


def _anon_kib(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", FRAGMENT, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_fixed_mmap_threshold_returns_large_temporaries() -> None:
    default, configured = _anon_kib("off"), _anon_kib("on")
    # Default glibc keeps the freed 4 MiB blocks in the heap behind the small survivors;
    # with the fixed threshold each is unmapped when freed.
    assert configured < default, (configured, default)


TRIM = r"""
import sys
from agent.bpf.compiler_memory import trim_heap
from shared.allocator import configure_allocator
configure_allocator()
def anon():
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["RssAnon"].split()[0])
# Many malloc-sized blocks (over pymalloc's 512 B), one in ten kept: what a cache that
# dropped most of its entries leaves behind, free but resident inside the arena.
blocks = [bytearray(2048) for _ in range(60_000)]
survivors = blocks[::10]
del blocks
before = anon()
if sys.argv[1] == "trim":
    trim_heap()
print(before, anon())
"""


def test_trim_heap_returns_free_pages_inside_the_arena() -> None:
    def run(mode: str) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", TRIM, mode], capture_output=True, text=True, check=True)
        before, after = out.stdout.split()
        return int(before), int(after)

    before, after = run("trim")
    kept_before, kept_after = run("keep")
    assert kept_after >= kept_before - 1024  # without the trim the free blocks stay resident
    assert before - after > 50 * 1024, (before, after)  # ~100 MiB freed in 2 KiB blocks, most returned
