"""The example NATS permissions (deploy/nats/accounts.conf) with a real nats-server: an agent
delivers its own host's profiles end to end (JetStream, resync, aggregator), and cannot
publish as another host — neither through the agent's publisher nor with a raw client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest

from agent.publish.publisher import Publisher
from agent.settings import AgentSettings
from aggregator.delivery.exported_messages import ExportedMessages
from aggregator.delivery.peer_markers import PeerMarkers
from aggregator.service import run_aggregator
from aggregator.settings import AggregatorSettings
from shared.counters import Counters
from shared.jetstream import StreamSettings
from shared.nats_connection import NatsSettings
from shared.profile_types import ProfileType
from shared.subjects import samples_subject
from stackfleet.nats_server import NatsServer
from tests.test_export_durability import PERIOD, cpu_samples, wait_for

ACCOUNTS = Path(__file__).resolve().parent.parent / "deploy" / "nats" / "accounts.conf"
PASSWORDS = {"WEB_01_PASSWORD": "pw-web-01", "WEB_02_PASSWORD": "pw-web-02", "AGGREGATOR_PASSWORD": "pw-agg"}


def _secured_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accounts: str) -> NatsServer:
    """A nats-server with JetStream and the given accounts (users, passwords, permissions)."""
    for name, value in PASSWORDS.items():
        monkeypatch.setenv(name, value)  # the server reads them from its environment
    (tmp_path / "accounts.conf").write_text(accounts)  # nats-server includes relative paths only
    conf = tmp_path / "server.conf"
    conf.write_text(f'jetstream {{ store_dir: "{tmp_path / "js"}" }}\ninclude "accounts.conf"\n')
    return NatsServer(jetstream=False, extra_args=["-c", str(conf)])


@pytest.fixture
def secured_nats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> NatsServer:
    return _secured_server(tmp_path, monkeypatch, ACCOUNTS.read_text())


def _nats(url: str, user: str, password: str) -> NatsSettings:
    return NatsSettings(url=url, user=user, password=password, jetstream_timeout_s=1.0)


def _start_aggregator(server: NatsServer, out: Path) -> tuple[asyncio.Task[Counters], Counters, asyncio.Event]:
    """The aggregator with the example's aggregator user, exporting every 0.5 s to ``out``."""
    counters, stop = Counters(), asyncio.Event()
    task = asyncio.create_task(run_aggregator(AggregatorSettings(
        nats=_nats(server.url, "aggregator", "pw-agg"), otlp_endpoint="", output_dir=out,
        export_interval_s=0.5, web_address=""), stop, counters))
    return task, counters, stop


async def _publish_as_web_01(server: NatsServer, counters: Counters) -> None:
    """web-01's real agent publishes 5 batches of 10 CPU samples and closes."""
    agent = Publisher(AgentSettings(nats=_nats(server.url, "web-01", "pw-web-01"), host_name="web-01"), counters)
    await agent.start()
    for _ in range(5):
        await agent.submit(ProfileType.CPU, cpu_samples(10), PERIOD)
    await agent.close()


async def test_each_agent_publishes_only_as_its_own_host(secured_nats: NatsServer, tmp_path: Path) -> None:
    with secured_nats as server:
        aggregator, agg_counters, stop = _start_aggregator(server, tmp_path / "out")
        # The real agent of web-01: everything arrives.
        honest_counters = Counters()
        await _publish_as_web_01(server, honest_counters)
        assert honest_counters.get("samples_published") == 50, honest_counters.snapshot()
        assert await wait_for(lambda: agg_counters.get("samples_received") == 50, 20), agg_counters.snapshot()

        # web-01's credentials used to pose as web-02: the server refuses every publish.
        forger_counters = Counters()
        forger = Publisher(AgentSettings(nats=_nats(server.url, "web-01", "pw-web-01"), host_name="web-02"),
                           forger_counters)
        await forger.start()
        await forger.submit(ProfileType.CPU, cpu_samples(10), PERIOD)
        assert await wait_for(lambda: forger_counters.get("publish_errors") > 0, 20), forger_counters.snapshot()
        await forger.close(timeout_s=1.0)
        assert forger_counters.get("samples_published") == 0
        assert forger_counters.get("nats_errors") > 0, forger_counters.snapshot()  # the violations, counted

        raw = await nats.connect(server.url, user="web-01", password="pw-web-01")
        violations: list[str] = []

        async def on_error(exc: Exception) -> None:
            violations.append(str(exc))

        raw._error_cb = on_error
        await raw.publish(samples_subject(ProfileType.CPU, "web-02"), b"\x93forged")
        await raw.flush()
        assert await wait_for(lambda: any("ermissions" in v for v in violations), 10), violations
        await raw.close()

        await asyncio.sleep(1.5)  # two export intervals: nothing of web-02 may have arrived
        stop.set()
        await asyncio.wait_for(aggregator, 30)

        # Another replica, with the aggregator's permissions, reads the shared export markers.
        peer = await nats.connect(server.url, user="aggregator", password="pw-agg")
        peer_counters = Counters()
        peer_markers = await PeerMarkers.open(peer.jetstream(), StreamSettings(), ExportedMessages(),
                                              peer_counters, timeout_s=5.0)
        assert await peer_markers.refresh() >= 1, peer_counters.snapshot()
        await peer.close()
    assert agg_counters.get("samples_received") == 50
    assert agg_counters.get("messages_rejected") == 0, agg_counters.snapshot()
    assert agg_counters.get("export_markers_shared") >= 1, agg_counters.snapshot()
    assert agg_counters.get("export_markers_unshared") == 0, agg_counters.snapshot()


async def test_aggregator_without_the_marker_bucket_permission_still_consumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An older permission set without the shared export-marker bucket's subjects: the markers
    cannot be shared (counted, logged) and the aggregator goes on consuming and exporting,
    exactly-once per replica only."""
    accounts = ACCOUNTS.read_text().replace('"$KV.stackfleet-exports.>", ', "")
    assert "$KV.stackfleet-exports" not in accounts.split("# replicas share")[-1]
    with _secured_server(tmp_path, monkeypatch, accounts) as server:
        aggregator, agg_counters, stop = _start_aggregator(server, tmp_path / "out")
        await _publish_as_web_01(server, Counters())
        assert await wait_for(lambda: agg_counters.get("samples_received") == 50, 30), agg_counters.snapshot()
        stop.set()
        await asyncio.wait_for(aggregator, 30)
    # The puts fail (permission violation: no reply), counted; intake and export went on.
    assert agg_counters.get("export_markers_unshared") >= 1, agg_counters.snapshot()
    assert agg_counters.get("export_markers_shared") == 0
    assert agg_counters.get("exports") >= 1
