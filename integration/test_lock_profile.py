"""Lock profile on the real kernel: futex contention with a known answer, told apart from
futex waits that are not contention.

lock_contention runs 4 threads taking one pthread mutex 200 times each, holding it 2 ms, and
2 threads taking one rwlock for writing 50 times each, holding it 1 ms; each measures its own
wait around the lock call with clock_gettime. Meanwhile one thread waits on a condition
variable, one on a semaphore, and the main thread in pthread_join, until the lockers are done.

- The mutex delay (samples labelled ``lock.wait.kind=mutex``, under contend_lock) is within
  5% of the program's own figure, and so is the rwlock delay.
- The condition, join and semaphore waits are labelled with their kinds (semaphore needs the
  name of glibc's unexported helper, which only a debug-symbol file gives; without it the
  wait is ``other``, never a wrong kind).
- The default lock views, the pprof file and the web query, show mutex and rwlock only; the
  web query's label filter brings the other waits back.
"""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from aggregator.otlp import validate_request
from aggregator.profile import AggregatedSample
from aggregator.web import query as q
from aggregator.web.store import RetainedExports
from integration.harness import PipelineRun, build_c, run_pipeline
from shared.lock_waits import LOCK_WAIT_KIND
from shared.profile_types import ProfileType
from stackfleet.nats_server import NatsServer
from tests.otlp_server import protoc_decode

PPROF = Path(__file__).resolve().parents[1] / ".tools" / "pprof"


@dataclass
class LockRun:
    run: PipelineRun
    pid: int
    own: dict[str, int]  # the program's own output: wait_ns, rw_wait_ns, cond_tid, sem_tid
    out_dir: Path

    def samples(self) -> list[AggregatedSample]:
        return self.run.samples(ProfileType.LOCK, self.pid)


@pytest.fixture(scope="module")
def lock_run(tmp_path_factory: pytest.TempPathFactory) -> LockRun:
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
    own = {name: int(value) for name, value in (line.split() for line in run.workload_output.splitlines())}
    return LockRun(run, box[0], own, out_dir)


def kind(s: AggregatedSample) -> str:
    return dict(s.attributes)[LOCK_WAIT_KIND]


def names(s: AggregatedSample) -> list[str]:
    return [f.function for f in s.frames]


def test_mutex_delay_matches_the_programs_own_measurement(lock_run: LockRun) -> None:
    samples = lock_run.samples()
    assert samples, lock_run.run.agent_counters.snapshot()
    mutex = [s for s in samples if kind(s) == "mutex"]
    assert mutex and all("contend_lock" in names(s) for s in mutex), [names(s) for s in mutex]
    delay = sum(s.values[1] for s in mutex)
    assert abs(delay - lock_run.own["wait_ns"]) <= 0.05 * lock_run.own["wait_ns"], (delay, lock_run.own)
    contentions = sum(s.values[0] for s in mutex)
    assert 0 < contentions <= lock_run.own["locks"]


def test_rwlock_waits_are_rwlock_or_other(lock_run: LockRun) -> None:
    """Frame-pointer stacks recover libc's frames by scanning the stack, which can turn up a
    stale return address (a clock_gettime call of the caller) as the innermost named frame:
    such a wait is ``other``, never a wrong kind."""
    rw = [s for s in lock_run.samples() if "contend_rwlock" in names(s)]
    assert any(kind(s) == "rwlock" for s in rw) and {kind(s) for s in rw} <= {"rwlock", "other"}


def test_waits_that_are_not_contention_are_labelled_with_their_kind(lock_run: LockRun) -> None:
    by_kind: dict[str, list[AggregatedSample]] = {}
    for s in lock_run.samples():
        by_kind.setdefault(kind(s), []).append(s)
    cond = by_kind.get("condition", [])
    assert cond and {s.tid for s in cond} == {lock_run.own["cond_tid"]}
    assert all("wait_for_done" in names(s) for s in cond)
    join = by_kind.get("join", [])
    assert join and {s.tid for s in join} == {lock_run.pid} and all("join_all" in names(s) for s in join)
    # The condition and join waits last as long as the lockers run: far longer than all contention.
    assert sum(s.values[1] for s in cond) > lock_run.own["wait_ns"] / 4
    assert sum(s.values[1] for s in join) > lock_run.own["wait_ns"] / 4
    sem = [s for s in lock_run.samples() if s.tid == lock_run.own["sem_tid"]]
    assert sem and all("wait_for_post" in names(s) for s in sem)
    for s in sem:
        named = any(f.function.lstrip("_").startswith("new_sem_wait") for f in s.frames)
        assert kind(s) == ("semaphore" if named else "other"), names(s)


def test_default_views_show_contention_only(lock_run: LockRun) -> None:
    pprof_file = max(lock_run.out_dir.glob("[0-9]*.lock.pb.gz"), key=lambda f: f.stat().st_size)
    top = subprocess.run([str(PPROF), "-top", "-cum", "-nodefraction=0", "-sample_index=delay", str(pprof_file)],
                         capture_output=True, text=True, check=True).stdout
    assert "contend_lock" in top
    assert "wait_for_done" not in top and "join_all" not in top and "wait_for_post" not in top

    store = RetainedExports(lock_run.out_dir)
    since, until = lock_run.run.workload_start_ns - 10**10, lock_run.run.workload_end_ns + 10**11
    default = q.ProfileQuery(ProfileType.LOCK, since, until, column=1)
    fleet, _ = q.load_fleet(store, default)
    kinds = {kind(s) for hp in fleet.hosts.values() for s in hp.samples.values() if s.pid == lock_run.pid}
    assert "mutex" in kinds and kinds <= {"mutex", "rwlock"}
    every = q.ProfileQuery(ProfileType.LOCK, since, until, column=1, labels=((LOCK_WAIT_KIND, frozenset({"*"})),))
    fleet, _ = q.load_fleet(store, every)
    kinds = {kind(s) for hp in fleet.hosts.values() for s in hp.samples.values() if s.pid == lock_run.pid}
    assert {"mutex", "condition", "join"} <= kinds


def test_outputs_are_valid(lock_run: LockRun) -> None:
    assert all(validate_request(r) == [] for r in lock_run.run.requests)
    decoded = "".join(protoc_decode(f) for f in lock_run.out_dir.glob("*.otlp.pb"))
    assert '"contentions"' in decoded and '"delay"' in decoded and LOCK_WAIT_KIND in decoded
