"""Native unwinding end to end: programs without frame pointers, profiled by the real agent.

Three workloads run side by side for a few seconds, all built with
``-O2 -fomit-frame-pointer -g``:
- nofp_chain: main -> chain_one -> chain_two -> chain_three -> hot_leaf, each chain frame
  ~280 bytes deep, so neither frame pointers nor the stack-copy scan reach main;
- qsort_callback: main -> sort_rounds -> qsort (Debian's libc, no frame pointers) -> compare_slow;
- nofp_chain waits: the same chain into wait_leaf, which spins, sleeps and waits for a mutex
  (for the wall and lock profiles, which share the CPU profile's unwinder and tables);
- nofp_chain allocs: the same chain into alloc_leaf, which allocates and frees (for the heap
  profile), twice: once in precise mode (uprobes on libc) and once with the sampler library
  preloaded (sampled mode).
The pipeline runs the CPU, wall, lock and heap profiles once with ``native_unwinding`` on and
once off, on the same binaries: the "off" run shows what the workloads look like to frame
pointers alone, so the "on" numbers measure the unwinder and not a lucky build.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.heap_sampler import ENV_SAMPLE_BYTES, ENV_SEED, build_library
from integration.harness import PipelineRun, build_c, run_pipeline
from shared.model import KERNEL_FILENAME, Frame, FrameType
from shared.profile_types import ProfileType
from stackfleet.nats_server import NatsServer

SECONDS = 5.0
NOFP = ("-O2", "-fomit-frame-pointer", "-g")
CHAIN = ["hot_leaf", "chain_three", "chain_two", "chain_one", "main"]
HEAP_SAMPLE_BYTES = 256 * 1024  # ~230 sampled allocations a second from alloc_leaf


@dataclass
class Profiled:
    run: PipelineRun
    chain_pid: int
    qsort_pid: int
    waits_pid: int
    allocs_pid: int
    allocs_sampled_pid: int


def _profile(tmp: Path, native_unwinding: bool) -> Profiled:
    chain_exe = build_c("nofp_chain.c", tmp, NOFP)
    qsort_exe = build_c("qsort_callback.c", tmp, NOFP)
    pids: dict[str, int] = {}

    sampled_env = {**os.environ, "LD_PRELOAD": str(build_library()), ENV_SAMPLE_BYTES: str(HEAP_SAMPLE_BYTES),
                   ENV_SEED: "7"}

    async def start(name: str, exe: Path, *args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(str(exe), str(SECONDS), *args, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE, env=env)
        pids[name] = proc.pid
        return proc

    async def finish(proc: asyncio.subprocess.Process) -> None:
        await proc.communicate(b"go\n")
        assert proc.returncode == 0

    async def workload(run: PipelineRun) -> None:
        chain, qsort = await start("chain", chain_exe), await start("qsort", qsort_exe)
        # The waits and allocs modes start on a line from stdin, once selected (and loaded).
        gated = [await start("waits", chain_exe, "waits"), await start("allocs", chain_exe, "allocs"),
                 await start("allocs_sampled", chain_exe, "allocs", env=sampled_env)]
        running = asyncio.gather(finish(chain), finish(qsort))
        await _until_selected(run, native_unwinding, len(gated), chain)
        await asyncio.gather(running, *(finish(proc) for proc in gated))

    with NatsServer() as nats:
        # Wall, lock and the heap's precise mode trace selected processes only (the CPU profile
        # samples every process, the sampled heap mode every process with the library).
        run = asyncio.run(run_pipeline(nats.url, [ProfileType.CPU, ProfileType.WALL, ProfileType.LOCK,
                                                  ProfileType.HEAP], workload,
                                       agent_overrides={"native_unwinding": native_unwinding,
                                                        "target_comm": "^nofp_chain$",
                                                        "heap_sample_bytes": HEAP_SAMPLE_BYTES,
                                                        "ringbuf_pages": 1024},
                                       # Four programs with the unwinder to compile and verify: on
                                       # a loaded 2-core host that has taken over a minute.
                                       ready_timeout_s=240.0))
    return Profiled(run, pids["chain"], pids["qsort"], pids["waits"], pids["allocs"], pids["allocs_sampled"])


async def _until_selected(run: PipelineRun, native_unwinding: bool, waiting: int,
                          chain: asyncio.subprocess.Process) -> None:
    """Until the selector's scan (1 s) has the ``waiting`` processes traced and, with native
    unwinding, the agent has loaded each of them for unwinding (it does when it selects them:
    they are idle until "go", and a process is otherwise loaded at its first traced event,
    whose stack and those after it until the load is served are walked without its tables; in
    a whole-suite run such stacks carried a flush window's sleeps: 90.5 % of wall time reached
    main). The chain process is selected too (counted once loaded), unless it ended first."""
    await asyncio.sleep(2.0)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 240  # as long as the programs' compile may take on a loaded host
    while native_unwinding and sum(run.agent_counters.get("unwind_preloads", result=r) for r in ("loaded", "known")) \
            < waiting + (chain.returncode is None):
        assert loop.time() < deadline, {k: v for k, v in run.agent_counters.snapshot().items() if "unwind_p" in k}
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def unwound(tmp_path_factory: pytest.TempPathFactory) -> Profiled:
    return _profile(tmp_path_factory.mktemp("on"), native_unwinding=True)


@pytest.fixture(scope="module")
def frame_pointers_only(tmp_path_factory: pytest.TempPathFactory) -> Profiled:
    return _profile(tmp_path_factory.mktemp("off"), native_unwinding=False)


def _user_names(frames: tuple[Frame, ...]) -> list[str]:
    return [f.function for f in frames if f.frame_type != FrameType.KERNEL]


# Unwind tables are built when the agent first sees a binary in a sample (docs/design/
# native-unwinding.md): a process's first moments unwind with frame pointers only, for about
# a second on a quiet machine and several on a loaded one (the tables are built in the
# agent's symbolizer thread). The claims below are about the steady state: counted from the
# first sample that shows the tables in place (a complete stack), or, if none ever does,
# from the process's first second (and then the share is ~0 and the test fails).
WARMUP_NS = 1_000_000_000


def _steady(p: Profiled, pid: int, complete: Callable[[tuple[Frame, ...]], bool],
            profile_type: ProfileType = ProfileType.CPU) -> int:
    """Start of the steady state: the pid's first complete stack, else its first sample + 1 s."""
    samples = p.run.samples(profile_type, pid)
    done = [t for s in samples if complete(s.frames) for t in s.timestamps_ns]
    if done:
        return min(done)
    return min((t for s in samples for t in s.timestamps_ns), default=0) + WARMUP_NS


def _share(p: Profiled, pid: int, counts: Callable[[list[str]], bool]) -> tuple[int, int]:
    """(steady-state samples for which ``counts`` holds, all steady-state samples) of one process."""
    hit = total = 0
    since = _steady(p, pid, lambda frames: counts(_user_names(frames)))
    for s in p.run.samples(ProfileType.CPU, pid):
        n = sum(1 for t in s.timestamps_ns if t >= since)
        total += n
        if counts(_user_names(s.frames)):
            hit += n
    return hit, total


def _has_chain(names: list[str]) -> bool:
    return any(names[i : i + len(CHAIN)] == CHAIN for i in range(len(names)))


def test_full_chain_from_main_to_leaf_without_frame_pointers(unwound: Profiled) -> None:
    full, total = _share(unwound, unwound.chain_pid, _has_chain)
    # Enough samples for the share to mean something (a loaded machine gives the workload less CPU).
    assert total >= 100, f"{total} samples; counters: {unwound.run.agent_counters.snapshot()}"
    assert full >= 0.9 * total, f"{full}/{total} samples show {CHAIN}"


def test_frame_pointers_alone_do_not_reach_main(frame_pointers_only: Profiled) -> None:
    full, total = _share(frame_pointers_only, frame_pointers_only.chain_pid, _has_chain)
    assert total and full <= 0.1 * total, f"{full}/{total}: the workload no longer needs CFI to unwind"


def _through_libc(frames: tuple[Frame, ...]) -> bool | None:
    """For a sample in compare_slow: whether its stack continues past libc's qsort to
    sort_rounds and main (None for other samples)."""
    user = [f for f in frames if f.frame_type != FrameType.KERNEL]
    if not user or user[0].function != "compare_slow":
        return None
    libc = [i for i, f in enumerate(user) if f.mapping is not None and "libc.so" in f.mapping.filename]
    if not libc:
        return False
    after = [f.function for f in user[libc[0] :]]
    return "sort_rounds" in after and "main" in after


def _beyond_libc(p: Profiled) -> tuple[int, int]:
    """(compare_slow samples reaching main through libc, all compare_slow samples), steady state."""
    hit = total = 0
    since = _steady(p, p.qsort_pid, lambda frames: _through_libc(frames) is True)
    for s in p.run.samples(ProfileType.CPU, p.qsort_pid):
        through = _through_libc(s.frames)
        if through is None:
            continue
        n = sum(1 for t in s.timestamps_ns if t >= since)
        total += n
        if through:
            hit += n
    return hit, total


def test_callback_under_libc_qsort_shows_frames_beyond_libc(unwound: Profiled, frame_pointers_only: Profiled) -> None:
    hit, total = _beyond_libc(unwound)
    # The issue asks that such stacks show frames beyond libc; 90 % is the bar for the plain
    # chain above. Through glibc's recursive merge sort, fresh-clone runs on a loaded machine
    # gave 86 - 88 % (quiet ones above 90 %); frame pointers alone give almost none.
    assert total >= 50 and hit >= 0.8 * total, f"{hit}/{total} compare_slow samples reach main through libc"
    fp_hit, fp_total = _beyond_libc(frame_pointers_only)
    assert fp_total and fp_hit <= 0.5 * fp_total, f"frame pointers alone: {fp_hit}/{fp_total}"


WAIT_CHAIN = ["chain_three", "chain_two", "chain_one", "main"]
OWN_FRAMES = {"wait_leaf", "alloc_leaf", *WAIT_CHAIN[:-1]}


def _through_chain(names: list[str], leaf: str = "wait_leaf") -> bool:
    """The stack runs from ``leaf`` through the whole chain to main."""
    return leaf in names and any(names[i : i + len(WAIT_CHAIN)] == WAIT_CHAIN for i in range(len(names)))


def _reaches_main(names: list[str]) -> bool:
    """The stack reaches main: through the whole chain if it is in the chain (a wait or an
    allocation at its end), directly for the main thread's other moments (pthread_join at
    the end, exit: how long those last depends on scheduling, so they count like the rest)."""
    if "main" not in names:
        return False
    return not OWN_FRAMES & set(names) or _through_chain(names) or _through_chain(names, "alloc_leaf")


# Wall's per-thread sums without a stack by design (bpf/wall.bpf.c): off-CPU blocks shorter
# than wall_min_block_ns, uncaptured blocks of a (thread, state) with no captured block in
# the window, and measured on-CPU time of a thread with no sample in the window. How much
# time they hold depends on scheduling, not on unwinding: not stacks.
STACKLESS_WALL_STATES = {"short-off-cpu", "off-cpu-not-captured", "on-cpu-not-sampled"}


def _main_thread_share(p: Profiled, profile_type: ProfileType,
                       counts: Callable[[list[str]], bool] = _reaches_main) -> tuple[int, int]:
    """(weight of the waits workload's main-thread stacks for which ``counts`` holds, weight
    of all of them), in the steady state; the weight is wall ns or lock waits (values[0]). An
    aggregate counts from the start of its flush window, so one that began before the
    steady state is left out whole."""
    since = _steady(p, p.waits_pid, lambda frames: counts(_user_names(frames)), profile_type)
    hit = total = 0
    for s in p.run.samples(profile_type, p.waits_pid):
        if s.tid != p.waits_pid or min(s.timestamps_ns) < since:
            continue  # the holder thread's stacks never pass through main
        if dict(s.attributes).get("wall.state") in STACKLESS_WALL_STATES:
            assert not s.frames, s
            continue
        total += s.values[0]
        if counts(_user_names(s.frames)):
            hit += s.values[0]
    return hit, total


@pytest.mark.parametrize("profile_type", [ProfileType.WALL, ProfileType.LOCK])
def test_wall_and_lock_stacks_reach_main_without_frame_pointers(unwound: Profiled, frame_pointers_only: Profiled,
                                                                 profile_type: ProfileType) -> None:
    hit, total = _main_thread_share(unwound, profile_type)
    counters = {k: v for k, v in unwound.run.agent_counters.snapshot().items()
                if "unwind" in k or "stack" in k or "dropped" in k}
    assert total and hit >= 0.95 * total, f"{profile_type}: {hit}/{total} reach main; {counters}"
    fp_hit, fp_total = _main_thread_share(frame_pointers_only, profile_type, _through_chain)
    assert fp_total and fp_hit <= 0.1 * fp_total, f"frame pointers alone: {fp_hit}/{fp_total}"


def _heap_share(p: Profiled, pid: int) -> tuple[int, int]:
    """(bytes allocated by alloc_leaf whose stack runs through the chain to main, all bytes
    the process allocated), from the flush after the first complete stack on: heap samples
    are stamped when reported, so records taken before the process's tables were loaded can
    share the first complete stack's report and are left out with it."""
    complete = [t for s in p.run.samples(ProfileType.HEAP, pid)
                if _through_chain(_user_names(s.frames), "alloc_leaf") for t in s.timestamps_ns]
    since = min(complete, default=0)
    hit = total = 0
    for s in p.run.samples(ProfileType.HEAP, pid):
        through = _through_chain(_user_names(s.frames), "alloc_leaf")
        for t, values in zip(s.timestamps_ns, s.series, strict=True):
            if t > since:
                total += values[1]
                hit += values[1] if through else 0
    return hit, total


@pytest.mark.parametrize("mode", ["precise", "sampled"])
def test_heap_stacks_reach_main_without_frame_pointers(unwound: Profiled, frame_pointers_only: Profiled,
                                                       mode: str) -> None:
    pid = unwound.allocs_pid if mode == "precise" else unwound.allocs_sampled_pid
    hit, total = _heap_share(unwound, pid)
    counters = {k: v for k, v in unwound.run.agent_counters.snapshot().items()
                if "unwind" in k or "heap" in k or "dropped" in k}
    # ~230 sampled allocations a second for 5 s: enough for the share to mean something.
    assert total >= 200 * 16384 and hit >= 0.95 * total, f"{mode}: {hit}/{total} bytes reach main; {counters}"
    # The sampled process exits right after its last allocations: they are still counted.
    assert not unwound.run.agent_counters.get("events_dropped", type="heap", reason="sampler_mean_unknown"), counters
    fp = frame_pointers_only
    fp_hit, fp_total = _heap_share(fp, fp.allocs_pid if mode == "precise" else fp.allocs_sampled_pid)
    assert fp_total and fp_hit <= 0.1 * fp_total, f"frame pointers alone: {fp_hit}/{fp_total}"


def test_every_location_has_a_frame_type(unwound: Profiled) -> None:
    seen: set[FrameType] = set()
    for s in unwound.run.samples(ProfileType.CPU):
        for f in s.frames:
            assert f.frame_type in FrameType
            seen.add(f.frame_type)
            if f.frame_type == FrameType.KERNEL:
                assert f.mapping is not None and f.mapping.filename == KERNEL_FILENAME
    assert {FrameType.NATIVE, FrameType.KERNEL} <= seen
    ours = unwound.run.samples(ProfileType.CPU, unwound.chain_pid)
    assert all(f.frame_type == FrameType.NATIVE for s in ours for f in s.frames if f.function in CHAIN)


def test_unwinder_work_is_counted(unwound: Profiled, frame_pointers_only: Profiled) -> None:
    c = unwound.run.agent_counters
    assert c.get("unwind_processes", result="loaded") >= 2
    assert c.get("unwind_samples") > 0 and c.get("unwind_frames", method="cfi") > 0
    # Host-wide: other processes (e.g. huge C++ libraries left to frame pointers) may stop early.
    assert c.get("unwind_stacks", end="complete") > 0.5 * c.get("unwind_samples")
    assert not frame_pointers_only.run.agent_counters.get("unwind_samples")
