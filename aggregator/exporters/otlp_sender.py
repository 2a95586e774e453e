"""Delivering export requests to the OTLP endpoint without ever holding up intake.

Each export interval hands its request to :meth:`OtlpSender.offer`, which only appends to
a bounded FIFO; one task sends the oldest request at a time. A request that fails (the
exporter's own retries within its timeout are exhausted: endpoint down, slow, or refusing)
stays at the head and is tried again with exponential backoff, so a collector that comes
back receives everything still queued, in order. When the queue is full the *oldest*
queued request is dropped and counted as ``exports_dropped{reason=otlp_queue_full}`` —
the local files (written before the offer) still have that interval. The request being
sent at that moment is never the one dropped, so a delivered request is never counted as
lost; a request that can never be delivered is eventually pushed out the same way.

Hand-written on purpose: the upstream exporter's retry is per call and bounded by its
timeout; what it lacks is this queue across calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)

from aggregator.exporters.grpc import OtlpGrpcExporter
from shared.counters import Counters
from shared.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class OtlpSender:
    """Bounded, ordered, retrying delivery of export requests from its own task."""

    def __init__(self, exporter: OtlpGrpcExporter, max_queue: int, counters: Counters,
                 retry_initial_s: float = 1.0, retry_max_s: float = 30.0) -> None:
        self.exporter = exporter
        self.max_queue = max_queue
        self.counters = counters
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.pending: deque[ExportProfilesServiceRequest] = deque()
        self._sending: ExportProfilesServiceRequest | None = None
        self._wakeup = asyncio.Event()
        self._last_drop_log = 0.0
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._loop(), name="otlp-sender")

    def offer(self, request: ExportProfilesServiceRequest) -> None:
        """Queue ``request``; if the queue is full, drop the oldest one not being sent right now."""
        if len(self.pending) >= self.max_queue:
            victim = 1 if self.pending and self.pending[0] is self._sending else 0
            if victim < len(self.pending):
                del self.pending[victim]
                self.counters.inc("exports_dropped", reason="otlp_queue_full")
                now = time.monotonic()
                if now - self._last_drop_log > 60:
                    self._last_drop_log = now
                    log.warning("OTLP endpoint is behind: dropped the oldest queued export (it is in the local files)")
        self.pending.append(request)
        self._wakeup.set()

    async def _loop(self) -> None:
        delay = self.retry_initial_s
        while True:
            if not self.pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            request = self._sending = self.pending[0]
            started = time.monotonic()
            try:
                ok = await self.exporter.export(request)
            finally:
                self._sending = None
            self.counters.inc("otlp_exports", result="ok" if ok else "failed")
            if ok:
                self.counters.inc("otlp_export_ms", int((time.monotonic() - started) * 1000))
                if self.pending and self.pending[0] is request:
                    self.pending.popleft()
                delay = self.retry_initial_s
                continue
            # Still at the head unless newer exports pushed it out meanwhile (then counted).
            self.counters.inc("otlp_export_retries")
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_max_s)

    async def close(self, timeout_s: float) -> None:
        """Give queued exports ``timeout_s`` to go out, then stop; what is left is counted."""
        deadline = time.monotonic() + timeout_s
        while self.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.task:
            await cancel_and_wait(self.task)
        if self.pending:
            self.counters.inc("exports_dropped", len(self.pending), reason="shutdown")
            log.warning("%d export(s) not delivered to OTLP before shutdown (they are in the local files)",
                        len(self.pending))
        await self.exporter.close()
