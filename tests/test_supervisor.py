"""The supervisor restarts a failing actor with backoff while the others keep running."""

from __future__ import annotations

import asyncio

from agent.actors.base import ProfileActor
from agent.supervisor import Supervisor
from shared.counters import Counters
from shared.profile_types import ProfileType


class Steady(ProfileActor):
    profile_type = ProfileType.CPU
    starts = 0
    stopped_cleanly = 0

    async def run(self) -> None:
        Steady.starts += 1
        try:
            await asyncio.Event().wait()
        finally:
            Steady.stopped_cleanly += 1


class Flaky(ProfileActor):
    profile_type = ProfileType.WALL
    starts = 0

    async def run(self) -> None:
        Flaky.starts += 1
        await asyncio.sleep(0.01)
        raise RuntimeError("boom")


async def test_failed_actor_is_restarted_with_backoff_others_unaffected() -> None:
    counters = Counters()
    sup = Supervisor({ProfileType.CPU: lambda: Steady(None),  # type: ignore[arg-type]
                      ProfileType.WALL: lambda: Flaky(None)},  # type: ignore[arg-type]
                     counters, backoff_initial_s=0.05, backoff_max_s=0.2)
    stop = asyncio.Event()
    task = asyncio.create_task(sup.run(stop))
    await asyncio.sleep(0.6)
    stop.set()
    await asyncio.wait_for(task, 5)
    # 0.05 + 0.1 + 0.2 + 0.2 ... backoff: a handful of restarts in 0.6 s, not hundreds.
    assert 3 <= Flaky.starts <= 7, Flaky.starts
    assert counters.get("actor_restarts", type="wall") == sup.restarts[ProfileType.WALL] >= 2
    assert Steady.starts == 1 and Steady.stopped_cleanly == 1
    assert counters.get("actor_restarts", type="cpu") == 0


async def test_killed_actor_task_comes_back() -> None:
    Steady.starts = Steady.stopped_cleanly = 0
    counters = Counters()
    sup = Supervisor({ProfileType.CPU: lambda: Steady(None)}, counters,  # type: ignore[arg-type]
                     backoff_initial_s=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(sup.run(stop))
    await asyncio.sleep(0.1)
    sup.current[ProfileType.CPU].cancel()  # someone kills the actor's task
    await asyncio.sleep(0.3)
    assert Steady.starts == 2
    stop.set()
    await asyncio.wait_for(task, 5)
    assert Steady.stopped_cleanly == 2
