"""The JetStream messages whose samples are merged but not exported yet: acked after the export.

A samples message is acked only once the export holding its samples is written (durability);
until then it sits here. The ledger also recognises a redelivery of a message it still holds:
JetStream redelivers after ``ack_wait`` even to the replica holding the first delivery.
"""

from __future__ import annotations

import contextlib
import time

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from aggregator.delivery.exported_messages import stream_position
from shared.counters import Counters


class AckLedger:
    """JetStream messages whose samples are merged but not yet exported, acked after export.

    ``take`` is called in the same event-loop step as ``Merger.rotate``, so the messages it
    returns are exactly those whose samples are in the interval being exported.
    """

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self._finished: list[Msg] = []
        self._held: set[int] = set()  # stream sequences of _finished
        self._since: float | None = None  # time.monotonic() of the oldest in _finished

    def finished(self, token: object) -> None:
        if isinstance(token, Msg):
            if not self._finished:
                self._since = time.monotonic()
            self._finished.append(token)
            pos = stream_position(token)
            if pos is not None:
                self._held.add(pos[1])

    def holds(self, msg: Msg) -> bool:
        """True when ``msg`` is a redelivery of a message this replica finished but has not acked.

        JetStream redelivers after ``ack_wait`` even to the replica still holding the first
        delivery (an overloaded replica's exports can lag that long); merging it again would
        count its samples twice. The caller adds it with :meth:`finished` instead, so this
        delivery too is acked after the export that holds the first one.
        """
        pos = stream_position(msg)
        return pos is not None and pos[1] in self._held

    def held_since(self) -> float | None:
        """``time.monotonic()`` when the oldest message held was finished; None when none is."""
        return self._since

    def take(self) -> list[Msg]:
        done, self._finished = self._finished, []
        self._held = set()
        self._since = None
        return done

    async def ack(self, nc: NATS, msgs: list[Msg]) -> None:
        """Ack each message (a publish each); if NATS is away they are redelivered later (counted)."""
        failed = 0
        for m in msgs:
            try:
                await m.ack()
            except Exception:  # closed connection, already acked...: redelivery covers it
                failed += 1
        if failed:
            self.counters.inc("ack_errors", failed)
        with contextlib.suppress(Exception):
            await nc.flush(timeout=5)
        self.counters.inc("messages_acked", len(msgs) - failed)
