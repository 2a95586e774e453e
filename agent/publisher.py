"""Publishing symbolized samples to NATS as compact msgpack deltas.

One :class:`shared.wire.StreamEncoder` per profile type keeps what the receivers already
know, so strings, functions, locations and stacks cross the network once. Outgoing
messages wait in a bounded queue: when NATS is slow or away the oldest are dropped and
counted rather than growing memory. A lost dict message is repaired by the resync
protocol (receivers ask, we re-send the full dictionary).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from agent.actors.base import SampleSink
from agent.settings import AgentSettings
from shared.counters import Counters
from shared.model import Sample
from shared.nats_connection import connect
from shared.profile_types import ProfileType
from shared.subjects import RESYNC_SUBJECT, dict_subject, samples_subject
from shared.wire import StreamEncoder, WireError, new_agent_id, parse_resync

log = logging.getLogger("stackfleet.agent.publisher")


class Publisher(SampleSink):
    """Encodes batches per profile type and publishes them, in order, from one sender task."""

    def __init__(self, settings: AgentSettings, counters: Counters) -> None:
        self.settings = settings
        self.counters = counters
        self.agent_id = new_agent_id()
        self.host = settings.host_name
        self._encoders: dict[ProfileType, StreamEncoder] = {}
        self._outgoing: deque[tuple[ProfileType, str, bytes]] = deque()
        self._wakeup = asyncio.Event()
        self._nc: NATS | None = None
        self._sender: asyncio.Task[None] | None = None
        self._closing = False

    def encoder(self, profile_type: ProfileType) -> StreamEncoder:
        enc = self._encoders.get(profile_type)
        if enc is None:
            enc = StreamEncoder(self.host, profile_type, self.agent_id, self.settings.max_dictionary_entries)
            self._encoders[profile_type] = enc
        return enc

    async def start(self) -> None:
        self._nc = await connect(self.settings.nats, name=f"stackfleet-agent@{self.host}", counters=self.counters)
        await self._nc.subscribe(RESYNC_SUBJECT, cb=self._on_resync)
        self._sender = asyncio.create_task(self._send_loop(), name="publisher-send")
        log.info("publishing as agent %s for host %s to %s", self.agent_id, self.host, self.settings.nats.url)

    async def submit(self, profile_type: ProfileType, samples: list[Sample], period: int) -> None:
        enc = self.encoder(profile_type)
        dict_msg, samples_msg = enc.encode(samples, period)
        if dict_msg is not None:
            self._enqueue(profile_type, dict_subject(profile_type, self.host), dict_msg)
        if samples_msg is not None:
            self._enqueue(profile_type, samples_subject(profile_type, self.host), samples_msg)
            self.counters.inc("samples_encoded", len(samples), type=profile_type.value)

    def _enqueue(self, profile_type: ProfileType, subject: str, payload: bytes) -> None:
        if len(self._outgoing) >= self.settings.max_outgoing_messages:
            dropped_type, dropped_subject, _ = self._outgoing.popleft()
            self.counters.inc("messages_dropped", type=dropped_type.value, reason="outgoing_queue_full")
            log.warning("outgoing queue full: dropped oldest message for %s", dropped_subject)
        self._outgoing.append((profile_type, subject, payload))
        self._wakeup.set()

    async def _on_resync(self, msg: Msg) -> None:
        try:
            host, types = parse_resync(msg.data)
        except WireError as exc:
            self.counters.inc("resync_requests_invalid", reason=exc.reason)
            return
        if host not in ("*", self.host):
            return
        for ptype, enc in self._encoders.items():
            if types and ptype not in types:
                continue
            enc.request_full()
            full = enc.flush_dictionary()
            if full is not None:
                self._enqueue(ptype, dict_subject(ptype, self.host), full)
            self.counters.inc("resyncs_served", type=ptype.value)

    async def _send_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self._drain_outgoing()

    async def _drain_outgoing(self) -> None:
        assert self._nc is not None
        while self._outgoing:
            ptype, subject, payload = self._outgoing[0]
            try:
                await self._nc.publish(subject, payload)
            except Exception as exc:  # nats-py raises several types when its own buffer is full/closed
                if self._nc.is_closed:
                    raise
                # Leave it queued: the bounded queue, not this loop, decides what is dropped.
                self.counters.inc("publish_errors", type=ptype.value, error=type(exc).__name__)
                log.warning("publish to %s failed (%s); retrying", subject, exc)
                await asyncio.sleep(1.0)
                continue
            self._outgoing.popleft()
            self.counters.inc("messages_sent", type=ptype.value)
            self.counters.inc("bytes_sent", len(payload), type=ptype.value)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (bounded by ``timeout_s``), then drain and close the connection."""
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
        if self._nc is None:
            return
        try:
            await asyncio.wait_for(self._drain_outgoing(), timeout_s)
            await asyncio.wait_for(self._nc.drain(), timeout_s)
        except (TimeoutError, Exception) as exc:
            left = len(self._outgoing)
            if left:
                self.counters.inc("messages_dropped", left, type="all", reason="shutdown")
            log.warning("closing publisher: %s (%d messages not sent)", type(exc).__name__, left)
            await self._nc.close()

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def stats(self) -> dict[str, Any]:
        return {"outgoing_queue": len(self._outgoing), "agent_id": self.agent_id}
