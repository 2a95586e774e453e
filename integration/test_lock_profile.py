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
- Every test runs twice: with the lock profile alone (its futex system-call tracepoints,
  bpf/lock.bpf.c) and with the wall profile on too (the waits from the wall program's
  switch-outs, bpf/lock_from_switch.h).
- lock_once runs alongside: 8 threads, one after another, each waiting once (~1 ms) for a mutex.
  With lock_contention's waits keeping the per-CPU capture budget engaged, each of these waits
  has its stack (a thread's first wait is captured for certain): none is left stackless.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from aggregator.otlp.encode import validate_request
from aggregator.profile import AggregatedSample
from aggregator.web import query as q
from aggregator.web.store import RetainedExports
from benchmarks.bpf_attach import attach_points
from integration.harness import PipelineRun, build_c, run_pipeline
from shared.lock_waits import LOCK_WAIT_KIND
from shared.model import FrameType
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
    once_pid: int
    once: dict[int, int]  # lock_once's threads: tid -> its own wait (ns)
    source: str  # WAIT_SOURCES key
    attached: set[str]  # the agent's attach points during the workload (the agent runs in this process)

    def samples(self) -> list[AggregatedSample]:
        return self.run.samples(ProfileType.LOCK, self.pid)


# Where the agent takes lock waits from: the lock program's tracepoints, or the wall program's switch-outs.
WAIT_SOURCES = {"tracepoints": [ProfileType.LOCK], "switch-outs": [ProfileType.WALL, ProfileType.LOCK]}


@pytest.fixture(scope="module", params=list(WAIT_SOURCES))
def lock_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LockRun:
    tmp = tmp_path_factory.mktemp("lock")
    exe, once_exe = build_c("lock_contention.c", tmp), build_c("lock_once.c", tmp)
    out_dir = tmp / "profiles"
    box: list[int] = []
    once_output: list[str] = []
    attached: set[str] = set()

    async def workload(run: PipelineRun) -> None:
        # Warm-up waits until "go": the name selector's scan (1 s) puts both processes in the BPF
        # target map and has the agent load them for unwinding; lock_contention's warm-up waits,
        # once exported, show that this very process is traced (a counter would also count
        # other runs' processes with these names). Then the contention, with whole stacks.
        once = await asyncio.create_subprocess_exec(str(once_exe), "8", "1000",
                                                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        proc = await asyncio.create_subprocess_exec(str(exe), "4", "200", "2000", "gate",
                                                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        box.extend((proc.pid, once.pid))
        deadline = asyncio.get_running_loop().time() + 120
        while not run.samples(ProfileType.LOCK, proc.pid):
            assert asyncio.get_running_loop().time() < deadline, run.agent_counters.snapshot()
            await asyncio.sleep(0.1)
        attached.update(attach_points(os.getpid()).values())
        assert once.stdin is not None
        once.stdin.write(b"go\n")  # lock_once exits when its stdin ends: after lock_contention
        out, _ = await proc.communicate(b"go\n")
        once.stdin.close()  # communicate() without input leaves stdin open
        once_out, _ = await once.communicate()
        assert proc.returncode == 0 and once.returncode == 0
        run.workload_output = out.decode()
        once_output.append(once_out.decode())

    with NatsServer() as nats:
        run = asyncio.run(run_pipeline(nats.url, WAIT_SOURCES[request.param], workload, output_dir=out_dir,
                                       export_interval_s=2.0,
                                       agent_overrides={"target_comm": "^(lock_contention|lock_once)$"}))
    own = {name: int(value) for name, value in (line.split() for line in run.workload_output.splitlines())}
    once = {int(tid): int(wait_ns) for _, tid, wait_ns in (line.split() for line in once_output[0].splitlines())}
    return LockRun(run, box[0], own, out_dir, box[1], once, request.param, attached)


def kind(s: AggregatedSample) -> str:
    return dict(s.attributes)[LOCK_WAIT_KIND]


def names(s: AggregatedSample) -> list[str]:
    return [f.function for f in s.frames]


# The futex tracepoints the agent attaches, by wait source: none when the wall program takes the waits.
FUTEX_TRACEPOINTS = {"tracepoints": {"tracepoint sys_enter_futex", "tracepoint sys_exit_futex"}, "switch-outs": set()}


def test_futex_tracepoints_are_attached_only_without_the_wall_profile(lock_run: LockRun) -> None:
    futex = {point for point in lock_run.attached if "futex" in point}
    assert futex == FUTEX_TRACEPOINTS[lock_run.source], lock_run.attached
    assert ("tracepoint sched_switch" in lock_run.attached) == (lock_run.source == "switch-outs")


def test_mutex_and_rwlock_delay_match_the_programs_own_measurement(lock_run: LockRun) -> None:
    samples = lock_run.samples()
    assert samples, lock_run.run.agent_counters.snapshot()
    expected = (("mutex", "contend_lock", "wait_ns"), ("rwlock", "contend_rwlock", "rw_wait_ns"))
    for wait_kind, caller, own_key in expected:
        labelled = [s for s in samples if caller in names(s)]
        assert {kind(s) for s in labelled} == {wait_kind}, [(kind(s), names(s)) for s in labelled]
        delay = sum(s.values[1] for s in labelled)
        own = lock_run.own[own_key]
        assert abs(delay - own) <= 0.05 * own, (wait_kind, delay, own)
    contentions = sum(s.values[0] for s in samples if kind(s) == "mutex")
    assert 0 < contentions <= lock_run.own["locks"]


def test_a_thread_waiting_once_has_its_wait_on_its_stack(lock_run: LockRun) -> None:
    """Each of lock_once's threads waits once, ~1 ms, while lock_contention's waits keep the
    per-CPU capture budget engaged (waits are sampled out). A thread's first wait is captured
    for certain (bpf/event_capture.h), so each such wait has its stack: drawn at the budget's
    factor instead, a thread's only waits on a lock could all be drawn out and its (thread,
    lock) delay stayed without a stack, as the rwlock's did in one run of thirteen."""
    counters = lock_run.run.agent_counters
    assert counters.get("stack_captures", type="lock", result="sampled_out") > 0, counters.snapshot()
    samples = [s for s in lock_run.run.samples(ProfileType.LOCK, lock_run.once_pid) if s.tid in lock_run.once]
    assert not [s for s in samples if not s.frames], [(s.tid, s.values, dict(s.attributes)) for s in samples]
    assert all("wait_once" in names(s) and kind(s) == "mutex" for s in samples), [names(s) for s in samples]
    # A thread preempted past the main thread's 1 ms hold finds the mutex free: at most one of eight.
    waited = {s.tid for s in samples}
    assert len(waited) >= len(lock_run.once) - 1, (waited, lock_run.once)
    for tid in waited:  # the futex wait lies within the thread's own measurement of it
        delay = sum(s.values[1] for s in samples if s.tid == tid)
        assert 0 < delay <= lock_run.once[tid], (tid, delay, lock_run.once[tid])


def test_lock_stacks_start_in_user_space(lock_run: LockRun) -> None:
    """A wait is captured at sys_exit_futex, where the kernel's stack is the system-call exit
    path whatever the wait was: no lock stack carries kernel frames (before, every one ended
    in syscall_exit_work, do_syscall_64, entry_SYSCALL_64_after_hwframe)."""
    samples = [s for pid in (lock_run.pid, lock_run.once_pid) for s in lock_run.run.samples(ProfileType.LOCK, pid)
               if s.frames]
    assert samples
    kernel = [names(s) for s in samples if any(f.frame_type == FrameType.KERNEL for f in s.frames)]
    assert not kernel, kernel[:3]
    assert all(s.frames[0].frame_type == FrameType.NATIVE for s in samples), [names(s)[:3] for s in samples]


def test_waits_that_are_not_contention_are_labelled_with_their_kind(lock_run: LockRun) -> None:
    by_kind: dict[str, list[AggregatedSample]] = {}
    for s in lock_run.samples():
        by_kind.setdefault(kind(s), []).append(s)
    # A wait the per-thread capture rate left out, on a lock with no captured stack of that
    # thread, is reported without one and labelled so (bpf/event_capture.h): e.g. the main
    # thread's second join, milliseconds after the first, on another thread's tid word.
    for s in lock_run.samples():
        if not s.frames:
            assert dict(s.attributes).get("lock.stack") == "not-captured", s
    cond = by_kind.get("condition", [])
    assert cond and {s.tid for s in cond} == {lock_run.own["cond_tid"]}
    assert all("wait_for_done" in names(s) for s in cond if s.frames)
    join = by_kind.get("join", [])
    assert join and {s.tid for s in join} == {lock_run.pid}, [(s.tid, names(s)) for s in join]
    assert all("join_all" in names(s) for s in join if s.frames), [(s.values, names(s)) for s in join]
    assert sum(s.values[1] for s in join if s.frames) > 0.9 * sum(s.values[1] for s in join)
    # The condition and join waits last as long as the lockers run: far longer than all contention.
    assert sum(s.values[1] for s in cond) > lock_run.own["wait_ns"] / 4
    assert sum(s.values[1] for s in join) > lock_run.own["wait_ns"] / 4
    sem = [s for s in lock_run.samples() if s.tid == lock_run.own["sem_tid"]]
    assert sem and all("wait_for_post" in names(s) for s in sem if s.frames)
    for s in sem:
        named = any(f.function.lstrip("_").startswith("new_sem_wait") for f in s.frames)
        assert kind(s) == ("semaphore" if named else "other"), names(s)


def test_default_views_show_contention_only(lock_run: LockRun) -> None:
    files = [str(f) for f in lock_run.out_dir.glob("[0-9]*.lock.pb.gz")]  # pprof merges them
    top = subprocess.run([str(PPROF), "-top", "-cum", "-nodefraction=0", "-sample_index=delay", *files],
                         capture_output=True, text=True, check=True).stdout
    assert "contend_lock" in top and "contend_rwlock" in top
    # wait_for_done also takes the mutex around its condition wait (real contention, tiny); the
    # condition wait itself is kept out, checked by kind through the page's query below.
    assert "join_all" not in top and "wait_for_post" not in top

    store = RetainedExports(lock_run.out_dir)
    since, until = lock_run.run.workload_start_ns - 10**10, lock_run.run.workload_end_ns + 10**11
    default = q.ProfileQuery(ProfileType.LOCK, since, until, column=1)
    fleet, _ = q.load_fleet(store, default)
    kinds = {kind(s) for hp in fleet.hosts.values() for s in hp.samples.values() if s.pid == lock_run.pid}
    assert kinds == {"mutex", "rwlock"}
    every = q.ProfileQuery(ProfileType.LOCK, since, until, column=1, labels=((LOCK_WAIT_KIND, frozenset({"*"})),))
    fleet, _ = q.load_fleet(store, every)
    kinds = {kind(s) for hp in fleet.hosts.values() for s in hp.samples.values() if s.pid == lock_run.pid}
    assert {"mutex", "rwlock", "condition", "join"} <= kinds


def test_outputs_are_valid(lock_run: LockRun) -> None:
    assert [e for r in lock_run.run.requests for e in validate_request(r)] == []
    decoded = "".join(protoc_decode(f) for f in lock_run.out_dir.glob("*.otlp.pb"))
    assert '"contentions"' in decoded and '"delay"' in decoded and LOCK_WAIT_KIND in decoded
