"""Goroutine profile on the real kernel: a Go program with a known number of goroutines.

After the agent probes it, the program starts 100 goroutines in worker (blocked on a
channel) and 10 in ticker and reports runtime.NumGoroutine() itself. The profile's live
count must equal the program's count within 2; the only goroutine the probes cannot have
seen is main, which existed before the process was probed. After the channel closes the
count falls back the same way. Creation stacks name the function with the `go` statement,
with file and line.

The current-stack profile (``goroutine.stack.kind=current``, read from the process's
``runtime.allgs``) must show the 100 workers parked in the channel receive
(runtime.gopark <- runtime.chanrecv <- runtime.chanrecv1 <- main.worker) and the 10 tickers
in their select, with file and line; its user goroutines (``goroutine.system=false``) total
runtime.NumGoroutine() within 2 (exactly 111 when nothing moves: 100 + 10 + main, which
sits in a read system call; the slack covers a goroutine caught running, whose stack is not
walked, or one the runtime starts or ends between its count and our read). After the
channel closes the worker stacks fall to 0. The same holds for builds by Go 1.19, 1.23,
1.26 and 1.27 (Go 1.22+ names the go-statement closures gowrapN), plain and stripped
(``-s -w``: the runtime.g offsets come from the per-release table, runtime.allgs from
runtime.allgadd's code, the probed functions from the pclntab). All of them run at once
under one agent, each through the same phases.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
from pathlib import Path

import pytest

from aggregator.otlp.encode import validate_request
from integration.go_toolchains import GoToolchain, available
from integration.harness import WORKLOADS, PipelineRun, run_pipeline
from shared.model import FrameType
from shared.profile_types import ProfileType
from stackfleet.nats_server import NatsServer
from tests.conftest import GO_CACHE

HOST = socket.gethostname()  # the agent's default host name


SOURCE = (WORKLOADS / "goroutines" / "main.go").read_text().splitlines()
Run = tuple[PipelineRun, int, int, int, list[int], GoToolchain]
# The end-to-end runs cover a subset of releases (the oldest, one before and the two after
# Go 1.25's gobuf change, with Go 1.26's zero pclntab text start); tests/test_go_layout.py
# and tests/test_gopclntab.py cover every installed release and PIE builds without BPF.
E2E_MINORS = (19, 23, 26, 27)
E2E = [(t, v) for t in available() if t.minor in E2E_MINORS for v in ("plain", "stripped")]
E2E_IDS = [f"{t.version}-{v}" for t, v in E2E]
GO_STAGGER_S = 0.5


def worker_start(toolchain: GoToolchain) -> str:
    """The closure the compiler makes for ``go worker(ch)``: Go 1.22 renamed it."""
    return "main.startWorkers.func1" if toolchain.minor < 22 else "main.startWorkers.gowrap1"


def ticker_start(toolchain: GoToolchain) -> str:
    return "main.startTickers.func1" if toolchain.minor < 22 else "main.startTickers.gowrap1"


def source_line(marker: str) -> int:
    return next(i for i, text in enumerate(SOURCE, 1) if marker in text)


def live(fleet_samples: list, pid: int, kind: str = "creation") -> tuple[int, dict[str, int]]:  # type: ignore[type-arg]
    user = 0
    by_start: dict[str, int] = {}
    for s in fleet_samples:
        attrs = dict(s.attributes)
        if s.pid != pid or attrs["goroutine.stack.kind"] != kind:
            continue
        by_start[attrs["goroutine.start"]] = by_start.get(attrs["goroutine.start"], 0) + s.values[0]
        if attrs["goroutine.system"] == "false":
            user += s.values[0]
    return user, by_start


def go_pipeline(builds: list[tuple[GoToolchain, Path]]) -> list[Run]:
    """One agent run with every build's process going through the same phases at once."""
    phase_marks: list[int] = []
    boxes: list[dict[str, int]] = [{} for _ in builds]

    async def one(index: int, exe: Path, box: dict[str, int], phases: list[asyncio.Event]) -> None:
        proc = await asyncio.create_subprocess_exec(str(exe), stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE)
        assert proc.stdin and proc.stdout
        box["pid"] = proc.pid
        await proc.stdout.readline()
        await phases[0].wait()
        # One process at a time: 110 creation records at once each (a few KiB apiece) from
        # every process together would overrun the agent's ring buffer (drops are counted).
        await asyncio.sleep(GO_STAGGER_S * index)
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        box["running"] = int((await proc.stdout.readline()).split()[1])
        await phases[1].wait()
        proc.stdin.write(b"close\n")
        await proc.stdin.drain()
        box["after_close"] = int((await proc.stdout.readline()).split()[1])
        await phases[2].wait()
        proc.stdin.write(b"exit\n")
        await proc.stdin.drain()
        await proc.wait()

    async def workload(run: PipelineRun) -> None:
        phases = [asyncio.Event() for _ in range(3)]
        tasks = [asyncio.create_task(one(i, exe, box, phases))
                 for i, ((_, exe), box) in enumerate(zip(builds, boxes, strict=True))]
        # Discovery scans every 2 s: let the agent probe the processes (slack for a loaded machine).
        await asyncio.sleep(6.0)
        phases[0].set()
        await asyncio.sleep(GO_STAGGER_S * len(builds) + 4.0)
        phase_marks.append(len(run.fleets))
        phases[1].set()
        await asyncio.sleep(6.0)  # room for a loaded host: reads run on the symbol thread
        # "exit" closes the tickers' channel before the process ends: their exits are real,
        # so the checks after the close read only intervals exported before this mark.
        phase_marks.append(len(run.fleets))
        phases[2].set()
        await asyncio.gather(*tasks)
        # The binaries' last processes are gone: their uprobes are detached at the next discovery.
        for _ in range(100):
            if run.agent_counters.get("go_binaries_unprobed") >= len(builds):
                break
            await asyncio.sleep(0.1)

    with NatsServer() as nats:
        run = asyncio.run(run_pipeline(nats.url, [ProfileType.GOROUTINE], workload, export_interval_s=1.0))
    return [(run, box["pid"], box["running"], box["after_close"], phase_marks, toolchain)
            for (toolchain, _), box in zip(builds, boxes, strict=True)]


@pytest.fixture(scope="module")
def go_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    out = tmp_path_factory.mktemp("go")
    builds = []
    for toolchain, variant in E2E:
        exe = toolchain.build(WORKLOADS / "goroutines", out / f"goroutines-{toolchain.version}-{variant}", variant,
                              cache=GO_CACHE / toolchain.version)
        if variant == "stripped":  # offsets must come from the table, functions from the pclntab
            sections = subprocess.run(["readelf", "-S", "-W", str(exe)], capture_output=True, text=True,
                                      check=True).stdout
            assert ".symtab" not in sections and ".debug_info" not in sections
        builds.append((toolchain, exe))
    return dict(zip(E2E_IDS, go_pipeline(builds), strict=True))


@pytest.fixture(params=E2E_IDS)
def go_run(go_runs: dict[str, Run], request: pytest.FixtureRequest) -> Run:
    return go_runs[request.param]


def fleet_samples(run: PipelineRun, index: int) -> list:  # type: ignore[type-arg]
    profile = run.fleets[index].hosts.get((HOST, ProfileType.GOROUTINE))
    return list(profile.samples.values()) if profile else []


def current_stacks(samples: list, pid: int) -> list:  # type: ignore[type-arg]
    return [s for s in samples if s.pid == pid and dict(s.attributes)["goroutine.stack.kind"] == "current"
            and s.values[0]]


def through(samples: list, function: str) -> list:  # type: ignore[type-arg]
    return [s for s in samples if any(f.function == function for f in s.frames)]


def check_current_profile(go: Run) -> None:
    run, pid, running, after_close, marks, _ = go
    assert running == 111 and after_close == 11
    before = next(i for i in range(marks[0] - 1, -1, -1) if current_stacks(fleet_samples(run, i), pid))
    samples = current_stacks(fleet_samples(run, before), pid)
    user, by_start = live(samples, pid, "current")
    assert abs(user - running) <= 2, (user, running, by_start)
    workers, tickers = through(samples, "main.worker"), through(samples, "main.ticker")
    assert sum(s.values[0] for s in workers) == 100 and sum(s.values[0] for s in tickers) == 10, by_start
    for s in workers:
        names = [f.function for f in s.frames]
        assert names[:4] == ["runtime.gopark", "runtime.chanrecv", "runtime.chanrecv1", "main.worker"], names
        assert dict(s.attributes)["goroutine.state"] == "waiting"
        assert all(f.line > 0 and f.filename and f.frame_type == FrameType.GO for f in s.frames)
        worker = s.frames[3]
        assert worker.filename.endswith("goroutines/main.go") and worker.line == source_line("func worker(")
        assert s.frames[1].filename.endswith("runtime/chan.go")
    for s in tickers:
        names = [f.function for f in s.frames]
        assert names[0] == "runtime.gopark" and "runtime.selectgo" in names, names
        ticker = s.frames[names.index("main.ticker")]
        assert ticker.filename.endswith("goroutines/main.go") and ticker.line == source_line("select {")
    # After close(ch): no worker stacks left, the rest within 2 of the program's own count.
    # Fleets are per export interval: the last one reporting the process, after the close and
    # before the exit phase.
    after = [i for i in range(marks[0] + 1, marks[1]) if current_stacks(fleet_samples(run, i), pid)]
    assert after, "no current stacks after the channel closed"
    last = current_stacks(fleet_samples(run, after[-1]), pid)
    assert not through(last, "main.worker")
    user_after, by_start_after = live(last, pid, "current")
    assert abs(user_after - after_close) <= 2, (user_after, after_close, by_start_after)


def test_live_count_matches_num_goroutine(go_run: Run) -> None:
    run, pid, running, after_close, marks, toolchain = go_run
    assert running == 111 and after_close == 11  # the program's own view: 100 + 10 + main
    before = [live(fleet_samples(run, i), pid) for i in range(marks[0])
              if any(s.pid == pid and dict(s.attributes)["goroutine.stack.kind"] == "creation"
                     for s in fleet_samples(run, i))]
    assert before, "no goroutine profile before the channel closed"
    counted, by_start = before[-1]
    assert abs(counted - running) <= 2, (counted, running, by_start)
    assert by_start.get(worker_start(toolchain)) == 100 and by_start.get(ticker_start(toolchain)) == 10
    # Fleets are per export interval: the last one that reports the process after the close,
    # before the exit phase.
    reporting = [i for i in range(marks[0] + 1, marks[1])
                 if any(s.pid == pid and dict(s.attributes)["goroutine.stack.kind"] == "creation"
                        for s in fleet_samples(run, i))]
    assert reporting, "no creation profile after the channel closed"
    last, by_start_after = live(fleet_samples(run, reporting[-1]), pid)
    assert abs(last - after_close) <= 2, (last, after_close, by_start_after)
    assert by_start_after.get(worker_start(toolchain), 0) == 0


def test_uprobes_are_detached_after_the_last_process(go_run: Run) -> None:
    run = go_run[0]
    counters = run.agent_counters.snapshot()
    assert run.agent_counters.get("go_processes_probed") >= 1, counters
    # Every probed Go binary of this test's agent had exited by the end (the workload, and
    # any other short-lived Go program on the host); none failed to detach.
    assert run.agent_counters.get("go_binaries_unprobed") >= 1, counters
    assert run.agent_counters.get("errors", kind="uprobe_detach") == 0, counters


def test_creation_stacks_name_the_go_statement(go_run: Run) -> None:
    run, pid, _, _, _, toolchain = go_run
    samples = [s for s in run.samples(ProfileType.GOROUTINE, pid) if s.values[0]]
    workers = [s for s in samples if dict(s.attributes)["goroutine.start"] == worker_start(toolchain)
               and dict(s.attributes)["goroutine.stack.kind"] == "creation"]
    assert workers
    frames = workers[0].frames
    creator = frames[1]
    assert creator.function == "main.startWorkers" and creator.filename.endswith("goroutines/main.go")
    assert creator.line > 0 and all(f.frame_type == FrameType.GO for f in frames[:3])
    assert any(f.function == "main.main" for f in frames)


def test_outputs_are_valid(go_run: Run) -> None:
    run = go_run[0]
    assert [e for r in run.requests for e in validate_request(r)] == []


def test_current_stacks_show_workers_in_channel_receive(go_run: Run) -> None:
    check_current_profile(go_run)
