"""Process selectors against real processes."""

from __future__ import annotations

import os
import subprocess
import time

from agent.process.selectors import ProcessSelector, sync_targets
from shared.counters import Counters


def test_empty_selector_does_not_filter() -> None:
    assert ProcessSelector().filters is False


def test_pid_comm_and_cgroup_selection() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.1)
        assert proc.pid in ProcessSelector(pids=[proc.pid]).scan()
        by_name = ProcessSelector(comm_pattern=r"^sleep$").scan()
        assert proc.pid in by_name and os.getpid() not in by_name
        with open(f"/proc/{proc.pid}/cgroup") as f:
            cgroup = f.readline().rstrip("\n").split(":", 2)[-1]
        assert proc.pid in ProcessSelector(cgroup_prefix=cgroup).scan()
        assert proc.pid not in ProcessSelector(cgroup_prefix="/no/such/cgroup").scan()
    finally:
        proc.kill()
        proc.wait()


def test_sync_targets_adds_and_removes() -> None:
    class FakeMap(dict):  # stands in for a bcc table: same __setitem__/__delitem__ protocol
        def __setitem__(self, k: object, v: object) -> None:
            super().__setitem__(k.value, v)  # type: ignore[attr-defined]

        def __delitem__(self, k: object) -> None:
            super().__delitem__(k.value)  # type: ignore[attr-defined]

    proc = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.1)
        bpf_map = FakeMap()
        current = sync_targets(ProcessSelector(pids=[proc.pid]), bpf_map, set(), Counters())
        assert current == {proc.pid} and set(bpf_map) == {proc.pid}
    finally:
        proc.kill()
        proc.wait()
    current = sync_targets(ProcessSelector(pids=[proc.pid]), bpf_map, current, Counters())
    assert current == set() and not bpf_map
