"""Aggregator intake at scale: N simulated hosts through a real nats-server into a real aggregator.

    .venv/bin/python -m benchmarks.intake --hosts 1000 --seconds 20

The run has four phases, measured separately because they answer different questions:

1. **warm-up**: each simulated host pre-encodes three seconds of traffic and publishes its
   dictionary; the benchmark waits until the aggregator has applied every dictionary
   message (its ``dict_messages`` counter) and reports how long that took. 1,000 hosts
   starting at once is a burst a fleet sees rarely; it must not be confused with the
   steady state.
2. **steady state**: samples at the real rate (``hz`` x ``cpus`` per host, one message per
   host per second) for ``seconds``. The aggregator's CPU is measured over this phase
   only. (It used to be averaged over the simulator's pre-encoding too, during which the
   aggregator idles: a saturated aggregator then read as a third of a core.)
3. **drain**: at the end of publishing the JetStream consumer's backlog is read; then the
   benchmark waits one export interval plus a grace for the last export to be encoded and
   counts the samples in the exported files. ``kept_up_ratio`` is that count over the
   samples published: what was exported in time, before any shutdown.
4. **shutdown**: SIGTERM, the seconds until the aggregator exits (it exports its last
   interval first) and the total exported then.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.measure import process_cpu_s
from stackfleet.nats_server import NatsServer, free_port

STACKFLEET = str(Path(sys.executable).parent / "stackfleet")
HZ, CPUS = 99, 2
SAMPLES_PER_HOST_S = HZ * CPUS
EXPORT_INTERVAL_S = 10.0
# An interval's export is encoded after it closes; allow this long for it beyond the interval.
EXPORT_GRACE_S = 15.0
WARMUP_LIMIT_S = 600.0
SHUTDOWN_LIMIT_S = 120.0


class Traffic:
    """Pre-encoded traffic of the simulated hosts: their dictionaries and 3 s of sample batches.

    Encoding is done before the measured phases so the simulator's own Python cost does not
    limit the rate under test; batches repeat every three seconds.
    """

    def __init__(self, hosts: int) -> None:
        from benchmarks.host_simulator import SimulatedHost
        from shared.profile_types import ProfileType
        from shared.subjects import dict_subject, samples_subject

        t0 = time.time_ns()
        self.dicts: list[tuple[str, bytes]] = []
        self.samples: list[tuple[str, list[bytes]]] = []
        for i in range(hosts):
            sim = SimulatedHost(i, distinct_stacks=200)
            encoded = [sim.encode(t0 + k * 10**9, 1, HZ, CPUS) for k in range(3)]
            # Every dictionary delta is published before any samples that need it.
            self.dicts += [(dict_subject(ProfileType.CPU, sim.name), d) for d, _ in encoded if d]
            self.samples.append((samples_subject(ProfileType.CPU, sim.name), [m or b"" for _, m in encoded]))


async def _publish_dicts(nats_url: str, traffic: Traffic) -> None:
    import nats

    nc = await nats.connect(nats_url, name="host-simulator-dicts", pending_size=64 * 2**20)
    for subject, data in traffic.dicts:
        await nc.publish(subject, data)
    await nc.drain()


async def _publish_samples(nats_url: str, traffic: Traffic, seconds: int) -> tuple[int, float]:
    """Publish one batch per host per second at real rate; (samples sent, seconds it took).

    When the simulator cannot keep the real rate on this machine, the achieved rate is
    reported rather than assumed."""
    import nats

    nc = await nats.connect(nats_url, name="host-simulator", pending_size=64 * 2**20)
    sent = 0
    start = time.monotonic()
    for second in range(seconds):
        for i, (subject, batches) in enumerate(traffic.samples):
            await nc.publish(subject, batches[second % 3])
            if i % 50 == 0:
                await asyncio.sleep(0)
        sent += SAMPLES_PER_HOST_S * len(traffic.samples)
        await nc.flush()
        delay = start + second + 1 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    duration = time.monotonic() - start
    await nc.drain()
    return sent, duration


def aggregator_intake(hosts: int, seconds: int, replicas: int = 1) -> dict[str, Any]:
    """Drive ``replicas`` real aggregator processes with ``hosts`` simulated hosts; did they keep up?

    Replicas share the samples consumer (each batch goes to one of them) and each reads every
    dictionary, as in docs/design/fleet.md; each writes its own output directory."""
    traffic = Traffic(hosts)
    with NatsServer() as nats, tempfile.TemporaryDirectory() as out:
        ports = [free_port() for _ in range(replicas)]
        dirs = [str(Path(out) / f"replica{i}") for i in range(replicas)]
        aggs = [subprocess.Popen([STACKFLEET, "aggregator", "--nats", nats.url, "--otlp-endpoint", "", "--web", "",
                                  "--output-dir", d, "--export-interval", str(EXPORT_INTERVAL_S),
                                  "--log-level", "WARNING"],
                                 env={**os.environ, "STACKFLEET_METRICS_ADDRESS": f"127.0.0.1:{port}"},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for port, d in zip(ports, dirs, strict=True)]

        def cpu() -> float:
            return sum(process_cpu_s(a.pid) for a in aggs)

        def counter(name: str) -> float:
            return sum(_counter(port, name) for port in ports)

        t_term = time.monotonic()
        try:
            _wait_for(lambda: all(_metrics(port) is not None for port in ports), 30, "aggregator metrics endpoint")
            t_warm, cpu_warm = time.monotonic(), cpu()
            asyncio.run(_publish_dicts(nats.url, traffic))
            _wait_for(lambda: all(_counter(port, "dict_messages") >= len(traffic.dicts) for port in ports),
                      WARMUP_LIMIT_S, "dictionaries applied")
            warmup_s, warmup_cpu = time.monotonic() - t_warm, cpu() - cpu_warm

            cpu0, t0 = cpu(), time.monotonic()
            sent, publish_s = asyncio.run(_publish_samples(nats.url, traffic, seconds))
            received_at_end = counter("samples_received")
            backlog = _consumer_backlog(nats.monitor_url)
            cpu_pct = 100 * (cpu() - cpu0) / (time.monotonic() - t0)

            # Messages are acked right after the export holding them is written: wait for all
            # of them (or the deadline), then count what the files hold.
            messages = hosts * seconds
            deadline = time.monotonic() + EXPORT_INTERVAL_S + EXPORT_GRACE_S
            while counter("messages_acked") < messages and time.monotonic() < deadline:
                time.sleep(0.5)
            exported_in_time = sum(_exported_samples(d) for d in dirs)
            t_term = time.monotonic()
        finally:
            for agg in aggs:
                agg.terminate()  # SIGTERM: the aggregator exports its last interval before exiting
            for agg in aggs:
                try:
                    agg.wait(max(1.0, SHUTDOWN_LIMIT_S - (time.monotonic() - t_term)))
                except subprocess.TimeoutExpired:
                    agg.kill()
                    agg.wait()
        shutdown_s = time.monotonic() - t_term
        exported_total = sum(_exported_samples(d) for d in dirs)
    return {"hosts": hosts, "replicas": replicas, "samples_published": sent,
            "achieved_host_seconds_per_s": sent / SAMPLES_PER_HOST_S / publish_s,
            "warmup_dict_messages": len(traffic.dicts), "warmup_s": round(warmup_s, 1),
            "warmup_aggregator_cpu_s": round(warmup_cpu, 1),
            "aggregator_cpu_pct_of_core": cpu_pct,
            "received_at_publish_end_ratio": received_at_end / sent if sent else 0.0,
            "consumer_backlog_at_publish_end": backlog,
            "samples_exported_in_time": exported_in_time,
            "kept_up_ratio": exported_in_time / sent if sent else 0.0,
            "shutdown_s": round(shutdown_s, 1), "exited_within_limit": shutdown_s < SHUTDOWN_LIMIT_S,
            "samples_exported_after_shutdown": exported_total}


def _wait_for(ok: Any, limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while not ok():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {limit_s}s")
        time.sleep(0.2)


def _metrics(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
            return str(resp.read().decode())
    except OSError:
        return None


def _counter(port: int, name: str) -> float:
    """Sum of one aggregator counter over its labels (0 when absent or unreachable)."""
    text = _metrics(port) or ""
    prefix = f"stackfleet_aggregator_{name}_total"
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(prefix) and line[len(prefix):len(prefix) + 1] in ("{", " "))


def _consumer_backlog(monitor_url: str) -> dict[str, int]:
    """The samples consumer's undelivered and delivered-but-unacked message counts."""
    with urllib.request.urlopen(f"{monitor_url}/jsz?consumers=true", timeout=10) as resp:
        data = json.load(resp)
    for account in data.get("account_details", []):
        for stream in account.get("stream_detail", []):
            for consumer in stream.get("consumer_detail", []):
                if "-dict-" not in consumer["name"]:
                    return {"num_pending": consumer["num_pending"], "num_ack_pending": consumer["num_ack_pending"]}
    return {}


def _exported_samples(out_dir: str) -> int:
    """Samples that reached the exported profiles (counted from the complete .otlp.pb files)."""
    from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
        ExportProfilesServiceRequest,
    )

    total = 0
    for f in Path(out_dir).glob("*.otlp.pb"):
        req = ExportProfilesServiceRequest()
        req.ParseFromString(f.read_bytes())
        for rp in req.resource_profiles:
            for sp in rp.scope_profiles:
                for p in sp.profiles:
                    total += sum(len(s.timestamps_unix_nano) or 1 for s in p.samples)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--replicas", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(aggregator_intake(args.hosts, args.seconds, args.replicas), indent=2))


if __name__ == "__main__":
    main()
