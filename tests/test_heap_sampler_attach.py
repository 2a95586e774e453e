"""Which library files the sampled heap mode probes, found from real processes' maps.

A recording stand-in takes the place of the BPF object (attaching is the kernel's business,
tested in integration/test_heap_profile.py): one probe pair per library *file*, for all
processes; a second process mapping the same file adds nothing; a copy elsewhere is another
file; a process without the library is left alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.heap_sampler import LIBRARY_NAME, PROBE_ALLOC, PROBE_FREE, build_library
from agent.heap_sampler.attach import SamplerProbes
from shared.counters import Counters


class RecordingBPF:
    def __init__(self) -> None:
        self.attached: list[tuple[str, str, str, int]] = []

    def attach_uprobe(self, name: str, sym: str, fn_name: str, pid: int) -> None:
        self.attached.append((name, sym, fn_name, pid))

    def detach_uprobe(self, name: str, sym: str, pid: int) -> None:
        raise AssertionError("nothing to detach")


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[dict[str, subprocess.Popen[Any]]]:
    library = build_library()
    copy_dir = tmp_path / "elsewhere"
    copy_dir.mkdir()
    copy = copy_dir / LIBRARY_NAME
    shutil.copy2(library, copy)
    started: dict[str, subprocess.Popen[Any]] = {}
    for name, preload in (("first", library), ("second", library), ("copy", copy), ("plain", None)):
        env = {**os.environ, **({"LD_PRELOAD": str(preload)} if preload else {})}
        # Reads stdin until closed: alive (and mapped) while the test looks at it.
        started[name] = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    try:
        for proc in started.values():  # preloaded libraries are mapped before libc
            deadline = time.monotonic() + 10
            while "/libc.so" not in Path(f"/proc/{proc.pid}/maps").read_text():
                assert time.monotonic() < deadline, "the process never mapped libc"
                time.sleep(0.01)
        yield started
    finally:
        for proc in started.values():
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(10)


def test_one_probe_pair_per_library_file(processes: dict[str, subprocess.Popen[Any]]) -> None:
    bpf = RecordingBPF()
    probes = SamplerProbes(Counters())
    for name in ("first", "second", "copy", "plain"):
        probes.library_of(processes[name].pid, bpf)
    files = {probes.process_files[processes[n].pid] for n in ("first", "second", "copy")}
    assert len(files) == 2  # first and second share one file
    assert processes["plain"].pid not in probes.process_files
    assert sorted((sym, fn, pid) for _, sym, fn, pid in bpf.attached) == sorted(
        [(PROBE_ALLOC, "on_sampled_alloc", -1), (PROBE_FREE, "on_sampled_free", -1)] * 2)
    # The agent's own build is the file the first process maps: attaching it adds nothing new.
    probes.attach_built_library(bpf)
    assert len(bpf.attached) == 4
    assert probes.process_files[processes["first"].pid] is probes.process_files[processes["second"].pid]
