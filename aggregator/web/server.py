"""The aggregator's HTTP server: the flame-graph page, its JSON API and downloads (aiohttp).

It runs on the aggregator's event loop; every handler that touches the disk or merges
profiles does so in a worker thread, and at most ``max_concurrent`` such jobs run at once
(further requests wait their turn) so a busy page cannot starve intake of CPU.

Routes:
  GET /                       the page (static/index.html)
  GET /static/...             its JS/CSS and the vendored d3 + d3-flame-graph builds
  GET /api/types              profile types, value columns and units, which have data in range
  GET /api/hosts              hosts, services (executable names) and processes in range
  GET /api/flamegraph         the flame-graph tree of one view, and its top-functions table
  GET /api/timeline           the view's value over its range (buckets), for the range selector
  GET /api/download/pprof     the same view as gzipped pprof (profile.proto)
  GET /api/download/otlp      the same view as an OTLP ExportProfilesServiceRequest
Views take ``type``, ``host`` (repeatable or comma separated), ``service``, ``pid``,
``since``, ``until`` and ``value`` (the value column, e.g. ``delay`` for lock). A flame
graph with ``compare_since``/``compare_until``/``compare_host`` is a diff view: every node
also carries ``delta`` against that baseline (see :func:`query.add_deltas`).
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from aggregator.exporters.pprof import encode_pprof
from aggregator.otlp.encode import encode_request
from aggregator.profile import FleetProfiles
from aggregator.web import query as q
from aggregator.web import summaries
from aggregator.web.access import WebAccess
from aggregator.web.store import RetainedExports
from shared.counters import Counters
from shared.profile_types import PROFILE_TYPES, ProfileType

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class WebServer:
    """Serves the retained exports of ``store`` at ``host:port``."""

    def __init__(self, host: str, port: int, store: RetainedExports, counters: Counters | None = None,
                 service_name: str = "stackfleet", service_version: str = "",
                 resource_attributes: dict[str, str] | None = None, max_concurrent: int = 2,
                 access: WebAccess | None = None) -> None:
        self.host, self.port = host, port
        self.access = access or WebAccess()
        self.store = store
        self.counters = counters or Counters()
        self.service_name, self.service_version = service_name, service_version
        self.resource_attributes = resource_attributes or {}
        self._jobs = asyncio.Semaphore(max_concurrent)
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.access.middleware, self._errors])
        app.router.add_get("/", self._index)
        app.router.add_static("/static/", STATIC_DIR)
        app.router.add_get("/api/types", self._types)
        app.router.add_get("/api/hosts", self._hosts)
        app.router.add_get("/api/flamegraph", self._flamegraph)
        app.router.add_get("/api/timeline", self._timeline)
        app.router.add_get("/api/download/pprof", self._download_pprof)
        app.router.add_get("/api/download/otlp", self._download_otlp)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, ssl_context=self.access.ssl_context()).start()
        log.info("web page at %s://%s:%d/ (retained exports in %s)", self.access.scheme, self.host, self.port,
                 self.store.directory)
        if not self.access.protected and not _loopback(self.host):
            log.warning("the web page on %s has no authentication: set web_token or web_user/web_password "
                        "(and web_tls_cert/web_tls_key), see the README", self.host)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        async with self._jobs:
            return await asyncio.to_thread(fn, *args)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except q.QueryError as exc:
            self.counters.inc("web_requests", result="bad_request")
            return web.json_response({"error": str(exc)}, status=400)

    @staticmethod
    def _query(request: web.Request) -> q.ProfileQuery:
        return q.parse_query(request.query.get, lambda k: request.query.getall(k, []))

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html")

    async def _types(self, request: web.Request) -> web.Response:
        now = time.time_ns()
        since = q.parse_time(request.query.get("since") or q.DEFAULT_SINCE, now)
        until = q.parse_time(request.query.get("until") or "now", now)
        present = await self._in_thread(q.present_types, self.store, since, until)
        return web.json_response({"types": [
            {"name": ptype.value, "description": spec.description, "has_data": ptype in present,
             "values": [{"name": vt.type, "unit": vt.unit} for vt in spec.sample_types]}
            for ptype, spec in PROFILE_TYPES.items()]})

    async def _hosts(self, request: web.Request) -> web.Response:
        query = self._query(request)
        unfiltered = q.ProfileQuery(query.profile_type, query.since_ns, query.until_ns)
        fleet, _ = await self._in_thread(q.load_fleet, self.store, unfiltered)
        return web.json_response(q.labels(fleet))

    async def _flamegraph(self, request: web.Request) -> web.Response:
        query = self._query(request)
        baseline = q.comparison(request.query.get, lambda k: request.query.getall(k, []), query)
        fleet, exports = await self._in_thread(q.load_fleet, self.store, query)
        tree = await self._in_thread(q.flamegraph, fleet, query)
        top = await self._in_thread(summaries.top_functions, fleet, query)
        value_type = PROFILE_TYPES[query.profile_type].sample_types[query.column]
        body = {"type": query.profile_type.value, "value": value_type.type, "unit": value_type.unit,
                "since_ns": query.since_ns, "until_ns": query.until_ns, "exports": exports,
                "total": tree["value"], "tree": tree, "top": top}
        if baseline is not None:
            base_fleet, base_exports = await self._in_thread(q.load_fleet, self.store, baseline)
            base_tree = await self._in_thread(q.flamegraph, base_fleet, baseline, 0.0)
            q.add_deltas(tree, base_tree)
            body["compare"] = {"since_ns": baseline.since_ns, "until_ns": baseline.until_ns,
                               "hosts": sorted(baseline.hosts), "exports": base_exports, "total": base_tree["value"]}
        self.counters.inc("web_requests", result="ok")
        return web.json_response(body)

    async def _timeline(self, request: web.Request) -> web.Response:
        query = self._query(request)
        buckets = await self._in_thread(summaries.timeline, self.store, query)
        profile_type = PROFILE_TYPES[query.profile_type]
        value_type = profile_type.sample_types[query.column]
        # A delta column's buckets differ in length (exports of uneven intervals), so the page
        # draws its bars' heights as a rate; a gauge column's value is a level at the bucket's end.
        gauge = query.column in profile_type.snapshot_columns
        return web.json_response({"since_ns": query.since_ns, "until_ns": query.until_ns, "unit": value_type.unit,
                                  "gauge": gauge,
                                  "points": [{"start_ns": s, "end_ns": e, "value": v} for s, e, v in buckets]})

    async def _download_pprof(self, request: web.Request) -> web.Response:
        query = self._query(request)
        fleet, _ = await self._in_thread(q.load_fleet, self.store, query)
        body = await self._in_thread(_gzipped_pprof, fleet, query.profile_type)
        return self._attachment(body, f"{self._file_stem(query)}.pb.gz", "application/octet-stream")

    async def _download_otlp(self, request: web.Request) -> web.Response:
        query = self._query(request)
        fleet, _ = await self._in_thread(q.load_fleet, self.store, query)
        req = await self._in_thread(encode_request, fleet, self.service_name, self.service_version,
                                    self.resource_attributes)
        return self._attachment(req.SerializeToString(), f"{self._file_stem(query)}.otlp.pb",
                                "application/x-protobuf")

    @staticmethod
    def _file_stem(query: q.ProfileQuery) -> str:
        until = time.strftime("%Y%m%dT%H%M%S", time.gmtime(query.until_ns // 10**9))
        return f"stackfleet-{query.profile_type.value}-{until}"

    def _attachment(self, body: bytes, filename: str, content_type: str) -> web.Response:
        self.counters.inc("web_downloads")
        return web.Response(body=body, content_type=content_type,
                            headers={"Content-Disposition": f'attachment; filename="{filename}"'})


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _gzipped_pprof(fleet: FleetProfiles, ptype: ProfileType) -> bytes:
    return gzip.compress(encode_pprof(fleet, ptype), compresslevel=6)
