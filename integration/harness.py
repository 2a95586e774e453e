"""Running the real pipeline — nats-server, agent (real BPF), aggregator — inside a test.

Everything is real: the agent attaches its BPF programs to this kernel, publishes over a
real nats-server, and the aggregator merges and exports. The harness only orchestrates:
start the aggregator and agent, wait until the agent's actors are attached, start the
workload, let it run, stop the agent (flushing its last batch), then the aggregator.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.main import run_agent
from agent.settings import AgentSettings
from aggregator.profile import AggregatedSample, FleetProfiles
from aggregator.service import run_aggregator
from aggregator.settings import AggregatorSettings
from shared.counters import Counters
from shared.nats_connection import NatsSettings
from shared.profile_types import ProfileType

WORKLOADS = Path(__file__).parent / "workloads"


def build_c(source: str, out_dir: Path, flags: tuple[str, ...] = ("-g", "-O0", "-fno-omit-frame-pointer")) -> Path:
    """Compile integration/workloads/<source> with gcc into ``out_dir``."""
    out = out_dir / Path(source).stem
    subprocess.run(["gcc", *flags, "-pthread", "-o", str(out), str(WORKLOADS / source)], check=True)
    return out


@dataclass
class PipelineRun:
    """What one run produced: every export, both sides' counters, and the workload's window."""

    fleets: list[FleetProfiles] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)
    agent_counters: Counters = field(default_factory=Counters)
    aggregator_counters: Counters = field(default_factory=Counters)
    workload_start_ns: int = 0
    workload_end_ns: int = 0
    workload_output: str = ""

    def samples(self, profile_type: ProfileType, pid: int | None = None) -> list[AggregatedSample]:
        out = []
        for fleet in self.fleets:
            for (_, ptype), profile in fleet.hosts.items():
                if ptype != profile_type:
                    continue
                out += [s for s in profile.samples.values() if pid is None or s.pid == pid]
        return out


Workload = Callable[[PipelineRun], Awaitable[None]]


async def run_pipeline(
    nats_url: str,
    types: list[ProfileType],
    workload: Workload,
    output_dir: Path | None = None,
    otlp_endpoint: str = "",
    export_interval_s: float = 1.0,
    agent_overrides: dict[str, Any] | None = None,
    ready_timeout_s: float = 180.0,  # compiling the BPF programs on a loaded 2-core host can take a minute
    on_supervisor: Callable[[Any], None] | None = None,
    aggregator_overrides: dict[str, Any] | None = None,
) -> PipelineRun:
    """Run aggregator + agent around ``workload`` and return what was exported.

    The aggregator's web page is off unless ``aggregator_overrides`` sets ``web_address``
    (tests run side by side and must not fight over its default port).
    """
    run = PipelineRun()
    nats = NatsSettings(url=nats_url)
    agg_settings = AggregatorSettings(**{"nats": nats, "otlp_endpoint": otlp_endpoint, "output_dir": output_dir,
                                         "export_interval_s": export_interval_s, "web_address": "",
                                         **(aggregator_overrides or {})})
    agent_settings = AgentSettings(nats=nats, types=types, flush_interval_s=0.5, **(agent_overrides or {}))
    agg_stop, agent_stop = asyncio.Event(), asyncio.Event()

    def on_export(fleet: FleetProfiles, request: Any) -> None:
        run.fleets.append(fleet)
        run.requests.append(request)

    agg = asyncio.create_task(run_aggregator(agg_settings, agg_stop, run.aggregator_counters, on_export))
    await asyncio.sleep(0.3)
    agt = asyncio.create_task(run_agent(agent_settings, agent_stop, run.agent_counters, on_supervisor))
    try:
        deadline = time.monotonic() + ready_timeout_s
        while not all(run.agent_counters.get("actor_started", type=t.value) for t in types):
            if agt.done():
                agt.result()
                raise RuntimeError("agent stopped before its actors started")
            if time.monotonic() > deadline:
                raise TimeoutError(f"actors not attached within {ready_timeout_s}s: {run.agent_counters.snapshot()}")
            await asyncio.sleep(0.1)
        run.workload_start_ns = time.time_ns()
        await workload(run)
        run.workload_end_ns = time.time_ns()
        await asyncio.sleep(agent_settings.flush_interval_s * 2)
    finally:
        agent_stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(agt, 30)
        await _wait_delivered(run, timeout_s=20.0)
        agg_stop.set()
        await asyncio.wait_for(agg, 30)
    if agt.done() and not agt.cancelled() and agt.exception():
        raise agt.exception()  # type: ignore[misc]
    return run



async def _wait_delivered(run: PipelineRun, timeout_s: float) -> None:
    """Let the aggregator take in every sample the agent published before it is stopped.

    With JetStream the agent's last batches sit in the stream until the aggregator pulls
    them (they would survive for its next start, but the test wants them in this run).
    """
    await asyncio.sleep(0.5)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        published = run.agent_counters.get("samples_published")
        if run.aggregator_counters.get("samples_received") >= published:
            return
        await asyncio.sleep(0.2)
