"""The lock profile's maps when its waits come from the wall program's switch-outs.

With the wall and lock profiles both on (and ``lock_waits_from_wall``), the lock actor loads no
program: the wall program reads each sleeping switch-out's system call from its saved registers
and records futex waits into the lock maps (bpf/lock_from_switch.h). Those maps are defined by a
program-less module, bpf/lock_maps.bpf.c, made once per agent process and kept for its lifetime
(bcc binds an extern declaration to the first live export of a name, as for the unwind maps:
agent/unwind/sharing.py), so either actor can start or restart first. The lock actor reads them
through :class:`LockMapsView`, under the names its own program gives the same maps, and drains
them as it drains its own program's.
"""

from __future__ import annotations

from typing import Any, ClassVar

from agent.bpf.loader import load_program
from agent.settings import AgentSettings
from shared.profile_types import ProfileType

LOCK_MAPS_SOURCE = "lock_maps.bpf.c"

_MODULE: Any = None
_MODULE_SIZES: tuple[int, int] = (0, 0)


def lock_waits_from_switches(settings: AgentSettings) -> bool:
    """Whether the wall program records the lock profile's waits in this agent."""
    return (settings.lock_waits_from_wall and ProfileType.WALL in settings.types
            and ProfileType.LOCK in settings.types)


def lock_maps_defines(settings: AgentSettings) -> dict[str, int | str]:
    """The lock maps' sizes, for their module and for the wall program that declares them."""
    return {"LOCK_AGG_ENTRIES": settings.agg_map_entries, "LOCK_STACK_ENTRIES": settings.agg_stack_entries}


def shared_lock_maps(settings: AgentSettings) -> Any:
    """The process's lock maps module, compiled on first use (the caller holds ``BCC_LOCK``).

    Sized by its first caller; a later caller asking for other sizes gets a clear error rather
    than maps of a size it did not ask for."""
    global _MODULE, _MODULE_SIZES
    sizes = (settings.agg_map_entries, settings.agg_stack_entries)
    if _MODULE is None:
        _MODULE = load_program(LOCK_MAPS_SOURCE, lock_maps_defines(settings))
        _MODULE_SIZES = sizes
    elif sizes != _MODULE_SIZES:
        raise RuntimeError(f"the lock maps of this process hold {_MODULE_SIZES[0]} entries and "
                           f"{_MODULE_SIZES[1]} stacks; {sizes[0]} and {sizes[1]} asked: "
                           "one agg_map_entries and agg_stack_entries per process")
    return _MODULE


class LockMapsView:
    """The shared lock maps under the names of the lock program's own maps (bpf/lock_maps.h)."""

    NAMES: ClassVar[dict[str, str]] = {"agg0": "lock_agg0", "agg1": "lock_agg1",
                                       "agg_generation": "lock_agg_generation", "stacks": "lock_stacks",
                                       "counters": "lock_counters"}

    def __init__(self, module: Any) -> None:
        self.module = module

    def __getitem__(self, name: str) -> Any:
        return self.module[self.NAMES[name]]
