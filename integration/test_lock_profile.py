"""Lock profile on the real kernel: futex contention with a known answer.

lock_contention runs 4 threads taking one pthread mutex 200 times each, holding it 2 ms,
and measures its own total wait around pthread_mutex_lock with clock_gettime. The lock
profile's total delay for that process must be within 10% of the program's own figure,
attributed to the stack that calls pthread_mutex_lock (contend_lock).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from aggregator.otlp import validate_request
from integration.harness import PipelineRun, build_c, run_pipeline
from shared.profile_types import ProfileType
from stackfleet.nats_server import NatsServer
from tests.otlp_server import protoc_decode

PPROF = Path(__file__).resolve().parents[1] / ".tools" / "pprof"


@pytest.fixture(scope="module")
def lock_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineRun, int, int, Path]:
    tmp = tmp_path_factory.mktemp("lock")
    exe = build_c("lock_contention.c", tmp)
    out_dir = tmp / "profiles"
    box: list[int] = []

    async def workload(run: PipelineRun) -> None:
        proc = await asyncio.create_subprocess_exec(str(exe), "4", "200", "2000", stdout=asyncio.subprocess.PIPE)
        box.append(proc.pid)
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        run.workload_output = out.decode()

    with NatsServer() as nats:
        run = asyncio.run(run_pipeline(nats.url, [ProfileType.LOCK], workload, output_dir=out_dir,
                                       export_interval_s=2.0))
    own_wait_ns = int(run.workload_output.split()[1])
    return run, box[0], own_wait_ns, out_dir


def test_mutex_delay_matches_the_programs_own_measurement(lock_run: tuple[PipelineRun, int, int, Path]) -> None:
    run, pid, own_wait_ns, _ = lock_run
    samples = run.samples(ProfileType.LOCK, pid)
    assert samples, run.agent_counters.snapshot()
    mutex = [s for s in samples if any(f.function == "contend_lock" for f in s.frames)]
    delay = sum(s.values[1] for s in mutex)
    contentions = sum(s.values[0] for s in mutex)
    assert abs(delay - own_wait_ns) <= 0.10 * own_wait_ns, (delay, own_wait_ns)
    assert 0 < contentions <= 4 * 200


def test_other_futex_waits_are_separate_stacks(lock_run: tuple[PipelineRun, int, int, Path]) -> None:
    # The main thread blocks in pthread_join on a futex too: a real wait, reported under
    # main's own stack, never mixed into the mutex's.
    run, pid, _, _ = lock_run
    others = [s for s in run.samples(ProfileType.LOCK, pid) if not any(f.function == "contend_lock" for f in s.frames)]
    assert all(s.tid == pid for s in others)
    assert all(any(f.function == "main" for f in s.frames) for s in others)


def test_delay_is_attributed_to_the_caller_of_pthread_mutex_lock(
        lock_run: tuple[PipelineRun, int, int, Path]) -> None:
    run, pid, _, _ = lock_run
    samples = [s for s in run.samples(ProfileType.LOCK, pid) if s.tid != pid]  # worker threads
    total = sum(s.values[1] for s in samples)
    attributed = sum(s.values[1] for s in samples if any(f.function == "contend_lock" for f in s.frames))
    assert total and attributed >= 0.95 * total, (attributed, total)
    chains = [[f.function for f in s.frames] for s in samples]
    assert any(c.index("contend_lock") + 1 < len(c) and c[c.index("contend_lock") + 1] == "worker"
               for c in chains if "contend_lock" in c)
    assert all(dict(s.attributes)["lock.address"].startswith("0x") for s in samples)


def test_outputs_are_valid(lock_run: tuple[PipelineRun, int, int, Path]) -> None:
    import subprocess

    run, _, _, out_dir = lock_run
    assert [e for r in run.requests for e in validate_request(r)] == []
    decoded = "".join(protoc_decode(f) for f in out_dir.glob("*.otlp.pb"))
    assert '"contentions"' in decoded and '"delay"' in decoded
    pprof_file = max(out_dir.glob("*.lock.pb.gz"), key=lambda f: f.stat().st_size)
    top = subprocess.run([str(PPROF), "-top", "-sample_index=delay", str(pprof_file)],
                         capture_output=True, text=True, check=True).stdout
    assert "contend_lock" in top
