"""The agent's outgoing buffer: where encoded messages wait while NATS is slow or away.

Sampling never waits for the network. Messages queue here in publish order, bounded by
both a message count and a byte total; when either bound is hit the *oldest* message is
dropped (the newest data is the most useful to someone looking at a profile now) and
counted as ``messages_dropped{reason=outgoing_queue_full}`` plus the samples it carried
as ``samples_dropped``. A warning is logged at most once per ``log_interval_s`` with the
number dropped since the last one, so a long outage cannot flood the log.

A lost dict message is repaired downstream by the resync protocol; lost samples are gone,
which is why they are counted.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from shared.counters import Counters

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outgoing:
    """One encoded message and what it is, for counting when it is sent or dropped."""

    profile_type: str
    subject: str
    payload: bytes
    # Unique per agent instance: JetStream stores a message once per id (duplicate window),
    # so re-publishing after a lost ack cannot duplicate profiles.
    msg_id: str
    samples: int


class MemoryOutbox:
    """FIFO of :class:`Outgoing` bounded by count and bytes; drops oldest, counted."""

    def __init__(self, max_messages: int, max_bytes: int, counters: Counters, log_interval_s: float = 10.0) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.counters = counters
        self.log_interval_s = log_interval_s
        self._items: deque[Outgoing] = deque()
        self._bytes = 0
        self._dropped_since_log = 0
        self._last_log = 0.0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        return self._bytes

    def append(self, item: Outgoing) -> None:
        """Queue ``item`` last, first dropping the oldest until it fits both bounds."""
        while self._items and (len(self._items) >= self.max_messages
                               or self._bytes + len(item.payload) > self.max_bytes):
            self.drop(self.pop(), "outgoing_queue_full")
        self._items.append(item)
        self._bytes += len(item.payload)

    def pop(self) -> Outgoing:
        """Take the oldest message out (to send it); ``push_back`` returns it on failure."""
        item = self._items.popleft()
        self._bytes -= len(item.payload)
        return item

    def push_back(self, item: Outgoing) -> None:
        """Put a message whose publish failed back at the front, keeping publish order."""
        self._items.appendleft(item)
        self._bytes += len(item.payload)

    def drop(self, item: Outgoing, reason: str) -> None:
        """Count (and rate-limit log) a message, already taken out of the queue, that will never be sent."""
        self.counters.inc("messages_dropped", type=item.profile_type, reason=reason)
        if item.samples:
            self.counters.inc("samples_dropped", item.samples, type=item.profile_type, reason=reason)
        self._dropped_since_log += 1
        now = time.monotonic()
        if now - self._last_log >= self.log_interval_s:
            log.warning("dropped %d outgoing message(s) (%s; latest for %s): NATS unreachable or too slow",
                        self._dropped_since_log, reason, item.subject)
            self._dropped_since_log = 0
            self._last_log = now

    def clear(self, reason: str) -> int:
        """Drop everything; returns how many were dropped."""
        n = len(self)
        while len(self):
            self.drop(self.pop(), reason)
        return n

    def shutdown(self) -> int:
        """The agent stops with messages still queued: in memory they are lost (counted as
        ``reason=shutdown``); returns how many were dropped."""
        return self.clear("shutdown")
