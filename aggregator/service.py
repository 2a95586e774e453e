"""The aggregator service: NATS subscriptions -> intake -> merge -> periodic export.

Intake runs on the event loop and never waits for export: each interval's merged profiles
are encoded and written to local files in a worker thread, and handed to the OTLP sender
(aggregator/exporters/otlp_sender.py: bounded queue, retried with backoff, oldest dropped
and counted when the collector is away for long; the local files still have every
interval). How messages arrive (JetStream consumers, acked after export) is in
aggregator/delivery/consumers.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)

from aggregator.delivery.consumers import AckLedger, defer_redelivery, deferral_id, start_core, start_jetstream
from aggregator.delivery.exported_messages import ExportedMessages, ExportMarker, marker_for
from aggregator.delivery.intake import Intake
from aggregator.exporters.files import LocalFileWriter
from aggregator.exporters.grpc import OtlpGrpcExporter
from aggregator.exporters.otlp_sender import OtlpSender
from aggregator.gc_policy import restore_thresholds, use_aggregator_thresholds
from aggregator.gil_policy import use_switch_interval
from aggregator.merge import Merger
from aggregator.otlp.encode import encode_request
from aggregator.profile import FleetProfiles
from aggregator.settings import AggregatorSettings
from aggregator.web.access import WebAccess
from aggregator.web.server import WebServer
from aggregator.web.store import RetainedExports
from shared.counters import Counters
from shared.metrics_server import MetricsServer, metrics_registry, parse_address
from shared.nats_connection import connect_when_available
from shared.profile_types import ProfileType
from shared.subjects import RESYNC_SUBJECT
from shared.tasks import cancel_and_wait
from shared.wire import resync_request

log = logging.getLogger("stackfleet.aggregator")

ExportHook = Callable[[FleetProfiles, ExportProfilesServiceRequest], None]


async def run_aggregator(
    settings: AggregatorSettings,
    stop: asyncio.Event,
    counters: Counters | None = None,
    on_export: ExportHook | None = None,
) -> Counters:
    """Run until ``stop`` is set, then export the last interval and return the counters."""
    counters = counters or Counters()
    merger = Merger()
    maybe_nc = await connect_when_available(settings.nats, "stackfleet-aggregator", stop, counters)
    if maybe_nc is None:  # stopped before NATS was ever reachable: nothing was taken in
        return counters
    nc = maybe_nc
    previous_gc = use_aggregator_thresholds()
    previous_switch = use_switch_interval(settings.gil_switch_interval_s)

    async def request_resync(host: str, ptype: ProfileType, reason: str) -> None:
        await nc.publish(RESYNC_SUBJECT, resync_request(host, [ptype], reason))

    ledger = AckLedger(counters)
    intake = Intake(counters, merger.add, request_resync, settings.max_parked_messages, settings.park_timeout_s,
                    on_done=ledger.finished, on_expired=defer_redelivery if settings.nats.jetstream else None,
                    message_id=deferral_id if settings.nats.jetstream else None)
    writer = None
    if settings.output_dir:
        writer = LocalFileWriter(settings.output_dir, keep=settings.keep_files,
                                 max_age_s=settings.retention_max_age_s, max_bytes=settings.retention_max_bytes)
        if writer.recover() is not None:
            counters.inc("exports_rolled_back")
    exported = ExportedMessages()
    if settings.nats.jetstream:
        consumers = await start_jetstream(nc, settings, intake, counters, stop.is_set, exported,
                                          writer.markers() if writer is not None else [], ledger)
    else:
        consumers = await start_core(nc, settings, intake)
    # Agents already running hold dictionaries we have never seen (or that aged out of the
    # stream): ask everyone once.
    await nc.publish(RESYNC_SUBJECT, resync_request("*", None, "aggregator start"))
    await nc.flush()

    sender = None
    if settings.otlp_endpoint:
        sender = OtlpSender(OtlpGrpcExporter(endpoint=settings.otlp_endpoint), settings.max_export_queue, counters)
        sender.start()
    log.info("aggregator: NATS %s, export every %gs to %s%s", settings.nats.url, settings.export_interval_s,
             settings.otlp_endpoint or "(no OTLP)", f" and {settings.output_dir}" if writer else "")

    async def export_once() -> None:
        fleet = merger.rotate()
        finished = ledger.take()  # same loop step as rotate(): exactly the messages in `fleet`
        if not fleet.hosts:
            await ledger.ack(nc, finished)  # rejected/stale/dropped ones: counted, nothing to export
            return
        request = await asyncio.to_thread(
            encode_request, fleet, settings.service_name, settings.service_version, settings.resource_attributes
        )
        if not request.resource_profiles:  # every sample was zero (e.g. only gauges that fell to 0): nothing to say
            counters.inc("exports_empty")
            await ledger.ack(nc, finished)
            return
        counters.inc("exports")
        marker = None
        if settings.nats.jetstream:  # what this export holds, so a redelivery is not exported twice
            marker = marker_for(finished) or ExportMarker(settings.nats.stream.name, (), 0, 0)
            exported.remember(marker)
        if writer is not None:
            try:
                await asyncio.to_thread(writer.write, fleet, request, marker)
            except OSError as exc:
                counters.inc("local_write_errors")
                log.error("writing local profiles failed: %s", exc)
        if sender is not None:
            sender.offer(request)
        if on_export is not None:
            on_export(fleet, request)
        if marker is not None and consumers.peers is not None:  # before the acks: see peer_markers
            await consumers.peers.publish(marker)
        # Only now is the interval safe (written locally / queued for OTLP): the stream may forget it.
        await ledger.ack(nc, finished)

    async def sweeper() -> None:
        while True:
            await asyncio.sleep(1.0)
            await intake.sweep()

    sweep_task = asyncio.create_task(sweeper(), name="intake-sweep")
    metrics = None
    if settings.metrics_address:
        mhost, mport = parse_address(settings.metrics_address)
        metrics = MetricsServer(mhost, mport, metrics_registry(counters, "stackfleet_aggregator"),
                                lambda: (nc.is_connected, f"nats={nc.is_connected} streams={len(intake.streams)}"))
        await metrics.start()
    web = await _start_web(settings, counters)
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), settings.export_interval_s)
            await export_once()
    finally:
        await cancel_and_wait(sweep_task)
        if metrics is not None:
            await metrics.close()
        if web is not None:
            await web.close()
        if settings.nats.jetstream:
            await consumers.stop()
            intake.release_parked()  # unacked: the stream redelivers them to whoever runs next
            await export_once()  # acks what it exports, so the connection must still be up
            with contextlib.suppress(Exception):
                await nc.flush(timeout=5)
            await nc.close()
        else:
            with contextlib.suppress(Exception):
                await nc.drain()
            intake.drop_parked("shutdown_parked")
            await export_once()
        if sender is not None:
            await sender.close(timeout_s=5.0)
        restore_thresholds(previous_gc)
        use_switch_interval(previous_switch)
        log.info("aggregator stopped: %s", counters.snapshot())
    return counters


async def _start_web(settings: AggregatorSettings, counters: Counters) -> WebServer | None:
    """The web page, if configured; it shows the retained exports, so it needs the output directory."""
    if not settings.web_address:
        return None
    if not settings.output_dir:
        log.warning("web page disabled: it shows the retained exports and there is no output directory")
        return None
    host, port = parse_address(settings.web_address)
    try:
        access = WebAccess(settings.web_token.get_secret_value() if settings.web_token else None, settings.web_user,
                           settings.web_password.get_secret_value() if settings.web_password else None,
                           settings.web_tls_cert, settings.web_tls_key)
    except ValueError as exc:  # half an auth or TLS setting: the page stays closed, profiling goes on
        counters.inc("web_start_errors")
        log.error("web page not started: %s", exc)
        return None
    web = WebServer(host, port, RetainedExports(settings.output_dir, counters), counters, settings.service_name,
                    settings.service_version, settings.resource_attributes, access=access)
    try:
        await web.start()
    except OSError as exc:  # port taken: profiling goes on without the page
        counters.inc("web_start_errors")
        log.error("web page not started on %s: %s", settings.web_address, exc)
        await web.close()
        return None
    return web
