"""Stopping asyncio tasks reliably on Python 3.11.

On 3.11 ``asyncio.wait_for`` can swallow a cancellation that arrives in the same loop step
in which the awaited future completes (fixed in 3.12; the system interpreter that carries
bcc here is 3.11). nats-py awaits through ``wait_for`` on every request and fetch, so a
single ``task.cancel()`` on a publishing or pulling loop is sometimes lost, the loop goes
on, and whoever awaits the task waits forever. :func:`cancel_and_wait` cancels again until
the task has really finished.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object]] | asyncio.Task[object],
                          retry_after_s: float = 0.5) -> None:
    """Cancel ``tasks`` and wait until every one is done, repeating a cancel that was lost.

    Exceptions of the tasks are not raised here (they were cancelled on purpose); a task
    that needed more than one cancel is logged at debug level.
    """
    pending = {tasks} if isinstance(tasks, asyncio.Task) else set(tasks)
    attempts = 0
    while pending:
        for task in pending:
            task.cancel()
        attempts += 1
        _, pending = await asyncio.wait(pending, timeout=retry_after_s)
        if pending:
            log.debug("%d task(s) still running after cancel #%d: %s", len(pending), attempts,
                      [t.get_name() for t in pending])
