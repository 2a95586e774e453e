"""Intake: NATS messages in, validated and decoded samples out.

Per stream (host, profile type, agent instance) the intake keeps the dictionary rebuilt
from dict messages. A samples message whose ids are not known yet — its dict message is
still in flight on the other subscription, or was lost — is *parked* (bounded, with a
timeout) and retried when the dictionary grows; a missing or gapped dictionary triggers a
rate-limited resync request. Every rejected message is counted by reason and by the host
it claims to come from; one bad sender never affects another's state.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from shared.counters import Counters
from shared.profile_types import ProfileType
from shared.subjects import host_token
from shared.wire import DecodedSamples, StreamDictionary, StreamKey, WireError, decode_samples, header, unpack

log = logging.getLogger(__name__)

RESYNC_MIN_INTERVAL_S = 2.0
STREAM_IDLE_TIMEOUT_S = 600.0
MAX_STREAMS = 200_000


@dataclass
class _Parked:
    arrived: float
    stream: StreamKey
    epoch: int
    body: dict[str, Any]
    token: object = None


@dataclass
class StreamState:
    """What the intake knows of one stream."""

    dictionary: StreamDictionary
    last_seen: float = field(default_factory=time.monotonic)
    last_resync: float = 0.0


class Intake:
    """Validates and decodes messages; hands decoded batches to ``deliver``."""

    def __init__(
        self,
        counters: Counters,
        deliver: Callable[[DecodedSamples], None],
        request_resync: Callable[[str, ProfileType, str], Awaitable[None]],
        max_parked: int = 10_000,
        park_timeout_s: float = 5.0,
        on_done: Callable[[object], None] | None = None,
        on_expired: Callable[[object], Awaitable[bool]] | None = None,
        message_id: Callable[[object], object] | None = None,
    ) -> None:
        self.counters = counters
        # Called with a samples message's token once the message is finished with (merged,
        # rejected, stale or dropped): the JetStream transport acks it after the next export.
        self.on_done = on_done
        # Called with the token of a message parked longer than park_timeout_s; True means the
        # transport will deliver it again later (JetStream: nak with a delay), so it is not
        # dropped: a dictionary held up by a NATS node failover then still arrives in time.
        self.on_expired = on_expired
        # What identifies a message across redeliveries (JetStream: stream and sequence), so
        # that messages handed back and not yet redelivered at shutdown are counted too.
        self.message_id = message_id
        self._deferred: dict[object, str] = {}  # message id -> sending host
        self.deliver = deliver
        self.request_resync = request_resync
        self.max_parked = max_parked
        self.park_timeout_s = park_timeout_s
        self.streams: dict[StreamKey, StreamState] = {}
        self.parked: deque[_Parked] = deque()
        self._last_resync_at: dict[tuple[str, ProfileType], float] = {}
        self._logged_senders: set[tuple[str, str]] = set()

    # -- message entry points (NATS callbacks call these with subject + data) -----------
    async def on_dict(self, subject: str, data: bytes) -> None:
        try:
            body, key, epoch = self._open(subject, data, "dict")
        except WireError as exc:
            self._reject(subject, exc)
            return
        state = self.streams.get(key)
        if state is None or epoch > state.dictionary.epoch:
            if state is None and len(self.streams) >= MAX_STREAMS:
                self._reject(subject, WireError("too_many_streams"))
                return
            state = StreamState(StreamDictionary(epoch))
            self.streams[key] = state
        elif epoch < state.dictionary.epoch:
            self.counters.inc("messages_stale", kind="dict", host=key.host)
            return
        state.last_seen = time.monotonic()
        try:
            state.dictionary.apply(body)
        except WireError as exc:
            if exc.reason == "dict_gap":
                self.counters.inc("dictionary_gaps", host=key.host, type=key.profile_type.value)
                await self._resync(key, state, "dictionary gap")
            else:
                self._reject(subject, exc)
            return
        self.counters.inc("dict_messages", type=key.profile_type.value)
        await self._retry_parked(key)

    async def on_samples(self, subject: str, data: bytes, token: object = None) -> None:
        if self._deferred and self.message_id is not None:
            self._deferred.pop(self.message_id(token), None)  # a deferred message is back
        try:
            body, key, epoch = self._open(subject, data, "samples")
        except WireError as exc:
            self._reject(subject, exc)
            self._done(token)
            return
        await self._decode_or_park(key, epoch, body, subject, token)

    # -- internals ------------------------------------------------------------------------
    def _open(self, subject: str, data: bytes, kind: str) -> tuple[dict[str, Any], StreamKey, int]:
        """Unpack a message and check its header against its subject: (body, stream, epoch)."""
        body = unpack(data)
        key, epoch, _seq = header(body, kind)
        self._check_subject(subject, key)
        return body, key, epoch

    def _check_subject(self, subject: str, key: StreamKey) -> None:
        parts = subject.split(".")
        if len(parts) < 5 or parts[-1] != host_token(key.host) or parts[-2] != key.profile_type.value:
            raise WireError("subject_mismatch", subject)

    def _done(self, token: object) -> None:
        if token is not None and self.on_done is not None:
            self.on_done(token)

    async def _decode_or_park(self, key: StreamKey, epoch: int, body: dict[str, Any], subject: str,
                              token: object = None) -> bool:
        state = self.streams.get(key)
        if state is not None and epoch < state.dictionary.epoch:
            self.counters.inc("messages_stale", kind="samples", host=key.host)
            self._done(token)
            return True
        if state is None or epoch > state.dictionary.epoch:
            self._park(key, epoch, body, token)
            if state is None:
                await self._resync(key, None, "unknown stream")
            return False
        try:
            decoded = decode_samples(body, key, state.dictionary)
        except WireError as exc:
            if exc.reason == "unknown_id":
                self._park(key, epoch, body, token)
                return False
            self._reject(subject, exc)
            self._done(token)
            return True
        state.last_seen = time.monotonic()
        self.counters.inc("samples_received", len(decoded.rows), type=key.profile_type.value)
        self.deliver(decoded)
        self._done(token)
        return True

    def _park(self, key: StreamKey, epoch: int, body: dict[str, Any], token: object = None) -> None:
        if len(self.parked) >= self.max_parked:
            old = self.parked.popleft()
            self.counters.inc("messages_dropped", reason="park_overflow", host=old.stream.host)
            self._done(old.token)
        self.parked.append(_Parked(time.monotonic(), key, epoch, body, token))
        self.counters.inc("messages_parked", type=key.profile_type.value)

    async def _retry_parked(self, key: StreamKey) -> None:
        if not self.parked:
            return
        keep: deque[_Parked] = deque()
        mine: list[_Parked] = []
        for p in self.parked:
            (mine if p.stream == key else keep).append(p)
        if not mine:
            return
        self.parked = keep
        for p in mine:
            state = self.streams.get(key)
            if state is None or p.epoch != state.dictionary.epoch:
                keep.append(p)
                continue
            try:
                decoded = decode_samples(p.body, key, state.dictionary)
            except WireError as exc:
                if exc.reason == "unknown_id":
                    keep.append(p)
                else:
                    self._reject(f"parked:{key.host}", exc)
                    self._done(p.token)
                continue
            self.counters.inc("samples_received", len(decoded.rows), type=key.profile_type.value)
            self.deliver(decoded)
            self._done(p.token)

    async def sweep(self) -> None:
        """Expire parked messages whose dictionary never came, and forget idle streams."""
        now = time.monotonic()
        while self.parked and now - self.parked[0].arrived > self.park_timeout_s:
            p = self.parked.popleft()
            if self.on_expired is not None and p.token is not None and await self.on_expired(p.token):
                self.counters.inc("messages_deferred", reason="dictionary_missing", host=p.stream.host)
                if self.message_id is not None:
                    self._deferred[self.message_id(p.token)] = p.stream.host
                log.info("a samples message from %s/%s waits for its dictionary: redelivered later",
                         p.stream.host, p.stream.profile_type.value)
            else:
                self.counters.inc("messages_dropped", reason="dictionary_missing", host=p.stream.host)
                self._done(p.token)
                log.warning("dropped a samples message from %s/%s: its dictionary never arrived",
                            p.stream.host, p.stream.profile_type.value)
            await self._resync(p.stream, self.streams.get(p.stream), "dictionary missing")
        for key in [k for k, s in self.streams.items() if now - s.last_seen > STREAM_IDLE_TIMEOUT_S]:
            del self.streams[key]

    def drop_parked(self, reason: str) -> int:
        """Count and discard every parked message (shutdown): nothing leaves uncounted."""
        n = len(self.parked)
        for p in self.parked:
            self.counters.inc("messages_dropped", reason=reason, host=p.stream.host)
            self._done(p.token)
        self.parked.clear()
        return n

    def release_parked(self) -> int:
        """Forget parked messages *without* finishing them (shutdown with JetStream): they are
        never acked, so the stream redelivers them to the next aggregator. Counted, not dropped."""
        n = len(self.parked)
        for p in self.parked:
            self.counters.inc("messages_released", reason="shutdown_parked", host=p.stream.host)
        self.parked.clear()
        # Handed back for a later redelivery that has not come yet: in the stream, not here.
        for host in self._deferred.values():
            self.counters.inc("messages_released", reason="shutdown_deferred", host=host)
        n += len(self._deferred)
        self._deferred.clear()
        return n

    async def _resync(self, key: StreamKey, state: StreamState | None, reason: str) -> None:
        now = time.monotonic()
        slot = (key.host, key.profile_type)
        if now - self._last_resync_at.get(slot, 0.0) < RESYNC_MIN_INTERVAL_S:
            return
        self._last_resync_at[slot] = now
        self.counters.inc("resync_requests", host=key.host, type=key.profile_type.value)
        log.info("asking %s for its %s dictionary (%s)", key.host, key.profile_type.value, reason)
        await self.request_resync(key.host, key.profile_type, reason)

    def _reject(self, subject: str, exc: WireError) -> None:
        sender = subject.rsplit(".", 1)[-1]
        self.counters.inc("messages_rejected", reason=exc.reason, sender=sender)
        if (sender, exc.reason) not in self._logged_senders and len(self._logged_senders) < 10_000:
            self._logged_senders.add((sender, exc.reason))
            log.warning("rejected a message on %s: %s (further ones from this sender are only counted)",
                        subject, exc)
