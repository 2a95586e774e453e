"""Which processes run on the host now: the one listing of /proc the agent's scanners share.

The selectors (wall, lock, heap), the goroutine actor, the Go heap reader, the heap sampler's
library scan and the metadata resolver each look at /proc on their own schedule; they all list
it here, so "a running process" means the same everywhere: a numeric entry of /proc, which is
a thread-group id (threads are not listed at its top level).
"""

from __future__ import annotations

import os


def running_pids(proc: str = "/proc") -> set[int]:
    """Tgids of the processes in ``proc`` now; raises OSError when ``proc`` cannot be listed."""
    return {int(name) for name in os.listdir(proc) if name.isdigit()}
