"""Telling futex waits apart (agent/actors/lock_waits.py) and the contention-only lock views.

The stacks are the ones glibc 2.36 produces (Debian 12): with its stripped libc only the
exported entry points have names; with libc6-dbg's debug file the internal helpers too.
"""

from __future__ import annotations

import gzip
from pathlib import Path

from agent.actors.lock_waits import (
    FUTEX_LOCK_PI,
    FUTEX_WAIT,
    FUTEX_WAIT_BITSET,
    FUTEX_WAIT_REQUEUE_PI,
    WAIT_MATCH_ANY,
    WAIT_PRIVATE,
    WAIT_REALTIME,
    WAIT_THREAD_TID,
    normalize,
    wait_kind,
)
from aggregator.exporters.pprof import encode_pprof, write_pprof
from aggregator.profile import FleetProfiles, HostProfile
from aggregator.web import query as q
from shared.lock_waits import LOCK_WAIT_KIND, LockWaitKind
from shared.model import Frame, FrameType, Mapping
from shared.profile_types import ProfileType

LIBC = Mapping(0x7F00_0000_0000, 0x7F00_0020_0000, 0, "/usr/lib/x86_64-linux-gnu/libc.so.6")
APP = Mapping(0x5500_0000_0000, 0x5500_0001_0000, 0, "/opt/app")
BITSET = FUTEX_WAIT_BITSET | WAIT_PRIVATE | WAIT_REALTIME | WAIT_MATCH_ANY
PLAIN = FUTEX_WAIT | WAIT_PRIVATE


def stack(*names: str) -> tuple[Frame, ...]:
    """Leaf first; "" is a frame a stripped library leaves unnamed, "app:" a program frame."""
    frames = [Frame("schedule", "", 0, 0xFFFF_FFFF_8100_0000, FrameType.KERNEL)]
    for i, name in enumerate(names):
        mapping = APP if name.startswith("app:") else LIBC
        frames.append(Frame(name.removeprefix("app:"), "", 0, mapping.start + 0x100 * (i + 1), FrameType.NATIVE,
                            mapping))
    return tuple(frames)


def test_mutex_waits_from_exported_and_debug_names() -> None:
    stripped = stack("", "pthread_mutex_lock", "app:contend_lock", "app:worker", "", "")
    assert wait_kind(PLAIN, stripped) == LockWaitKind.MUTEX
    debug = stack("__GI___lll_lock_wait", "___pthread_mutex_lock", "app:contend_lock")
    assert wait_kind(PLAIN, debug) == LockWaitKind.MUTEX
    # glibc-internal locks (stdio, malloc arenas): exported as __lll_lock_wait_private.
    assert wait_kind(PLAIN, stack("__lll_lock_wait_private", "", "app:main")) == LockWaitKind.MUTEX
    # A timed lock waits with WAIT_BITSET through the generic futex helpers (named with debug files).
    timed = stack("__futex_abstimed_wait_common", "__futex_abstimed_wait64", "__lll_clocklock_wait",
                  "__pthread_mutex_clocklock_common", "app:main")
    assert wait_kind(BITSET, timed) == LockWaitKind.MUTEX
    # Priority-inheritance mutexes are the only users of LOCK_PI, whatever the stack says.
    assert wait_kind(FUTEX_LOCK_PI | WAIT_PRIVATE, stack("", "app:main")) == LockWaitKind.MUTEX


def test_condition_waits_need_the_bitset_wait_glibc_uses() -> None:
    assert wait_kind(BITSET, stack("", "pthread_cond_wait", "app:wait_for_done")) == LockWaitKind.CONDITION
    assert wait_kind(BITSET, stack("", "", "___pthread_cond_timedwait64", "app:take_gil")) == LockWaitKind.CONDITION
    # A plain WAIT under pthread_cond_wait is the re-lock of its mutex in an unnamed helper:
    # not a condition wait; named (debug file) it is the mutex it is.
    assert wait_kind(PLAIN, stack("", "", "pthread_cond_wait", "app:wait_for_done")) == LockWaitKind.OTHER
    relock = stack("__lll_lock_wait", "__pthread_mutex_cond_lock", "___pthread_cond_wait", "app:wait_for_done")
    assert wait_kind(PLAIN, relock) == LockWaitKind.MUTEX
    assert wait_kind(FUTEX_WAIT_REQUEUE_PI, stack("", "app:main")) == LockWaitKind.CONDITION


def test_join_from_the_thread_descriptor_word_or_its_name() -> None:
    # glibc's pthread_join tail-calls an unexported function: stripped, no libc name is left.
    stripped = stack("", "", "", "app:join_all", "app:main")
    assert wait_kind(FUTEX_WAIT_BITSET | WAIT_REALTIME | WAIT_MATCH_ANY, stripped) == LockWaitKind.OTHER
    tid_word = FUTEX_WAIT_BITSET | WAIT_REALTIME | WAIT_MATCH_ANY | WAIT_THREAD_TID
    assert wait_kind(tid_word, stripped) == LockWaitKind.JOIN
    named = stack("__futex_abstimed_wait_common", "__futex_abstimed_wait_cancelable64", "__pthread_clockjoin_ex",
                  "app:main")
    assert wait_kind(tid_word, named) == LockWaitKind.JOIN
    assert wait_kind(FUTEX_WAIT_BITSET, named) == LockWaitKind.JOIN
    # The word and the stack disagree: nothing is claimed.
    assert wait_kind(tid_word, stack("", "pthread_mutex_lock", "app:main")) == LockWaitKind.OTHER


def test_semaphores_rwlocks_and_waits_that_are_none_of_them() -> None:
    assert wait_kind(BITSET, stack("", "", "app:wait_for_post")) == LockWaitKind.OTHER  # sem_wait tail-calls
    sem = stack("__futex_abstimed_wait_common", "do_futex_wait.constprop.0", "__new_sem_wait_slow64.constprop.0",
                "app:wait_for_post")
    assert wait_kind(BITSET, sem) == LockWaitKind.SEMAPHORE
    assert wait_kind(BITSET, stack("", "pthread_rwlock_wrlock", "app:contend_rwlock")) == LockWaitKind.RWLOCK
    assert wait_kind(BITSET, stack("", "pthread_barrier_wait", "pthread_mutex_lock")) == LockWaitKind.OTHER
    # A program's own futex (Go's runtime, hand-made locks): its name ends the search.
    assert wait_kind(PLAIN, stack("runtime.futex", "runtime.futexsleep", "runtime.notesleep")) == LockWaitKind.OTHER
    assert wait_kind(PLAIN, stack("syscall", "app:my_lock", "pthread_mutex_lock")) == LockWaitKind.OTHER
    assert wait_kind(PLAIN, ()) == LockWaitKind.OTHER
    # Frames named only by their place are unnamed, whatever form the place takes.
    assert wait_kind(PLAIN, stack("libc.so.6+0x891f5", "0x7f12 (libc.so.6)", "pthread_mutex_lock")) == \
        LockWaitKind.MUTEX


def test_normalize_strips_aliases_versions_and_clone_suffixes() -> None:
    assert normalize("__GI___pthread_mutex_lock") == "pthread_mutex_lock"
    assert normalize("pthread_cond_wait@@GLIBC_2.3.2") == "pthread_cond_wait"
    assert normalize("__new_sem_wait_slow64.constprop.0") == "new_sem_wait_slow64"


def lock_fleet() -> FleetProfiles:
    f = FleetProfiles(start_ns=1_000, end_ns=10_000_000_000)
    lock = HostProfile("web-1", ProfileType.LOCK, 1_000, 9_000, 1)
    for kind, delay in (("mutex", 1_000), ("rwlock", 200), ("condition", 50_000), ("join", 70_000), ("other", 30)):
        frames = stack("", f"app:wait_{kind}")
        lock.add(frames, 10, 11, "w", "app", 0, ((LOCK_WAIT_KIND, kind),), (1, delay), 8_000)
    lock.add(stack("", "app:unlabelled"), 10, 11, "w", "app", 0, (), (1, 5), 8_000)
    f.hosts[("web-1", ProfileType.LOCK)] = lock
    return f


def delays(fleet: FleetProfiles) -> int:
    return sum(s.values[1] for hp in fleet.hosts.values() for s in hp.samples.values())


def test_web_lock_view_shows_contention_unless_asked_for_more() -> None:
    def lock_query(*labels: str) -> q.ProfileQuery:
        return q.parse_query({"type": "lock"}.get, lambda k: list(labels) if k == "label" else [])

    assert delays(q.filter_fleet(lock_fleet(), lock_query())) == 1_000 + 200 + 5
    everything = lock_query("lock.wait.kind=*")
    assert delays(q.filter_fleet(lock_fleet(), everything)) == 1_000 + 200 + 50_000 + 70_000 + 30 + 5
    assert delays(q.filter_fleet(lock_fleet(), lock_query("lock.wait.kind=condition,join"))) == 50_000 + 70_000
    assert delays(q.filter_fleet(lock_fleet(), lock_query("lock.wait.kind=mutex", "thread=x"))) == 0


def test_pprof_lock_files_hold_contention_only(tmp_path: Path) -> None:
    path = tmp_path / "lock.pb.gz"
    write_pprof(str(path), lock_fleet(), ProfileType.LOCK)
    data = gzip.decompress(path.read_bytes())
    assert b"wait_mutex" in data and b"wait_rwlock" in data and b"unlabelled" in data
    assert b"wait_condition" not in data and b"wait_join" not in data and b"wait_other" not in data
    assert b"wait_join" in encode_pprof(lock_fleet(), ProfileType.LOCK)  # the web's download: as filtered
