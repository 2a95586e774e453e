"""One native unwinder for every profile type that captures user stacks.

The unwind maps (rows, processes, requests, per-CPU state: bpf/unwind.h) are defined by a
program-less BPF module, bpf/unwind_maps.bpf.c, which exports them by name to the other bcc
modules of this process; the CPU, wall and lock programs declare them extern. One
:class:`NativeUnwinder` worker serves all of them, so a file's table is built and loaded once,
whichever profile asked for it first, and a process is read from /proc once.

bcc resolves exported names process-wide and binds an extern declaration to the first live
export of that name, so the maps module is made once per process and kept for its lifetime
(``_maps_module``); :class:`SharedUnwinding` runs the worker while any actor holds it
(``acquire``/``release``, counted) and stops it with the last user. A new worker starts from
empty process and request maps (its row allocator knows nothing of earlier rows). Every
acquire and release runs under ``BCC_LOCK``: compiling an extern declaration needs the
exporting module.

:class:`ActorUnwinding` is one actor's side: the defines for its program, holding the shared
maps across its compile, falling back to frame pointers if its program does not load with
unwinding, and the program arrays that chain its stages.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any

from agent.bpf.loader import BCC_LOCK, load_program
from agent.unwind.loader import BccUnwindMaps, NativeUnwinder

log = logging.getLogger(__name__)

MAPS_SOURCE = "unwind_maps.bpf.c"


_MAPS_MODULE: Any = None
_MAPS_MODULE_ROWS = 0


def _maps_module(max_rows: int) -> Any:
    """The process's unwind maps module, compiled on first use (caller holds ``BCC_LOCK``).

    Its maps are exported by name, so a process has one, sized by its first caller: a later
    caller asking for another size gets a clear error instead of a table that is too small.
    """
    global _MAPS_MODULE, _MAPS_MODULE_ROWS
    if _MAPS_MODULE is None:
        _MAPS_MODULE = load_program(MAPS_SOURCE, {"UNWIND_MAX_ROWS": max_rows})
        _MAPS_MODULE_ROWS = max_rows
    elif max_rows != _MAPS_MODULE_ROWS:
        raise RuntimeError(f"the unwind maps of this process hold {_MAPS_MODULE_ROWS} rows; "
                           f"{max_rows} asked: one unwind_table_rows per process")
    return _MAPS_MODULE


class SharedUnwinding:
    """The agent's unwind maps and table worker, shared by the actors that unwind."""

    def __init__(self, counters: Any, max_rows: int) -> None:
        self.counters = counters
        self.max_rows = max_rows
        self._owner: Any = None  # the bcc module that defines the maps
        self.unwinder: NativeUnwinder | None = None
        self._users = 0

    def defines(self) -> dict[str, int | str]:
        """Compile-time settings of every program that includes bpf/unwind.h."""
        return {"NATIVE_UNWINDING": 1, "UNWIND_MAX_ROWS": self.max_rows, "UNWIND_SELF_TGID": os.getpid()}

    def acquire(self) -> None:
        """Make sure the maps exist and the worker runs, for one more user. Blocking (the first
        call compiles the maps module); the caller holds ``BCC_LOCK``."""
        if self._owner is None:
            self._owner = _maps_module(self.max_rows)
            self._start_worker()
        elif self.unwinder is not None and self.unwinder.failure is not None:
            log.warning("restarting the native unwinder after: %s", self.unwinder.failure)
            self.unwinder.close()
            self._start_worker()
        self._users += 1

    def release(self) -> None:
        """One user fewer; the last one stops the worker (the maps stay with the process).
        Blocking; takes ``BCC_LOCK`` itself."""
        with BCC_LOCK:
            self._users -= 1
            if self._users > 0 or self._owner is None:
                return
            self._owner = None
            unwinder, self.unwinder = self.unwinder, None
            if unwinder is not None:
                unwinder.close()

    def preload(self, pids: set[int]) -> None:
        """Have these processes loaded for unwinding before their first sample (NativeUnwinder.preload)."""
        unwinder = self.unwinder
        if unwinder is not None and pids:
            unwinder.preload(pids)

    def nudge(self) -> None:
        """Wake the worker to serve BPF's requests now (any thread)."""
        unwinder = self.unwinder
        if unwinder is not None:
            unwinder.nudge()

    def nudge_if_requested(self) -> None:
        """Wake the worker if a request waits for it (NativeUnwinder.nudge_if_requested)."""
        unwinder = self.unwinder
        if unwinder is not None:
            unwinder.nudge_if_requested()

    def check(self) -> None:
        """Raise if the worker stopped on an error (the actor's supervisor restarts the actor,
        whose next acquire replaces the worker)."""
        if self.unwinder is not None and self.unwinder.failure is not None:
            raise RuntimeError("native unwinder failed") from self.unwinder.failure

    def _start_worker(self) -> None:
        """A worker over empty process and request maps: BPF falls back to frame pointers for
        every process until this worker loads it, so no walk uses rows its allocator does not
        know about. Served before the first sample: a process's tables load while it is young."""
        self._owner["unwind_procs"].clear()
        self._owner["unwind_requests"].clear()
        self.unwinder = NativeUnwinder(BccUnwindMaps(self._owner), self.counters, self.max_rows)
        self.unwinder.start()


class ActorUnwinding:
    """One actor's use of the shared unwinder (inactive when unwinding is off)."""

    def __init__(self, shared: SharedUnwinding | None, counters: Any, type_name: str) -> None:
        self.shared = shared
        self.active = shared is not None
        self.counters = counters
        self.type_name = type_name
        self._held = False

    def defines(self) -> dict[str, int | str]:
        return self.shared.defines() if self.active and self.shared is not None else {}

    def hold(self) -> None:
        """Before the actor's program is compiled, under ``BCC_LOCK``."""
        if self.active and not self._held and self.shared is not None:
            self.shared.acquire()
            self._held = True

    def drop(self) -> None:
        """After the actor's program is gone (not under ``BCC_LOCK``)."""
        if self._held and self.shared is not None:
            self._held = False
            self.shared.release()

    def give_up(self, exc: BaseException) -> None:
        """The program did not load with unwinding (a verifier on another kernel may refuse the
        unwinder, the largest program we load): profile with frame pointers rather than not at all."""
        log.warning("%s profile without native unwinding (frame pointers only): %s", self.type_name, exc)
        self.counters.inc("unwind_unavailable", type=self.type_name)
        self.drop()
        self.active = False

    def check(self) -> None:
        if self._held and self.shared is not None:
            self.shared.check()

    def nudge(self) -> None:
        """Something new was sampled (a new stack may come with an unwind request): wake the
        worker (any thread)."""
        if self._held and self.shared is not None:
            self.shared.nudge()

    def nudge_if_requested(self) -> None:
        """At each flush: wake the worker if this or another program left a request."""
        if self._held and self.shared is not None:
            self.shared.nudge_if_requested()


def chain_stages(bpf: Any, array: str, stages: list[tuple[str, int]]) -> None:
    """Load each (function, program type) and put it in its slot of the program array
    ``array``, last slot first: a stage's successor is in place before it can be called."""
    for slot in reversed(range(len(stages))):
        name, prog_type = stages[slot]
        fn = bpf.load_func(name, prog_type)
        bpf[array][ctypes.c_int(slot)] = ctypes.c_int(fn.fd)
