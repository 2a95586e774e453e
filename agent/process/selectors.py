"""Which processes the event-tracing actors (wall, lock, heap) look at.

Selectors come from settings: explicit pids, a regular expression on the process name
(``comm``), and a cgroup path prefix (e.g. ``/system.slice/nginx.service`` or a Kubernetes
pod's cgroup). With no selector every user process is traced (the agent excludes itself).
With selectors, the process watcher's periodic /proc scan (agent/process/watcher.py) matches
them once for all actors, and each actor keeps its BPF ``targets`` map (bpf/targets.h) equal
to the matching tgids, so new processes are picked up within one scan interval.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.process.watcher import running_pids
from shared.counters import Counters

if TYPE_CHECKING:
    from agent.settings import AgentSettings


@dataclass
class ProcessSelector:
    """A set of criteria; a process matches when it matches any given criterion."""

    pids: list[int] = field(default_factory=list)
    comm_pattern: str | None = None
    cgroup_prefix: str | None = None

    @classmethod
    def from_settings(cls, settings: AgentSettings) -> ProcessSelector:
        """The selectors the agent is configured with (``target_pids``, ``_comm``, ``_cgroup``)."""
        return cls(list(settings.target_pids), settings.target_comm, settings.target_cgroup)

    def __post_init__(self) -> None:
        self._comm = re.compile(self.comm_pattern) if self.comm_pattern else None

    @property
    def filters(self) -> bool:
        """False when no criterion is set: then every user process is traced."""
        return bool(self.pids or self._comm or self.cgroup_prefix)

    def matches(self, pid: int) -> bool:
        if pid in self.pids:
            return True
        if self._comm is not None:
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if self._comm.search(f.read().strip()):
                        return True
            except OSError:
                return False
        if self.cgroup_prefix:
            try:
                with open(f"/proc/{pid}/cgroup") as f:
                    for line in f:
                        if line.rstrip("\n").split(":", 2)[-1].startswith(self.cgroup_prefix):
                            return True
            except OSError:
                return False
        return False

    def scan(self) -> set[int]:
        """Tgids of running processes that match (threads are covered by their tgid)."""
        return {pid for pid in running_pids() if self.matches(pid)}


def sync_targets(selector: ProcessSelector, bpf_map: Any, current: set[int], counters: Counters,
                 wanted: set[int] | None = None) -> set[int]:
    """Make the BPF targets map hold exactly the matching tgids (``wanted``, when the caller
    has matched them already: the process watcher's scan); returns the new set."""
    import ctypes

    if wanted is None:
        wanted = selector.scan()
    for pid in wanted - current:
        try:
            bpf_map[ctypes.c_uint32(pid)] = ctypes.c_uint8(1)
        except Exception:  # map full: counted, the process is simply not traced
            counters.inc("target_map_full")
    for pid in current - wanted:
        try:
            del bpf_map[ctypes.c_uint32(pid)]
        except KeyError:
            pass
    return wanted
