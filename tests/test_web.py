"""The web page's backend: retention bounds, reading retained exports after a restart, the
JSON API and downloads over real HTTP (aiohttp server on a free port, Google pprof)."""

from __future__ import annotations

import gzip
import os
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)

from aggregator.exporters.files import LocalFileWriter, export_stamp, stamp_ns
from aggregator.otlp.decode import merge_request
from aggregator.otlp.encode import encode_request, validate_request
from aggregator.profile import FleetProfiles
from aggregator.web import query as q
from aggregator.web.access import WebAccess
from aggregator.web.server import WebServer
from aggregator.web.store import RetainedExports
from shared.counters import Counters
from shared.profile_types import ProfileType
from stackfleet.nats_server import free_port
from tests.test_otlp import fleet

PPROF = Path(__file__).resolve().parents[1] / ".tools" / "pprof"
SAMPLE = 10_101_010  # ns per CPU sample in tests.test_otlp.fleet()


def write_exports(directory: Path, ends_s_ago: list[float], **bounds: int | float) -> LocalFileWriter:
    """One export of tests.test_otlp.fleet() per entry, ending that many seconds ago."""
    writer = LocalFileWriter(directory, **bounds)  # type: ignore[arg-type]
    now = time.time_ns()
    for ago in ends_s_ago:
        f = fleet()
        f.end_ns = now - int(ago * 1e9)
        writer.write(f, encode_request(f))
    return writer


def stamps(directory: Path) -> list[str]:
    return sorted(p.name[: -len(".otlp.pb")] for p in directory.glob("*.otlp.pb"))


# ---- retention --------------------------------------------------------------------------

def test_stamps_round_trip() -> None:
    t = 1_764_000_000_123_456_789
    assert stamp_ns(export_stamp(t)) == t
    assert stamp_ns("latest") is None


def test_retention_by_count_keeps_the_newest(tmp_path: Path) -> None:
    write_exports(tmp_path, [50, 40, 30, 20, 10], keep=3)
    kept = stamps(tmp_path)
    assert len(kept) == 3
    # whole exports go: no pprof file outlives its OTLP file
    assert sorted(p.name.split(".")[0] for p in tmp_path.glob("[0-9]*.pb.gz")) == sorted(kept * 2)
    assert (tmp_path / "latest.cpu.pb.gz").resolve().name.startswith(kept[-1])


def test_retention_by_age_uses_write_time(tmp_path: Path) -> None:
    writer = write_exports(tmp_path, [30, 20, 10], max_age_s=3600)
    oldest = stamps(tmp_path)[0]
    for f in tmp_path.glob(f"{oldest}.*"):  # written two hours ago
        os.utime(f, (time.time() - 7200, time.time() - 7200))
    assert writer._enforce_retention() == [oldest]
    assert len(stamps(tmp_path)) == 2
    # everything old, still the newest export stays
    assert len(writer._enforce_retention(now=time.time() + 10 * 3600)) == 1
    assert len(stamps(tmp_path)) == 1


def test_retention_by_total_size(tmp_path: Path) -> None:
    write_exports(tmp_path, [10])
    one_export = sum(f.stat().st_size for f in tmp_path.iterdir() if f.is_file() and not f.is_symlink())
    for f in list(tmp_path.iterdir()):
        f.unlink()
    write_exports(tmp_path, [60, 50, 40, 30, 20, 10], max_bytes=int(one_export * 3.5))
    total = sum(f.stat().st_size for f in tmp_path.iterdir() if f.is_file() and not f.is_symlink())
    assert len(stamps(tmp_path)) == 3
    assert total <= one_export * 3.5


# ---- reading the retained exports --------------------------------------------------------

def cpu_query(**kw: object) -> q.ProfileQuery:
    now = time.time_ns()
    args: dict[str, object] = {"since_ns": now - int(600e9), "until_ns": now, **kw}
    return q.ProfileQuery(ProfileType.CPU, **args)  # type: ignore[arg-type]


def find(node: dict, *path: str) -> dict:
    for name in path:
        node = next(c for c in node["children"] if c["name"] == name)
    return node


def test_flamegraph_of_exports_read_after_a_restart(tmp_path: Path) -> None:
    write_exports(tmp_path, [1200, 30, 20])  # the first is outside a 10-minute range
    store = RetainedExports(tmp_path)  # a new aggregator process: nothing in memory
    fleet_, read = q.load_fleet(store, cpu_query())
    assert read == 2
    tree = q.flamegraph(fleet_, cpu_query())
    # per export and host: leaf<-main twice, schedule once; 2 hosts, 2 exports
    assert tree["value"] == 2 * 2 * 3 * SAMPLE
    leaf = find(tree, "app", "main", "leaf")
    assert leaf["value"] == leaf["self"] == 2 * 2 * 2 * SAMPLE
    assert find(tree, "app", "main")["self"] == 0
    one_host = q.flamegraph(q.load_fleet(store, cpu_query(hosts=frozenset({"web-2"})))[0], cpu_query())
    assert one_host["value"] == tree["value"] // 2
    assert q.load_fleet(store, cpu_query(pid=999))[0].hosts == {}
    assert q.load_fleet(store, cpu_query(service="other"))[0].hosts == {}
    assert q.labels(fleet_) == {"hosts": ["web-1", "web-2"], "services": ["app"],
                                "processes": [{"host": "web-1", "pid": 10, "name": "app"},
                                              {"host": "web-2", "pid": 10, "name": "app"}]}


def test_views_reuse_decoded_exports_without_changing_them(tmp_path: Path) -> None:
    """Each export is decoded once; repeated and overlapping views sum the same cached parts."""
    write_exports(tmp_path, [30, 20])
    store = RetainedExports(tmp_path)
    first = q.flamegraph(q.load_fleet(store, cpu_query())[0], cpu_query())
    decoded_before = len(store._decoded)
    again = q.flamegraph(q.load_fleet(store, cpu_query())[0], cpu_query())
    assert again == first and len(store._decoded) == decoded_before == 2
    fleet_, _ = q.load_fleet(store, cpu_query())
    for hp in fleet_.hosts.values():  # a view's samples are its own: changing them leaves the cache
        for sample in hp.samples.values():
            sample.values[0] = 0
            sample.timestamps_ns.clear()
    assert q.flamegraph(q.load_fleet(store, cpu_query())[0], cpu_query()) == first
    write_exports(tmp_path, [10])  # a new export: only it is decoded
    assert q.flamegraph(q.load_fleet(store, cpu_query())[0], cpu_query())["value"] == first["value"] * 3 // 2
    assert len(store._decoded) == 3
    small = RetainedExports(tmp_path, max_decoded_samples=1)  # bounded by samples: views stay exact
    assert q.flamegraph(q.load_fleet(small, cpu_query())[0], cpu_query())["value"] == first["value"] * 3 // 2
    assert len(small._decoded) <= 1


def test_small_frames_fold_into_their_caller() -> None:
    f = fleet()
    tree = q.flamegraph(f, cpu_query(), min_fraction=0.5)  # schedule is 1/3 of the total
    app = find(tree, "app")
    assert [c["name"] for c in app["children"]] == ["main"]
    assert app["self"] == 2 * SAMPLE and tree["value"] == 6 * SAMPLE


def test_diff_against_a_baseline_uses_shares() -> None:
    now = fleet()  # leaf<-main 2 of 3 samples per host, schedule 1 of 3
    before = fleet()
    for hp in before.hosts.values():  # baseline: twice as long, and schedule as hot as leaf
        for sample in hp.samples.values():
            sample.values = [v * (4 if sample.frames[0].function == "schedule" else 2) for v in sample.values]
    tree, base = q.flamegraph(now, cpu_query()), q.flamegraph(before, cpu_query())
    q.add_deltas(tree, base)
    # baseline scaled to the same total: leaf 1/2 of it, schedule 1/2; now leaf 2/3, schedule 1/3
    total = tree["value"]
    assert tree["delta"] == 0
    assert find(tree, "app", "main", "leaf")["delta"] == pytest.approx(total * (2 / 3 - 1 / 2), abs=1)
    assert find(tree, "app", "schedule")["delta"] == pytest.approx(total * (1 / 3 - 1 / 2), abs=1)
    empty = q.flamegraph(FleetProfiles(0, 0), cpu_query())
    q.add_deltas(tree, empty)  # nothing to compare with: everything is new
    assert find(tree, "app", "main", "leaf")["delta"] == find(tree, "app", "main", "leaf")["value"]


def test_parse_time_and_bad_parameters() -> None:
    now = 1_000_000 * 10**9
    assert q.parse_time("15m", now) == now - 900 * 10**9
    assert q.parse_time("now", now) == now
    assert q.parse_time("1700000000", now) == 1_700_000_000 * 10**9
    assert q.parse_time("2023-11-14T22:13:20Z", now) == 1_700_000_000 * 10**9
    for params in ({"type": "nope"}, {"since": "yesterday"}, {"pid": "x"}, {"type": "lock", "value": "cpu"},
                   {"since": "now", "until": "1h"}):
        with pytest.raises(q.QueryError):
            q.parse_query(params.get, lambda k, p=params: [p[k]] if k in p else [], now)  # type: ignore[misc]
    query = q.parse_query({"type": "lock", "value": "delay", "host": "a,b"}.get,
                          lambda k: ["a,b"] if k == "host" else [], now)
    assert query.column == 1 and query.hosts == {"a", "b"}


# ---- over HTTP ------------------------------------------------------------------------------

async def test_api_and_downloads_over_http(tmp_path: Path) -> None:
    write_exports(tmp_path / "p", [30, 20])
    (tmp_path / "p" / "20000101T000000-000000000.otlp.pb").write_bytes(b"\xff damaged")  # outside the range
    (tmp_path / "p" / (export_stamp(time.time_ns() - 5 * 10**9) + ".otlp.pb")).write_bytes(b"\x0a\xff damaged")
    counters = Counters()
    port = free_port()
    server = WebServer("127.0.0.1", port, RetainedExports(tmp_path / "p", counters), counters, "svc", "1")
    await server.start()
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/") as r:
                assert r.status == 200 and "d3-flamegraph" in await r.text()
            for asset in ("/static/app.js", "/static/vendor/d3/d3.min.js",
                          "/static/vendor/d3-flame-graph/d3-flamegraph.umd.min.js"):
                async with http.get(base + asset) as r:
                    assert r.status == 200, asset
            async with http.get(base + "/api/types") as r:
                types = {t["name"]: t for t in (await r.json())["types"]}
            assert types["cpu"]["has_data"] and types["lock"]["has_data"] and not types["heap"]["has_data"]
            assert [v["name"] for v in types["lock"]["values"]] == ["contentions", "delay"]
            async with http.get(base + "/api/flamegraph", params={"type": "lock", "value": "delay"}) as r:
                lock = await r.json()
            assert lock["unit"] == "nanoseconds" and lock["total"] == 2 * 1_500 and lock["exports"] == 2
            assert find(lock["tree"], "app", "wait")["value"] == 2 * 1_500
            # diff view: web-1 against web-2 (same data) -> no difference anywhere
            async with http.get(base + "/api/flamegraph", params={"host": "web-1", "compare_host": "web-2"}) as r:
                diff = await r.json()
            assert diff["compare"]["hosts"] == ["web-2"] and diff["compare"]["total"] == diff["total"] > 0
            assert find(diff["tree"], "app", "main", "leaf")["delta"] == 0
            # against a range before any export: everything is new
            async with http.get(base + "/api/flamegraph", params={"compare_since": "2h", "compare_until": "1h"}) as r:
                diff = await r.json()
            assert diff["compare"]["exports"] == 0 and diff["tree"]["delta"] == diff["total"]
            async with http.get(base + "/api/flamegraph", params={"type": "cpu"}) as r:
                cpu = await r.json()
            assert cpu["top"][:2] == [{"name": "leaf", "self": 8 * SAMPLE, "total": 8 * SAMPLE},  # ties by name
                                      {"name": "main", "self": 0, "total": 8 * SAMPLE}]
            async with http.get(base + "/api/timeline", params={"type": "cpu", "host": "web-1"}) as r:
                line = await r.json()
            # two good exports, then the damaged one of 5 s ago: its interval has no value
            assert [p["value"] for p in line["points"]] == [3 * SAMPLE, 3 * SAMPLE, 0]
            assert line["unit"] == "nanoseconds" and line["gauge"] is False  # CPU time adds up: drawn as a rate
            async with http.get(base + "/api/flamegraph", params={"type": "bogus"}) as r:
                assert r.status == 400 and "unknown profile type" in (await r.json())["error"]
            async with http.get(base + "/api/download/pprof", params={"type": "cpu", "host": "web-1"}) as r:
                assert r.status == 200 and "attachment" in r.headers["Content-Disposition"]
                pprof_bytes = await r.read()
            async with http.get(base + "/api/download/otlp", params={"type": "cpu"}) as r:
                otlp_bytes = await r.read()
    finally:
        await server.close()
    assert counters.get("web_unreadable_exports") == 1  # the damaged file in range, skipped
    gzip.decompress(pprof_bytes)
    path = tmp_path / "view.pb.gz"
    path.write_bytes(pprof_bytes)
    if not PPROF.exists():
        pytest.fail("Google pprof missing: scripts/setup.sh builds it into .tools/pprof")
    top = subprocess.run([str(PPROF), "-top", "-unit=ns", str(path)], capture_output=True, text=True,
                         check=True).stdout
    assert "leaf" in top and f"{2 * 2 * SAMPLE}ns" in top.replace(",", ""), top  # one host, two exports
    req = ExportProfilesServiceRequest()
    req.ParseFromString(otlp_bytes)
    assert validate_request(req) == []
    back = FleetProfiles(0, 0)
    merge_request(back, req, ProfileType.CPU)
    assert sum(s.values[0] for hp in back.hosts.values() for s in hp.samples.values()) == 2 * 2 * 3 * SAMPLE


def test_service_is_the_samples_service_name_else_the_executable() -> None:
    from aggregator.profile import AggregatedSample
    from aggregator.web.query import sample_service

    named = AggregatedSample((), 1, 1, "t", "java", 0, (("container.id", "c"), ("service.name", "checkout")), [1])
    plain = AggregatedSample((), 2, 2, "t", "nginx", 0, (), [1])
    assert sample_service(named) == "checkout" and sample_service(plain) == "nginx"


# ---- access: token, basic auth, TLS ------------------------------------------------------------

async def _serve(tmp_path: Path, access: WebAccess) -> tuple[WebServer, int]:
    write_exports(tmp_path / "p", [20])
    port = free_port()
    server = WebServer("127.0.0.1", port, RetainedExports(tmp_path / "p"), access=access)
    await server.start()
    return server, port


async def test_token_guards_the_page_and_the_api(tmp_path: Path) -> None:
    server, port = await _serve(tmp_path, WebAccess(token="s3cret-token"))
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for path in ("/", "/static/app.js", "/api/flamegraph?type=cpu", "/api/download/pprof"):
                async with http.get(base + path) as r:
                    assert r.status == 401, path
            async with http.get(base + "/api/types", headers={"Authorization": "Bearer wrong"}) as r:
                assert r.status == 401
            async with http.get(base + "/api/flamegraph", headers={"Authorization": "Bearer s3cret-token"}) as r:
                assert r.status == 200 and (await r.json())["total"] == 2 * 3 * SAMPLE
        # A browser: the link with the token sets a cookie and drops the token from the URL.
        # (aiohttp keeps cookies of IP-address hosts only when "unsafe"; browsers keep them)
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
            async with browser.get(base + "/?type=cpu&token=s3cret-token") as r:
                assert r.status == 200 and "d3-flamegraph" in await r.text()
                assert [str(h.url) for h in r.history] == [base + "/?type=cpu&token=s3cret-token"]
                assert r.url.query == {"type": "cpu"}
                cookie = r.history[0].cookies["stackfleet_token"]
                assert cookie["httponly"] and cookie["samesite"] == "Strict"
            async with browser.get(base + "/api/hosts") as r:  # the cookie alone admits
                assert r.status == 200 and (await r.json())["hosts"] == ["web-1", "web-2"]
        async with aiohttp.ClientSession() as stranger, stranger.get(base + "/?token=guess") as r:
            assert r.status == 401
    finally:
        await server.close()


def basic(user: str, password: str) -> str:
    import base64

    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_basic_auth(tmp_path: Path) -> None:
    server, port = await _serve(tmp_path, WebAccess(user="ops", password="pa:ss"))
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/") as r:
                assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Basic ")
            async with http.get(base + "/", headers={"Authorization": basic("ops", "wrong")}) as r:
                assert r.status == 401
            async with http.get(base + "/api/types", headers={"Authorization": basic("ops", "pa:ss")}) as r:
                assert r.status == 200
    finally:
        await server.close()
    with pytest.raises(ValueError, match="user and a password"):
        WebAccess(user="ops")


async def test_tls_with_a_self_signed_certificate(tmp_path: Path) -> None:
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server, port = await _serve(tmp_path, WebAccess(token="t", tls_cert=cert, tls_key=key))
    trusting = ssl.create_default_context(cafile=str(cert))
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"https://127.0.0.1:{port}/api/types", ssl=trusting,
                                headers={"Authorization": "Bearer t"}) as r:
                assert r.status == 200 and r.url.scheme == "https"
            async with http.get(f"https://127.0.0.1:{port}/api/types", ssl=trusting) as r:
                assert r.status == 401
            with pytest.raises(aiohttp.ClientConnectorCertificateError):  # not trusted: refused by the client
                await http.get(f"https://127.0.0.1:{port}/")
            with pytest.raises(aiohttp.ClientError):  # plain HTTP is not served
                await http.get(f"http://127.0.0.1:{port}/api/types", headers={"Authorization": "Bearer t"})
    finally:
        await server.close()


# ---- the top table and the timeline --------------------------------------------------------

def test_top_functions_self_and_total() -> None:
    from aggregator.web.summaries import top_functions
    from tests.test_otlp import frame

    f = fleet()  # per host: leaf<-main twice, schedule once
    recursive = f.hosts[("web-1", ProfileType.CPU)]
    recursive.add((frame("walk", 4, 0x7F40), frame("walk", 4, 0x7F48), frame("main", 9, 0x7F20)), 10, 11, "w",
                  "app", 0, (), (7,), 8_000)
    rows = {r["name"]: (r["self"], r["total"]) for r in top_functions(f, cpu_query())}
    assert rows == {"leaf": (4 * SAMPLE, 4 * SAMPLE), "main": (0, 4 * SAMPLE + 7),
                    "schedule": (2 * SAMPLE, 2 * SAMPLE), "walk": (7, 7)}  # walk counted once in its total
    tree = q.flamegraph(f, cpu_query())
    assert sum(s for s, _ in rows.values()) == tree["value"]  # every sample has a leaf
    assert [r["name"] for r in top_functions(f, cpu_query(), limit=2)] == ["main", "leaf"]  # by total
    nowhere = cpu_query(hosts=frozenset({"nowhere"}))
    assert top_functions(q.filter_fleet(f, nowhere), nowhere) == []  # the view's filtered samples only


def test_timeline_buckets_follow_the_exports(tmp_path: Path) -> None:
    from aggregator.web.summaries import timeline

    write_exports(tmp_path, [40, 30, 20])
    store = RetainedExports(tmp_path)
    query = cpu_query()
    points = timeline(store, query)
    ends = [e.end_ns for e in store.list(query.since_ns, query.until_ns)]
    # the first interval is as long as the next (an export's start is not in its name)
    first = ends[0] - (ends[1] - ends[0])
    assert [(s, e) for s, e, _ in points] == [(first, ends[0]), (ends[0], ends[1]), (ends[1], ends[2])]
    assert [v for _, _, v in points] == [2 * 3 * SAMPLE] * 3  # per export: 2 hosts x 3 samples
    assert [v for _, _, v in timeline(store, cpu_query(hosts=frozenset({"web-1"})))] == [3 * SAMPLE] * 3
    # Narrowing the range to the last two exports: what the page's drag does.
    narrow = cpu_query(since_ns=ends[0] + 1, until_ns=ends[2])
    assert sum(v for _, _, v in timeline(store, narrow)) == q.flamegraph(q.load_fleet(store, narrow)[0], narrow)[
        "value"] == 2 * 2 * 3 * SAMPLE
    few = timeline(store, query, max_points=2)  # more exports than points: even buckets, values add up
    assert len(few) == 2 and few[0][0] == query.since_ns and few[-1][1] >= query.until_ns
    assert sum(v for _, _, v in few) == 3 * 2 * 3 * SAMPLE
    assert timeline(store, cpu_query(since_ns=0, until_ns=1)) == []


async def test_a_broken_access_setting_keeps_the_page_closed(tmp_path: Path) -> None:
    from aggregator.service import _start_web
    from aggregator.settings import AggregatorSettings

    counters = Counters()
    half_auth = AggregatorSettings(output_dir=tmp_path, web_address=f"127.0.0.1:{free_port()}", web_user="ops")
    assert await _start_web(half_auth, counters) is None
    missing_cert = AggregatorSettings(output_dir=tmp_path, web_address=f"127.0.0.1:{free_port()}",
                                      web_tls_cert=tmp_path / "no.pem", web_tls_key=tmp_path / "no.key")
    assert await _start_web(missing_cert, counters) is None
    assert counters.get("web_start_errors") == 2
