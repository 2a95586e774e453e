"""CPython frames end to end: a Python script profiled by the real agent.

``py_chain.py`` spins in ``compute`` called as main -> handler -> compute. It runs under
every CPython of a supported version (agent/runtimes/python/offsets.py: 3.8-3.13) found on the
machine (at least the default ``python3``, Debian's ``/usr/bin/python3.11`` and pyenv's 3.8
and 3.9); the CPU profile must show those three
functions with file and line, innermost first, as ``cpython`` frames, nested under the
interpreter's native frames (``main`` of the interpreter binary at the bottom).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.runtimes.python.offsets import OFFSETS
from integration.harness import PipelineRun, run_pipeline
from shared.model import Frame, FrameType
from shared.profile_types import ProfileType
from stackfleet.nats_server import NatsServer

# Each interpreter runs until the agent has exported ENOUGH_SAMPLES of it, MAX_SECONDS at most.
ENOUGH_SAMPLES = 150
MAX_SECONDS = 30.0
SCRIPT = Path(__file__).parent / "workloads" / "py_chain.py"
CHAIN = ["compute", "handler", "main"]
SUPPORTED = {f"{major}.{minor}" for major, minor in OFFSETS}


def _line_of(text: str) -> int:
    return next(i for i, line in enumerate(SCRIPT.read_text().splitlines(), 1) if text in line)


COMPUTE_LINES = range(_line_of("def compute"), _line_of("return total"))
HANDLER_LINE = _line_of("return compute(")
MAIN_LINE = _line_of("handler(float(")


def _interpreters() -> dict[str, str]:
    """Distinct interpreter binaries by version label: default python3, Debian's, pyenv's."""
    candidates = [shutil.which("python3") or "", "/usr/bin/python3.11"]
    pyenv = Path("/root/.pyenv/versions")
    if pyenv.is_dir():
        candidates += [str(p / "bin" / "python3") for p in sorted(pyenv.iterdir())]
    found: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    for exe in candidates:
        if not exe or not os.access(exe, os.X_OK):
            continue
        try:
            out = subprocess.run([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2], sys.prefix)"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.split()
        except (OSError, subprocess.SubprocessError):
            continue
        version, prefix = out[0], out[1]
        if version not in SUPPORTED or (version, prefix) in seen:
            continue
        seen.add((version, prefix))
        found[f"{version}:{prefix}"] = exe
    return found


INTERPRETERS = _interpreters()


@dataclass
class Profiled:
    run: PipelineRun
    pids: dict[str, int]
    go_ns: dict[str, int]


@pytest.fixture(scope="module")
def profiled() -> Profiled:
    pids: dict[str, int] = {}
    go_ns: dict[str, int] = {}

    async def one(run: PipelineRun, label: str, exe: str) -> None:
        proc = await asyncio.create_subprocess_exec(exe, str(SCRIPT), str(MAX_SECONDS), stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE)
        pids[label] = proc.pid
        assert proc.stdout is not None and proc.stdin is not None
        await proc.stdout.readline()
        await _agent_shows_warm_up(run, proc.pid)
        go_ns[label] = time.time_ns()
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        await _until_exported(run, proc.pid, go_ns[label])
        if proc.returncode is None:
            proc.send_signal(signal.SIGUSR1)
        await proc.communicate()
        assert proc.returncode == 0

    async def workload(run: PipelineRun) -> None:
        for label, exe in INTERPRETERS.items():  # one at a time: each gets a whole core
            await one(run, label, exe)

    with NatsServer() as nats:
        run = asyncio.run(run_pipeline(nats.url, [ProfileType.CPU], workload))
    return Profiled(run, pids, go_ns)


async def _until_exported(run: PipelineRun, pid: int, since_ns: int) -> None:
    """Until ENOUGH_SAMPLES samples of ``pid`` taken after ``since_ns`` are exported, or the
    workload's MAX_SECONDS are over: a fixed run gave a starved process too few samples on a
    loaded machine, and an idle one more than it needs."""
    deadline = time.monotonic() + MAX_SECONDS
    while time.monotonic() < deadline:
        exported = sum(1 for s in run.samples(ProfileType.CPU, pid) for t in s.timestamps_ns if t >= since_ns)
        if exported >= ENOUGH_SAMPLES:
            return
        await asyncio.sleep(0.5)


async def _agent_shows_warm_up(run: PipelineRun, pid: int, timeout_s: float = 60.0) -> None:
    """Until an exported sample of ``pid`` shows ``warm_up`` as a Python frame in a complete native
    stack: the agent has found the interpreter and built the binary's unwind tables. On a loaded
    machine that takes seconds after the process's first sample; a fixed sleep let 10 % of the
    measured samples fall before it. Gives up quietly after ``timeout_s``: the share assertion
    then reports what was missing."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for s in run.samples(ProfileType.CPU, pid):
            user = [f for f in s.frames if f.frame_type != FrameType.KERNEL]
            if any(f.function == "warm_up" and f.frame_type == FrameType.CPYTHON for f in user) \
                    and _under_interpreter(user):
                return
        await asyncio.sleep(0.5)


def test_machine_has_the_interpreters_the_issue_names() -> None:
    labels = " ".join(INTERPRETERS)
    assert "3.11:/usr" in labels, f"Debian's python3.11 not found: {INTERPRETERS}"
    # RHEL 9's system Python is 3.9; 3.8 is the oldest the issue asks for (pyenv builds here).
    assert all(f"{v}:" in labels for v in ("3.8", "3.9")), f"CPython 3.8 or 3.9 not found: {INTERPRETERS}"
    assert len(INTERPRETERS) >= 2, INTERPRETERS


@pytest.mark.parametrize("label", sorted(INTERPRETERS))
def test_python_functions_nested_under_interpreter_frames(profiled: Profiled, label: str) -> None:
    pid = profiled.pids[label]
    samples = profiled.run.samples(ProfileType.CPU, pid)
    total = full = 0
    misses: list[list[tuple[str, str, str]]] = []
    for s in samples:
        n = sum(1 for t in s.timestamps_ns if t >= profiled.go_ns[label])
        if not n:
            continue
        total += n
        user = [f for f in s.frames if f.frame_type != FrameType.KERNEL]
        python = [f for f in user if f.frame_type == FrameType.CPYTHON]
        names = [f.function for f in python]
        if names[:1] != ["compute"] or names[1:3] != CHAIN[1:] or not _under_interpreter(user):
            misses.append(_describe(user))
            continue
        compute, handler, main = python[0], python[1], python[2]
        if all(f.filename == str(SCRIPT) for f in (compute, handler, main)) and \
                compute.line in COMPUTE_LINES and handler.line == HANDLER_LINE and main.line == MAIN_LINE:
            full += n
    counters = {k: v for k, v in profiled.run.agent_counters.snapshot().items()
                if k.startswith(("python", "unwind_tables", "unwind_stacks"))}
    example = max(samples, key=lambda s: len(s.timestamps_ns), default=None)
    shown = [(f.function, f.frame_type.value, f.line) for f in example.frames] if example else []
    assert total >= 100, f"{total} samples of {label}; counters {counters}"
    assert full >= 0.9 * total, (f"{label}: {full}/{total} samples show {CHAIN} with file and line; {counters}; "
                                 f"most common stack {shown}; misses {misses[:5]}")


def _describe(frames: list[Frame]) -> list[tuple[str, str, str]]:
    return [(f.function[:24], hex(f.address), (f.mapping.filename if f.mapping else "-")[-20:]) for f in frames]


def _under_interpreter(user: list[Frame]) -> bool:
    """Python frames sit between native frames: the outermost frame is the interpreter's
    native ``main``/``_start`` (or libc's start), never a Python frame."""
    return bool(user) and user[-1].frame_type == FrameType.NATIVE and \
        any(f.frame_type == FrameType.NATIVE for f in user[user.index(next(
            f for f in user if f.frame_type == FrameType.CPYTHON)):])
