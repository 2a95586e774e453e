"""Wall profile on the real kernel: threads alternating 30 ms busy / 70 ms asleep.

The wall profile of the worker threads must split ~30/70 between busy_part (on-CPU) and
sleep_part (off-CPU, state "sleeping") within 5 percentage points, and each thread's total
wall time must be within 5% of the time it existed.

Threads alternating 1 ms busy / 4 ms asleep switch out ~200 times a second, faster than
the default capture rate (99 Hz): about half their switch-out stacks are captured, the
kernel sums the other sleeps per thread and the agent spreads that sum over the captured
stacks; the profile must still split ~20/80 and add up per thread.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import pytest

from aggregator.otlp import validate_request
from integration.harness import PipelineRun, build_c, run_pipeline
from shared.model import FrameType
from shared.profile_types import ProfileType
from stackfleet.nats_server import NatsServer

SECONDS, THREADS = 6.0, 2
PPROF = Path(__file__).resolve().parents[1] / ".tools" / "pprof"


@pytest.fixture(scope="module")
def wall_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineRun, int, float, Path]:
    return profile_wall_split(tmp_path_factory.mktemp("wall"), SECONDS, busy_ms=30, sleep_ms=70)


def profile_wall_split(tmp: Path, seconds: float, busy_ms: int, sleep_ms: int) -> tuple[PipelineRun, int, float, Path]:
    """Run wall_split (THREADS workers, busy/sleep cycles) under the wall profile."""
    exe = build_c("wall_split.c", tmp)
    out_dir = tmp / "profiles"
    box: list[int] = []
    lifetime: list[float] = []

    async def workload(run: PipelineRun) -> None:
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(str(exe), str(seconds), str(THREADS), str(busy_ms), str(sleep_ms),
                                                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        box.append(proc.pid)
        # Let the name selector's /proc scan (1 s) put the process in the BPF target map first.
        await asyncio.sleep(2.0)
        await proc.communicate(b"go\n")
        lifetime.append(time.monotonic() - started)
        assert proc.returncode == 0

    with NatsServer() as nats:
        run = asyncio.run(run_pipeline(nats.url, [ProfileType.WALL], workload, output_dir=out_dir,
                                       export_interval_s=2.0, agent_overrides={"target_comm": "^wall_split$"}))
    return run, box[0], lifetime[0], out_dir


def worker_samples(run: PipelineRun, pid: int) -> list:  # type: ignore[type-arg]
    return [s for s in run.samples(ProfileType.WALL, pid) if s.tid != pid]


def test_busy_and_sleep_split_30_70(wall_run: tuple[PipelineRun, int, float, Path]) -> None:
    run, pid, _, _ = wall_run
    samples = worker_samples(run, pid)
    assert samples, run.agent_counters.snapshot()
    total = sum(s.values[0] for s in samples)
    busy = sum(s.values[0] for s in samples if any(f.function == "busy_part" for f in s.frames))
    asleep = sum(s.values[0] for s in samples if any(f.function == "sleep_part" for f in s.frames))
    assert abs(100 * busy / total - 30) <= 5, (busy / total, asleep / total)
    assert abs(100 * asleep / total - 70) <= 5, (busy / total, asleep / total)
    states = {dict(s.attributes)["wall.state"] for s in samples if any(f.function == "sleep_part" for f in s.frames)}
    assert "sleeping" in states


def test_kernel_stacks_only_where_they_say_something(wall_run: tuple[PipelineRun, int, float, Path]) -> None:
    """Asleep: the kernel stack shows the sleep (schedule under the nanosleep system call).
    Rescheduled on the way back to user space ("preempted": the two busy threads share the
    two CPUs with the agent, so it happens): no kernel stack, the user stack says it all."""
    run, pid, _, _ = wall_run
    samples = worker_samples(run, pid)
    by_state: dict[str, list] = {}  # type: ignore[type-arg]
    for s in samples:
        by_state.setdefault(dict(s.attributes)["wall.state"], []).append(s)
    assert by_state.get("sleeping") and by_state.get("preempted"), sorted(by_state)
    for s in by_state["sleeping"]:
        kernel = [f.function for f in s.frames if f.frame_type == FrameType.KERNEL]
        assert "schedule" in kernel, kernel
    for s in by_state["preempted"]:
        assert not [f for f in s.frames if f.frame_type == FrameType.KERNEL], s.frames


def test_total_wall_time_per_thread_matches_elapsed(wall_run: tuple[PipelineRun, int, float, Path]) -> None:
    run, pid, _, _ = wall_run
    per_thread: dict[int, int] = {}
    for s in worker_samples(run, pid):
        per_thread[s.tid] = per_thread.get(s.tid, 0) + s.values[0]
    assert len(per_thread) == THREADS
    for tid, ns in per_thread.items():
        # Each worker runs SECONDS (its loop's own deadline) from thread start to exit.
        assert abs(ns / 1e9 - SECONDS) <= 0.05 * SECONDS, (tid, ns / 1e9)


def test_selector_kept_other_processes_out(wall_run: tuple[PipelineRun, int, float, Path]) -> None:
    run, pid, _, _ = wall_run
    assert {s.pid for s in run.samples(ProfileType.WALL)} == {pid}


def test_outputs_are_valid(wall_run: tuple[PipelineRun, int, float, Path]) -> None:
    run, _, _, out_dir = wall_run
    assert [e for r in run.requests for e in validate_request(r)] == []
    pprof_file = max(out_dir.glob("*.wall.pb.gz"), key=lambda f: f.stat().st_size)
    top = subprocess.run([str(PPROF), "-top", "-cum", str(pprof_file)], capture_output=True, text=True,
                         check=True).stdout
    assert "sleep_part" in top and "busy_part" in top


FAST_SECONDS = 8.0


@pytest.fixture(scope="module")
def fast_switch_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineRun, int, float, Path]:
    return profile_wall_split(tmp_path_factory.mktemp("wall-fast"), FAST_SECONDS, busy_ms=1, sleep_ms=4)


def test_fast_switchers_are_sampled_and_weighted(fast_switch_run: tuple[PipelineRun, int, float, Path]) -> None:
    """~1,600 sleeps per thread at ~200 switch-outs a second against a 99 Hz capture rate.

    Captured every time, nothing would be left out; left without their stacks, the uncaptured
    sleeps would make sleep_part ~55 % of the threads' time, and dropped, each thread would
    be ~40 % short of its elapsed time."""
    run, pid, _, _ = fast_switch_run
    samples = worker_samples(run, pid)
    assert samples, run.agent_counters.snapshot()
    cycles = THREADS * FAST_SECONDS / 0.005
    not_captured = run.agent_counters.get("wall_switch_outs_not_captured")
    assert 0.25 * cycles <= not_captured <= 0.75 * cycles, (not_captured, cycles, run.agent_counters.snapshot())
    assert run.agent_counters.get("wall_blocks_estimated") > 0.8 * not_captured
    total = sum(s.values[0] for s in samples)
    asleep = sum(s.values[0] for s in samples if any(f.function == "sleep_part" for f in s.frames))
    assert abs(100 * asleep / total - 80) <= 6, asleep / total
    stackless = sum(s.values[0] for s in samples if dict(s.attributes)["wall.state"] == "off-cpu-not-captured")
    assert stackless < 0.01 * total, (stackless, total)
    per_thread: dict[int, int] = {}
    for s in samples:
        per_thread[s.tid] = per_thread.get(s.tid, 0) + s.values[0]
    assert len(per_thread) == THREADS
    for tid, ns in per_thread.items():
        assert abs(ns / 1e9 - FAST_SECONDS) <= 0.05 * FAST_SECONDS, (tid, ns / 1e9)
