"""The benchmark's measuring arithmetic (benchmarks/measure.py, cost.py, busy_mix.py,
agent_profile.py) on recorded kernel texts and recorded numbers, with answers worked out by
hand; and the /proc and BPF readers on this test's own process tree and a program it loads."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import pytest

from benchmarks.agent_profile import function_name, parse_collapsed, summarise
from benchmarks.bpf_attach import attach_points, describe, program_labels
from benchmarks.busy_mix import Window, mix_is_busy, storm_summary
from benchmarks.cost import Comparison, CostSnapshot, WindowCost, cost_ratio, window_cost
from benchmarks.event_mix import MixRates
from benchmarks.measure import (
    BpfProgStats,
    bpf_programs,
    enable_bpf_stats,
    parse_bpf_prog_fdinfo,
    parse_context_switches,
    parse_cpu_ticks,
    parse_ppid,
    parse_processes_started,
    process_cpu_clock_s,
    process_tree,
    process_tree_cpu_s,
)

# /proc/PID/fdinfo/6 of bcc's profile-bpfcc on this kernel (6.18), as the kernel wrote it.
PROG_FDINFO = """pos:\t0
flags:\t02000002
mnt_id:\t17
ino:\t26
prog_type:\t7
prog_jited:\t1
prog_tag:\t37c35d2aaa9a0897
memlock:\t4096
prog_id:\t4175
run_time_ns:\t1073577
run_cnt:\t140
recursion_misses:\t0
verified_insns:\t69
"""
MAP_FDINFO = """pos:\t0
flags:\t02000002
mnt_id:\t17
ino:\t26
map_type:\t27
key_size:\t0
value_size:\t0
max_entries:\t262144
map_flags:\t0x0
map_extra:\t0x0
memlock:\t270336
map_id:\t812
frozen:\t0
"""


def test_prog_fdinfo_parsed() -> None:
    prog = parse_bpf_prog_fdinfo(PROG_FDINFO)
    assert prog == BpfProgStats(prog_id=4175, prog_type=7, run_time_ns=1073577, run_cnt=140)
    assert prog.type_name == "perf_event"


def test_non_program_fdinfo_is_none() -> None:
    assert parse_bpf_prog_fdinfo(MAP_FDINFO) is None
    assert parse_bpf_prog_fdinfo("pos:\t0\nflags:\t02\nmnt_id:\t5\nino:\t77\n") is None  # a plain file
    # A program fd without statistics (a kernel before bpf_stats) is not a zero-cost program.
    assert parse_bpf_prog_fdinfo(PROG_FDINFO.replace("run_time_ns:\t1073577\n", "")) is None


def test_stat_fields_after_a_comm_with_spaces_and_parens() -> None:
    line = "4321 (a (b) c) S 17 4321 4321 0 -1 4194560 5 0 0 0 250 31 7 2 20 0 3 0 100 1000 50\n"
    assert parse_ppid(line) == 17
    assert parse_cpu_ticks(line) == (250 + 31, 7 + 2)


def test_context_switches_from_proc_stat() -> None:
    text = "cpu  1 2 3 4\nintr 99 1 2\nctxt 123456789\nbtime 1700000000\nprocesses 42\n"
    assert parse_context_switches(text) == 123456789
    assert parse_processes_started(text) == 42
    with pytest.raises(ValueError):
        parse_context_switches("cpu 1 2 3\n")
    with pytest.raises(ValueError):
        parse_processes_started("cpu 1 2 3\nprocs_running 3\n")


def test_process_tree_holds_a_live_child() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        tree = process_tree(os.getpid())
        assert tree[0] == os.getpid()
        assert child.pid in tree
    finally:
        child.kill()
        child.wait()


def test_process_tree_cpu_covers_own_cpu() -> None:
    t = os.times()
    # os.times() rounds to whole clock ticks; the tree's figure is the exact runtime.
    assert process_tree_cpu_s(os.getpid()) >= t.user + t.system - 0.02


def test_a_process_cpu_clock_is_its_exact_cpu_time() -> None:
    """Another process's CPU-time clock read by pid is the clock the process reads as its own
    (CLOCK_PROCESS_CPUTIME_ID), to the nanosecond; a gone process raises OSError."""
    before = process_cpu_clock_s(os.getpid())
    own = time.process_time()
    after = process_cpu_clock_s(os.getpid())
    assert before <= own <= after and after - before < 0.01
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with pytest.raises(OSError):
        process_cpu_clock_s(child.pid)


def prog(prog_id: int, prog_type: int, ns: int, runs: int) -> BpfProgStats:
    return BpfProgStats(prog_id, prog_type, ns, runs)


def test_window_cost_from_recorded_counters() -> None:
    # A 20 s window: 1.5 s of process CPU; a perf_event program ran 40,000 times for 0.2 s,
    # a tracepoint 10,000 times for 0.05 s; a second tracepoint was loaded in the window.
    before = CostSnapshot(100.0, 10.0, {1: prog(1, 7, 1_000_000_000, 500_000), 2: prog(2, 5, 5_000, 100)})
    after = CostSnapshot(120.0, 11.5, {1: prog(1, 7, 1_200_000_000, 540_000), 2: prog(2, 5, 50_005_000, 10_100),
                                       3: prog(3, 5, 7_000, 7)})
    w = window_cost(before, after)
    assert w.seconds == 20.0
    assert w.samples == 40_000  # perf_event runs only
    assert w.bpf_ns == 200_000_000 + 50_000_000 + 7_000
    assert w.process_us_per_sample == pytest.approx(1.5e6 / 40_000)  # 37.5
    assert w.bpf_us_per_sample == pytest.approx(250_007_000 / 1e3 / 40_000)  # 6.250175
    assert w.us_per_sample == pytest.approx(37.5 + 6.250175)
    assert w.process_pct == pytest.approx(7.5)
    assert w.bpf_pct == pytest.approx(100 * 0.250007 / 20)
    assert [(p.prog_id, p.runs, p.us_per_run) for p in w.programs] == [(1, 40_000, 5.0), (2, 10_000, 5.0),
                                                                      (3, 7, 1.0)]


def test_window_cost_with_cpu_measured_elsewhere() -> None:
    before = CostSnapshot(0.0, 3.0, {9: prog(9, 7, 0, 0)})
    after = CostSnapshot(10.0, 3.0, {9: prog(9, 7, 40_000_000, 20_000)})
    w = window_cost(before, after, process_cpu_s=0.2)
    assert w.process_cpu_s == 0.2
    assert w.us_per_sample == pytest.approx(10.0 + 2.0)


def test_no_samples_is_not_a_cost_of_zero() -> None:
    assert math.isnan(WindowCost(10, 1.0, 0, 0).us_per_sample)


def cost(us_process: float, us_bpf: float, samples: int = 1000, seconds: float = 10) -> WindowCost:
    return WindowCost(seconds, us_process * samples / 1e6, int(us_bpf * samples * 1e3), samples)


def test_per_sample_ratio_of_medians_and_per_round() -> None:
    # Issue #20's recorded figures: agent 23.6 + 5.2 us, bcc profile 2.1 us (all BPF).
    c = Comparison(999, agent=[cost(23.6, 5.2), cost(30.0, 6.0), cost(20.0, 4.0)],
                   reference=[cost(0.0, 2.1), cost(0.0, 3.0), cost(0.0, 2.0)],
                   reference_exit_cpu_s=[0.001, 0.002, 0.003])
    assert c.agent_us == pytest.approx(28.8)
    assert c.reference_us == pytest.approx(2.1)
    assert c.ratio == pytest.approx(28.8 / 2.1)
    assert c.round_ratios == pytest.approx([28.8 / 2.1, 36.0 / 3.0, 24.0 / 2.0])
    # Exit-time CPU spread over each round's 1,000 samples: 2.1 + 1, 3.0 + 2, 2.0 + 3 us.
    assert c.reference_us_with_exit == pytest.approx(5.0)


def window(pct: float, ctxt: float, futex: float) -> Window:
    # pct % of a core over 10 s, all of it process CPU.
    return Window(WindowCost(10, pct / 10, 0, 0), MixRates(10, 0, 0, 0, futex, ctxt), 100)


def test_storm_summary_from_recorded_numbers() -> None:
    quiet = [window(4.0, 2_000, 0), window(6.0, 2_000, 0)]
    base = [window(10.0, 20_000, 3_000), window(12.0, 22_000, 3_200)]
    fast = [window(14.0, 40_000, 6_000), window(16.0, 42_000, 6_200)]
    s = storm_summary(quiet, base, fast)
    assert s.cost_ratio == pytest.approx(15 / 11)
    assert s.context_switch_ratio == pytest.approx(41_000 / 21_000)
    assert s.futex_wait_ratio == pytest.approx(6_100 / 3_100)
    assert s.event_part_ratio == pytest.approx((15 - 5) / (11 - 5))
    assert s.event_ratio == pytest.approx(41_000 / 21_000)  # the smaller growth
    assert s.elasticity == pytest.approx(math.log(15 / 11) / math.log(41 / 21))
    assert s.met is True
    # Cost up x2, events x41/21: more than proportional.
    assert storm_summary(quiet, base, [window(22.0, 40_000, 6_000), window(22.0, 42_000, 6_200)]).met is False
    # Cost up x1.5 while the events grew only x1.5: proportional, not bounded.
    assert storm_summary(quiet, base, [window(16.5, 31_500, 4_650)]).met is False
    # Events barely grew: no verdict.
    assert storm_summary(quiet, base, [window(11.0, 23_000, 3_200)]).met is None
    assert cost_ratio([w.cost for w in base], [w.cost for w in fast]) == pytest.approx(15 / 11)


def test_busy_mix_thresholds() -> None:
    assert mix_is_busy(MixRates(10, 0, 0, 0, 2_000, 15_000))
    assert not mix_is_busy(MixRates(10, 0, 0, 0, 1_999, 50_000))
    assert not mix_is_busy(MixRates(10, 0, 0, 0, 9_000, 14_999))


COLLAPSED = """\
_run_once (asyncio/base_events.py:1922);_run (asyncio/events.py:80);drain (base.py:210);decode (events.py:55) 7
_run_once (asyncio/base_events.py:1922);_run (asyncio/events.py:80);drain (base.py:212) 2
run (threading.py:975);poll (base.py:120);<module> (<frozen site>:616) 1
"""


def test_collapsed_stacks_summarised() -> None:
    stacks = parse_collapsed(COLLAPSED)
    assert [count for _, count in stacks] == [7, 2, 1]
    s = summarise(stacks, top=3)
    assert s.total_samples == 10
    assert s.self_samples == [("decode (events.py)", 7), ("drain (base.py)", 2),
                              ("<module> (<frozen site>)", 1)]
    assert s.callers["decode (events.py)"] == [("drain (base.py)", 7)]
    assert s.callers["drain (base.py)"] == [("_run (asyncio/events.py)", 2)]
    # Ties in name order.
    assert s.inclusive_samples == [("_run (asyncio/events.py)", 9), ("_run_once (asyncio/base_events.py)", 9),
                                   ("drain (base.py)", 9)]


def test_collapsed_recursion_counts_once_inclusive() -> None:
    s = summarise(parse_collapsed("f (a.py:1);f (a.py:2);g (a.py:9) 4\n"))
    assert dict(s.inclusive_samples) == {"f (a.py)": 4, "g (a.py)": 4}
    assert s.self_samples == [("g (a.py)", 4)]


def test_collapsed_markers_and_bad_lines() -> None:
    assert function_name('process 17:"python agent"') is None
    assert function_name("thread (0x7f00)") is None
    with pytest.raises(ValueError):
        parse_collapsed("f (a.py:1);g (a.py:2)\n")


BPF_COUNTER = """
TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
    return 0;
}
"""


def test_attach_point_descriptions() -> None:
    assert describe(1, "sched_switch", 0) == "tracepoint sched_switch"
    assert describe(4, "/opt/x/bin/nats-server", 0x5AD40) == "uprobe nats-server+0x5ad40"
    assert describe(2, "do_sys_open", 0) == "kprobe do_sys_open"


def test_live_program_named_attached_and_counted() -> None:
    """A tracepoint program this process loads: the kernel's own answers for its name, its
    attach point and its run count (bpf_stats on), read the way the benchmarks read the agent's."""
    bcc = pytest.importorskip("bcc")
    if not enable_bpf_stats():
        pytest.skip("needs root to enable kernel.bpf_stats_enabled")
    loaded_before = set(bpf_programs([os.getpid()]))  # other tests' programs may still be loaded
    bpf = bcc.BPF(text=BPF_COUNTER)
    try:
        ours = {i: p for i, p in bpf_programs([os.getpid()]).items() if i not in loaded_before}
        assert [p.prog_type for p in ours.values()] == [5]
        (prog_id, before), = ours.items()
        for _ in range(100):
            os.getppid()
        after = bpf_programs([os.getpid()])[prog_id]
        # Every process's getppid runs it: at least our 100 calls.
        assert after.run_cnt - before.run_cnt >= 100
        assert after.run_time_ns > before.run_time_ns
        # bcc names the program after its function, cut to the kernel's 15 characters.
        assert program_labels(os.getpid(), [prog_id]) == {prog_id: "syscalls__sys_e @ tracepoint sys_enter_getppid"}
        assert attach_points(os.getpid()) == {prog_id: "tracepoint sys_enter_getppid"}
    finally:
        bpf.cleanup()
