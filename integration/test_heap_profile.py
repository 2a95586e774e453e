"""Heap profile on the real kernel: known live set and known churn, in both native modes.

heap_pattern keeps 64 MiB live from keep_alive and churns short-lived blocks from churn,
counting the churned bytes itself. The scaled estimates must give keep_alive's inuse_space
within 10% of 64 MiB, churn's alloc_space within 15% of the program's own count, and churn's
in-use near zero: in precise mode (the process selected by name, uprobes on libc) and in
sampled mode (the process started with the sampler library preloaded, no selector).

Sampling interval: the estimate's relative standard error is about 1/sqrt(samples). At the
512 KiB default, 64 MiB of live memory is ~128 samples (+-9%), so a 10% bound would be one
sigma; the tests sample every 64 KiB on average (~1,000 samples, +-3%). The sampled mode's
library takes a fixed seed, so its sampling decisions are the same on every run.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from pathlib import Path

import pytest

from agent.heap_sampler import ENV_SAMPLE_BYTES, ENV_SEED, build_library
from aggregator.otlp.encode import validate_request
from integration.harness import PipelineRun, build_c, run_pipeline
from shared.profile_types import ProfileType
from stackfleet.nats_server import NatsServer
from tests.otlp_server import protoc_decode

HOST = socket.gethostname()
MIB = 1024 * 1024
SAMPLING = {"heap_sample_bytes": 64 * 1024, "ringbuf_pages": 1024}


HeapRun = tuple[PipelineRun, int, int, list[int]]


def run_heap_pattern(tmp: Path, agent_overrides: dict[str, object], env: dict[str, str] | None = None) -> HeapRun:
    """heap_pattern under the agent: (run, pid, churned bytes, index of the export taken while
    the live set was live)."""
    exe = build_c("heap_pattern.c", tmp)
    box: dict[str, int] = {}
    marks: list[int] = []

    async def workload(run: PipelineRun) -> None:
        proc = await asyncio.create_subprocess_exec(str(exe), stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE, env=env)
        assert proc.stdin and proc.stdout
        box["pid"] = proc.pid
        await proc.stdout.readline()
        await asyncio.sleep(2.5)  # the name selector's scan probes the process
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        box["churn"] = int((await proc.stdout.readline()).split()[1])
        await asyncio.sleep(2.5)  # reports while the live set is still live
        marks.append(len(run.fleets))
        proc.stdin.write(b"exit\n")
        await proc.stdin.drain()
        await proc.wait()

    with NatsServer() as nats:
        run = asyncio.run(run_pipeline(nats.url, [ProfileType.HEAP], workload, export_interval_s=1.0,
                                       output_dir=tmp / "profiles", agent_overrides=agent_overrides))
    run.workload_output = str(tmp / "profiles")
    return run, box["pid"], box["churn"], marks


@pytest.fixture(scope="module")
def heap_run(tmp_path_factory: pytest.TempPathFactory) -> HeapRun:
    """Precise mode: the process is selected by name and has no sampler library."""
    return run_heap_pattern(tmp_path_factory.mktemp("heap"), {"target_comm": "^heap_pattern$", **SAMPLING})


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory: pytest.TempPathFactory) -> HeapRun:
    """Sampled mode: the library preloaded, sampling every 64 KiB on average; no selector."""
    env = {**os.environ, "LD_PRELOAD": str(build_library()), ENV_SAMPLE_BYTES: str(64 * 1024), ENV_SEED: "7"}
    return run_heap_pattern(tmp_path_factory.mktemp("heap_sampled"), {"ringbuf_pages": 8192}, env)


def by_function(samples: list, fn: str) -> list:  # type: ignore[type-arg]
    return [s for s in samples if any(f.function == fn for f in s.frames)]


def assert_estimates(heap: HeapRun) -> None:
    run, pid, churn_bytes, marks = heap
    assert run.agent_counters.get("events_dropped") == 0, run.agent_counters.snapshot()
    live_fleet = run.fleets[marks[0] - 1]
    samples = [s for s in live_fleet.hosts[(HOST, ProfileType.HEAP)].samples.values() if s.pid == pid]
    keep_inuse = sum(s.values[3] for s in by_function(samples, "keep_alive"))
    churn_inuse = sum(s.values[3] for s in by_function(samples, "churn"))
    assert abs(keep_inuse - 64 * MIB) <= 0.10 * 64 * MIB, keep_inuse / MIB
    assert churn_inuse <= 0.02 * 64 * MIB, churn_inuse / MIB
    all_samples = run.samples(ProfileType.HEAP, pid)
    churn_alloc = sum(s.values[1] for s in by_function(all_samples, "churn"))
    assert abs(churn_alloc - churn_bytes) <= 0.15 * churn_bytes, (churn_alloc, churn_bytes)
    keep_alloc = sum(s.values[1] for s in by_function(all_samples, "keep_alive"))
    assert abs(keep_alloc - 64 * MIB) <= 0.10 * 64 * MIB, keep_alloc / MIB


def test_inuse_and_alloc_estimates(heap_run: HeapRun) -> None:
    assert_estimates(heap_run)
    assert heap_run[0].agent_counters.get("heap_processes_probed") == 1


def test_sampled_mode_estimates(sampled_run: HeapRun) -> None:
    assert_estimates(sampled_run)
    run, pid, _, _ = sampled_run
    counters = run.agent_counters
    # Sampled, not probed on libc: the library's probes were the only ones.
    assert counters.get("heap_processes_sampled") == 1, counters.snapshot()
    assert counters.get("heap_processes_probed") == 0, counters.snapshot()
    # The allocating function is the leaf: the library's own frames are not in the stacks.
    keep = by_function(run.samples(ProfileType.HEAP, pid), "keep_alive")
    assert keep and all(s.frames[0].function == "keep_alive" for s in keep), [s.frames[:3] for s in keep]


def test_outputs_are_valid(heap_run: HeapRun) -> None:
    run, _, _, _ = heap_run
    assert [e for r in run.requests for e in validate_request(r)] == []
    strings = {s for r in run.requests for s in r.dictionary.string_table}
    assert {"alloc_objects", "alloc_space", "inuse_objects", "inuse_space"} <= strings
    out_dir = Path(run.workload_output)
    assert "keep_alive" in "".join(protoc_decode(f) for f in out_dir.glob("*.otlp.pb"))
    pprof = Path(__file__).resolve().parents[1] / ".tools" / "pprof"
    biggest = max(out_dir.glob("*.heap.pb.gz"), key=lambda f: f.stat().st_size)
    top = subprocess.run([str(pprof), "-top", "-sample_index=alloc_space", str(biggest)],
                         capture_output=True, text=True, check=True).stdout
    assert "churn" in top or "keep_alive" in top


def test_go_without_memory_profiling_is_counted_not_probed(tmp_path: Path) -> None:
    """go_alloc never references runtime.MemProfile, so its linker turned memory profiling
    off (MemProfileRate 0): no heap samples, no probes, one count with the reason."""
    from integration.go_toolchains import system
    from integration.harness import WORKLOADS

    exe = system().build(WORKLOADS / "go_alloc", tmp_path / "go_alloc", cache=tmp_path / "gocache")
    box: dict[str, int] = {}

    async def workload(run: PipelineRun) -> None:
        proc = await asyncio.create_subprocess_exec(str(exe), stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE)
        assert proc.stdin and proc.stdout
        box["pid"] = proc.pid
        await proc.stdout.readline()
        for _ in range(300):
            if run.agent_counters.get("go_heap_processes_skipped"):
                break
            await asyncio.sleep(0.1)
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        box["allocated"] = int((await proc.stdout.readline()).split()[1])
        await asyncio.sleep(1.5)
        proc.stdin.write(b"exit\n")
        await proc.stdin.drain()
        await proc.wait()

    with NatsServer() as nats:
        run = asyncio.run(run_pipeline(nats.url, [ProfileType.HEAP], workload, export_interval_s=1.0,
                                       agent_overrides={"target_comm": "^go_alloc$", "heap_go_interval_s": 0.5,
                                                        **SAMPLING}))
    assert box["allocated"] == 20000 * 4096
    counters = run.agent_counters
    assert counters.get("go_heap_processes_skipped", reason="memprofile_disabled") == 1, counters.snapshot()
    assert counters.get("heap_processes_probed") == 0
    assert run.samples(ProfileType.HEAP, box["pid"]) == []
