"""OTLP gRPC export of profiles (``ProfilesService/Export``).

Built on the upstream ``OTLPExporterMixin`` from opentelemetry-exporter-otlp-proto-grpc,
which already handles endpoint parsing, TLS/insecure, headers, compression, timeouts,
retry with jittered backoff (honouring RetryInfo), channel re-creation on UNAVAILABLE and
the ``OTEL_EXPORTER_OTLP_*`` variables. Upstream has no profiles exporter; this subclass
supplies the profiles stub and runs the mixin's blocking export in a worker thread so the
aggregator's event loop never waits on the network.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time

from opentelemetry.exporter.otlp.proto.grpc.exporter import OTLPExporterMixin
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2_grpc import ProfilesServiceStub

log = logging.getLogger(__name__)


class _RateLimit(logging.Filter):
    """Lets one record through per ``interval_s``: a collector that is down for hours would
    otherwise log an error every export interval. Failures are still counted every time."""

    def __init__(self, interval_s: float = 60.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.last = 0.0
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self.last < self.interval_s:
            self.suppressed += 1
            return False
        if self.suppressed:
            record.msg = f"{record.msg} ({self.suppressed} similar messages suppressed)"
            self.suppressed = 0
        self.last = now
        return True


logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter").addFilter(_RateLimit())


class ExportResult(enum.Enum):
    SUCCESS = 0
    FAILURE = 1


# The mixin's type variables are bound to the trace/metric/log types it ships with; the
# runtime code is generic, so the profile types are substituted with the checks silenced.
_Request = ExportProfilesServiceRequest
_Mixin = OTLPExporterMixin[_Request, _Request, ExportResult, ProfilesServiceStub]  # type: ignore[type-var]


class _ProfilesExporter(_Mixin):
    """The mixin specialised to profiles: the request is already built, so translation is identity."""

    def _translate_data(self, data: ExportProfilesServiceRequest) -> ExportProfilesServiceRequest:
        return data

    def _count_data(self, data: ExportProfilesServiceRequest) -> int:
        return sum(len(p.samples) for rp in data.resource_profiles for sp in rp.scope_profiles for p in sp.profiles)

    @property
    def _exporting(self) -> str:
        return "profiles"


class OtlpGrpcExporter:
    """Async facade: ``await export(request)`` returns True/False and never raises for network errors."""

    def __init__(self, endpoint: str | None = None, timeout_s: float | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.endpoint = endpoint
        self._exporter = _ProfilesExporter(
            ProfilesServiceStub, ExportResult,  # type: ignore[arg-type]
            endpoint=endpoint, timeout=timeout_s, headers=headers, signal="logs")
        self.exported = 0
        self.failed = 0
        self.last_error = ""

    async def export(self, request: ExportProfilesServiceRequest) -> bool:
        started = time.monotonic()
        try:
            result = await asyncio.to_thread(self._exporter._export, request)
        except Exception as exc:  # anything unexpected from grpc must not take the aggregator down
            result = ExportResult.FAILURE
            self.last_error = repr(exc)[:200]
            log.warning("OTLP export to %s raised %r", self.endpoint, exc)
        if result == ExportResult.SUCCESS:
            self.exported += 1
            log.debug("exported profiles to %s in %.0f ms", self.endpoint, (time.monotonic() - started) * 1e3)
            return True
        self.failed += 1
        return False

    async def close(self) -> None:
        await asyncio.to_thread(self._exporter.shutdown)
