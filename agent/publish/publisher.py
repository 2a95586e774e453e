"""Publishing symbolized samples to NATS as compact msgpack deltas.

One :class:`shared.wire.StreamEncoder` per profile type keeps what the receivers already
know, so strings, functions, locations and stacks cross the network once. Outgoing
messages wait in a bounded outbox (agent/publish/memory_outbox.py): when NATS is slow or away sampling
goes on, and beyond the bound the oldest are dropped and counted rather than growing
memory. One sender task publishes them strictly in order; with JetStream (the default) a
message leaves the outbox only once the stream has acknowledged storing it, so an outage
of NATS costs nothing up to the outbox's bound. A lost dict message is repaired by the
resync protocol (receivers ask, we re-send the full dictionary).

Large batches are encoded in a worker thread (``INLINE_ENCODE_MAX_SAMPLES``), not on the
event loop; each encoder serves one batch or resync at a time, in the order they came.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError

from agent.actors.base import SampleSink
from agent.memory_budget import MemoryBudget
from agent.publish.disk_outbox import DiskOutbox
from agent.publish.memory_outbox import MemoryOutbox, Outgoing
from agent.settings import AgentSettings
from shared.counters import Counters
from shared.jetstream import ensure_stream
from shared.model import Sample
from shared.nats_connection import connect
from shared.profile_types import ProfileType
from shared.subjects import RESYNC_SUBJECT, dict_subject, samples_subject
from shared.tasks import cancel_and_wait
from shared.wire import StreamEncoder, WireError, new_agent_id, parse_resync

log = logging.getLogger(__name__)


RETRY_INITIAL_S = 0.2
DUPLICATE_ID_IN_PROCESS = 10158  # JetStream err_code
RETRY_MAX_S = 5.0
# Batches of up to this many samples are encoded on the event loop: well under a millisecond
# at the encoder's ~0.65 us a sample (docs/design/overhead.md), less than a hop to a worker
# thread and back costs. Larger ones (a CPU flush: ~20,000 samples at 999 Hz on two CPUs,
# ~13 ms; ten times that on a big host) are encoded in a worker thread, so the loop's NATS
# I/O, acknowledgements and timers are not held up behind them.
INLINE_ENCODE_MAX_SAMPLES = 1_000


T = TypeVar("T")


async def run_to_completion(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread. A cancellation waits for the thread to finish before
    it propagates: the encoder the thread works on must not be touched by the next batch (or
    a resync) while it runs, and a thread cannot be interrupted."""
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.gather(work, return_exceptions=True)
        raise


class Publisher(SampleSink):
    """Encodes batches per profile type and publishes them, in order, from one sender task."""

    def __init__(self, settings: AgentSettings, counters: Counters, budget: MemoryBudget | None = None) -> None:
        self.settings = settings
        self.counters = counters
        # The encoders' dictionaries together stay within this share of the cache budget:
        # over it, the largest starts a new epoch before its next batch (see _within_budget).
        self._share = (budget or MemoryBudget(settings.cache_memory_bytes, counters)).share("wire_dictionaries")
        self.agent_id = new_agent_id()
        self.host = settings.host_name
        self._encoders: dict[ProfileType, StreamEncoder] = {}
        # One batch or resync at a time per encoder (held across a worker thread's encode).
        self._encoder_locks: dict[ProfileType, asyncio.Lock] = {}
        self.outbox: MemoryOutbox = (
            DiskOutbox(settings.spool_dir, settings.max_outgoing_messages, settings.spool_max_bytes, counters)
            if settings.spool_dir else
            MemoryOutbox(settings.max_outgoing_messages, settings.max_outgoing_bytes, counters))
        self._msg_numbers = itertools.count(1)
        self._wakeup = asyncio.Event()
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._sender: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()

    def encoder(self, profile_type: ProfileType) -> StreamEncoder:
        enc = self._encoders.get(profile_type)
        if enc is None:
            enc = StreamEncoder(self.host, profile_type, self.agent_id, self.settings.max_dictionary_entries)
            self._encoders[profile_type] = enc
            self._encoder_locks[profile_type] = asyncio.Lock()
        return enc

    async def start(self) -> None:
        """Start sending; returns at once. Until NATS is reachable, batches wait in the outbox."""
        self._sender = asyncio.create_task(self._send_loop(), name="publisher-send")

    async def _connect(self) -> None:
        """Connect; nats-py retries while NATS is not there yet (the agent samples meanwhile)."""
        nc = await connect(self.settings.nats, name=f"stackfleet-agent@{self.host}", counters=self.counters)
        await nc.subscribe(RESYNC_SUBJECT, cb=self._on_resync)
        if self.settings.nats.jetstream:
            self._js = nc.jetstream(timeout=self.settings.nats.jetstream_timeout_s)
        self._nc = nc
        self._connected.set()
        log.info("publishing as agent %s for host %s to %s (%s)", self.agent_id, self.host, self.settings.nats.url,
                 "JetStream" if self._js else "core NATS")

    async def submit(self, profile_type: ProfileType, samples: Sequence[Sample], period: int) -> None:
        """Encode a batch (in a worker thread when large) and queue its messages, in order."""
        enc = self.encoder(profile_type)
        async with self._encoder_locks[profile_type]:
            if len(samples) > INLINE_ENCODE_MAX_SAMPLES:
                dict_msg, samples_msg = await run_to_completion(enc.encode, samples, period)
            else:
                dict_msg, samples_msg = enc.encode(samples, period)
            self._share.used = sum(e.estimated_bytes for e in self._encoders.values())
            if self._share.over:
                self._within_budget(enc)
            if dict_msg is not None:
                self._enqueue(profile_type, dict_subject(profile_type, self.host), dict_msg, 0)
            if samples_msg is not None:
                self._enqueue(profile_type, samples_subject(profile_type, self.host), samples_msg, len(samples))
                self.counters.inc("samples_encoded", len(samples), type=profile_type.value)

    def _within_budget(self, own: StreamEncoder) -> None:
        """Start new epochs, largest dictionary first, until the encoders fit their share.

        After a batch is encoded, so every samples message refers to the dictionary sent just
        before it and the next batch's dictionary starts from id 1 in the new epoch; counted
        as cache_evictions{cache=wire_dictionaries}. ``own`` is the encoder whose batch this
        is (its lock is held by the caller); an other encoder busy with a batch of its own
        is left for a later check."""
        for enc in sorted(self._encoders.values(), key=lambda e: e.estimated_bytes, reverse=True):
            if not self._share.over:
                return
            if enc is not own and self._encoder_locks[enc.profile_type].locked():
                continue
            nbytes = enc.estimated_bytes
            self._share.evicted(enc.start_new_epoch(), nbytes)
            self.counters.inc("dictionary_epochs", type=enc.profile_type.value, reason="memory_budget")

    def _enqueue(self, profile_type: ProfileType, subject: str, payload: bytes, n_samples: int) -> None:
        msg_id = f"{self.agent_id}-{next(self._msg_numbers)}"
        self.outbox.append(Outgoing(profile_type.value, subject, payload, msg_id, n_samples))
        self._wakeup.set()

    async def _on_resync(self, msg: Msg) -> None:
        try:
            host, types = parse_resync(msg.data)
        except WireError as exc:
            self.counters.inc("resync_requests_invalid", reason=exc.reason)
            return
        if host not in ("*", self.host):
            return
        for ptype, enc in list(self._encoders.items()):
            if types and ptype not in types:
                continue
            async with self._encoder_locks[ptype]:  # after any batch being encoded, before the next
                enc.request_full()
                full = await run_to_completion(enc.flush_dictionary)
                if full is not None:
                    self._enqueue(ptype, dict_subject(ptype, self.host), full, 0)
            self.counters.inc("resyncs_served", type=ptype.value)

    async def _send_loop(self) -> None:
        await self._connect()
        if len(self.outbox):  # from the spool, or sampled while NATS was away: send it first
            self._wakeup.set()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self._drain_outgoing()

    async def _drain_outgoing(self) -> None:
        """Publish queued messages oldest first; on failure wait (backing off) and retry the same one."""
        assert self._nc is not None
        backoff = RETRY_INITIAL_S
        while self.outbox:
            if not self._nc.is_connected:
                if self._nc.is_closed:
                    raise ConnectionError("NATS connection closed")
                await asyncio.sleep(RETRY_INITIAL_S)  # nats-py is reconnecting; the outbox holds the data
                continue
            item = self.outbox.pop()
            try:
                await self._publish(item)
            except asyncio.CancelledError:
                # Stopped mid-publish (shutdown): keep it for close(); if it did reach the
                # stream, re-publishing it under the same Nats-Msg-Id is stored only once.
                self.outbox.push_back(item)
                raise
            except (NoStreamResponseError, ServiceUnavailableError) as exc:
                await self._stream_missing(item, exc)
            except APIError as exc:
                # 10158: the first attempt under this Nats-Msg-Id is still being stored (a timed-out
                # publish retried during a cluster failover): transient, so retried, not dropped.
                if exc.err_code != DUPLICATE_ID_IN_PROCESS and exc.code is not None and 400 <= exc.code < 500:
                    self.outbox.drop(item, "rejected_by_server")
                    log.warning("JetStream refused a message for %s: %s", item.subject, exc)
                    continue
                self._publish_failed(item, exc)
            except (TimeoutError, NatsError, OSError) as exc:
                if self._nc.is_closed:
                    self.outbox.push_back(item)
                    raise
                self._publish_failed(item, exc)
            else:
                self.counters.inc("messages_sent", type=item.profile_type)
                self.counters.inc("bytes_sent", len(item.payload), type=item.profile_type)
                if item.samples:
                    self.counters.inc("samples_published", item.samples, type=item.profile_type)
                backoff = RETRY_INITIAL_S
                continue
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RETRY_MAX_S)

    async def _publish(self, item: Outgoing) -> None:
        assert self._nc is not None
        if self._js is None:
            await self._nc.publish(item.subject, item.payload)
            return
        await self._js.publish(item.subject, item.payload, headers={"Nats-Msg-Id": item.msg_id})

    def _publish_failed(self, item: Outgoing, exc: Exception) -> None:
        # Back at the front: the outbox's bound, not this loop, decides what is dropped.
        self.outbox.push_back(item)
        self.counters.inc("publish_errors", type=item.profile_type, error=type(exc).__name__)
        log.debug("publish to %s failed (%r); will retry", item.subject, exc)

    async def _stream_missing(self, item: Outgoing, exc: Exception) -> None:
        """No stream answered: create it if we may (idempotent), otherwise keep buffering."""
        self._publish_failed(item, exc)
        assert self._js is not None
        try:
            await ensure_stream(self._js, self.settings.nats.stream, authoritative=False)
        except Exception as create_exc:  # JetStream off, no permission, cluster without quorum...
            self.counters.inc("stream_create_errors", error=type(create_exc).__name__)
            log.warning("no JetStream stream for %s and cannot create it (%r); buffering", item.subject, create_exc)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (bounded by ``timeout_s``), then drain and close the connection."""
        if self._sender is not None and self._nc is None and len(self.outbox):
            # Still waiting for NATS: queued batches get the same grace as sending them.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), timeout_s)
        if self._sender is not None:
            await cancel_and_wait(self._sender)
        if self._nc is None:  # never reached NATS: what is queued cannot be sent
            left = self.outbox.shutdown()
            if left:
                log.warning("closing publisher: NATS was never reachable (%d messages not sent)", left)
            return
        try:
            await asyncio.wait_for(self._drain_outgoing(), timeout_s)
            await asyncio.wait_for(self._nc.drain(), timeout_s)
        except (TimeoutError, Exception) as exc:
            left = len(self.outbox)
            log.warning("closing publisher: %s (%d messages not sent)", type(exc).__name__, left)
            await self._nc.close()
        self.outbox.shutdown()

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def stats(self) -> dict[str, Any]:
        return {"outgoing_queue": len(self.outbox), "outgoing_bytes": self.outbox.bytes, "agent_id": self.agent_id}
