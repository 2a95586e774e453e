"""The one /proc listing (agent/process/watcher.py): processes, not threads, and nothing else."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

from agent.process.watcher import running_pids


def test_lists_processes_but_not_their_threads() -> None:
    started = threading.Event()
    stop = threading.Event()
    tid: list[int] = []

    def worker() -> None:
        tid.append(threading.get_native_id())
        started.set()
        stop.wait()

    thread = threading.Thread(target=worker)
    thread.start()
    child = subprocess.Popen(["sleep", "30"])
    try:
        started.wait(5)
        pids = running_pids()
        assert os.getpid() in pids and child.pid in pids
        assert tid[0] != os.getpid() and tid[0] not in pids  # a thread has a /proc entry, not a listed one
        assert os.path.exists(f"/proc/{tid[0]}")
    finally:
        stop.set()
        thread.join()
        child.kill()
        child.wait()
    assert child.pid not in running_pids()  # reaped: gone from /proc


def test_only_numeric_entries_of_the_given_tree(tmp_path: Path) -> None:
    for name in ("1", "42", "self", "net", "7x"):
        (tmp_path / name).mkdir()
    assert running_pids(str(tmp_path)) == {1, 42}
