"""The aggregator service: NATS subscriptions -> intake -> merge -> periodic export.

:func:`run_aggregator` wires the parts and runs the export loop. Intake runs on the event
loop and never waits for export (aggregator/exporters/interval.py: encoding and file writes
in worker threads, a bounded OTLP queue). How messages arrive is in
aggregator/delivery/consumers.py; the order in which an interval is exported, marked and
acked — what makes delivery exactly-once — is aggregator/delivery/export_then_ack.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.client import Client as NATS

from aggregator.delivery.ack_ledger import AckLedger
from aggregator.delivery.consumers import defer_redelivery, deferral_id, start_core, start_jetstream
from aggregator.delivery.export_then_ack import ExportThenAck
from aggregator.delivery.exported_messages import ExportedMessages
from aggregator.delivery.intake import Intake
from aggregator.exporters.interval import ExportHook, IntervalExporter
from aggregator.gc_policy import restore_thresholds, use_aggregator_thresholds
from aggregator.gil_policy import use_switch_interval
from aggregator.merge import Merger
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

log = logging.getLogger(__name__)


async def run_aggregator(
    settings: AggregatorSettings,
    stop: asyncio.Event,
    counters: Counters | None = None,
    on_export: ExportHook | None = None,
) -> Counters:
    """Run until ``stop`` is set, then export the last interval and return the counters."""
    counters = counters or Counters()
    maybe_nc = await connect_when_available(settings.nats, "stackfleet-aggregator", stop, counters)
    if maybe_nc is None:  # stopped before NATS was ever reachable: nothing was taken in
        return counters
    nc = maybe_nc
    previous_gc = use_aggregator_thresholds()
    previous_switch = use_switch_interval(settings.gil_switch_interval_s)
    merger = Merger()
    ledger = AckLedger(counters)
    intake = _intake(nc, settings, counters, merger, ledger)
    output = IntervalExporter(settings, counters, on_export)
    exported = ExportedMessages()
    if settings.nats.jetstream:
        consumers = await start_jetstream(nc, settings, intake, counters, stop.is_set, exported,
                                          output.markers_on_disk(), ledger)
    else:
        consumers = await start_core(nc, settings, intake)
    # Agents already running hold dictionaries we have never seen (or that aged out of the
    # stream): ask everyone once.
    await nc.publish(RESYNC_SUBJECT, resync_request("*", None, "aggregator start"))
    await nc.flush()
    output.start()
    log.info("aggregator: NATS %s, export every %gs to %s%s", settings.nats.url, settings.export_interval_s,
             settings.otlp_endpoint or "(no OTLP)", f" and {settings.output_dir}" if output.writer else "")
    delivery = ExportThenAck(nc, ledger, output, merger.rotate, counters,
                             exported if settings.nats.jetstream else None, settings.nats.stream.name, consumers.peers,
                             settings.max_marker_wait_s)

    sweep_task = asyncio.create_task(_sweep_forever(intake), name="intake-sweep")
    metrics = await _start_metrics(settings, counters, nc, intake)
    web = await _start_web(settings, counters)
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), settings.export_interval_s)
            await delivery.export_interval()
    finally:
        await cancel_and_wait(sweep_task)
        if metrics is not None:
            await metrics.close()
        if web is not None:
            await web.close()
        await delivery.stop_and_export_last(consumers, intake)
        await output.close()
        restore_thresholds(previous_gc)
        use_switch_interval(previous_switch)
        log.info("aggregator stopped: %s", counters.snapshot())
    return counters


def _intake(nc: NATS, settings: AggregatorSettings, counters: Counters, merger: Merger, ledger: AckLedger) -> Intake:
    """The intake, merging into ``merger``; finished messages go to ``ledger`` (acked after export),
    and with JetStream a sample whose dictionary is late is handed back for a later redelivery."""

    async def request_resync(host: str, ptype: ProfileType, reason: str) -> None:
        await nc.publish(RESYNC_SUBJECT, resync_request(host, [ptype], reason))

    jetstream = settings.nats.jetstream
    return Intake(counters, merger.add, request_resync, settings.max_parked_messages, settings.park_timeout_s,
                  on_done=ledger.finished, on_expired=defer_redelivery if jetstream else None,
                  message_id=deferral_id if jetstream else None)


async def _sweep_forever(intake: Intake) -> None:
    """Expire parked messages and idle streams once a second."""
    while True:
        await asyncio.sleep(1.0)
        await intake.sweep()


async def _start_metrics(settings: AggregatorSettings, counters: Counters, nc: NATS,
                         intake: Intake) -> MetricsServer | None:
    """The Prometheus endpoint, if configured; healthy while the NATS connection is up."""
    if not settings.metrics_address:
        return None
    host, port = parse_address(settings.metrics_address)
    metrics = MetricsServer(host, port, metrics_registry(counters, "stackfleet_aggregator"),
                            lambda: (nc.is_connected, f"nats={nc.is_connected} streams={len(intake.streams)}"))
    await metrics.start()
    return metrics


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
