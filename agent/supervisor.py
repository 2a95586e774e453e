"""The supervisor: one asyncio task per actor, restarted with backoff when it fails.

An actor that raises is logged with its traceback, counted, and started again after a
backoff that doubles up to a cap (and resets once the actor has stayed up for a while),
while the other actors keep running. Stopping cancels every actor and waits for each to
detach its BPF program and flush its last batch.

The supervisor also runs the process watcher the actors share (agent/process/watcher.py):
its periodic /proc scan lives as long as the actors do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from agent.actors.base import ProfileActor
from agent.process.watcher import ProcessWatcher
from shared.counters import Counters
from shared.profile_types import ProfileType

log = logging.getLogger(__name__)

HEALTHY_AFTER_S = 60.0


class Supervisor:
    """Owns the actor tasks; ``run`` returns after ``stop`` is set and every actor has stopped."""

    def __init__(
        self,
        factories: dict[ProfileType, Callable[[], ProfileActor]],
        counters: Counters,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 30.0,
        processes: ProcessWatcher | None = None,
    ) -> None:
        self.factories = factories
        self.processes = processes
        self.counters = counters
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.tasks: dict[ProfileType, asyncio.Task[None]] = {}
        self.current: dict[ProfileType, asyncio.Task[None]] = {}
        self.restarts: dict[ProfileType, int] = dict.fromkeys(factories, 0)

    async def run(self, stop: asyncio.Event) -> None:
        watching = None
        if self.processes is not None:
            watching = asyncio.create_task(self.processes.run(stop), name="process-watcher")
        for ptype in self.factories:
            self.tasks[ptype] = asyncio.create_task(self._supervise(ptype, stop), name=f"supervise-{ptype}")
        await stop.wait()
        for task in self.current.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        if watching is not None:
            await asyncio.gather(watching, return_exceptions=True)

    async def _supervise(self, ptype: ProfileType, stop: asyncio.Event) -> None:
        backoff = self.backoff_initial_s
        while not stop.is_set():
            actor = self.factories[ptype]()
            started = time.monotonic()
            task = asyncio.create_task(actor.run(), name=f"actor-{ptype}")
            self.current[ptype] = task
            try:
                await task
                if stop.is_set():
                    return
                log.error("%s actor returned unexpectedly; restarting", ptype)
            except asyncio.CancelledError:
                if stop.is_set():
                    return
                log.error("%s actor was cancelled from outside; restarting", ptype)
            except Exception:
                log.exception("%s actor failed", ptype)
            self.restarts[ptype] += 1
            self.counters.inc("actor_restarts", type=ptype.value)
            if time.monotonic() - started > HEALTHY_AFTER_S:
                backoff = self.backoff_initial_s
            log.info("restarting %s actor in %.1fs", ptype, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, self.backoff_max_s)
