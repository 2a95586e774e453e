"""One export interval in the order exactly-once delivery depends on: export, then mark, then ack.

Every interval (and once more at shutdown) :meth:`ExportThenAck.export_interval` runs these
steps, and the order is what keeps a samples message from being lost or exported twice:

0. **Wait for the last marker.** While an earlier export's marker cannot be shared (JetStream
   away: see step 5), the interval is not exported: its samples stay merged and its messages
   unacked, and the next interval exports them with its own. A replica killed during an outage
   then leaves one export that peers cannot know about, not one per interval of the outage.
   The wait ends when the marker is shared, at shutdown, or before the stream would redeliver
   the held messages to a peer (``max_hold_s``): past that they would be exported twice anyway.
   Memory and unacked messages grow while it lasts (bounded by ``max_hold_s`` and the
   consumer's ``max_ack_pending``).
1. **Rotate and take, in one event-loop step.** ``Merger.rotate`` hands over the interval's
   samples and :meth:`AckLedger.take` the messages they came from, with no ``await``
   between them: the taken messages are exactly those whose samples are in this export.
2. **Nothing to export, nothing to wait for.** An interval without samples (its messages were
   rejected, stale or dropped, all counted by the intake) acks its messages at once, and so
   does one whose samples were all zero (after step 3, with nothing written).
3. **Mark** (JetStream), still in the same loop step. The export's :class:`ExportMarker` — the
   stream sequences it holds — is remembered locally before it is encoded, so a redelivery
   arriving from now on is skipped rather than merged into the next interval. If encoding or
   writing raises, the marker is dropped again: the messages stay unacked and come back.
4. **Export.** The output encodes the interval, writes the local files (the marker file last:
   the export's commit point), queues the OTLP request and calls the hook.
5. **Share the marker** with the other replicas, *before* the acks: if the acks are then lost,
   the replica the stream redelivers to finds the marker and skips the messages.
6. **Ack.** Only now is the interval safe (written locally, queued for OTLP), so the stream may
   forget its messages. An ack that fails means a redelivery, which step 3 or 5 catches; so does
   the consumer's ack floor once it has passed them (a redelivery the server sent before the
   ack reached it can still be on its way).

:meth:`ExportThenAck.stop_and_export_last` is the same path at shutdown: stop taking messages
in, then export and ack what was merged while the connection is still up.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from nats.aio.client import Client as NATS

from aggregator.delivery.ack_ledger import AckLedger
from aggregator.delivery.consumers import Consumers
from aggregator.delivery.exported_messages import ExportedMessages, ExportMarker, marker_for
from aggregator.delivery.intake import Intake
from aggregator.delivery.peer_markers import PeerMarkers
from aggregator.profile import FleetProfiles
from shared.counters import Counters

log = logging.getLogger(__name__)

Encoded = TypeVar("Encoded")


class IntervalOutput(Protocol[Encoded]):
    """Where an interval's profiles go; the delivery path only decides *when*."""

    async def encode(self, fleet: FleetProfiles) -> Encoded | None:
        """The interval's export, or None when it holds nothing worth sending (counted by the output)."""
        ...

    async def write(self, fleet: FleetProfiles, encoded: Encoded, marker: ExportMarker | None) -> None:
        """Write and queue the export; ``marker`` goes into the local files as their commit point."""
        ...


class ExportThenAck(Generic[Encoded]):
    """Exports each interval, records which messages it holds, and only then acks them.

    ``exported`` is None on core NATS: nothing is acked or redelivered there, so nothing is
    marked either. ``peers`` is the bucket shared with other replicas (None when it could not
    be opened, or on core NATS). ``max_hold_s``: how long finished messages may wait for an
    unshared marker (step 0), counted from when the oldest of them was merged.
    """

    def __init__(self, nc: NATS, ledger: AckLedger, output: IntervalOutput[Encoded],
                 rotate: Callable[[], FleetProfiles], counters: Counters, exported: ExportedMessages | None,
                 stream: str, peers: PeerMarkers | None, max_hold_s: float = 0.0) -> None:
        self.nc = nc
        self.ledger = ledger
        self.output = output
        self.rotate = rotate
        self.counters = counters
        self.exported = exported
        self.stream = stream
        self.peers = peers
        self.max_hold_s = max_hold_s
        self._waiting = False

    async def export_interval(self, final: bool = False) -> None:
        """Export what was merged since the last call, then ack the messages it came from.

        Not final: the export may wait for an unshared marker (step 0) and happen at a later call."""
        if await self._wait_for_marker(final):
            return
        fleet = self.rotate()
        finished = self.ledger.take()  # same loop step as rotate(): exactly the messages in `fleet`
        if not fleet.hosts:
            await self.ledger.ack(self.nc, finished)
            return
        marker = None
        if self.exported is not None:  # what this export holds, so a redelivery is not exported twice
            # Still the same loop step: from here on the ledger no longer knows these messages,
            # and a redelivery arriving while the export is encoded must already find them.
            marker = marker_for(finished) or ExportMarker(self.stream, (), 0, 0)
            self.exported.remember(marker)
        try:
            encoded = await self.output.encode(fleet)
            if encoded is not None:
                self.counters.inc("exports")
                await self.output.write(fleet, encoded, marker)
        except BaseException:
            # Not exported: unacked, the messages come back and must then be merged, not skipped.
            if self.exported is not None:
                self.exported.forget(marker)
            raise
        if encoded is None:
            await self.ledger.ack(self.nc, finished)
            return
        if marker is not None and self.peers is not None:  # before the acks: see peer_markers
            await self.peers.publish(marker)
        await self.ledger.ack(self.nc, finished)

    async def _wait_for_marker(self, final: bool) -> bool:
        """True when this interval waits for an earlier export's marker to be shared (counted).

        The last export never waits, but still tries the put once: the bucket may be back."""
        if self.peers is None or not self.peers.in_outage:
            return False
        if await self.peers.share_pending() or final:
            self._waiting = False
            return False
        since = self.ledger.held_since()
        if since is not None and time.monotonic() - since >= self.max_hold_s:
            # Waiting longer would let the stream redeliver the held messages to a peer. The
            # bucket is now treated as broken until a put works again, so a bucket lost for
            # good costs one wait, not one per max_hold_s.
            log.warning("exporting with an export marker still unshared after %gs; exports no longer "
                        "wait for the bucket until a put works again", self.max_hold_s)
            self.peers.stop_waiting()
            self._waiting = False
            return False
        if not self._waiting:
            log.warning("exports wait while an export marker cannot be shared with other replicas "
                        "(at most %gs): one unshared export at a time", self.max_hold_s)
        self._waiting = True
        if since is not None:
            self.counters.inc("exports_deferred", reason="marker_unshared")
        return True

    async def stop_and_export_last(self, consumers: Consumers, intake: Intake) -> None:
        """Stop taking messages in, export and ack the last interval, close the connection.

        JetStream: parked messages are released unacked (the stream redelivers them to whoever
        runs next) and the last export acks what it holds, so the connection is closed only
        after it. Core NATS: the subscriptions are drained first, parked messages are dropped
        and counted, and the last export follows.
        """
        if self.exported is not None:
            await consumers.stop()
            intake.release_parked()
            await self.export_interval(final=True)
            with contextlib.suppress(Exception):
                await self.nc.flush(timeout=5)
            await self.nc.close()
        else:
            with contextlib.suppress(Exception):
                await self.nc.drain()
            intake.drop_parked("shutdown_parked")
            await self.export_interval(final=True)
