"""The per-CPU capture budget (bpf/event_capture.h) engaged on the real kernel, with known answers.

One agent run, wall and lock, with ``capture_budget_per_cpu_hz`` = 10 (one capture per CPU per
100 ms window, hard cap two): far below what the workloads ask for, so most switch-outs and
waits are not captured and their time is shared out by inverse-probability weights.

- wall_split, two threads 1 ms busy / 4 ms asleep (~200 switch-outs a second each, ~400
  wanted captures a second against a budget of ~20): the busy/asleep split is still within 3
  points of the threads' own clocks and each thread's total within 5 % of its life
  (integration/test_wall_profile.py's check), and the uncaptured switch-outs are counted.
- lock_contention, 4 threads x 200 waits on one mutex: the delay recorded at the mutex's
  address is within 5 % of the program's own clock; every sample there is a mutex wait under
  contend_lock or, where a thread's waits in a flush window had no capture at all, a
  stackless sample labelled ``lock.stack=not-captured``; the waits not captured are counted.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from integration.harness import PipelineRun, build_c, run_pipeline
from integration.test_wall_profile import THREADS, Own, WallRun, check_split_and_totals
from shared.lock_waits import LOCK_WAIT_KIND
from shared.profile_types import ProfileType
from stackfleet.nats_server import NatsServer

BUDGET_HZ = 10
WALL_SECONDS = 6.0


@dataclass
class BudgetRun:
    run: PipelineRun
    wall: WallRun
    lock_pid: int
    lock_own: dict[str, int]


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory: pytest.TempPathFactory) -> BudgetRun:
    tmp = tmp_path_factory.mktemp("budget")
    wall_exe, lock_exe = build_c("wall_split.c", tmp), build_c("lock_contention.c", tmp)
    pids: dict[str, int] = {}
    outputs: dict[str, str] = {}

    async def workload(run: PipelineRun) -> None:
        wall = await asyncio.create_subprocess_exec(str(wall_exe), str(WALL_SECONDS), str(THREADS), "1", "4", "0",
                                                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        lock = await asyncio.create_subprocess_exec(str(lock_exe), "4", "200", "2000", "gate",
                                                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        pids["wall"], pids["lock"] = wall.pid, lock.pid
        # Both in the target map (1 s scans) and loaded for unwinding (when selected) before
        # either starts, as in the single-type tests: lock_contention's warm-up waits in the
        # exported samples of its own pid show the selection happened (a counter would also
        # count other runs' processes with these names).
        await asyncio.sleep(2.0)
        deadline = asyncio.get_running_loop().time() + 120
        while not run.samples(ProfileType.LOCK, lock.pid):
            assert asyncio.get_running_loop().time() < deadline, run.agent_counters.snapshot()
            await asyncio.sleep(0.1)
        (wall_out, _), (lock_out, _) = await asyncio.gather(wall.communicate(b"go\n"), lock.communicate(b"go\n"))
        assert wall.returncode == 0 and lock.returncode == 0
        outputs["wall"], outputs["lock"] = wall_out.decode(), lock_out.decode()

    with NatsServer() as nats:
        run = asyncio.run(run_pipeline(
            nats.url, [ProfileType.WALL, ProfileType.LOCK], workload, export_interval_s=2.0,
            agent_overrides={"target_comm": "^(wall_split|lock_contention)$", "capture_budget_per_cpu_hz": BUDGET_HZ}))
    own = {}
    for line in outputs["wall"].splitlines():
        words = line.split()
        if words[0] == "worker":  # worker <tid> busy_ns <n> sleep_ns <n> life_ns <n> cycles <n>
            own[int(words[1])] = Own(int(words[3]), int(words[5]), int(words[7]), int(words[9]))
    lock_own = {name: int(value) for name, value in (line.split() for line in outputs["lock"].splitlines())}
    return BudgetRun(run, WallRun(run, pids["wall"], own, tmp), pids["lock"], lock_own)


def test_wall_split_holds_with_the_budget_engaged(budget_run: BudgetRun) -> None:
    counters = budget_run.run.agent_counters
    captured = counters.get("stack_captures", type="wall", result="captured")
    sampled_out = counters.get("stack_captures", type="wall", result="sampled_out")
    assert captured > 0 and sampled_out > 5 * captured, counters.snapshot()
    assert counters.get("wall_blocks_estimated") > 0
    check_split_and_totals(budget_run.wall)


def test_mutex_delay_holds_with_the_budget_engaged(budget_run: BudgetRun) -> None:
    counters = budget_run.run.agent_counters
    captured = counters.get("stack_captures", type="lock", result="captured")
    assert 0 < captured < counters.get("stack_captures", type="lock", result="sampled_out"), counters.snapshot()
    assert counters.get("lock_waits_estimated") > 0
    samples = budget_run.run.samples(ProfileType.LOCK, budget_run.lock_pid)
    under_contend = [s for s in samples if any(f.function == "contend_lock" for f in s.frames)]
    addresses = {dict(s.attributes)["lock.address"] for s in under_contend}
    assert len(addresses) == 1, addresses  # one mutex
    at_mutex = [s for s in samples if dict(s.attributes)["lock.address"] in addresses]
    for s in at_mutex:
        attributes = dict(s.attributes)
        assert (s in under_contend and attributes[LOCK_WAIT_KIND] == "mutex") or \
            (not s.frames and attributes.get("lock.stack") == "not-captured"), (attributes, s.frames)
    delay, own = sum(s.values[1] for s in at_mutex), budget_run.lock_own["wait_ns"]
    assert abs(delay - own) <= 0.05 * own, (delay, own)
    # Most of it is on the mutex's stack, not in the stackless remainder.
    assert sum(s.values[1] for s in under_contend) >= 0.8 * own, (sum(s.values[1] for s in under_contend), own)
