"""benchmarks/idle_cost.py's arithmetic: per-thread counters to CPU and wake-ups a second."""

from __future__ import annotations

from benchmarks.idle_cost import group, window


def test_window_sums_threads_and_keeps_symbolization_apart() -> None:
    names = {1: "MainThread", 2: "uvloop_0", 3: "symbolize_0", 4: "unwind-tables", 5: "poll-cpu"}
    before = {1: (1_000_000, 10), 2: (0, 0), 3: (5_000_000, 1), 4: (0, 0)}
    # 2 s window: thread 5 started inside it (counted from zero), a thread that ended is gone.
    after = {1: (3_000_000, 14), 2: (1_000_000, 4), 3: (25_000_000, 3), 4: (4_000_000, 6), 5: (2_000_000, 8)}
    w = window(before, after, 2.0, names)
    assert w["threads"] == {"MainThread": {"cpu_ms_per_s": 1.0, "wakeups_per_s": 2.0},
                            "executor": {"cpu_ms_per_s": 0.5, "wakeups_per_s": 2.0},
                            "poll-cpu": {"cpu_ms_per_s": 1.0, "wakeups_per_s": 4.0},
                            "symbolize+unwind": {"cpu_ms_per_s": 12.0, "wakeups_per_s": 4.0}}
    assert w["cpu_ms_per_s"] == 14.5 and w["wakeups_per_s"] == 12.0
    assert w["fixed_cpu_ms_per_s"] == 2.5 and w["fixed_wakeups_per_s"] == 8.0
    assert group("asyncio_3") == "executor" and group("unknown") == "unknown"
