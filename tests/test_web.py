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
from aggregator.otlp import encode_request, validate_request
from aggregator.otlp_decode import merge_request
from aggregator.profile import FleetProfiles
from aggregator.web import query as q
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
        writer.write(f, encode_request(f, "svc", "1"))
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
