"""Which JetStream sample messages are already in an export, so a redelivery is not merged twice.

Messages are acked only after the export holding their samples is written (durability).
If the aggregator dies between writing that export and sending its acks, or the acks are
lost while NATS is away, the stream redelivers the messages and, without this record, their
samples would be exported a second time. Each export therefore records the stream
sequences of its messages — compactly, as ranges, with the span of their stream
timestamps — as a marker file written *after* the export's other files (its commit
point), and in memory. A redelivered message (``num_delivered > 1``) whose sequence and
timestamp fall inside a recorded export is acked and skipped, not merged.

The record is bounded: an export is forgotten once the consumer's ack floor passes its
highest sequence, and at most ``max_exports`` are kept. Below the floor no marker is needed:
every message there was acked, which happens only once it is handled, so a redelivery of one
(sent by the server before the ack reached it, and still queued here when the floor moved)
is recognised by its sequence alone. The timestamp span guards against a recreated stream reusing
sequence numbers. Scope: one replica. Across replicas the markers are shared through a
JetStream key-value bucket (aggregator/delivery/peer_markers.py, docs/design/durability.md).

Hand-written: JetStream offers no exactly-once consumption, only these building blocks.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from nats.aio.msg import Msg

log = logging.getLogger(__name__)

MARKER_VERSION = 1


@dataclass(frozen=True)
class ExportMarker:
    """The stream messages one export holds: sequence ranges and their timestamp span (ns)."""

    stream: str
    ranges: tuple[tuple[int, int], ...]
    first_ns: int
    last_ns: int

    @property
    def max_seq(self) -> int:
        return self.ranges[-1][1] if self.ranges else 0

    def holds(self, stream: str, seq: int, stamp_ns: int) -> bool:
        if stream != self.stream or not (self.first_ns <= stamp_ns <= self.last_ns):
            return False
        lo, hi = 0, len(self.ranges)
        while lo < hi:  # the ranges are sorted and disjoint: binary search
            mid = (lo + hi) // 2
            first, last = self.ranges[mid]
            if seq < first:
                hi = mid
            elif seq > last:
                lo = mid + 1
            else:
                return True
        return False

    def to_json(self) -> bytes:
        return json.dumps({"v": MARKER_VERSION, "stream": self.stream, "ranges": self.ranges,
                           "first_ns": self.first_ns, "last_ns": self.last_ns}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ExportMarker:
        """Parse a marker file; ValueError for anything that is not one of ours."""
        try:
            doc = json.loads(data)
            if doc.get("v") != MARKER_VERSION:
                raise ValueError(f"unknown marker version {doc.get('v')!r}")
            ranges = tuple((int(a), int(b)) for a, b in doc["ranges"])
            return cls(str(doc["stream"]), ranges, int(doc["first_ns"]), int(doc["last_ns"]))
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not an export marker: {exc}") from exc


def stream_position(msg: Msg) -> tuple[str, int, int, int] | None:
    """(stream, stream sequence, stream timestamp ns, deliveries) of a JetStream message, else None."""
    try:
        md = msg.metadata
    except Exception:  # not a JetStream message (core NATS): nothing to record
        return None
    return md.stream, md.sequence.stream, int(md.timestamp.timestamp() * 1_000_000_000), md.num_delivered


def marker_for(msgs: Iterable[Msg]) -> ExportMarker | None:
    """The marker of the messages in one export (None when none came from JetStream)."""
    seqs: list[int] = []
    stamps: list[int] = []
    stream = ""
    for m in msgs:
        pos = stream_position(m)
        if pos is None:
            continue
        stream, seq, stamp, _ = pos
        seqs.append(seq)
        stamps.append(stamp)
    if not seqs:
        return None
    seqs.sort()
    ranges: list[tuple[int, int]] = []
    first = last = seqs[0]
    for s in seqs[1:]:
        if s == last + 1 or s == last:
            last = s
            continue
        ranges.append((first, last))
        first = last = s
    ranges.append((first, last))
    # Timestamps are parsed from a float of seconds: widen by a millisecond for rounding.
    return ExportMarker(stream, tuple(ranges), min(stamps) - 1_000_000, max(stamps) + 1_000_000)


class ExportedMessages:
    """The recent exports' markers, consulted for every redelivered samples message."""

    def __init__(self, max_exports: int = 10_000) -> None:
        self.markers: deque[ExportMarker] = deque(maxlen=max_exports)
        # The consumer's ack floor (stream sequence) as last read, with the stream it belongs to.
        self.ack_floor = 0
        self.floor_stream = ""

    def remember(self, marker: ExportMarker | None) -> None:
        if marker is not None:
            self.markers.append(marker)

    def forget(self, marker: ExportMarker | None) -> None:
        """Drop a marker whose export failed: its messages are not acked and must be merged again."""
        if marker is not None:
            with contextlib.suppress(ValueError):
                self.markers.remove(marker)

    def load(self, markers: Iterable[ExportMarker], stream: str, ack_floor: int = 0) -> int:
        """Take in the markers of exports written before a restart; returns how many matter."""
        self.ack_floor, self.floor_stream = ack_floor, stream
        n = 0
        for marker in markers:
            if marker.max_seq > ack_floor:
                self.markers.append(marker)
                n += 1
        return n

    def forget_acked(self, stream: str, ack_floor: int) -> None:
        """Drop the markers the consumer's ack floor has passed (the floor itself now recognises
        redeliveries of their messages). The floor is replaced, not raised: a stream recreated
        under the same name starts again from 0."""
        self.ack_floor, self.floor_stream = ack_floor, stream
        if ack_floor and any(m.max_seq <= ack_floor for m in self.markers):
            kept = [m for m in self.markers if m.max_seq > ack_floor]
            self.markers.clear()
            self.markers.extend(kept)

    def already_exported(self, msg: Msg) -> bool:
        """True for a redelivered message whose samples an earlier export already holds, or
        that was acked (at or below the ack floor) since this copy was sent."""
        pos = stream_position(msg)
        if pos is None or pos[3] <= 1:  # first delivery: cannot have been exported
            return False
        stream, seq, stamp, _ = pos
        if seq <= self.ack_floor and stream == self.floor_stream:
            return True
        return any(m.holds(stream, seq, stamp) for m in reversed(self.markers))


def read_markers(paths: Iterable[Path]) -> list[ExportMarker]:
    """Markers from files; unreadable or foreign ones are logged and skipped (oldest first)."""
    out: list[ExportMarker] = []
    for path in sorted(paths):
        try:
            out.append(ExportMarker.from_json(path.read_bytes()))
        except (OSError, ValueError) as exc:
            log.warning("ignoring export marker %s: %s", path.name, exc)
    return out

