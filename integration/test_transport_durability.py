"""Transport durability with a real nats-server (JetStream), real BPF and a real aggregator process.

1. NATS is stopped for 60 s mid-run and restarted on the same store: the agent keeps
   sampling into its outbox and delivers it afterwards, so the aggregator's exported
   files hold every sample the agent produced (drop counters are zero at default bounds)
   and a steady CPU workload shows no gap in per-5-second sample counts.
2. The aggregator is SIGKILLed mid-run and restarted: the shared durable consumer
   redelivers what the dead process had not exported, so again nothing is missing.

Both compare what the agent published with the samples in the aggregator's .otlp.pb
files exactly, as sets of (pid, tid, timestamp) and against the agent's count of
JetStream-acknowledged samples (see integration/durability.py). Per-5-second counts of the
steady workload are printed too, but not asserted: on a loaded machine the workload (or
the agent's own sampling) can stall for seconds, which is not a transport gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats.errors
import pytest

from agent.main import run_agent
from agent.publish.publisher import Publisher
from agent.settings import AgentSettings
from integration.durability import (
    AggregatorProcess,
    exported_samples,
    samples_consumer_state,
    slice_counts,
    wait_consumer_settled,
)
from integration.harness import build_c
from shared.counters import Counters
from shared.model import Sample
from shared.nats_connection import NatsSettings
from shared.profile_types import ProfileType
from stackfleet.nats_server import NatsServer

OUTAGE_S = 60.0
SampleId = tuple[int, int, int]


def record_submitted(monkeypatch: pytest.MonkeyPatch) -> set[SampleId]:
    """Every sample the agent hands to its publisher, as (pid, tid, timestamp)."""
    submitted: set[SampleId] = set()
    original = Publisher.submit

    async def submit(self: Publisher, profile_type: ProfileType, samples: list[Sample], period: int) -> None:
        submitted.update((s.pid, s.tid, s.timestamp_ns) for s in samples)
        await original(self, profile_type, samples, period)

    monkeypatch.setattr(Publisher, "submit", submit)
    return submitted


async def _run_agent_around(nats_url: str, counters: Counters, middle: Callable[[], Awaitable[None]]) -> None:
    """Start the agent (CPU), wait for its actor, run ``middle``, stop it (flushing its outbox)."""
    stop = asyncio.Event()
    # Samples are told apart by (pid, tid, timestamp), and a weighted sample is exported as its
    # timestamp repeated once per period: the agent (this process) keeps all its own samples.
    settings = AgentSettings(nats=NatsSettings(url=nats_url), types=[ProfileType.CPU], flush_interval_s=0.5,
                             cpu_self_sample_one_in=1)
    agent = asyncio.create_task(run_agent(settings, stop, counters))
    try:
        deadline = time.monotonic() + 60
        while not counters.get("actor_started", type="cpu"):
            if agent.done():
                agent.result()
            assert time.monotonic() < deadline, f"CPU actor did not start: {counters.snapshot()}"
            await asyncio.sleep(0.1)
        await middle()
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(agent, 60)
    agent.result()


def _check_nothing_lost(agent: Counters, submitted: set[SampleId], output_dir: Path, nats_url: str,
                        aggregator_log: Path) -> tuple[dict[SampleId, int], int]:
    """Every acknowledged sample is exported; nothing was dropped on the agent side."""
    pending, ack_pending, redelivered = asyncio.run(wait_consumer_settled(nats_url, timeout_s=90))
    assert (pending, ack_pending) == (0, 0), f"samples consumer not settled: {pending} pending, {ack_pending} unacked"
    print(f"samples messages redelivered by the stream: {redelivered}")
    published = agent.get("samples_published", type="cpu")
    encoded = agent.get("samples_encoded", type="cpu")
    assert agent.get("samples_dropped") == 0 and agent.get("messages_dropped") == 0, agent.snapshot()
    assert published == encoded > 0, f"published {published} of {encoded} encoded: {agent.snapshot()}"
    seen, files = exported_samples(output_dir, ProfileType.CPU)
    duplicates = sum(n - 1 for n in seen.values())
    assert len(seen) == published, (f"aggregator exported {len(seen)} distinct samples in {files} files, "
                                    f"agent published {published} (duplicates: {duplicates})")
    missing, extra = submitted - seen.keys(), seen.keys() - submitted
    assert not missing and not extra, f"{len(missing)} published samples missing, {len(extra)} unknown exported"
    # Redelivered messages whose samples an export already holds are recognised and skipped
    # (aggregator/delivery/exported_messages.py), and an export interrupted before its commit marker is
    # removed at restart: into one output directory every sample arrives exactly once.
    print(f"published {published} samples; exported all of them, {duplicates} duplicated")
    assert duplicates == 0, (f"{duplicates} duplicated samples of {published} with {redelivered} redelivered "
                             f"messages; aggregator log: {aggregator_log.read_text()[-3000:]}")
    return dict(seen), redelivered


def _workload_slices(seen: dict[SampleId, int], pid: int, start_ns: int, end_ns: int) -> list[int]:
    """The workload's exported samples per 5 s slice (shown, to see the run's shape)."""
    counts = slice_counts([t for (p, _, t) in seen if p == pid], start_ns, end_ns, 5.0)
    assert sum(counts) > 0, "the workload is not in the exported profiles"
    return counts


def test_nats_outage_of_60s_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    submitted = record_submitted(monkeypatch)
    exe = build_c("cpu_chain.c", tmp_path)
    out = tmp_path / "profiles"
    store = tmp_path / "jetstream"
    counters = Counters()
    window: dict[str, int] = {}
    server = NatsServer(store_dir=str(store)).start()
    # ack_wait well above the time the backlog after the outage takes to export on a busy machine.
    aggregator = AggregatorProcess(server.url, out, tmp_path / "aggregator.log", ack_wait_s=30)
    aggregator.start()

    async def outage() -> None:
        nonlocal server
        proc = await asyncio.create_subprocess_exec(str(exe), str(OUTAGE_S + 25), "1")
        window["pid"], window["start"] = proc.pid, time.time_ns()
        await asyncio.sleep(8)
        await asyncio.to_thread(server.stop)
        sent_before = counters.get("messages_sent")
        await asyncio.sleep(OUTAGE_S)
        assert counters.get("messages_sent") == sent_before, "agent claims acks while NATS was down"
        buffered = counters.get("samples_encoded", type="cpu") - counters.get("samples_published", type="cpu")
        assert buffered > 0, "agent did not keep sampling while NATS was down"
        server = await asyncio.to_thread(NatsServer(port=server.port, monitor_port=server.monitor_port,
                                                    store_dir=str(store)).start)
        await proc.wait()
        window["end"] = time.time_ns()

    try:
        asyncio.run(_run_agent_around(server.url, counters, outage))
        seen, _ = _check_nothing_lost(counters, submitted, out, server.url, tmp_path / "aggregator.log")
    finally:
        aggregator.stop()
        server.stop()
    counts = _workload_slices(seen, window["pid"], window["start"] + int(2e9), window["end"] - int(2e9))
    print(f"per-5s CPU samples of the workload across the outage: {counts}")


async def _unacked(nats_url: str) -> int:
    """The samples consumer's unacked messages; 0 when the server is too busy to answer in time."""
    try:
        return (await samples_consumer_state(nats_url))[1]
    except (TimeoutError, nats.errors.Error, OSError):
        return 0


def test_aggregator_killed_and_restarted_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    submitted = record_submitted(monkeypatch)
    exe = build_c("cpu_chain.c", tmp_path)
    out = tmp_path / "profiles"
    counters = Counters()
    window: dict[str, int] = {}
    with NatsServer() as server:
        # Short ack_wait: the dead process's unexported messages come back quickly. A 3 s export
        # interval leaves a wide window in which it holds merged, unexported (unacked) batches.
        aggregator = AggregatorProcess(server.url, out, tmp_path / "aggregator.log", ack_wait_s=10,
                                       export_interval_s=3)
        aggregator.start()

        async def kill_and_restart() -> None:
            proc = await asyncio.create_subprocess_exec(str(exe), "25", "1")
            window["pid"], window["start"] = proc.pid, time.time_ns()
            await asyncio.sleep(8)
            deadline = time.monotonic() + 30
            while await _unacked(server.url) == 0:  # kill it holding unacked batches
                assert time.monotonic() < deadline, "aggregator never held unacked messages"
                await asyncio.sleep(0.1)
            aggregator.kill()
            await asyncio.sleep(3)  # agent keeps publishing into the stream meanwhile
            aggregator.start()
            await proc.wait()
            window["end"] = time.time_ns()

        try:
            asyncio.run(_run_agent_around(server.url, counters, kill_and_restart))
            seen, redelivered = _check_nothing_lost(counters, submitted, out, server.url, tmp_path / "aggregator.log")
        finally:
            aggregator.stop()
    assert redelivered > 0, "the killed aggregator held nothing unacked: redelivery was not exercised"
    counts = _workload_slices(seen, window["pid"], window["start"] + int(2e9), window["end"] - int(2e9))
    print(f"per-5s CPU samples of the workload across the aggregator kill: {counts}")
