"""The one /proc watcher (agent/process/watcher.py): processes, not threads; new and exited
processes of real children told to each subscriber; unreadable ones counted."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

from agent.process.procmaps import ProcessKey, file_key
from agent.process.selectors import ProcessSelector
from agent.process.watcher import ProcessSnapshot, ProcessWatcher, next_wait, running_pids, same_pid_namespace
from shared.counters import Counters


def test_lists_processes_but_not_their_threads() -> None:
    started = threading.Event()
    stop = threading.Event()
    tid: list[int] = []

    def worker() -> None:
        tid.append(threading.get_native_id())
        started.set()
        stop.wait()

    thread = threading.Thread(target=worker)
    thread.start()
    child = subprocess.Popen(["sleep", "30"])
    try:
        started.wait(5)
        pids = running_pids()
        assert os.getpid() in pids and child.pid in pids
        assert tid[0] != os.getpid() and tid[0] not in pids  # a thread has a /proc entry, not a listed one
        assert os.path.exists(f"/proc/{tid[0]}")
    finally:
        stop.set()
        thread.join()
        child.kill()
        child.wait()
    assert child.pid not in running_pids()  # reaped: gone from /proc


def test_only_numeric_entries_of_the_given_tree(tmp_path: Path) -> None:
    for name in ("1", "42", "self", "net", "7x"):
        (tmp_path / name).mkdir()
    assert running_pids(str(tmp_path)) == {1, 42}


# -- the watcher: one scan, changes per subscriber ---------------------------------------------
def _wait_exec(pid: int, exe_name: str) -> None:
    deadline = time.monotonic() + 5
    while os.path.basename(os.readlink(f"/proc/{pid}/exe")) != exe_name:
        assert time.monotonic() < deadline, f"pid {pid} did not exec {exe_name}"
        time.sleep(0.01)


def test_subscribers_are_told_of_a_child_starting_and_exiting() -> None:
    counters = Counters()
    watcher = ProcessWatcher(counters)
    early = watcher.subscribe()
    first = early.take()  # nothing scanned before: the take scans, all processes are new to it
    assert first.complete and os.getpid() in first.snapshot.alive
    child = subprocess.Popen(["sleep", "30"])
    try:
        _wait_exec(child.pid, "sleep")
        late = watcher.subscribe()  # subscribing after a scan: told of what is alive at its first take
        changes = early.take(max_age_s=0)
        assert changes.started[child.pid] == ProcessKey.read(child.pid)
        assert child.pid not in changes.exited
        assert early.take(max_age_s=0).started == {}  # told once
        assert child.pid in late.take(max_age_s=0).started
    finally:
        child.kill()
        child.wait()
    changes = early.take(max_age_s=0)
    assert child.pid in changes.exited and child.pid not in changes.snapshot.alive
    assert child.pid not in changes.started
    assert counters.get("process_watch_unreadable") == 0


def test_an_exec_is_an_exit_and_a_start_under_the_new_key() -> None:
    watcher = ProcessWatcher(Counters())
    subscription = watcher.subscribe()
    # The shell runs until it reads a line, then execs sleep: one pid, two executables.
    child = subprocess.Popen(["sh", "-c", "read line; exec sleep 30"], stdin=subprocess.PIPE)
    try:
        _wait_exec(child.pid, os.path.basename(os.path.realpath(shutil.which("sh") or "sh")))
        before = subscription.take(max_age_s=0).started[child.pid]
        assert child.stdin is not None
        child.stdin.write(b"go\n")
        child.stdin.flush()
        _wait_exec(child.pid, "sleep")
        changes = subscription.take(max_age_s=0)
        after = changes.started[child.pid]
        assert child.pid in changes.exited
        assert after is not None and before is not None
        assert (after.pid, after.start_ticks) == (before.pid, before.start_ticks) and after.exe != before.exe
        assert after.exe == file_key(os.stat(shutil.which("sleep") or "/bin/sleep"))
    finally:
        child.kill()
        child.wait()


def test_selected_processes_are_matched_once_per_scan() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        _wait_exec(child.pid, "sleep")
        watcher = ProcessWatcher(Counters(), ProcessSelector(pids=[child.pid]))
        assert watcher.current().selected == {child.pid}
        assert ProcessWatcher(Counters(), ProcessSelector()).current().selected is None  # no filter
    finally:
        child.kill()
        child.wait()


def test_unreadable_processes_are_counted_and_listed_without_a_key(tmp_path: Path) -> None:
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "stat").write_text("7 (broken")  # no closing parenthesis: a malformed line
    (tmp_path / "8").mkdir()  # no stat at all: gone before it was read
    counters = Counters()
    watcher = ProcessWatcher(counters, proc=str(tmp_path))
    snapshot = watcher.scan()
    assert snapshot.keys == {7: None} and snapshot.alive == {7}
    watcher.scan()
    assert counters.get("process_watch_unreadable", reason="ValueError") == 1  # once per process


def test_changes_past_the_bound_ask_for_a_rebuild() -> None:
    watcher = ProcessWatcher(Counters())
    subscription = watcher.subscribe()
    subscription.max_pending = 1
    changes = subscription.take()
    assert not changes.complete and changes.started == {} and os.getpid() in changes.snapshot.alive
    assert subscription.take(max_age_s=0).complete  # the next take is exact again


def test_the_watcher_task_scans_in_the_background() -> None:
    async def main() -> ProcessSnapshot | None:
        watcher = ProcessWatcher(Counters(), interval_s=0.05)
        stop = asyncio.Event()
        task = asyncio.create_task(watcher.run(stop))
        while watcher.latest is None:
            await asyncio.sleep(0.01)
        stop.set()
        await task
        return watcher.latest

    latest = asyncio.run(main())
    assert latest is not None and os.getpid() in latest.alive


def test_unsubscribing_removes_that_subscriber_only() -> None:
    watcher = ProcessWatcher(Counters())
    first, second = watcher.subscribe(), watcher.subscribe()  # equal pending changes, two subscribers
    second.close()
    watcher.scan()
    assert os.getpid() in first.take(max_age_s=60).started
    assert second.take(max_age_s=60).started == {}  # closed before the scan: told nothing


# -- nothing changed, nothing listed -----------------------------------------------------------
def _fake_proc(root: Path, pids: list[int], threads: int, last_pid: int) -> None:
    """A /proc with ``pids`` (stat files a ProcessKey reads), its loadavg, and pid 1's pid
    namespace link pointing where this process's does (so loadavg describes it)."""
    for pid in pids:
        _fake_process(root, pid)
    (root / "1" / "ns").mkdir(parents=True, exist_ok=True)
    if not (root / "1" / "ns" / "pid").is_symlink():
        os.symlink(os.readlink("/proc/self/ns/pid"), root / "1" / "ns" / "pid")
    (root / "loadavg").write_text(f"0.00 0.00 0.00 1/{threads} {last_pid}\n")


def _fake_process(root: Path, pid: int) -> None:
    d = root / str(pid)
    d.mkdir(exist_ok=True)
    # Started at boot (tick 1): old, so its key is not read again at every scan.
    fields = ["S"] + ["0"] * 18 + ["1"] + ["0"] * 30
    (d / "stat").write_text(f"{pid} (proc {pid}) " + " ".join(fields) + "\n")
    os.symlink("/bin/true", d / "exe")


def test_unchanged_loadavg_skips_the_listing_and_a_new_process_is_found_at_the_next_scan(tmp_path: Path) -> None:
    """/proc/loadavg's thread count and last pid change with every process created or reaped:
    while they stay, the watcher does not list /proc (a pid added behind its back, which the
    kernel never does, stays unseen: the listing really was skipped); once they change, the
    very next scan finds the new process and tells the subscriber, and a reaped one as exited.
    With no young process to read again either, such a scan rebuilds nothing."""
    _fake_proc(tmp_path, [1, 10, 20], threads=30, last_pid=20)
    watcher = ProcessWatcher(Counters(), proc=str(tmp_path))
    subscription = watcher.subscribe()
    first = watcher.scan()
    assert set(first.alive) == {1, 10, 20} and watcher.listings == 1
    subscription.take(max_age_s=3600)
    _fake_process(tmp_path, 21)
    again = watcher.scan()
    assert set(again.alive) == {1, 10, 20} and watcher.listings == 1
    # Nothing came, went or is young enough to exec: the same snapshot, only newer.
    assert again.keys is first.keys and again.scanned_at > first.scanned_at
    (tmp_path / "loadavg").write_text("0.00 0.00 0.00 1/31 21\n")  # pid 21 created
    assert set(watcher.scan().alive) == {1, 10, 20, 21} and watcher.listings == 2
    assert set(subscription.take(max_age_s=3600).started) == {21}
    shutil.rmtree(tmp_path / "10")
    (tmp_path / "loadavg").write_text("0.00 0.00 0.00 1/30 21\n")  # pid 10 reaped
    assert set(watcher.scan().alive) == {1, 20, 21} and watcher.listings == 3
    assert subscription.take(max_age_s=3600).exited == {10}


def test_real_proc_new_child_found_by_the_next_scan() -> None:
    """On the real /proc: a child started after a scan is in the next scan, whether or not
    that scan listed the directory (its fork changed loadavg), and gone after it is reaped."""
    watcher = ProcessWatcher(Counters())
    watcher.scan()
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert child.pid in watcher.scan().alive
    finally:
        child.kill()
        child.wait()
    assert child.pid not in watcher.scan().alive


class _TimedScans(ProcessWatcher):
    """Records each scan's time (its snapshot's ``scanned_at``)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.times: list[float] = []

    def scan(self) -> ProcessSnapshot:
        snapshot = super().scan()
        self.times.append(snapshot.scanned_at)
        return snapshot


async def test_after_each_scan_steps_run_on_the_fresh_scan_and_a_failing_one_is_counted() -> None:
    """A follow-up registered with after_each_scan runs after every periodic scan (on the
    watcher's thread) and finds it fresh (its own take scans nothing more); one that raises is
    counted, the scans go on."""
    counters = Counters()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    watcher = _TimedScans(counters, interval_s=0.001)
    scans = watcher.times
    subscription = watcher.subscribe()
    fresh: list[bool] = []

    def follow_up() -> None:
        fresh.append(subscription.take(max_age_s=3600).snapshot.scanned_at == scans[-1])
        if len(fresh) == 3:
            loop.call_soon_threadsafe(stop.set)

    def broken() -> None:
        raise RuntimeError("a consumer's bug")

    watcher.after_each_scan(broken)
    watcher.after_each_scan(follow_up)
    await asyncio.wait_for(watcher.run(stop), 60)
    # The thread may scan again before it hears of the stop; every scan has its follow-ups.
    assert len(scans) >= 3 and fresh == [True] * len(scans)
    assert counters.get("errors", kind="process_watch_follow_up") == len(scans)


def test_the_pid_namespace_check_works_where_pid_1_cannot_be_read(tmp_path: Path) -> None:
    """A sandbox may deny reading pid 1's namespace link; then ``self`` of the proc directory
    tells: it names the reader's own pid only in the reader's pid namespace."""
    assert same_pid_namespace("/proc")
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    (ours / "self").symlink_to(str(os.getpid()))
    (theirs / "self").symlink_to("4242" if os.getpid() != 4242 else "4243")
    assert same_pid_namespace(str(ours))
    assert not same_pid_namespace(str(theirs))
    assert not same_pid_namespace(str(tmp_path))  # no self at all: not ours


# -- a quiet host: the periodic scan backs off, new processes wake it ---------------------------
def test_the_wait_doubles_after_quiet_scans_and_resets_after_any_other() -> None:
    waits = [1.0]
    for quiet in (True, True, True, True, False, True):
        waits.append(next_wait(waits[-1], quiet, 1.0, 4.0))
    assert waits == [1.0, 2.0, 4.0, 4.0, 4.0, 1.0, 2.0]


def test_a_quiet_proc_is_scanned_less_and_less_often_and_a_change_restores_the_interval(tmp_path: Path) -> None:
    """With nothing created or reaped (loadavg unchanged) every scan after the first is quiet and
    the waits double up to the quiet interval; once loadavg changes, the scan after it lists
    the new process and the wait is back to the scan interval."""
    _fake_proc(tmp_path, [1, 10], threads=30, last_pid=10)
    watcher = _TimedScans(Counters(), interval_s=0.02, proc=str(tmp_path), quiet_interval_s=0.32)

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(watcher.run(stop))
        await asyncio.sleep(1.6)
        # Without backing off: ~80 scans. Waits 0.02, 0.04 ... 0.32, 0.32 ...: ~9.
        assert 3 <= len(watcher.times) <= 12, len(watcher.times)
        assert watcher.last_scan_quiet and watcher.listings == 1
        gaps = [b - a for a, b in zip(watcher.times, watcher.times[1:], strict=False)]
        assert gaps[-1] >= 0.3 and gaps[0] < gaps[-1]
        _fake_process(tmp_path, 11)
        (tmp_path / "loadavg").write_text("0.00 0.00 0.00 1/31 11\n")
        before = len(watcher.times)
        while len(watcher.times) < before + 3:
            await asyncio.sleep(0.01)
        stop.set()
        await task

    asyncio.run(main())
    assert watcher.latest is not None and 11 in watcher.latest.alive and watcher.listings == 2


def test_a_nudge_for_an_unknown_process_scans_at_once_and_one_for_known_processes_does_not(
        tmp_path: Path) -> None:
    _fake_proc(tmp_path, [1, 10], threads=30, last_pid=10)
    watcher = _TimedScans(Counters(), interval_s=60.0, proc=str(tmp_path))

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(watcher.run(stop))
        while not watcher.times:
            await asyncio.sleep(0.01)
        watcher.nudge({1, 10})  # both scanned already: nothing to do
        await asyncio.sleep(0.3)
        assert len(watcher.times) == 1
        _fake_process(tmp_path, 12)
        (tmp_path / "loadavg").write_text("0.00 0.00 0.00 1/31 12\n")
        watcher.nudge({10, 12})
        for _ in range(1000):  # the next periodic scan is a minute away
            if len(watcher.times) == 2:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await task

    asyncio.run(main())
    assert watcher.latest is not None and 12 in watcher.latest.alive
    assert len(watcher.times) == 2
