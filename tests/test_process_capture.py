"""agent/process/capture.py: processes read as their records arrive, against a real process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.process import capture as capture_module
from agent.process.capture import ProcessCaptures
from tests.test_symbols import Target, build


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Target]:
    t = Target(build(tmp_path))
    yield t
    t.stop()


def test_capture_holds_identity_maps_and_the_open_executable(target: Target) -> None:
    captures = ProcessCaptures()
    captures.note(target.pid)
    captured = captures.get(target.pid)
    assert captured is not None
    exe = os.stat(f"/proc/{target.pid}/exe")
    assert captured.key.pid == target.pid and captured.key.exe is not None and captured.key.exe[1] == exe.st_ino
    assert captured.comm == "target"
    assert captured.executable is not None and os.fstat(captured.executable.fileno()).st_ino == exe.st_ino
    leaf, _ = target.truth["leaf_function"]
    assert any(e.start <= leaf < e.end and (e.start, e.end) in captured.keys for e in captured.entries)


def test_a_failed_capture_is_tried_again(target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read that failed (a process between fork and exec, /proc briefly unreadable) is not
    remembered as final: the next record after RECHECK_S tries again."""
    real = capture_module.capture
    calls: list[int] = []

    def fails_once(pid: int) -> capture_module.CapturedProcess | None:
        calls.append(pid)
        return None if len(calls) == 1 else real(pid)

    monkeypatch.setattr(capture_module, "capture", fails_once)
    monkeypatch.setattr(capture_module, "RECHECK_S", 0.0)
    captures = ProcessCaptures()
    captures.note(target.pid)
    assert captures.get(target.pid) is None
    captures.note(target.pid)
    assert captures.get(target.pid) is not None


def test_oldest_captures_are_dropped_with_their_files(target: Target) -> None:
    captures = ProcessCaptures(capacity=1)
    captures.note(target.pid)
    first = captures.get(target.pid)
    assert first is not None and first.executable is not None
    captures.note(os.getpid())
    assert captures.get(target.pid) is None and first.executable.closed
