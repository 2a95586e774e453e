"""A redelivered samples message is not exported twice (aggregator/delivery/exported_messages.py).

Unit level: markers from JetStream ack subjects, the redelivery check and its guards, and
the files writer's recovery of an export interrupted before its commit marker. With a real
nats-server: acks that never reach the server (lost while NATS is away, or the aggregator
stopped before sending them) make the stream redeliver; the redeliveries are recognised —
in memory, and after a restart from the markers on disk — and every sample is in the
exported files exactly once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from nats.aio.msg import Msg

from agent.publish.publisher import Publisher
from agent.settings import AgentSettings
from aggregator.delivery.ack_ledger import AckLedger
from aggregator.delivery.export_then_ack import ExportThenAck
from aggregator.delivery.exported_messages import ExportedMessages, ExportMarker, marker_for
from aggregator.delivery.peer_markers import PeerMarkers
from aggregator.exporters.files import MARKER_SUFFIX, LocalFileWriter
from aggregator.profile import FleetProfiles
from aggregator.service import run_aggregator
from aggregator.settings import AggregatorSettings
from integration.durability import exported_samples, wait_consumer_settled
from shared.counters import Counters
from shared.nats_connection import NatsSettings
from shared.profile_types import ProfileType
from stackfleet.nats_server import NatsServer
from tests.test_export_durability import PERIOD, cpu_samples, wait_for

T0 = 1_700_000_000_000_000_000


def js_msg(seq: int, delivered: int = 1, stamp_ns: int | None = None, stream: str = "STACKFLEET") -> Msg:
    """A message as a pull consumer delivers it: the ack subject carries its stream position."""
    stamp = T0 + seq * 1_000_000 if stamp_ns is None else stamp_ns
    reply = f"$JS.ACK.{stream}.aggs.{delivered}.{seq}.{seq}.{stamp}.0"
    return Msg(_client=None, subject="stackfleet.v1.samples.cpu.h", reply=reply)  # type: ignore[arg-type]


def test_marker_compresses_sequences_into_ranges_and_round_trips() -> None:
    marker = marker_for([js_msg(s) for s in (7, 3, 4, 5, 9, 10)])
    assert marker is not None
    assert marker.ranges == ((3, 5), (7, 7), (9, 10)) and marker.max_seq == 10
    assert ExportMarker.from_json(marker.to_json()) == marker
    assert marker_for([Msg(_client=None, subject="x", reply="_INBOX.1")]) is None  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ExportMarker.from_json(b'{"v": 99}')


def test_only_redeliveries_of_exported_messages_are_skipped() -> None:
    exported = ExportedMessages()
    exported.remember(marker_for([js_msg(s) for s in range(10, 20)]))
    assert exported.already_exported(js_msg(12, delivered=2))
    assert not exported.already_exported(js_msg(12, delivered=1))  # a first delivery never is
    assert not exported.already_exported(js_msg(25, delivered=2))  # not in the export
    assert not exported.already_exported(js_msg(12, delivered=2, stream="OTHER"))
    # Same sequence, much later timestamp: a recreated stream numbering from 1 again.
    assert not exported.already_exported(js_msg(12, delivered=2, stamp_ns=T0 + 10**12))
    assert not exported.already_exported(js_msg(25, delivered=2))


def test_a_redelivery_below_the_ack_floor_is_skipped_after_its_marker_is_forgotten() -> None:
    """The server can send a redelivery before the ack of the first delivery reaches it; when
    that copy is handled only after the ack floor passed the export (and its marker was
    forgotten), the floor itself recognises it."""
    exported = ExportedMessages()
    exported.remember(marker_for([js_msg(s) for s in range(10, 20)]))
    exported.forget_acked("STACKFLEET", 19)
    assert not exported.markers
    assert exported.already_exported(js_msg(12, delivered=2))
    assert not exported.already_exported(js_msg(20, delivered=2))  # above the floor, in no export
    assert not exported.already_exported(js_msg(12, delivered=1))
    assert not exported.already_exported(js_msg(12, delivered=2, stream="OTHER"))
    exported.forget_acked("STACKFLEET", 3)  # the stream was recreated: its floor starts again
    assert not exported.already_exported(js_msg(12, delivered=2))


class _SlowOutput:
    """An output whose encoding takes a while (a thread under load) or fails."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.encoding = asyncio.Event()
        self.release = asyncio.Event()
        self.written: list[ExportMarker | None] = []

    async def encode(self, fleet: FleetProfiles) -> str | None:
        self.encoding.set()
        await self.release.wait()
        if self.fail:
            raise OSError("disk full")
        return "encoded"

    async def write(self, fleet: FleetProfiles, encoded: str, marker: ExportMarker | None) -> None:
        self.written.append(marker)


class _Connection:
    async def flush(self, timeout: float = 0) -> None:
        return None


def _export_path(output: _SlowOutput, held: list[Msg], peers: PeerMarkers | None = None,
                 max_hold_s: float = 0.0) -> tuple[ExportThenAck[str], ExportedMessages, AckLedger]:
    counters = peers.counters if peers is not None else Counters()
    ledger = AckLedger(counters)
    for m in held:
        ledger.finished(m)
    fleet = FleetProfiles(start_ns=0, end_ns=1)
    fleet.hosts[("h1", ProfileType.CPU)] = None  # type: ignore[assignment]  # one host: something to export
    exported = peers.exported if peers is not None else ExportedMessages()
    path = ExportThenAck(_Connection(), ledger, output, lambda: fleet, counters,  # type: ignore[arg-type]
                         exported, "STACKFLEET", peers, max_hold_s)
    return path, exported, ledger


class FlakyBucket:
    """A key-value bucket whose puts fail while ``down`` (JetStream away)."""

    def __init__(self, down: bool = True) -> None:
        self.down = down
        self.attempts = 0
        self.stored: dict[str, bytes] = {}

    async def put(self, key: str, value: bytes) -> int:
        self.attempts += 1
        if self.down:
            raise ConnectionError("JetStream unavailable")
        self.stored[key] = value
        return len(self.stored)


async def _peers_in_outage() -> tuple[PeerMarkers, FlakyBucket]:
    """Peer markers whose bucket took one export's marker, then went away during the next."""
    bucket = FlakyBucket(down=False)
    peers = PeerMarkers(bucket, ExportedMessages(), Counters(), timeout_s=1.0)  # type: ignore[arg-type]
    await peers.publish(marker_for([js_msg(1)]))  # type: ignore[arg-type]
    bucket.down = True
    await peers.publish(marker_for([js_msg(2)]))  # type: ignore[arg-type]
    assert peers.in_outage
    return peers, bucket


async def test_a_redelivery_during_the_encoding_of_its_export_is_recognised(monkeypatch: pytest.MonkeyPatch) -> None:
    acked = _record_acks(monkeypatch)
    output = _SlowOutput()
    path, exported, ledger = _export_path(output, [js_msg(s) for s in (5, 6, 7)])
    export = asyncio.create_task(path.export_interval())
    await output.encoding.wait()  # taken from the ledger, not yet written
    assert not ledger.holds(js_msg(6, delivered=2))
    assert exported.already_exported(js_msg(6, delivered=2))
    output.release.set()
    await export
    assert output.written and output.written[0] is not None and output.written[0].ranges == ((5, 7),)
    assert acked == [5, 6, 7]


async def test_an_export_that_fails_leaves_its_messages_to_be_merged_again(monkeypatch: pytest.MonkeyPatch) -> None:
    acked = _record_acks(monkeypatch)
    output = _SlowOutput(fail=True)
    path, exported, _ = _export_path(output, [js_msg(s) for s in (5, 6, 7)])
    output.release.set()
    with pytest.raises(OSError):
        await path.export_interval()
    assert not output.written
    assert not exported.already_exported(js_msg(6, delivered=2))  # unacked: it comes back, and counts
    assert acked == []


def _record_acks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Stream sequences of the messages acked, in order."""
    acked: list[int] = []

    async def ack(self: Msg) -> None:
        acked.append(self.metadata.sequence.stream)

    monkeypatch.setattr(Msg, "ack", ack)
    return acked


def _export_files(directory: Path, stamp: str, marker: bool) -> None:
    (directory / f"{stamp}.otlp.pb").write_bytes(b"")
    (directory / f"{stamp}.cpu.pb.gz").write_bytes(b"")
    if marker:
        (directory / f"{stamp}{MARKER_SUFFIX}").write_bytes(ExportMarker("S", ((1, 2),), 0, 1).to_json())


def test_writer_recovery_removes_only_an_uncommitted_newest_export(tmp_path: Path) -> None:
    _export_files(tmp_path, "20260101T000000-000000001", marker=True)
    _export_files(tmp_path, "20260101T000010-000000001", marker=False)  # killed before its marker
    (tmp_path / "20260101T000020-000000001.cpu.pb.tmp").write_bytes(b"half")
    (tmp_path / "latest.cpu.pb.gz").symlink_to("20260101T000010-000000001.cpu.pb.gz")
    writer = LocalFileWriter(tmp_path)
    assert writer.recover() == "20260101T000010-000000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "20260101T000000-000000001.cpu.pb.gz", f"20260101T000000-000000001{MARKER_SUFFIX}",
        "20260101T000000-000000001.otlp.pb"]
    assert len(writer.markers()) == 1
    # A directory without any marker (core NATS, or an older version) is left alone.
    other = tmp_path / "core"
    other.mkdir()
    _export_files(other, "20260101T000000-000000001", marker=False)
    assert LocalFileWriter(other).recover() is None and len(list(other.iterdir())) == 2


async def _publish(nats_url: str, batches: int, per_batch: int) -> int:
    counters = Counters()
    publisher = Publisher(AgentSettings(nats=NatsSettings(url=nats_url), host_name="h1"), counters)
    await publisher.start()
    for _ in range(batches):
        await publisher.submit(ProfileType.CPU, cpu_samples(per_batch), PERIOD)
        await asyncio.sleep(0.01)
    await publisher.close()
    return counters.get("samples_published")


def _settings(nats_url: str, out: Path, ack_wait_s: float) -> AggregatorSettings:
    return AggregatorSettings(nats=NatsSettings(url=nats_url), otlp_endpoint="", output_dir=out,
                              export_interval_s=0.5, ack_wait_s=ack_wait_s, web_address="")


def _lose_acks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Acks after export never reach the server (as when NATS is away when they are sent)."""

    async def lost(self: AckLedger, nc: Any, msgs: list[Msg]) -> None:
        self.counters.inc("acks_lost_in_test", len(msgs))

    monkeypatch.setattr(AckLedger, "ack", lost)


async def test_redelivery_after_lost_acks_is_recognised_in_memory(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _lose_acks(monkeypatch)
    out = tmp_path / "out"
    with NatsServer() as nats:
        counters, stop = Counters(), asyncio.Event()
        task = asyncio.create_task(run_aggregator(_settings(nats.url, out, ack_wait_s=1.5), stop, counters))
        published = await asyncio.wait_for(_publish(nats.url, batches=20, per_batch=10), 30)
        assert await wait_for(lambda: counters.get("messages_already_exported") > 0, 30), counters.snapshot()
        assert (await wait_consumer_settled(nats.url, timeout_s=30))[:2] == (0, 0)  # all acked on redelivery
        stop.set()
        await asyncio.wait_for(task, 30)
    seen, _ = exported_samples(out, ProfileType.CPU)
    assert published == 200 and len(seen) == published
    assert max(seen.values()) == 1, f"{sum(n - 1 for n in seen.values())} samples exported twice"
    assert counters.get("samples_received") == published


async def _lost_acks_then_a_second_aggregator(nats_url: str, monkeypatch: pytest.MonkeyPatch, first_out: Path,
                                             second_out: Path) -> tuple[int, Counters, Counters]:
    """A first aggregator exports 200 samples and stops before any ack reaches the server; a
    second one (writing to ``second_out``) then gets the redeliveries. Returns (published,
    first's counters, second's counters) once the consumer has settled."""
    with monkeypatch.context() as patch:
        _lose_acks(patch)
        first, stop = Counters(), asyncio.Event()
        task = asyncio.create_task(run_aggregator(_settings(nats_url, first_out, ack_wait_s=6.0), stop, first))
        published = await asyncio.wait_for(_publish(nats_url, batches=20, per_batch=10), 30)
        assert await wait_for(lambda: first.get("samples_received") >= published, 20), first.snapshot()
        stop.set()
        await asyncio.wait_for(task, 30)
    assert first.get("messages_already_exported") == 0  # stopped before ack_wait ran out
    second, stop = Counters(), asyncio.Event()
    task = asyncio.create_task(run_aggregator(_settings(nats_url, second_out, ack_wait_s=6.0), stop, second))
    assert await wait_for(lambda: second.get("messages_already_exported") > 0, 30), second.snapshot()
    assert (await wait_consumer_settled(nats_url, timeout_s=30))[:2] == (0, 0)
    stop.set()
    await asyncio.wait_for(task, 30)
    return published, first, second


async def test_redelivery_after_a_restart_is_recognised_from_the_markers_on_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    with NatsServer() as nats:
        published, _, second = await _lost_acks_then_a_second_aggregator(nats.url, monkeypatch, out, out)
    seen, _ = exported_samples(out, ProfileType.CPU)
    assert published == 200 and len(seen) == published
    assert max(seen.values()) == 1, f"{sum(n - 1 for n in seen.values())} samples exported twice"
    assert second.get("samples_received") == 0


async def test_a_redelivery_to_another_replica_is_recognised_from_the_shared_markers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two replicas, two output directories: what the first exported (acks lost) and the
    stream then redelivers to the second is skipped there, through the shared marker bucket."""
    first_out, second_out = tmp_path / "replica1", tmp_path / "replica2"
    with NatsServer() as nats:
        published, first, second = await _lost_acks_then_a_second_aggregator(nats.url, monkeypatch, first_out,
                                                                              second_out)
    assert first.get("export_markers_shared") > 0, first.snapshot()
    seen, _ = exported_samples(first_out, ProfileType.CPU)
    again, _ = exported_samples(second_out, ProfileType.CPU)
    assert published == 200 and len(seen) == published
    assert not again, f"{sum(again.values())} samples exported again by the second replica"
    assert second.get("samples_received") == 0


async def test_an_unshared_marker_is_counted_and_put_again_after_the_retry_delay() -> None:
    bucket, counters = FlakyBucket(), Counters()
    peers = PeerMarkers(bucket, ExportedMessages(), counters, timeout_s=1.0)  # type: ignore[arg-type]
    markers = [marker_for([js_msg(s) for s in seqs]) for seqs in ((1, 2, 3), (4, 5), (6,), (7,))]
    await peers.publish(markers[0])  # type: ignore[arg-type]
    assert counters.get("export_markers_unshared") == 1 and bucket.attempts == 1 and not bucket.stored
    bucket.down = False
    await peers.publish(markers[1])  # type: ignore[arg-type]
    await peers.publish(markers[2])  # type: ignore[arg-type]
    assert bucket.attempts == 1, "retried within the delay"  # one timeout per delay, not per export
    assert counters.get("export_markers_unshared") == 3
    peers._retry_at = 0.0  # the delay has passed
    await peers.publish(markers[3])  # type: ignore[arg-type]
    assert [ExportMarker.from_json(v) for v in bucket.stored.values()] == markers  # in order, none lost
    assert counters.get("export_markers_shared") == 4


async def test_a_bucket_that_never_took_a_put_is_not_an_outage() -> None:
    peers = PeerMarkers(FlakyBucket(), ExportedMessages(), Counters(), timeout_s=1.0)  # type: ignore[arg-type]
    await peers.publish(marker_for([js_msg(1)]))  # type: ignore[arg-type]
    assert not peers.in_outage  # misconfigured rather than away: exports must not wait for it
    path, _, _ = _export_path(_SlowOutput(), [js_msg(2)], peers, max_hold_s=60.0)
    path.output.release.set()  # type: ignore[attr-defined]
    await path.export_interval()
    assert path.output.written  # type: ignore[attr-defined]


async def test_exports_wait_for_an_unshared_marker_and_then_go_out_together(monkeypatch: pytest.MonkeyPatch) -> None:
    acked = _record_acks(monkeypatch)
    peers, bucket = await _peers_in_outage()
    output = _SlowOutput()
    output.release.set()
    path, exported, ledger = _export_path(output, [js_msg(3), js_msg(4)], peers, max_hold_s=60.0)
    await path.export_interval()
    await path.export_interval()
    assert output.written == [] and acked == []  # nothing exported or acked while the marker waits
    assert peers.counters.get("exports_deferred", reason="marker_unshared") == 2
    assert bucket.attempts == 4  # shared, failed, then tried again at each deferred interval
    assert not exported.already_exported(js_msg(3, delivered=2)) and ledger.holds(js_msg(3, delivered=2))
    ledger.finished(js_msg(5))  # the next interval's message
    bucket.down = False
    await path.export_interval()
    assert len(output.written) == 1 and output.written[0] is not None
    assert output.written[0].ranges == ((3, 5),)  # one export holding everything that waited
    assert acked == [3, 4, 5]
    assert [ExportMarker.from_json(v).ranges for v in bucket.stored.values()] == [((1, 1),), ((2, 2),), ((3, 5),)]


async def test_an_outage_does_not_hold_messages_until_the_stream_redelivers_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    acked = _record_acks(monkeypatch)
    peers, _ = await _peers_in_outage()
    output = _SlowOutput()
    output.release.set()
    path, _, ledger = _export_path(output, [js_msg(3)], peers, max_hold_s=60.0)
    await path.export_interval()
    assert output.written == []
    since = ledger.held_since()
    assert since is not None
    monkeypatch.setattr(ledger, "_since", since - 60.0)  # held as long as the limit allows
    await path.export_interval()
    assert len(output.written) == 1 and acked == [3]
    assert peers.counters.get("exports_deferred") == 1
    # The bucket is still down: it is now treated as broken, and exports no longer wait for it.
    ledger.finished(js_msg(4))
    await path.export_interval()
    assert len(output.written) == 2 and acked == [3, 4]
    assert peers.counters.get("exports_deferred") == 1 and not peers.in_outage


def test_the_marker_wait_ends_before_the_stream_would_redeliver() -> None:
    settings = AggregatorSettings(export_interval_s=10.0, park_timeout_s=5.0)  # ack_wait: 3 x 10 + 30 s
    assert settings.max_marker_wait_s == 60.0 - 2 * 10.0 - 5.0 - 1.0
    assert AggregatorSettings(export_interval_s=1.0, ack_wait_s=20.0).max_marker_wait_s == 12.0
    assert AggregatorSettings(export_interval_s=5.0, ack_wait_s=10.0).max_marker_wait_s == 0.0  # no room: no wait


async def test_the_last_export_at_shutdown_does_not_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    acked = _record_acks(monkeypatch)
    peers, bucket = await _peers_in_outage()
    output = _SlowOutput()
    output.release.set()
    path, _, _ = _export_path(output, [js_msg(3)], peers, max_hold_s=60.0)
    await path.export_interval(final=True)
    assert len(output.written) == 1 and acked == [3]
    assert peers.counters.get("exports_deferred") == 0
    assert bucket.attempts == 3  # the unshared marker was tried once more, then the last export's


async def test_the_last_export_shares_what_waited_when_the_bucket_is_back(monkeypatch: pytest.MonkeyPatch) -> None:
    _record_acks(monkeypatch)
    peers, bucket = await _peers_in_outage()
    output = _SlowOutput()
    output.release.set()
    path, _, _ = _export_path(output, [js_msg(3)], peers, max_hold_s=60.0)
    bucket.down = False
    await path.export_interval(final=True)
    assert [ExportMarker.from_json(v).ranges for v in bucket.stored.values()] == [((1, 1),), ((2, 2),), ((3, 3),)]
