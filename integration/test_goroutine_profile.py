"""Goroutine profile on the real kernel: a Go program with a known number of goroutines.

After the agent probes it, the program starts 100 goroutines in worker (blocked on a
channel) and 10 in ticker and reports runtime.NumGoroutine() itself. The profile's live
count must equal the program's count within 2; the only goroutine the probes cannot have
seen is main, which existed before the process was probed. After the channel closes the
count falls back the same way. Creation stacks name the function with the `go` statement,
with file and line.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from pathlib import Path

import pytest

from aggregator.otlp import validate_request
from integration.harness import WORKLOADS, PipelineRun, run_pipeline
from shared.model import FrameType
from shared.profile_types import ProfileType
from stackfleet.nats_server import NatsServer

HOST = socket.gethostname()  # the agent's default host name


def build_go(out: Path) -> Path:
    exe = out / "goroutines"
    env = {**os.environ, "GO111MODULE": "off", "GOCACHE": str(out / "gocache"), "GOFLAGS": ""}
    subprocess.run(["go", "build", "-o", str(exe), "main.go"], cwd=WORKLOADS / "goroutines", env=env, check=True)
    return exe


def live(fleet_samples: list, pid: int) -> tuple[int, dict[str, int]]:  # type: ignore[type-arg]
    user = 0
    by_start: dict[str, int] = {}
    for s in fleet_samples:
        if s.pid != pid:
            continue
        attrs = dict(s.attributes)
        by_start[attrs["goroutine.start"]] = by_start.get(attrs["goroutine.start"], 0) + s.values[0]
        if attrs["goroutine.system"] == "false":
            user += s.values[0]
    return user, by_start


@pytest.fixture(scope="module")
def go_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineRun, int, int, int, list[int]]:
    exe = build_go(tmp_path_factory.mktemp("go"))
    box: dict[str, int] = {}
    phase_marks: list[int] = []

    async def workload(run: PipelineRun) -> None:
        proc = await asyncio.create_subprocess_exec(str(exe), stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE)
        assert proc.stdin and proc.stdout
        box["pid"] = proc.pid
        await proc.stdout.readline()
        await asyncio.sleep(3.0)  # discovery scans every 2 s: let the agent probe the process
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        box["running"] = int((await proc.stdout.readline()).split()[1])
        await asyncio.sleep(3.0)
        phase_marks.append(len(run.fleets))
        proc.stdin.write(b"close\n")
        await proc.stdin.drain()
        box["after_close"] = int((await proc.stdout.readline()).split()[1])
        await asyncio.sleep(3.0)
        proc.stdin.write(b"exit\n")
        await proc.stdin.drain()
        await proc.wait()

    with NatsServer() as nats:
        run = asyncio.run(run_pipeline(nats.url, [ProfileType.GOROUTINE], workload, export_interval_s=1.0))
    return run, box["pid"], box["running"], box["after_close"], phase_marks


def test_live_count_matches_num_goroutine(go_run: tuple[PipelineRun, int, int, int, list[int]]) -> None:
    run, pid, running, after_close, marks = go_run
    assert running == 111 and after_close == 11  # the program's own view: 100 + 10 + main
    before = [live(list(f.hosts.get((HOST, ProfileType.GOROUTINE)).samples.values()), pid)  # type: ignore[union-attr]
              for f in run.fleets[: marks[0]] if (HOST, ProfileType.GOROUTINE) in f.hosts]
    assert before, "no goroutine profile before the channel closed"
    counted, by_start = before[-1]
    assert abs(counted - running) <= 2, (counted, running, by_start)
    assert by_start.get("main.startWorkers.func1") == 100 and by_start.get("main.startTickers.func1") == 10
    last, by_start_after = live(list(run.fleets[-1].hosts[(HOST, ProfileType.GOROUTINE)].samples.values()), pid)
    assert abs(last - after_close) <= 2, (last, after_close, by_start_after)
    assert by_start_after.get("main.startWorkers.func1", 0) == 0


def test_creation_stacks_name_the_go_statement(go_run: tuple[PipelineRun, int, int, int, list[int]]) -> None:
    run, pid, _, _, _ = go_run
    samples = [s for s in run.samples(ProfileType.GOROUTINE, pid) if s.values[0]]
    workers = [s for s in samples if dict(s.attributes)["goroutine.start"] == "main.startWorkers.func1"]
    assert workers
    frames = workers[0].frames
    creator = frames[1]
    assert creator.function == "main.startWorkers" and creator.filename.endswith("goroutines/main.go")
    assert creator.line > 0 and all(f.frame_type == FrameType.GO for f in frames[:3])
    assert any(f.function == "main.main" for f in frames)


def test_outputs_are_valid(go_run: tuple[PipelineRun, int, int, int, list[int]]) -> None:
    run, _, _, _, _ = go_run
    assert all(validate_request(r) == [] for r in run.requests)
