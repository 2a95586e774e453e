"""ProcessKey (agent/process/procmaps.py): one process instance = pid, start time, executable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.process.procmaps import ProcessKey, file_key, read_proc_file, start_time


def test_key_of_this_process() -> None:
    key = ProcessKey.read(os.getpid())
    assert key.pid == os.getpid()
    assert key.start_ticks == start_time(os.getpid())
    assert key.exe == file_key(os.stat(os.path.realpath(sys.executable)))
    assert ProcessKey.read(os.getpid()) == key and hash(ProcessKey.read(os.getpid())) == hash(key)
    with pytest.raises(AttributeError):
        key.pid = 1  # type: ignore[misc]  # frozen: safe as a dict key


def test_a_child_differs_and_a_gone_process_raises() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        key = ProcessKey.read(child.pid)
        assert key != ProcessKey.read(os.getpid())
        assert key.exe == ProcessKey.read(os.getpid()).exe  # the same interpreter file
    finally:
        child.kill()
        child.wait()
    with pytest.raises(OSError):
        ProcessKey.read(child.pid)


def test_kernel_threads_have_no_executable() -> None:
    kthreadd = 2  # the kernel's thread creator, always pid 2 in the initial pid namespace
    with open("/proc/2/comm") as f:
        if f.read().strip() != "kthreadd":
            pytest.skip("not in the initial pid namespace")
    assert ProcessKey.read(kthreadd).exe is None


def test_proc_files_read_whole_at_any_size(tmp_path: Path) -> None:
    """read_proc_file returns the same bytes as a buffered read: a stat line in one read, and a
    file longer than one read (a process's maps, the kernel's own files) read on to its end."""
    own_stat = f"/proc/{os.getpid()}/stat"
    with open(f"/proc/{os.getpid()}/maps", "rb") as f:
        maps = f.read()
    assert len(maps) > 4096  # the interpreter maps more than one read's worth
    assert read_proc_file(f"/proc/{os.getpid()}/maps") == maps
    assert read_proc_file(own_stat).split()[0] == str(os.getpid()).encode()
    big = tmp_path / "big"  # several reads' worth
    big.write_bytes(bytes(range(256)) * 1000)
    assert read_proc_file(str(big)) == bytes(range(256)) * 1000
    with pytest.raises(FileNotFoundError):
        read_proc_file(str(tmp_path / "gone"))
