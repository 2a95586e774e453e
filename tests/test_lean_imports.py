"""The agent process leaves out nats-py's WebSocket dependency and still talks to NATS."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agent.settings import AgentSettings
from stackfleet.nats_server import NatsServer

PROBE = """
import asyncio, sys
from agent.lean_imports import skip_unused_imports
assert skip_unused_imports()
import nats

async def main(url):
    nc = await nats.connect(url)
    sub = await nc.subscribe("probe")
    await nc.publish("probe", b"hello")
    msg = await sub.next_msg(timeout=5)
    await nc.close()
    return msg.data

print(asyncio.run(main(sys.argv[1])).decode(), sys.modules.get("aiohttp"))
"""


def test_agent_imports_skip_aiohttp_and_nats_still_works() -> None:
    with NatsServer(jetstream=False) as server:
        out = subprocess.run([sys.executable, "-c", PROBE, server.url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["hello", "None"]  # delivered, and aiohttp never loaded


def test_agent_refuses_websocket_urls() -> None:
    with pytest.raises(ValueError, match="over TCP"):
        AgentSettings(nats={"url": "nats://a:4222,wss://b:443"})
