"""Where each export interval's merged profiles go: local files, the OTLP sender, a hook.

The interval is encoded once, in a worker thread, into one OTLP request; the local files are
written from it in a worker thread too, and the request is handed to the OTLP sender
(aggregator/exporters/otlp_sender.py: bounded queue, retried with backoff, oldest dropped and
counted when the collector is away for long; the local files still have every interval), so
the event loop never waits for an export. When each interval is exported and its messages
acked is decided by aggregator/delivery/export_then_ack.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)

from aggregator.delivery.exported_messages import ExportMarker
from aggregator.exporters.files import LocalFileWriter
from aggregator.exporters.grpc import OtlpGrpcExporter
from aggregator.exporters.otlp_sender import OtlpSender
from aggregator.otlp.encode import encode_request
from aggregator.profile import FleetProfiles
from aggregator.settings import AggregatorSettings
from shared.counters import Counters

log = logging.getLogger(__name__)

ExportHook = Callable[[FleetProfiles, ExportProfilesServiceRequest], None]


class IntervalExporter:
    """Encodes an interval into an OTLP request and hands it to every configured output."""

    def __init__(self, settings: AggregatorSettings, counters: Counters, on_export: ExportHook | None = None) -> None:
        """Open the local output directory (rolling back an export a crash interrupted) and
        make the OTLP sender; the sender's task starts with :meth:`start`."""
        self.settings = settings
        self.counters = counters
        self.on_export = on_export
        self.writer: LocalFileWriter | None = None
        if settings.output_dir:
            self.writer = LocalFileWriter(settings.output_dir, keep=settings.keep_files,
                                          max_age_s=settings.retention_max_age_s,
                                          max_bytes=settings.retention_max_bytes)
            if self.writer.recover() is not None:
                counters.inc("exports_rolled_back")
        self.sender: OtlpSender | None = None
        if settings.otlp_endpoint:
            self.sender = OtlpSender(OtlpGrpcExporter(endpoint=settings.otlp_endpoint), settings.max_export_queue,
                                     counters)

    def markers_on_disk(self) -> list[ExportMarker]:
        """The markers of the exports in the output directory (which messages they hold)."""
        return self.writer.markers() if self.writer is not None else []

    def start(self) -> None:
        if self.sender is not None:
            self.sender.start()

    async def encode(self, fleet: FleetProfiles) -> ExportProfilesServiceRequest | None:
        """The interval's OTLP request, or None (counted) when every sample was zero, e.g. only
        gauges that fell to 0: there is nothing to say."""
        s = self.settings
        request = await asyncio.to_thread(encode_request, fleet, s.service_name, s.service_version,
                                          s.resource_attributes)
        if not request.resource_profiles:
            self.counters.inc("exports_empty")
            return None
        return request

    async def write(self, fleet: FleetProfiles, request: ExportProfilesServiceRequest,
                    marker: ExportMarker | None) -> None:
        """Write the local files (a failed write is logged and counted), queue the OTLP request,
        call the hook."""
        if self.writer is not None:
            try:
                await asyncio.to_thread(self.writer.write, fleet, request, marker)
            except OSError as exc:
                self.counters.inc("local_write_errors")
                log.error("writing local profiles failed: %s", exc)
        if self.sender is not None:
            self.sender.offer(request)
        if self.on_export is not None:
            self.on_export(fleet, request)

    async def close(self) -> None:
        """Give the OTLP sender a few seconds to deliver what is queued."""
        if self.sender is not None:
            await self.sender.close(timeout_s=5.0)
