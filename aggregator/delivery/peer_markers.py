"""Export markers shared between aggregator replicas, so a message one replica exported is
not exported again by another.

:mod:`aggregator.delivery.exported_messages` makes consumption exactly-once per output directory.
Across replicas that alone is at-least-once: when a replica's acks are lost (it died right
after an export, or a NATS node died and took the consumer leader with it), the stream
redelivers the messages to whichever replica pulls next, and a *peer* would export them again. Each replica
therefore also puts every export's marker into a JetStream key-value bucket — after the
export is written and before its acks — and a replica that receives a redelivered message it
has no marker for looks at its peers' markers first.

* Key ``<replica>.<n>``: one per export (replica = a random id per start). Value: the
  marker's JSON (stream, sequence ranges, timestamp span).
* Bounded: the bucket's age limit is the stream's (a marker is useless once its messages can
  no longer be redelivered), and each replica deletes its own keys once the consumer's ack
  floor has passed them.
* A put that fails (JetStream unavailable) is kept (bounded) and retried with the first
  export at least RETRY_AFTER_S later, so a replica that survives a NATS node failure still
  shares what it exported while the acks were being lost, and a bucket that never took a put
  delays an export by PUT_TIMEOUT_S at most once per period. Failures are counted
  (``export_markers_unshared``).
* Peers' markers are read on demand — only when a redelivered message is not known locally,
  at most once per :data:`REFRESH_INTERVAL_S` — not watched, so an ordinary run makes no
  extra reads.
* While a marker of a bucket that took puts before stays unshared (JetStream away), the
  replica's next exports wait for it (:mod:`aggregator.delivery.export_then_ack`), trying the
  put once an interval (:meth:`PeerMarkers.share_pending`): one export at a time is
  unshared. A wait that reaches its limit exports anyway and ends waiting for this bucket
  until a put works again (:meth:`PeerMarkers.stop_waiting`).

Limits: a replica killed between writing an export and putting its marker (or while its
retries still fail) leaves no marker, and that export's messages can still be exported twice.

Hand-written: JetStream has no cross-consumer exactly-once; the bucket is the shared record.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import NoKeysError
from nats.js.kv import KeyValue
from nats.nuid import NUID

from aggregator.delivery.exported_messages import ExportedMessages, ExportMarker
from shared.counters import Counters
from shared.jetstream import StreamSettings

log = logging.getLogger(__name__)

BUCKET = "stackfleet-exports"
REFRESH_INTERVAL_S = 1.0
RETRY_AFTER_S = 2.0
# A put takes about a millisecond; during a NATS failover it fails or hangs, and the export
# (whose acks wait for it) should not hang with it for the whole JetStream timeout.
PUT_TIMEOUT_S = 1.0
MAX_UNSHARED = 256
MAX_KNOWN_KEYS = 50_000


class PeerMarkers:
    """This replica's export markers published to the shared bucket, and its peers' read back."""

    def __init__(self, kv: KeyValue, exported: ExportedMessages, counters: Counters, timeout_s: float) -> None:
        self.kv = kv
        self.exported = exported
        self.counters = counters
        self.timeout_s = timeout_s
        self.replica = NUID().next().decode()
        self._n = 0
        self._unshared: deque[tuple[str, ExportMarker]] = deque(maxlen=MAX_UNSHARED)
        self._own: deque[tuple[str, int]] = deque()  # (key, max_seq), oldest first
        self._known: set[str] = set()  # peers' keys already read
        self._last_refresh = 0.0
        self._retry_at = 0.0
        self._failing = False
        self._shared_once = False  # a put has worked: a failure now means JetStream is away
        self._refresh_lock = asyncio.Lock()

    @classmethod
    async def open(cls, js: JetStreamContext, stream: StreamSettings, exported: ExportedMessages,
                   counters: Counters, timeout_s: float) -> PeerMarkers:
        """Create (or bind) the bucket; raises the nats-py error when JetStream is unavailable."""
        config = KeyValueConfig(bucket=BUCKET, description="stackfleet: which stream messages each export holds",
                                history=1, ttl=stream.max_age_s, replicas=stream.replicas,
                                storage=StorageType.FILE if stream.storage == "file" else StorageType.MEMORY)
        try:
            kv = await js.create_key_value(config)
        except Exception:  # exists with other limits (another replica's settings): use it as it is
            kv = await js.key_value(BUCKET)
        return cls(kv, exported, counters, timeout_s)

    async def publish(self, marker: ExportMarker) -> None:
        """Share one export's marker (and any earlier ones whose put failed) before its acks.

        After a failed put the bucket is left alone for RETRY_AFTER_S: a bucket that stays
        unreachable (e.g. permissions without its subjects) costs one timeout per period,
        not one per export."""
        if not marker.ranges:
            return
        self._n += 1
        self._unshared.append((f"{self.replica}.{self._n}", marker))
        if time.monotonic() < self._retry_at:
            self.counters.inc("export_markers_unshared")
            return
        await self._put_unshared()

    @property
    def in_outage(self) -> bool:
        """True when markers wait to be shared with a bucket that took puts before.

        A bucket that never took a put is misconfigured rather than away (permissions, say):
        waiting for it would stop exports for good, so that case is left to the retries."""
        return bool(self._unshared) and self._shared_once

    def stop_waiting(self) -> None:
        """Treat the bucket as broken (not in an outage) until a put works again."""
        self._shared_once = False

    async def share_pending(self) -> bool:
        """Put the markers whose put failed, now (not after the retry delay); True when none is left."""
        if self._unshared:
            await self._put_unshared()
        return not self._unshared

    async def _put_unshared(self) -> None:
        """Put the unshared markers in order, stopping at the first failure (counted, logged once)."""
        while self._unshared:
            key, pending = self._unshared[0]
            try:
                await asyncio.wait_for(self.kv.put(key, pending.to_json()), min(self.timeout_s, PUT_TIMEOUT_S))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # kept and retried with an export after RETRY_AFTER_S
                self.counters.inc("export_markers_unshared")
                self._retry_at = time.monotonic() + RETRY_AFTER_S
                if not self._failing:  # logged when sharing starts failing, not at every retry
                    log.warning("could not share export marker %s with other replicas (retrying every %gs "
                                "while it fails): %s", key, RETRY_AFTER_S, exc or type(exc).__name__)
                self._failing = True
                return
            if self._failing:
                log.info("sharing export markers with other replicas works again")
                self._failing = False
            self._unshared.popleft()
            self._shared_once = True
            self._retry_at = 0.0  # the bucket works: the next export's put need not wait
            self._own.append((key, pending.max_seq))
            self.counters.inc("export_markers_shared")

    async def forget_acked(self, ack_floor: int) -> None:
        """Delete this replica's markers the ack floor has passed: their messages cannot return."""
        while ack_floor and self._own and self._own[0][1] <= ack_floor:
            key, _ = self._own[0]
            try:
                await asyncio.wait_for(self.kv.delete(key), self.timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception:  # NATS away: try again next round (the bucket's age limit also ends it)
                return
            self._own.popleft()

    async def refresh(self) -> int:
        """Read peers' markers not seen yet (at most once per REFRESH_INTERVAL_S); returns how many."""
        async with self._refresh_lock:
            if time.monotonic() - self._last_refresh < REFRESH_INTERVAL_S:
                return 0
            self._last_refresh = time.monotonic()
            try:
                keys = await asyncio.wait_for(self.kv.keys(ignore_deletes=True), self.timeout_s)
            except NoKeysError:
                return 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.counters.inc("export_marker_read_errors")
                log.warning("could not read other replicas' export markers: %s", exc or type(exc).__name__)
                return 0
            added = 0
            for key in keys:
                if key in self._known or key.startswith(f"{self.replica}."):
                    continue
                try:
                    entry = await asyncio.wait_for(self.kv.get(key), self.timeout_s)
                except asyncio.CancelledError:
                    raise
                except Exception:  # deleted meanwhile, or NATS away: next refresh
                    continue
                self._known.add(key)
                try:
                    marker = ExportMarker.from_json(entry.value or b"")
                except ValueError as exc:
                    self.counters.inc("export_marker_read_errors")
                    log.warning("ignoring export marker %s from another replica: %s", key, exc)
                    continue
                self.exported.remember(marker)
                added += 1
            if len(self._known) > MAX_KNOWN_KEYS:  # keys of deleted markers: start over
                self._known = set(keys) & self._known
            return added
