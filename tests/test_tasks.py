"""cancel_and_wait: a cancellation lost inside a task (as Python 3.11's wait_for can lose
one) does not leave the caller waiting forever."""

from __future__ import annotations

import asyncio

from shared.tasks import cancel_and_wait


async def test_a_lost_cancellation_is_repeated_until_the_task_ends() -> None:
    lost = 0

    async def loop_that_loses_one_cancel() -> None:
        nonlocal lost
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if lost == 0:  # the first cancel is swallowed, as wait_for may do on 3.11
                    lost += 1
                    continue
                raise

    task = asyncio.create_task(loop_that_loses_one_cancel())
    await asyncio.sleep(0)
    task.cancel()  # what a single cancel + gather would rely on
    done, _ = await asyncio.wait({task}, timeout=0.3)
    assert not done and lost == 1, "the test task should have survived one cancel"
    await asyncio.wait_for(cancel_and_wait(task, retry_after_s=0.1), 5)
    assert task.cancelled()


async def test_tasks_that_end_on_the_first_cancel_and_finished_tasks_are_fine() -> None:
    finished = asyncio.create_task(asyncio.sleep(0))
    await finished
    sleeper = asyncio.create_task(asyncio.sleep(3600))
    await asyncio.wait_for(cancel_and_wait([finished, sleeper]), 5)
    assert sleeper.cancelled() and finished.done()
