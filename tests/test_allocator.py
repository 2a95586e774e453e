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
