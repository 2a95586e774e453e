"""`stackfleet top` in a pseudo-terminal: an ad-hoc NATS subscriber shows the hot function.

A real agent profiles cpu_chain (hot_leaf); `stackfleet top` runs as its own process on a
pty, subscribed only to the public subjects (no aggregator), and its screen must show
hot_leaf.
"""

from __future__ import annotations

import asyncio
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from integration.harness import PipelineRun, build_c, run_pipeline
from shared.profile_types import ProfileType
from stackfleet.nats_server import NatsServer

STACKFLEET = str(Path(sys.executable).parent / "stackfleet")


def read_pty_until(fd: int, proc: subprocess.Popen[bytes], text: str, timeout_s: float) -> str:
    """The terminal's output until ``text`` is on it, the process exits or the timeout passes."""
    out = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None and text.encode() not in out:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                out += os.read(fd, 65536)
            except OSError:
                break
    return out.decode("utf-8", "replace")


def test_top_shows_the_hot_function_in_a_terminal(tmp_path: Path) -> None:
    exe = build_c("cpu_chain.c", tmp_path)
    screen: list[str] = []

    async def workload(run: PipelineRun) -> None:
        # Both run long enough for a loaded machine; each is stopped once the screen shows hot_leaf.
        proc = await asyncio.create_subprocess_exec(str(exe), "60", "1", stdout=asyncio.subprocess.PIPE)
        main_fd, child_fd = pty.openpty()
        top = subprocess.Popen([STACKFLEET, "top", "--nats", nats.url, "--duration", "50", "--window", "5"],
                               stdin=child_fd, stdout=child_fd, stderr=child_fd, env={**os.environ, "COLUMNS": "160"})
        os.close(child_fd)
        screen.append(await asyncio.to_thread(read_pty_until, main_fd, top, "hot_leaf", 55))
        top.terminate()
        top.wait(10)
        os.close(main_fd)
        proc.kill()
        await proc.communicate()

    with NatsServer() as nats:
        asyncio.run(run_pipeline(nats.url, [ProfileType.CPU], workload, export_interval_s=2.0))
    text = screen[0]
    assert "stackfleet top" in text, text[-2000:]
    assert "hot_leaf" in text, text[-2000:]
