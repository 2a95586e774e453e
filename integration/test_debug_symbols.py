"""System-library frames end to end: named from distribution debug files, and merged across processes.

One C program (futex_pingpong: two threads trading a turn through a condition variable, so
they sit in libc's futex wait helper under ``start_thread``) runs as three processes while
the real agent profiles CPU. Address randomisation loads libc at a different address in each
process. The claims, checked on the OTLP requests the aggregator exported:
- the three processes' stacks are the *same locations* (one stack in the fleet dictionary);
- with libc6-dbg's files, ``start_thread`` and ``__futex_abstimed_wait_common`` are named;
- with the debug directory pointed at an empty folder, the same frames are ``libc.so.6+0x…``
  file offsets (inside the functions' ranges per ``nm`` on the debug file), still merged.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aggregator.exporters.pprof import unknown_frame_label
from integration.harness import PipelineRun, build_c, run_pipeline
from shared.model import Frame, FrameType
from shared.profile_types import ProfileType
from stackfleet.nats_server import NatsServer

SECONDS = 4.0
PROCESSES = 3
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
FUTEX_HELPER = "__futex_abstimed_wait_common"


@dataclass
class Profiled:
    run: PipelineRun
    pids: list[int]


def _profile(tmp: Path, agent_overrides: dict[str, Any]) -> Profiled:
    exe = build_c("futex_pingpong.c", tmp)
    pids: list[int] = []

    async def one() -> None:
        proc = await asyncio.create_subprocess_exec(str(exe), str(SECONDS), stdout=asyncio.subprocess.PIPE)
        pids.append(proc.pid)
        out, _ = await proc.communicate()
        assert proc.returncode == 0 and out.startswith(b"rounds ")

    async def workload(run: PipelineRun) -> None:
        await asyncio.gather(*(one() for _ in range(PROCESSES)))

    with NatsServer() as nats:
        run = asyncio.run(run_pipeline(nats.url, [ProfileType.CPU], workload, agent_overrides=agent_overrides))
    return Profiled(run, pids)


@pytest.fixture(scope="module")
def with_debug_files(tmp_path_factory: pytest.TempPathFactory) -> Profiled:
    return _profile(tmp_path_factory.mktemp("dbg"), {})


@pytest.fixture(scope="module")
def without_debug_files(tmp_path_factory: pytest.TempPathFactory) -> Profiled:
    empty = tmp_path_factory.mktemp("empty-debug-dir")
    return _profile(tmp_path_factory.mktemp("nodbg"), {"debug_directories": [str(empty)]})


def _libc_range(name: str) -> tuple[int, int]:
    """File offsets [start, end) of a libc function: nm on libc6-dbg's file, readelf -l on libc."""
    notes = subprocess.run(["readelf", "-n", LIBC], capture_output=True, text=True, check=True).stdout
    build_id = re.search(r"Build ID: ([0-9a-f]+)", notes).group(1)  # type: ignore[union-attr]
    debug_file = f"/usr/lib/debug/.build-id/{build_id[:2]}/{build_id[2:]}.debug"
    nm = subprocess.run(["nm", "-S", debug_file], capture_output=True, text=True, check=True).stdout
    vaddr, size = next((int(f[0], 16), int(f[1], 16)) for f in map(str.split, nm.splitlines())
                       if len(f) == 4 and f[3] == name)
    for f in map(str.split, subprocess.run(["readelf", "-lW", LIBC], capture_output=True, text=True,
                                           check=True).stdout.splitlines()):
        if f[:1] == ["LOAD"] and "E" in f[6:-1]:
            return vaddr - int(f[2], 16) + int(f[1], 16), vaddr - int(f[2], 16) + int(f[1], 16) + size
    raise AssertionError("no executable segment in libc")


LocationValue = tuple[Any, ...]


@dataclass
class ExportedStacks:
    """What the exported requests say about the workload's user stacks (kernel frames left out)."""

    # Per pid: its user stacks as tuples of decoded Locations, weighted by sample count.
    by_value: dict[int, Counter[tuple[LocationValue, ...]]]
    # User stacks, as location *indices* of one request's dictionary, that hold samples of
    # every workload process in that request: proof that the exporter made them one stack.
    same_indices: list[tuple[int, ...]]


def _exported_stacks(p: Profiled) -> ExportedStacks:
    """Each export is one request with its own dictionary: indices are compared within a
    request, decoded values across requests (the three processes' samples need not all
    fall into the same one-second export on a loaded machine)."""
    by_value: dict[int, Counter[tuple[LocationValue, ...]]] = {pid: Counter() for pid in p.pids}
    same_indices: list[tuple[int, ...]] = []
    for request in p.run.requests:
        d = request.dictionary

        def attr(i: int, d: Any = d) -> tuple[str, Any]:
            kv = d.attribute_table[i]
            return d.string_table[kv.key_strindex], kv.value

        def value(i: int, d: Any = d) -> LocationValue:
            loc = d.location_table[i]
            m = d.mapping_table[loc.mapping_index]
            lines = tuple((d.string_table[d.function_table[ln.function_index].name_strindex], ln.line)
                          for ln in loc.lines)
            return (d.string_table[m.filename_strindex], m.memory_start, m.memory_limit, m.file_offset,
                    loc.address, lines)

        kernel = {i for i, loc in enumerate(d.location_table)
                  if any(attr(a)[0] == "profile.frame.type" and attr(a)[1].string_value == "kernel"
                         for a in loc.attribute_indices)}
        pids_by_stack: dict[tuple[int, ...], set[int]] = {}
        for rp in request.resource_profiles:
            # One resource per profiled process: process.pid is a resource attribute.
            pid = next((kv.value.int_value for kv in rp.resource.attributes if kv.key == "process.pid"), None)
            for sp in rp.scope_profiles:
                for profile in sp.profiles:
                    for sample in profile.samples:
                        if pid not in by_value:
                            continue
                        locations = tuple(i for i in d.stack_table[sample.stack_index].location_indices
                                          if i not in kernel)
                        by_value[pid][tuple(map(value, locations))] += len(sample.timestamps_unix_nano) or 1
                        pids_by_stack.setdefault(locations, set()).add(pid)
        same_indices += [stack for stack, pids in pids_by_stack.items() if len(pids) == PROCESSES]
    return ExportedStacks(by_value, same_indices)


def _frames_by_pid(p: Profiled) -> dict[int, list[tuple[Frame, ...]]]:
    return {pid: [tuple(f for f in s.frames if f.frame_type != FrameType.KERNEL)
                  for s in p.run.samples(ProfileType.CPU, pid)] for pid in p.pids}


def _assert_merged(p: Profiled) -> None:
    exported = _exported_stacks(p)
    stacks = exported.by_value
    assert all(sum(c.values()) >= 30 for c in stacks.values()), \
        f"{ {pid: sum(c.values()) for pid, c in stacks.items()} }; {p.run.agent_counters.snapshot()}"
    # The exporter made identical stacks of the three processes one stack (same indices).
    assert exported.same_indices, "no exported stack holds samples of all three processes"
    shared = set.intersection(*(set(c) for c in stacks.values()))
    for pid, counts in stacks.items():
        # Each process's most frequent stack is one all three have, and most of its samples
        # are in such stacks: the same locations. Some stacks are seen in one process only
        # (rare paths sampled once; on a loaded machine more of them).
        assert counts.most_common(1)[0][0] in shared, (pid, counts.most_common(3))
        in_shared = sum(n for s, n in counts.items() if s in shared)
        assert in_shared >= 0.6 * sum(counts.values()), (pid, in_shared, sum(counts.values()))


def test_one_program_in_three_processes_is_one_stack_named_from_libc6_dbg(with_debug_files: Profiled) -> None:
    _assert_merged(with_debug_files)
    for pid, stacks in _frames_by_pid(with_debug_files).items():
        waits = [s for s in stacks if [f.function for f in s[:1]] == [FUTEX_HELPER]]
        assert waits, f"pid {pid}: no sample in {FUTEX_HELPER}: {[[f.function for f in s] for s in stacks[:5]]}"
        names = [f.function for f in max(waits, key=len)]
        # clone3 has two symbols at one address (clone3 and __clone3): either is right.
        assert names[-3:-1] == ["player", "start_thread"] and names[-1] in ("clone3", "__clone3"), names


def test_without_debug_files_frames_are_libc_offsets_and_still_merge(without_debug_files: Profiled) -> None:
    _assert_merged(without_debug_files)
    lo, hi = _libc_range(FUTEX_HELPER)
    start_lo, start_hi = _libc_range("start_thread")
    libc_size = Path(LIBC).stat().st_size
    for pid, stacks in _frames_by_pid(without_debug_files).items():
        libc = [f for s in stacks for f in s if f.mapping is not None and f.mapping.filename.endswith("/libc.so.6")]
        assert libc and all(f.address < libc_size for f in libc), "a libc frame with an absolute address"
        helper = [f for f in libc if lo <= f.address < hi]
        assert helper and all(f.function == "" for f in helper), pid
        assert all(re.fullmatch(r"libc\.so\.6\+0x[0-9a-f]+", unknown_frame_label(f)) for f in helper)
        # start_thread too: the thread entry's return address, unnamed.
        assert any(start_lo < f.address <= start_hi and f.function == "" for f in libc), pid
