"""Helpers for the transport-durability tests: a real aggregator *process* (so it can be
SIGKILLed), the real agent in-process, and counting what the aggregator's files hold.

The comparison is exact: every sample the agent got a JetStream publish ack for must be
in the aggregator's exported ``.otlp.pb`` files. Samples are identified by (pid, tid,
timestamp) — one thread cannot be sampled twice in the same nanosecond — so a redelivered
message that was exported twice shows up as a *duplicate*, never as extra coverage.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import nats
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)

from aggregator.otlp.decode import merge_request
from aggregator.profile import FleetProfiles
from shared.jetstream import StreamSettings
from shared.profile_types import ProfileType

STACKFLEET = str(Path(sys.executable).parent / "stackfleet")
SAMPLES_CONSUMER = "stackfleet-aggregators"


class AggregatorProcess:
    """``stackfleet aggregator`` as a child process writing local files only (no OTLP)."""

    def __init__(self, nats_url: str, output_dir: Path, log_path: Path, ack_wait_s: float = 5.0,
                 export_interval_s: float = 1.0) -> None:
        self.export_interval_s = export_interval_s
        self.env = {**os.environ, "STACKFLEET_NATS__URL": nats_url, "STACKFLEET_ACK_WAIT_S": str(ack_wait_s),
                    "STACKFLEET_OTLP_ENDPOINT": ""}
        self.output_dir = output_dir
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([STACKFLEET, "aggregator", "--output-dir", str(self.output_dir),
                                          "--export-interval", str(self.export_interval_s), "--otlp-endpoint", ""],
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        """SIGKILL: no final export, no acks — what was in memory must come back by redelivery."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9


async def samples_consumer_state(nats_url: str) -> tuple[int, int, int]:
    """(pending, ack_pending, redeliveries) of the shared samples consumer right now.

    Redeliveries = deliveries made (the consumer sequence counts every delivery) minus the
    samples messages stored; the server's own ``num_redelivered`` forgets acked ones.
    """
    nc = await nats.connect(nats_url)
    try:
        jsm = nc.jsm()
        info = await jsm.consumer_info(StreamSettings().name, SAMPLES_CONSUMER)
        stream = await jsm.stream_info(StreamSettings().name, subjects_filter="stackfleet.v1.samples.>")
        stored = sum((stream.state.subjects or {}).values())
        deliveries = info.delivered.consumer_seq if info.delivered else 0
        return info.num_pending or 0, info.num_ack_pending or 0, deliveries - stored
    finally:
        await nc.close()


async def wait_consumer_settled(nats_url: str, timeout_s: float) -> tuple[int, int, int]:
    """Wait until the shared samples consumer has nothing pending and nothing unacked.

    Acks are sent only after the export holding a message is written, so "settled" means
    every stored sample batch is in the aggregator's files. Returns (pending, ack_pending,
    redeliveries) as :func:`samples_consumer_state`.
    """
    deadline = time.monotonic() + timeout_s
    state = (-1, -1, 0)
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            state = await samples_consumer_state(nats_url)
            if state[:2] == (0, 0):
                break
        await asyncio.sleep(0.5)
    return state


def exported_samples(output_dir: Path, profile_type: ProfileType) -> tuple[Counter[tuple[int, int, int]], int]:
    """Every (pid, tid, timestamp) in the aggregator's .otlp.pb files with how often it appears,
    and the number of export files read."""
    seen: Counter[tuple[int, int, int]] = Counter()
    files = sorted(output_dir.glob("*.otlp.pb"))
    for path in files:
        req = ExportProfilesServiceRequest()
        req.ParseFromString(path.read_bytes())
        fleet = FleetProfiles(start_ns=0, end_ns=0)
        merge_request(fleet, req, profile_type)
        for profile in fleet.hosts.values():
            for s in profile.samples.values():
                for t in s.timestamps_ns:
                    seen[(s.pid, s.tid, t)] += 1
    return seen, len(files)


def slice_counts(timestamps: list[int], start_ns: int, end_ns: int, slice_s: float) -> list[int]:
    """Samples per time slice of ``slice_s`` seconds between start and end (partial last slice dropped)."""
    width = int(slice_s * 1e9)
    n = max(0, (end_ns - start_ns) // width)
    counts = [0] * n
    for t in timestamps:
        i = (t - start_ns) // width
        if 0 <= i < n:
            counts[i] += 1
    return counts
