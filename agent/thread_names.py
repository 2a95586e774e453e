"""OS names for the agent's own threads.

Python's thread names stay inside the interpreter (before 3.14): every thread of the agent
shows as the process name in ``top -H``, ``ps -L``, ``/proc/PID/task/*/comm`` and in the
agent's own CPU profile. Naming the long-lived threads (ring pollers, the symbolization
thread, the unwind-table worker) lets an operator and the benchmarks see which one takes
the CPU without attaching a Python profiler. ``setproctitle`` does the system call.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from setproctitle import setthreadtitle


def name_os_thread(name: str | None = None) -> None:
    """Give the calling thread its OS name: ``name``, else its Python thread name (the
    kernel keeps the first 15 bytes)."""
    setthreadtitle(name or threading.current_thread().name)


def named_worker_pool(prefix: str) -> ThreadPoolExecutor:
    """A thread pool (sized as asyncio's default one) whose threads carry ``prefix_N`` as
    their OS name: set as the event loop's default executor, the ``asyncio.to_thread`` work
    (large encodes, BPF loads, metadata reads) shows under its own name, not the process's."""
    return ThreadPoolExecutor(thread_name_prefix=prefix, initializer=name_os_thread)
