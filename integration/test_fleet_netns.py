"""Three hosts, a three-node NATS cluster, two aggregator replicas — and failures mid-run.

Each "host" is a network namespace (integration/netns.py) running its own agent process
(``process_scope=network_namespace``: the kernel is shared, so each agent keeps only its
host's processes) and its own CPU workload, with a different thread count per host. The
agents get the URLs of all three NATS nodes; the stream is replicated three times; the two
aggregator replicas share the samples through the durable consumer and write local files.

Mid-run the NATS node leading the export-marker bucket is killed (SIGKILL), then one
aggregator replica: while its exports wait for the bucket's failover, if they do within 5 s.
Afterwards the union of both replicas' exported files must hold, for every host, exactly the
samples its agent got JetStream acknowledgements for (identified by pid, tid, timestamp;
nothing may be missing; the replicas' shared export markers keep the survivor from exporting
again what the killed one exported, except the one export whose marker the failover kept from
being shared: at most 10 %), each host's workload only under its own host, and no agent may
report drops.
"""

from __future__ import annotations

import ast
import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import nats
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)

from aggregator.delivery.peer_markers import BUCKET as MARKER_BUCKET
from aggregator.otlp.decode import merge_request
from aggregator.profile import FleetProfiles
from integration.durability import AggregatorProcess, wait_consumer_settled
from integration.harness import build_c
from integration.netns import NatsCluster, NetnsTestBed
from shared.profile_types import ProfileType

STACKFLEET = str(Path(sys.executable).parent / "stackfleet")
WORKLOAD_S = 24
METRICS_PORT = 9464


def _agent_env(cluster: NatsCluster) -> dict[str, str]:
    return {**os.environ, "STACKFLEET_NATS__URL": cluster.urls, "STACKFLEET_PROCESS_SCOPE": "network_namespace",
            "STACKFLEET_FLUSH_INTERVAL_S": "0.5", "STACKFLEET_NATS__STREAM__REPLICAS": "3",
            "STACKFLEET_METRICS_ADDRESS": f"0.0.0.0:{METRICS_PORT}",
            # Samples are told apart by (pid, tid, timestamp), and a weighted sample is exported
            # as its timestamp repeated once per period: each agent keeps all its own samples.
            "STACKFLEET_CPU_SELF_SAMPLE_ONE_IN": "1"}


async def _stream_leader(url: str, stream: str) -> str:
    """Name of the NATS node leading ``stream``'s replicas."""
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(stream)
    finally:
        await nc.close()
    assert info.cluster is not None and info.cluster.leader, info
    return info.cluster.leader


def _wait_for_line(log: Path, text: str, timeout_s: float) -> bool:
    """Until ``text`` appears in ``log``; False after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return True
        time.sleep(0.1)
    return False


def _attached(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}:{METRICS_PORT}/metrics", timeout=2) as r:
            return 'actor_started_total{type="cpu"}' in r.read().decode()
    except OSError:
        return False


def _final_counters(log: Path) -> dict[str, int]:
    """The agent's last log line ``agent stopped: {...}`` (its counters at exit)."""
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if "agent stopped: " in line:
            return dict(ast.literal_eval(line.split("agent stopped: ", 1)[1]))
    raise AssertionError(f"agent did not stop cleanly:\n{log.read_text()[-3000:]}")


def _exported_by_host(dirs: list[Path]) -> dict[str, Counter[tuple[int, int, int]]]:
    """host -> (pid, tid, timestamp) -> times exported, over every replica's files."""
    out: dict[str, Counter[tuple[int, int, int]]] = {}
    for d in dirs:
        for path in sorted(d.glob("*.otlp.pb")):
            req = ExportProfilesServiceRequest()
            req.ParseFromString(path.read_bytes())
            fleet = FleetProfiles(start_ns=0, end_ns=0)
            merge_request(fleet, req, ProfileType.CPU)
            for (host, _), profile in fleet.hosts.items():
                seen = out.setdefault(host, Counter())
                for s in profile.samples.values():
                    for t in s.timestamps_ns:
                        seen[(s.pid, s.tid, t)] += 1
    return out


def test_three_hosts_nats_cluster_two_aggregators_with_failures(tmp_path: Path) -> None:
    exe = build_c("cpu_chain.c", tmp_path)
    with NetnsTestBed(n_hosts=3) as bed, NatsCluster(bed.gateway) as cluster:
        outs = [tmp_path / f"aggregator{i}" for i in range(2)]
        aggregators = [AggregatorProcess(cluster.urls, out, tmp_path / f"aggregator{i}.log", ack_wait_s=20)
                       for i, out in enumerate(outs)]
        for a in aggregators:
            a.env["STACKFLEET_NATS__STREAM__REPLICAS"] = "3"
            a.env["STACKFLEET_WEB_ADDRESS"] = ""
            a.start()
        logs = {h: tmp_path / f"agent-{h}.log" for h in bed.hosts}
        agents = {}
        for h in bed.hosts:
            with open(logs[h], "wb") as log:
                agents[h] = bed.popen(h, [STACKFLEET, "agent", "--types", "cpu", "--host-name", h],
                                      env=_agent_env(cluster), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not all(_attached(bed.address(h)) for h in bed.hosts):
                assert all(p.poll() is None for p in agents.values()), [logs[h].read_text()[-2000:] for h in logs]
                assert time.monotonic() < deadline, "agents did not attach"
                time.sleep(1)
            # Host i runs i+1 busy threads: per-host totals differ, so a mixed-up host shows.
            workloads = {h: bed.popen(h, [str(exe), str(WORKLOAD_S), str(i + 1)], stdout=subprocess.DEVNULL)
                         for i, h in enumerate(bed.hosts)}
            time.sleep(7)
            # The node leading the export-marker bucket: sharing markers fails until the bucket
            # has a new leader (seconds, if the samples stream's leader lives on, while samples
            # keep coming). Aggregator 0 is killed as soon as its exports wait for that, else
            # 5 s later: the window that used to leave one unshared export per interval.
            leader = asyncio.run(_stream_leader(cluster.nodes[0].url, f"KV_{MARKER_BUCKET}"))
            killed = next(n for n in cluster.nodes if n.name == leader)
            cluster.kill(killed)
            waiting = _wait_for_line(tmp_path / "aggregator0.log", "exports wait while an export marker", 5)
            aggregators[0].kill()
            print(f"aggregator 0 killed {'while' if waiting else 'without'} waiting for an unshared marker")
            for w in workloads.values():
                assert w.wait(WORKLOAD_S + 120) == 0
            for p in agents.values():
                p.send_signal(signal.SIGINT)
            for p in agents.values():
                p.wait(90)
            settled = asyncio.run(wait_consumer_settled(next(n for n in cluster.nodes if n is not killed).url,
                                                    timeout_s=120))
            assert settled[:2] == (0, 0), f"samples consumer not settled (pending, ack pending): {settled}"
            print(f"stream redelivered {settled[2]} sample messages after the replica was killed")
        finally:
            for p in agents.values():
                if p.poll() is None:
                    p.kill()
            if aggregators[1].proc is not None:
                aggregators[1].stop()

    exported = _exported_by_host(outs)
    bed_hosts = list(logs)
    assert set(exported) == set(bed_hosts), f"hosts exported: {sorted(exported)}"
    pids = {h: workloads[h].pid for h in bed_hosts}
    for i, h in enumerate(bed_hosts):
        counters = _final_counters(logs[h])
        published = counters.get("samples_published{type=cpu}", 0)
        dropped = sum(v for k, v in counters.items() if k.startswith(("samples_dropped", "messages_dropped")))
        assert dropped == 0, f"{h} dropped: {counters}"
        assert counters.get("samples_out_of_scope{type=cpu}", 0) > 0, "the agent saw no other host's process"
        seen = exported[h]
        assert len(seen) == published > 0, f"{h}: exported {len(seen)} distinct samples, agent published {published}"
        duplicates = sum(n - 1 for n in seen.values())
        assert duplicates <= 0.1 * published, f"{h}: {duplicates} duplicates of {published}"
        # Each workload appears only under its own host, with its own thread count.
        other = {pid for host, s in exported.items() if host != h for (pid, _, _) in s}
        assert pids[h] not in other, f"{h}'s workload also exported under another host"
        worker_tids = {tid for (pid, tid, _) in seen if pid == pids[h] and tid != pid}
        assert len(worker_tids) == i + 1, f"{h}: {len(worker_tids)} worker threads, expected {i + 1}"
        print(f"{h}: {published} samples published and exported once each ({duplicates} duplicated)")
