"""How profile messages reach the aggregator's intake: JetStream consumers or core subscriptions.

JetStream (default), see docs/design/durability.md:

* **samples** come from one *shared durable pull consumer* (named after the queue group)
  on ``stackfleet.v1.samples.>``. Every replica pulls from the same consumer, so each
  batch goes to exactly one replica (work-queue semantics) and the consumer's position
  survives restarts of every replica. A message is acked only after the export that
  contains its samples has been written (:mod:`aggregator.delivery.export_then_ack`); one
  that is never acked — the aggregator crashed first — is redelivered after ``ack_wait``.
* **dictionaries** come from a *per-replica* durable pull consumer on
  ``stackfleet.v1.dict.>`` that starts at the beginning of the stream, so each replica
  sees every retained dictionary delta (also those of agents that have since gone away,
  whose samples may still be redelivered). Its name is unique per start and it expires
  after ``inactive_threshold`` once its replica is gone. Before pulling samples the
  replica catches up on dictionaries, so a backlog does not have to be parked.

Core NATS (``nats.jetstream = false``): plain subscriptions (queue group for samples), fire
and forget.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from aggregator.delivery.ack_ledger import AckLedger
from aggregator.delivery.exported_messages import ExportedMessages, ExportMarker, stream_position
from aggregator.delivery.intake import Intake
from aggregator.delivery.peer_markers import PeerMarkers
from aggregator.settings import AggregatorSettings
from shared.counters import Counters
from shared.jetstream import ensure_stream
from shared.subjects import ALL_DICT_SUBJECTS, ALL_SAMPLE_SUBJECTS
from shared.tasks import cancel_and_wait

log = logging.getLogger(__name__)

T = TypeVar("T")

FETCH_BATCH = 256
FETCH_TIMEOUT_S = 1.0
DICT_CONSUMER_INACTIVE_S = 600.0
DICT_CATCH_UP_LIMIT_S = 30.0
STREAM_WATCH_INTERVAL_S = 30.0


Stopper = Callable[[], bool]

# A samples message whose dictionary has not arrived is delivered again this many times, each
# after DEFER_DELAY_S (plus the intake's park timeout), before it is dropped and counted.
MAX_DEFERRED_DELIVERIES = 6
DEFER_DELAY_S = 5.0


def deferral_id(token: object) -> object:
    """(stream, stream sequence) of a JetStream message: the same across its redeliveries."""
    pos = stream_position(token) if isinstance(token, Msg) else None
    return (pos[0], pos[1]) if pos is not None else None


async def defer_redelivery(token: object) -> bool:
    """Hand a JetStream message back for a later redelivery; False once it has had its chances.

    Used for samples whose dictionary is late (e.g. the dictionary consumer is waiting for a
    new leader after a NATS node died): unacked, they are not lost, just merged later.
    """
    if not isinstance(token, Msg):
        return False
    pos = stream_position(token)
    if pos is None or pos[3] >= MAX_DEFERRED_DELIVERIES:  # core NATS, or it has had its chances
        return False
    try:
        await token.nak(delay=DEFER_DELAY_S)
    except Exception:  # NATS away: never acked, so the stream redelivers it after ack_wait anyway
        log.debug("nak failed; the message comes back after ack_wait")
    return True


class Consumers:
    """The running message sources: tasks to cancel, subscriptions to close on shutdown."""

    def __init__(self, tasks: list[asyncio.Task[None]], subs: list[Any], js: JetStreamContext | None = None,
                 stream: str = "", own_consumer: str = "", peers: PeerMarkers | None = None) -> None:
        self.tasks = tasks
        self.subs = subs
        self.js = js
        self.stream = stream
        self.own_consumer = own_consumer
        self.peers = peers  # export markers shared with other replicas (JetStream only)

    async def stop(self) -> None:
        """Stop pulling (before the final export); messages not yet exported stay unacked."""
        await cancel_and_wait(self.tasks)
        for sub in self.subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self.js is not None and self.own_consumer:
            # This start's dictionary consumer is of no use to anyone else; the server would
            # also remove it after DICT_CONSUMER_INACTIVE_S.
            with contextlib.suppress(Exception):
                await self.js.delete_consumer(self.stream, self.own_consumer)


async def start_jetstream(nc: NATS, settings: AggregatorSettings, intake: Intake, counters: Counters,
                          stopping: Stopper, exported: ExportedMessages | None = None,
                          markers_on_disk: Iterable[ExportMarker] = (), ledger: AckLedger | None = None) -> Consumers:
    """Ensure the stream, create/bind both consumers, catch up on dictionaries, start pulling.

    A redelivered samples message is not merged a second time: ``ledger`` knows the ones this
    replica holds merged but not yet exported (JetStream redelivers after ``ack_wait`` even to
    the replica holding it), ``exported`` the ones already in an export (those on disk from
    before a restart are loaded here, above the consumer's ack floor), and the shared bucket
    of :class:`PeerMarkers` the ones another replica exported.
    """
    exported = exported if exported is not None else ExportedMessages()
    js = nc.jetstream(timeout=settings.nats.jetstream_timeout_s)
    await _retry("create the JetStream stream", stopping, counters,
                 lambda: ensure_stream(js, settings.nats.stream, authoritative=True))
    stream = settings.nats.stream.name
    dict_name = f"{settings.queue_group}-dict-{nc._nuid.next().decode()}"
    dict_sub = await _retry("create the dictionary consumer", stopping, counters, lambda: js.pull_subscribe(
        ALL_DICT_SUBJECTS, durable=dict_name, stream=stream,
        config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL,
                              inactive_threshold=DICT_CONSUMER_INACTIVE_S)))
    samples_sub = await _retry("bind the shared samples consumer", stopping, counters, lambda: js.pull_subscribe(
        ALL_SAMPLE_SUBJECTS, durable=settings.queue_group, stream=stream,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
                              ack_wait=settings.effective_ack_wait_s, max_ack_pending=settings.max_ack_pending)))

    peers = await _open_peer_markers(js, settings, exported, counters)

    async def on_dict(m: Msg) -> None:
        await intake.on_dict(m.subject, m.data)

    floor = await _ack_floor(js, stream, settings.queue_group)
    loaded = exported.load(markers_on_disk, stream, floor or 0)
    if loaded:
        log.info("JetStream: %d export(s) on disk hold messages above the ack floor %s", loaded, floor)

    async def on_samples(m: Msg) -> None:
        if ledger is not None and ledger.holds(m):
            counters.inc("messages_redelivered_held")
            ledger.finished(m)  # acked with the export that holds the first delivery
            return
        if exported.already_exported(m) or (peers is not None and _redelivered(m) and await peers.refresh()
                                            and exported.already_exported(m)):
            counters.inc("messages_already_exported")
            try:
                await m.ack()
            except Exception:  # redelivered again later, and skipped again
                counters.inc("ack_errors")
            return
        await intake.on_samples(m.subject, m.data, m)

    caught_up = await _catch_up(dict_sub, on_dict)
    log.info("JetStream: %d dictionary message(s) replayed; consuming samples through %s/%s",
             caught_up, stream, settings.queue_group)
    tasks = [asyncio.create_task(_pull_forever(dict_sub, on_dict, counters, "dict"), name="pull-dict"),
             asyncio.create_task(_pull_forever(samples_sub, on_samples, counters, "samples"), name="pull-samples"),
             asyncio.create_task(_watch_stream_limits(js, stream, settings.queue_group, counters, exported, peers),
                                 name="watch-stream-limits")]
    return Consumers(tasks, [dict_sub, samples_sub], js, stream, dict_name, peers)


async def _open_peer_markers(js: JetStreamContext, settings: AggregatorSettings, exported: ExportedMessages,
                             counters: Counters, attempts: int = 3) -> PeerMarkers | None:
    """The shared export-marker bucket, or None (logged, counted) when it cannot be opened.

    JetStream itself is up (the stream was just created), so a failure here is most likely
    NATS permissions without the bucket's subjects (deploy/nats/accounts.conf): the replica
    then works as before, exactly-once only within its own output directory.
    """
    for attempt in range(attempts):
        try:
            return await PeerMarkers.open(js, settings.nats.stream, exported, counters,
                                          settings.nats.jetstream_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if attempt + 1 < attempts:
                await asyncio.sleep(1.0)
                continue
            counters.inc("jetstream_setup_errors", step="open the shared export-marker bucket",
                         error=type(exc).__name__)
            log.error("export markers are not shared with other replicas (%r): a batch redelivered to "
                      "another replica after this one exported it may be exported twice; allow the "
                      "$KV.stackfleet-exports subjects (deploy/nats/accounts.conf)", exc)
    return None


def _redelivered(m: Msg) -> bool:
    pos = stream_position(m)
    return pos is not None and pos[3] > 1


async def _ack_floor(js: JetStreamContext, stream: str, consumer: str) -> int | None:
    """The samples consumer's ack floor (every message at or below it is acked); None if unknown."""
    try:
        floor = (await js.consumer_info(stream, consumer)).ack_floor
    except asyncio.CancelledError:
        raise
    except Exception:  # NATS away: keep every marker for now
        return None
    return floor.stream_seq if floor is not None and floor.stream_seq else 0


async def _watch_stream_limits(js: JetStreamContext, stream: str, consumer: str, counters: Counters,
                               exported: ExportedMessages | None = None, peers: PeerMarkers | None = None) -> None:
    """Count messages the stream discarded (size/age limit) before the samples consumer acked them.

    JetStream drops them silently; the evidence is the stream's first sequence moving past
    the consumer's ack floor. The count is in stream messages (dictionaries included, so an
    upper bound for sample batches) and every replica reports it. The same ack floor tells
    which export markers can no longer matter.
    """
    counted_upto = 0
    while True:
        await asyncio.sleep(STREAM_WATCH_INTERVAL_S)
        try:
            first_seq = (await js.stream_info(stream)).state.first_seq
            ack_floor = (await js.consumer_info(stream, consumer)).ack_floor
        except asyncio.CancelledError:
            raise
        except Exception:  # NATS away: the next round will see the same evidence
            continue
        floor = ack_floor.stream_seq if ack_floor is not None and ack_floor.stream_seq else 0
        if exported is not None:
            exported.forget_acked(stream, floor)
        if peers is not None:
            await peers.forget_acked(floor)
        lost_upto = first_seq - 1
        start = max(floor, counted_upto)
        if lost_upto > start:
            counters.inc("messages_dropped", lost_upto - start, reason="stream_limit")
            log.warning("the JetStream stream discarded %d message(s) before they were consumed: all aggregators "
                        "were behind for longer than its size/age limits", lost_upto - start)
            counted_upto = lost_upto


async def start_core(nc: NATS, settings: AggregatorSettings, intake: Intake) -> Consumers:
    """Plain subscriptions: dictionaries to every replica, samples through the queue group."""

    async def on_dict(msg: Msg) -> None:
        await intake.on_dict(msg.subject, msg.data)

    async def on_samples(msg: Msg) -> None:
        await intake.on_samples(msg.subject, msg.data)

    subs = [await nc.subscribe(ALL_DICT_SUBJECTS, cb=on_dict),
            await nc.subscribe(ALL_SAMPLE_SUBJECTS, queue=settings.queue_group, cb=on_samples)]
    return Consumers([], subs)


async def _catch_up(sub: JetStreamContext.PullSubscription, handle: Callable[[Msg], Awaitable[None]]) -> int:
    """Read what the consumer already has (bounded in time), so samples find their dictionaries."""
    n = 0
    deadline = time.monotonic() + DICT_CATCH_UP_LIMIT_S
    while time.monotonic() < deadline:
        try:
            msgs = await sub.fetch(FETCH_BATCH * 4, timeout=0.5)
        except TimeoutError:
            break
        for m in msgs:
            await handle(m)
        n += len(msgs)
    return n


async def _pull_forever(sub: JetStreamContext.PullSubscription, handle: Callable[[Msg], Awaitable[None]],
                        counters: Counters, what: str) -> None:
    """Fetch and hand over messages until cancelled; NATS outages are waited out, not fatal."""
    while True:
        try:
            msgs = await sub.fetch(FETCH_BATCH, timeout=FETCH_TIMEOUT_S)
        except TimeoutError:
            continue
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # disconnected, consumer gone during a server restart...
            counters.inc("fetch_errors", consumer=what, error=type(exc).__name__)
            log.debug("fetching %s failed: %r", what, exc)
            await asyncio.sleep(FETCH_TIMEOUT_S)
            continue
        for m in msgs:
            await handle(m)


async def _retry(what: str, stopping: Stopper, counters: Counters, attempt: Callable[[], Awaitable[T]]) -> T:
    """Retry a JetStream setup step until it works (NATS/JetStream may come up after us)."""
    delay = 0.5
    while True:
        try:
            return await attempt()
        except Exception as exc:
            if stopping():
                raise
            counters.inc("jetstream_setup_errors", step=what, error=type(exc).__name__)
            log.warning("could not %s (%r); retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
