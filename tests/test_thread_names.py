"""The agent's threads carry their names at the OS level (/proc/PID/task/TID/comm)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from agent.thread_names import name_os_thread, named_worker_pool


def _os_name_of_thread(target_name: str | None, python_name: str) -> str:
    seen: list[str] = []

    def run() -> None:
        name_os_thread(target_name)
        seen.append(Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip())

    thread = threading.Thread(target=run, name=python_name)
    thread.start()
    thread.join()
    return seen[0]


def test_a_thread_takes_its_python_name_at_the_os_level() -> None:
    assert _os_name_of_thread(None, "poll-cpu") == "poll-cpu"


def test_an_explicit_name_wins_and_the_kernel_keeps_15_bytes() -> None:
    assert _os_name_of_thread("unwind-tables-and-more", "ignored") == "unwind-tables-a"


def test_naming_a_thread_leaves_the_process_name_alone() -> None:
    before = Path("/proc/self/comm").read_text()
    _os_name_of_thread("symbolize_0", "symbolize_0")
    assert Path("/proc/self/comm").read_text() == before


def test_the_event_loops_named_workers_carry_their_name_at_the_os_level() -> None:
    """asyncio.to_thread work runs on threads named like the agent's others (stackfleet agent
    sets the pool as its loop's default executor)."""
    def os_name() -> str:
        return Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()

    async def main() -> str:
        asyncio.get_running_loop().set_default_executor(named_worker_pool("agent-worker"))
        return await asyncio.to_thread(os_name)

    assert asyncio.run(main()) == "agent-worker_0"
