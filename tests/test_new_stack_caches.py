"""The caches that make a new CPU stack cheap: resolved frames per process instance, Python
frames per process entry, unreadable code objects retried after a while (known answers from a
real process that prints its own addresses and lines, and from a counting fake reader)."""

from __future__ import annotations

import dis
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.process.procmaps import ProcessKey
from agent.runtimes.python import frames as python_frames
from agent.runtimes.python.code import BadObject, CodeInfo
from agent.runtimes.python.frames import UNKNOWN_FRAME, PythonProcesses, PythonStacks, _Entry
from agent.runtimes.python.offsets import OFFSETS
from agent.runtimes.python.process import PythonProcess
from agent.symbols import Symbolizer, symbolizer
from shared.counters import Counters
from tests.test_symbols import Target, build


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Target]:
    t = Target(build(tmp_path))
    yield t
    t.stop()


def test_leaf_and_return_address_of_one_address_are_cached_apart(target: Target) -> None:
    """The same address as a leaf (looked up as is) and as a return address (looked up at
    address - 1) are two entries: the caller's labelled instruction + 1 is its own line as a
    return address and may be another as a leaf."""
    sym = Symbolizer()
    caller_addr, caller_line = target.truth["caller_function"]
    for _ in range(2):  # resolved, then from the cache
        leaf, ret = sym.symbolize_user(target.pid, [caller_addr, caller_addr])
        assert (leaf.function, leaf.line) == ("caller_function", caller_line)
        assert ret.function == "caller_function"
    assert sym.stats["frames_cached"] == 2


def test_frames_stay_right_when_the_bound_drops_them(target: Target) -> None:
    sym = Symbolizer(max_cached_addresses=2)
    leaf_addr, leaf_line = target.truth["leaf_function"]
    caller_addr, caller_line = target.truth["caller_function"]
    for _ in range(3):
        leaf, caller, again = sym.symbolize_user(target.pid, [leaf_addr, caller_addr + 1, caller_addr + 1])
        assert (leaf.function, leaf.line) == ("leaf_function", leaf_line)
        assert (caller.function, caller.line) == (again.function, again.line) == ("caller_function", caller_line)
        assert sym.stats["frames_cached"] <= 2


def test_unmapped_addresses_are_unnamed_and_not_cached(target: Target) -> None:
    sym = Symbolizer()
    leaf_addr, _ = target.truth["leaf_function"]
    frames = sym.symbolize_user(target.pid, [leaf_addr, 0x10, 0x18])
    assert frames[0].function == "leaf_function"
    assert [(f.function, f.address, f.mapping) for f in frames[1:]] == [("", 0x10, None), ("", 0x18, None)]
    assert sym.stats["frames_cached"] == 1  # only the named one: a later dlopen may map the others


def test_frames_survive_a_maps_reread_of_the_same_process(target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(symbolizer, "YOUNG_MAPS_TTL_S", 0.0)  # the target is seconds old
    sym = Symbolizer(maps_ttl_s=0.0)
    leaf_addr, leaf_line = target.truth["leaf_function"]
    (first,) = sym.symbolize_user(target.pid, [leaf_addr])
    maps_reads = sym.stats["maps_reads"]
    sym.symbolize_user(target.pid, [0x10])  # outside every mapping, TTL 0: the maps are read again
    assert sym.stats["maps_reads"] == maps_reads + 1
    (again,) = sym.symbolize_user(target.pid, [leaf_addr])
    assert again is first and (again.function, again.line) == ("leaf_function", leaf_line)


def handler(x: int) -> int:
    y = x * 2
    return y + 1


class _CountingReader:
    """A code reader whose one good code object (``handler``'s, as this interpreter compiled
    it) is at 0x1000; any other address is bad."""

    def __init__(self) -> None:
        self.reads: list[int] = []

    def code(self, address: int) -> CodeInfo:
        self.reads.append(address)
        if address != 0x1000:
            raise BadObject(f"no code object at {address:#x}")
        code = handler.__code__
        return CodeInfo(code.co_qualname, code.co_filename, code.co_firstlineno, code.co_linetable)


def _entry() -> tuple[PythonStacks, Any, _CountingReader]:
    reader = _CountingReader()
    version = sys.version_info[:2]
    process = PythonProcess(1, version, 0, ((0x1000, 0x2000),), OFFSETS[version], "python")
    entry = _Entry(ProcessKey(1, 1, None), process, 0.0, reader)  # type: ignore[arg-type]
    counters = Counters()
    return PythonStacks(PythonProcesses(counters), None, counters, "cpu"), entry, reader


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the interpreter's own 3.11+ location table is the truth")
def test_python_frames_cached_per_code_and_offset() -> None:
    """Each instruction of one code object gets its own line (the interpreter's own answer,
    ``dis``), cached per (code, offset)."""
    stacks, entry, reader = _entry()
    truth = {i.offset: i.positions.lineno for i in dis.get_instructions(handler)
             if i.positions is not None and i.positions.lineno}
    assert len(set(truth.values())) >= 2  # the body's two lines
    for _ in range(2):
        for offset, line in truth.items():
            frame = stacks._frame(entry, 0x1000, offset)
            assert (frame.function, frame.line, frame.address) == ("handler", line, offset)
            assert stacks._frame(entry, 0x1000, offset) is frame
    assert len(reader.reads) == len(truth)  # the second pass was all cached


def test_unreadable_code_object_is_read_again_only_after_the_retry_period(monkeypatch: pytest.MonkeyPatch) -> None:
    stacks, entry, reader = _entry()
    now = [100.0]
    monkeypatch.setattr(python_frames.time, "monotonic", lambda: now[0])
    for _ in range(3):
        assert stacks._frame(entry, 0x2000, 4).function == UNKNOWN_FRAME
    assert reader.reads == [0x2000]  # failed once, not read again within the period
    assert stacks.counters.get("python_frames_unreadable", type="cpu") == 3  # every frame counted
    now[0] += python_frames.UNREADABLE_RETRY_S + 0.1
    assert stacks._frame(entry, 0x2000, 4).function == UNKNOWN_FRAME
    assert reader.reads == [0x2000, 0x2000]
