"""OTLP delivery across a collector outage, against a real gRPC ProfilesService.

The endpoint is down while exports are offered; it comes up later on the same port. What
fits the bounded queue arrives, in order; what did not is counted, oldest first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)

from aggregator.exporters.grpc import OtlpGrpcExporter
from aggregator.exporters.otlp_sender import OtlpSender
from aggregator.otlp.encode import encode_request
from shared.counters import Counters
from stackfleet.nats_server import free_port
from tests.otlp_server import OtlpTestServer
from tests.test_otlp import fleet


def numbered_requests(n: int) -> list[ExportProfilesServiceRequest]:
    """Distinct requests, told apart by their service version."""
    return [encode_request(fleet(), "svc", str(i)) for i in range(n)]


def version_of(request: ExportProfilesServiceRequest) -> str:
    attrs = request.resource_profiles[0].resource.attributes
    return next(a.value.string_value for a in attrs if a.key == "service.version")


async def wait_until(predicate: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


async def test_exports_queued_while_endpoint_down_arrive_in_order_when_it_comes_up() -> None:
    port = free_port()
    counters = Counters()
    sender = OtlpSender(OtlpGrpcExporter(f"http://127.0.0.1:{port}", timeout_s=1), max_queue=3,
                        counters=counters, retry_initial_s=0.2, retry_max_s=1.0)
    sender.start()
    requests = numbered_requests(5)
    sender.offer(requests[0])
    await wait_until(lambda: counters.get("otlp_exports", result="failed") >= 1, 30)
    assert counters.get("otlp_exports", result="failed") >= 1, "export to a dead endpoint did not fail"
    for r in requests[1:]:  # intake goes on: offers never block, the queue stays bounded
        sender.offer(r)
    assert len(sender.pending) == 3
    assert counters.get("exports_dropped", reason="otlp_queue_full") == 2
    with OtlpTestServer(port) as server:
        await wait_until(lambda: len(server.requests) >= 3 and not sender.pending, 60)
        await sender.close(timeout_s=5)
    assert [version_of(r) for r in server.requests] == ["2", "3", "4"]
    assert counters.get("otlp_exports", result="ok") == 3
    assert counters.get("otlp_export_retries") >= 1
    assert counters.get("exports_dropped", reason="shutdown") == 0


async def test_request_being_sent_is_not_the_one_dropped() -> None:
    counters = Counters()
    with OtlpTestServer() as server:
        sender = OtlpSender(OtlpGrpcExporter(server.endpoint, timeout_s=5), max_queue=1, counters=counters)
        sender.start()
        requests = numbered_requests(3)
        sender.offer(requests[0])
        await asyncio.sleep(0)  # the sender task takes requests[0] and starts sending it
        sender.offer(requests[1])  # queue full: requests[0] is in flight, so nothing else to drop yet
        sender.offer(requests[2])  # now requests[1] is the oldest not being sent
        await wait_until(lambda: not sender.pending, 30)
        await sender.close(timeout_s=5)
    assert [version_of(r) for r in server.requests] == ["0", "2"]
    assert counters.get("exports_dropped", reason="otlp_queue_full") == 1
