"""A killed actor comes back under the supervisor while the other actors keep profiling."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from integration.harness import PipelineRun, build_c, run_pipeline
from shared.profile_types import ProfileType
from stackfleet.nats_server import NatsServer


def test_killed_cpu_actor_restarts_and_lock_is_unaffected(tmp_path: Path) -> None:
    exe = build_c("lock_contention.c", tmp_path)
    busy = build_c("cpu_chain.c", tmp_path)
    box: dict[str, Any] = {}
    lock_during_outage: list[int] = []
    busy_pid: list[int] = []

    async def workload(run: PipelineRun) -> None:
        sup = box["supervisor"]
        proc = await asyncio.create_subprocess_exec(str(exe), "4", "600", "2000", stdout=asyncio.subprocess.PIPE)
        await asyncio.sleep(1.0)
        before = run.agent_counters.get("samples_collected", type="lock")
        sup.current[ProfileType.CPU].cancel()  # kill the CPU actor's task from outside
        # While the CPU actor is down (1 s backoff, then its BPF recompile: seconds, more on a
        # busy host), the lock actor keeps collecting. Waited for, not timed.
        deadline = asyncio.get_running_loop().time() + 180
        while run.agent_counters.get("actor_started", type="cpu") < 2:
            if not lock_during_outage and run.agent_counters.get("samples_collected", type="lock") > before:
                lock_during_outage.append(run.agent_counters.get("actor_started", type="cpu"))
            assert asyncio.get_running_loop().time() < deadline, "CPU actor did not come back in 180 s"
            await asyncio.sleep(0.1)
        await proc.communicate()
        # Then the restarted CPU actor gets known work to profile.
        after = await asyncio.create_subprocess_exec(str(busy), "2", "1", stdout=asyncio.subprocess.PIPE)
        busy_pid.append(after.pid)
        await after.communicate()

    with NatsServer() as nats:
        run = asyncio.run(run_pipeline(nats.url, [ProfileType.CPU, ProfileType.LOCK], workload,
                                       export_interval_s=1.0,
                                       on_supervisor=lambda sup: box.__setitem__("supervisor", sup)))
    c = run.agent_counters
    assert c.get("actor_restarts", type="cpu") == 1 and c.get("actor_restarts", type="lock") == 0
    assert c.get("actor_started", type="cpu") == 2 and c.get("actor_started", type="lock") == 1
    assert lock_during_outage == [1], "lock actor collected nothing while the CPU actor was down"
    # The restarted actor profiles work started after it came back (2 s of one busy thread).
    hot = sum(len(s.timestamps_ns) for s in run.samples(ProfileType.CPU, busy_pid[0])
              if any(f.function == "hot_leaf" for f in s.frames))
    assert hot >= 50, f"restarted CPU actor saw {hot} samples of a 2 s busy loop (~198 expected)"
