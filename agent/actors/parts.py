"""The parts a BPF profile actor is composed of (agent/actors/base.py's ``BpfActor``).

An actor's BPF program is compiled with the defines of its parts and, once loaded, each part
sets up what it owns in the program:

- a record source (agent/actors/sources.py: a ring buffer; agent/actors/aggregated.py: the
  aggregation maps), which the actor drains once per flush;
- :class:`TargetFilter`: the program traces only the processes the selectors match
  (bpf/targets.h), kept in step with the shared process watcher;
- :class:`PythonFrames`: the program walks CPython frames (bpf/python.h), and the actor keeps
  its ``py_procs`` map filled and splices the frames into stacks.

An actor lists the parts it has; nothing is switched on or off by flags.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, ClassVar

from agent.process.selectors import ProcessSelector, sync_targets
from agent.runtimes.python import PythonStacks

if TYPE_CHECKING:
    from agent.actors.base import ActorContext
    from shared.profile_types import ProfileType


class ProgramPart:
    """One piece of an actor's BPF program: its compile-time defines, its set-up once loaded."""

    def defines(self) -> dict[str, int | str]:
        """``-D`` defines the part needs in the program."""
        return {}

    def open(self, bpf: Any) -> None:
        """Set up in the loaded program before the actor attaches its events (blocking; runs
        with ``BCC_LOCK`` held)."""

    def ready(self, bpf: Any) -> None:
        """Set up after the program is attached (blocking; a worker thread, lock not held)."""

    def close(self) -> None:
        """Let go of what ``open`` set up, before the program is detached (blocking; idempotent)."""


class TargetFilter(ProgramPart):
    """Programs including bpf/targets.h: only processes the selectors match are traced.

    With no selector every user process is traced but the agent. With selectors the BPF
    ``targets`` map is made equal to the matching tgids at load and then every
    ``SYNC_INTERVAL_S`` (from the shared watcher's latest scan), so new processes are traced
    from the next sync on, at most this late. Newly selected processes are handed to the
    native unwinder first, to be loaded before their first traced event (its stack would
    otherwise be walked without their tables).
    """

    SYNC_INTERVAL_S: ClassVar[float] = 1.0

    def __init__(self, ctx: ActorContext) -> None:
        self.ctx = ctx
        self.selector = ProcessSelector.from_settings(ctx.settings)
        self._map: Any = None
        self._targets: set[int] = set()
        self._synced = 0.0

    def defines(self) -> dict[str, int | str]:
        return {"AGENT_TGID": os.getpid(), "TARGET_FILTER": int(self.selector.filters)}

    def ready(self, bpf: Any) -> None:
        if self.selector.filters:
            self._map = bpf["targets"]
            self._sync()

    def sync(self) -> None:
        """Bring the targets map up to date, at most every SYNC_INTERVAL_S (blocking: on the
        symbolization thread)."""
        if self._map is not None and time.monotonic() - self._synced >= self.SYNC_INTERVAL_S:
            self._sync()

    def _sync(self) -> None:
        snapshot = self.ctx.processes.current(self.SYNC_INTERVAL_S)
        wanted = set(snapshot.selected or ())
        if self.ctx.unwinding is not None:
            self.ctx.unwinding.preload(wanted - self._targets)
        self._targets = sync_targets(self.selector, self._map, self._targets, self.ctx.counters, wanted)
        self._synced = time.monotonic()


class PythonFrames(ProgramPart):
    """Programs whose stacks get CPython frames (bpf/python.h through bpf/stack_event.h).

    ``own_program`` False: the stacks come from another actor's program, which reads the frames
    with its own ``py_procs`` map (the lock profile's waits taken by the wall program): this actor
    only splices them."""

    def __init__(self, ctx: ActorContext, profile_type: ProfileType, own_program: bool = True) -> None:
        self.ctx = ctx
        self.profile_type = profile_type
        self.own_program = own_program
        self.stacks: PythonStacks | None = None  # once the program is loaded

    def defines(self) -> dict[str, int | str]:
        return {"PYTHON_FRAMES": 1} if self.own_program else {}

    def ready(self, bpf: Any) -> None:
        table = bpf["py_procs"] if self.own_program else None
        self.stacks = PythonStacks(self.ctx.python, table, self.ctx.counters, self.profile_type.value)
