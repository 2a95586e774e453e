"""The spine, end to end on the real kernel: CPU profile of a workload with a known answer.

cpu_chain runs 2 threads for 5 s, spinning in hot_leaf() reached through
run_thread -> outer -> middle -> hot_leaf. The real agent samples it at 99 Hz, publishes over
a real nats-server, the aggregator merges and exports to a real gRPC ProfilesService and to
local files, which protoc and Google's pprof must read.
"""

from __future__ import annotations

import re
import resource
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from aggregator.otlp.encode import validate_request
from integration.harness import WORKLOADS, PipelineRun, build_c, run_pipeline
from shared.model import FrameType
from shared.profile_types import ProfileType
from stackfleet.nats_server import NatsServer
from tests.otlp_server import OtlpTestServer, protoc_decode

SECONDS, THREADS, HZ = 5.0, 2, 99
PPROF = Path(__file__).resolve().parents[1] / ".tools" / "pprof"


def function_lines(source: Path, name: str) -> range:
    """Source lines of a C function's body (from its signature to the closing brace)."""
    lines = source.read_text().splitlines()
    start = next(i for i, line in enumerate(lines, 1) if re.search(rf"\b{name}\(", line) and "void" in line)
    end = next(i for i, line in enumerate(lines[start:], start + 1) if line.startswith("}"))
    return range(start, end + 1)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineRun, int, Path, OtlpTestServer]:
    import asyncio

    tmp = tmp_path_factory.mktemp("cpu")
    exe = build_c("cpu_chain.c", tmp)
    out_dir = tmp / "profiles"
    pid_box: list[int] = []

    async def workload(run: PipelineRun) -> None:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = await asyncio.create_subprocess_exec(str(exe), str(SECONDS), str(THREADS),
                                                    stdout=asyncio.subprocess.PIPE)
        pid_box.append(proc.pid)
        await proc.communicate()
        assert proc.returncode == 0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        # CPU seconds the workload really got: on a loaded machine its threads do not run
        # SECONDS x THREADS, and 99 Hz sampling can only see the time they ran.
        run.workload_output = str(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)

    with NatsServer() as nats, OtlpTestServer() as otlp:
        run = asyncio.run(run_pipeline(nats.url, [ProfileType.CPU], workload, output_dir=out_dir,
                                       otlp_endpoint=otlp.endpoint, export_interval_s=2.0))
        otlp.wait_for_requests(1, timeout_s=10)
    return run, pid_box[0], out_dir, otlp


def test_known_function_dominates_with_file_and_line(cpu_run: tuple[PipelineRun, int, Path, OtlpTestServer]) -> None:
    run, pid, _, _ = cpu_run
    samples = run.samples(ProfileType.CPU, pid)
    assert samples, f"no CPU samples for pid {pid}; agent counters: {run.agent_counters.snapshot()}"
    weight: Counter[str] = Counter()
    leaf_lines: Counter[int] = Counter()
    for s in samples:
        user = [f for f in s.frames if f.frame_type != FrameType.KERNEL]
        if not user:
            continue
        # hot_leaf calls now() -> clock_gettime (vDSO): attribute to the first frame in our program.
        ours = next((f for f in user if f.filename.endswith("cpu_chain.c")), None)
        name = ours.function if ours else user[0].function
        weight[name] += len(s.timestamps_ns)
        if ours and ours.function == "hot_leaf":
            leaf_lines[ours.line] += len(s.timestamps_ns)
    total = sum(weight.values())
    assert weight.most_common(1)[0][0] == "hot_leaf", weight.most_common(5)
    assert weight["hot_leaf"] >= 0.9 * total, weight.most_common(5)
    body = function_lines(WORKLOADS / "cpu_chain.c", "hot_leaf")
    assert leaf_lines and all(line in body for line in leaf_lines), (leaf_lines, body)


def test_call_chain_is_intact(cpu_run: tuple[PipelineRun, int, Path, OtlpTestServer]) -> None:
    run, pid, _, _ = cpu_run
    chain = ["hot_leaf", "middle", "outer", "run_thread"]
    intact = total = 0
    for s in run.samples(ProfileType.CPU, pid):
        names = [f.function for f in s.frames if f.frame_type != FrameType.KERNEL]
        if "hot_leaf" not in names:
            continue
        n = len(s.timestamps_ns)
        total += n
        i = names.index("hot_leaf")
        if names[i : i + 4] == chain:
            intact += n
    assert total and intact >= 0.95 * total, f"{intact}/{total} samples have {chain}"


def test_pid_tid_count_and_timestamps(cpu_run: tuple[PipelineRun, int, Path, OtlpTestServer]) -> None:
    run, pid, _, _ = cpu_run
    samples = run.samples(ProfileType.CPU, pid)
    assert {s.pid for s in samples} == {pid}
    worker_tids = {s.tid for s in samples if any(f.function == "hot_leaf" for f in s.frames)}
    assert len(worker_tids) == THREADS and pid not in worker_tids
    # A sample taken between fork and exec truthfully carries the parent's name (the pytest
    # process); every sample with the program's own code must carry the program's name.
    own = {"main", "run_thread", "outer", "middle", "hot_leaf"}
    before_exec = [s for s in samples if s.thread_name != "cpu_chain"]
    assert all(not own & {f.function for f in s.frames} for s in before_exec), before_exec[:3]
    assert sum(len(s.timestamps_ns) for s in before_exec) <= 3, before_exec[:3]
    count = sum(len(s.timestamps_ns) for s in samples)
    cpu_seconds = float(run.workload_output)
    assert cpu_seconds > 0.25 * SECONDS * THREADS, f"workload got only {cpu_seconds:.2f} CPU-s"
    expected = HZ * cpu_seconds  # = 99 Hz x seconds x busy threads when the machine is otherwise idle
    assert abs(count - expected) <= 0.15 * expected, f"{count} samples, expected ~{expected:.0f}"
    stamps = [t for s in samples for t in s.timestamps_ns]
    slack = 200_000_000  # process start/exit around the window edges
    assert min(stamps) >= run.workload_start_ns - slack and max(stamps) <= run.workload_end_ns + slack
    assert all(v % (1_000_000_000 // HZ) == 0 for s in samples for v in s.values)


def test_otlp_export_received_and_valid(cpu_run: tuple[PipelineRun, int, Path, OtlpTestServer]) -> None:
    _, _, _, otlp = cpu_run
    assert otlp.requests, "the gRPC ProfilesService received nothing"
    names: set[str] = set()
    for req in otlp.requests:
        assert validate_request(req) == []
        strings = req.dictionary.string_table
        names |= {strings[f.name_strindex] for f in req.dictionary.function_table}
        for rp in req.resource_profiles:
            attrs = {a.key: a.value.string_value or a.value.int_value for a in rp.resource.attributes}
            assert attrs["host.name"] and attrs["service.name"] and "process.pid" in attrs
            for sp in rp.scope_profiles:
                for prof in sp.profiles:
                    # the OpenTelemetry eBPF profiler's shape: counted samples, one timestamp each
                    assert strings[prof.sample_type.type_strindex] == "samples"
                    assert strings[prof.sample_type.unit_strindex] == "count"
                    assert strings[prof.period_type.type_strindex] == "cpu"
                    assert prof.period == 1_000_000_000 // HZ
                    assert all(s.timestamps_unix_nano and not s.values for s in prof.samples)
    assert {"hot_leaf", "middle", "outer"} <= names


def _total_sample_ms(pprof_top: str) -> float:
    """The "Total samples = 30.30ms" of ``pprof -top``'s header, in ms (s and ms both occur)."""
    found = re.search(r"Total samples = ([\d.]+)(m?s)", pprof_top)
    assert found, pprof_top[:500]
    return float(found.group(1)) * (1 if found.group(2) == "ms" else 1000)


def test_local_files_decode_with_protoc_and_pprof(cpu_run: tuple[PipelineRun, int, Path, OtlpTestServer]) -> None:
    _, _, out_dir, _ = cpu_run
    otlp_files = sorted(out_dir.glob("*.otlp.pb"))
    pprof_files = sorted(out_dir.glob("*.cpu.pb.gz"))
    assert otlp_files and pprof_files, list(out_dir.iterdir())
    decoded = "".join(protoc_decode(f) for f in otlp_files)
    assert "hot_leaf" in decoded
    if not PPROF.exists():
        pytest.fail("Google pprof missing: scripts/setup.sh builds it into .tools/pprof")
    # The window with the most CPU time is the workload's (it spins): by samples, not by file
    # size, which a window of a few deep stacks of another process (nats-server's) can top.
    tops = [subprocess.run([str(PPROF), "-top", "-flat", str(f)], capture_output=True, text=True, check=True).stdout
            for f in pprof_files]
    busiest = max(tops, key=_total_sample_ms)
    rows = [line for line in busiest.splitlines() if re.match(r"\s*[\d.]+\w*s?\s+[\d.]+%", line)]
    assert rows and "hot_leaf" in rows[0], busiest[-2000:]
    assert shutil.which("protoc")
