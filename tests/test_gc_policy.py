"""The agent's collector thresholds (agent/gc_policy.py)."""

from __future__ import annotations

import gc
import subprocess
import sys

from agent.gc_policy import YOUNG_GENERATION_THRESHOLD, apply_gc_policy


def test_the_policy_raises_only_the_young_generation_threshold() -> None:
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        assert apply_gc_policy() == (700, 10, 10)
        assert gc.get_threshold() == (YOUNG_GENERATION_THRESHOLD, 10, 10)
    finally:
        gc.set_threshold(*before)


def test_young_collections_come_after_the_threshold_of_container_allocations() -> None:
    """In a fresh interpreter with the policy: 5,000 lists kept alive trigger no young
    collection (at CPython's default of 700 they trigger seven); 15,000 trigger one."""
    script = """
import gc
from agent.gc_policy import apply_gc_policy
apply_gc_policy()
gc.collect()
runs = []
gc.callbacks.append(lambda phase, info: phase == "start" and info["generation"] == 0 and runs.append(1))
kept = [[] for _ in range(5_000)]
print(len(runs), end=" ")
kept += [[] for _ in range(10_000)]
print(len(runs))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0", "1"]
