"""The compiler's library pages leave the agent's resident set after a BPF compile."""

from __future__ import annotations

import subprocess
import sys

PROBE = r"""
from bcc import BPF
from agent.bpf.compiler_memory import release_compiler_memory
def file_kib():
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["RssFile"].split()[0])
b = BPF(text="int probe(void *ctx) { return 0; }")  # clang/LLVM run in this process
b.load_func("probe", BPF.KPROBE)
before = file_kib()
advised = release_compiler_memory()
print(before, file_kib(), advised)
"""


def test_compiler_pages_are_paged_out_after_a_compile() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after, advised = (int(x) for x in out.stdout.split())
    assert advised >= 2, out.stdout  # libLLVM, libclang-cpp, libbcc mappings
    assert before - after > 20 * 1024, (before, after)  # tens of MB of compiler code were resident
