"""Which kind of wait a futex wait is: mutex, rwlock, condition, join, semaphore or other.

Every pthread primitive parks threads on a futex, so the lock profile's futex waits mix
lock contention (mutexes, rwlocks) with waits for events (condition variables, joins,
semaphores). This module decides the kind from what BPF can know without reading kernel
structures (bpf/lock.bpf.c packs it into the top byte of each aggregate's label):

1. The futex command: ``FUTEX_LOCK_PI``/``LOCK_PI2`` only lock priority-inheritance mutexes,
   ``FUTEX_WAIT_REQUEUE_PI`` only waits on a condition variable.
2. The waiting stack, leaf first: the first frame with a name decides. Futex plumbing
   (``syscall``, glibc's ``__futex_abstimed_wait*``, musl's ``__timedwait``) is looked
   through; a known libc entry point (exported names such as ``pthread_mutex_lock``, and the
   internal ones debug-symbol files add, such as ``__lll_lock_wait`` or
   ``__pthread_clockjoin_ex``) gives its kind; any other name (the program's own code, Go's
   runtime, a barrier) ends the search with ``other``. Unnamed frames (stripped libraries)
   are skipped.
3. The futex word: BPF marks a word that is the thread-id field of a glibc thread descriptor,
   which only pthread_join (and its timed forms) wait on: that makes a join even when the
   stack has no name for it (glibc's ``pthread_join`` tail-calls an unexported function).

Op consistency: glibc waits on a condition variable with ``FUTEX_WAIT_BITSET``; a plain
``FUTEX_WAIT`` under ``pthread_cond_wait`` is the re-lock of its mutex in a helper that a
stripped libc leaves unnamed, so it is ``other`` there, never ``condition`` (named, the
helper ``__lll_lock_wait`` makes it ``mutex``). Whatever cannot be told is ``other``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from agent.bpf.layouts import (
    LOCK_LABEL_ADDRESS_BITS,
    LOCK_WAIT_MATCH_ANY,
    LOCK_WAIT_PRIVATE,
    LOCK_WAIT_REALTIME,
    LOCK_WAIT_THREAD_TID,
)
from shared.lock_waits import LockWaitKind
from shared.model import Frame, FrameType

# bpf/lock.bpf.c: the label's top byte (WAIT_BITS), below it the futex address.
LABEL_ADDRESS_BITS = LOCK_LABEL_ADDRESS_BITS
ADDRESS_MASK = (1 << LABEL_ADDRESS_BITS) - 1
COMMAND_MASK = 0x0F
WAIT_PRIVATE = LOCK_WAIT_PRIVATE
WAIT_REALTIME = LOCK_WAIT_REALTIME
WAIT_MATCH_ANY = LOCK_WAIT_MATCH_ANY
WAIT_THREAD_TID = LOCK_WAIT_THREAD_TID

FUTEX_WAIT, FUTEX_LOCK_PI, FUTEX_WAIT_BITSET, FUTEX_WAIT_REQUEUE_PI, FUTEX_LOCK_PI2 = 0, 6, 9, 11, 13
FUTEX_COMMAND_NAMES = {FUTEX_WAIT: "wait", FUTEX_LOCK_PI: "lock_pi", FUTEX_WAIT_BITSET: "wait_bitset",
                       FUTEX_WAIT_REQUEUE_PI: "wait_requeue_pi", FUTEX_LOCK_PI2: "lock_pi2"}

_K = LockWaitKind
# Names after normalize(): no leading underscores, no "@version", no ".constprop.0"-style
# suffix, no "__GI_" prefix. glibc 2.28-2.36 and musl spellings.
_WAIT_FUNCTIONS: dict[str, LockWaitKind] = {
    **dict.fromkeys((
        "pthread_mutex_lock", "pthread_mutex_timedlock", "pthread_mutex_timedlock64", "pthread_mutex_clocklock",
        "pthread_mutex_clocklock64", "pthread_mutex_clocklock_common", "pthread_mutex_lock_full",
        "pthread_mutex_cond_lock", "pthread_mutex_cond_lock_full", "lll_lock_wait", "lll_lock_wait_private",
        "lll_clocklock_wait", "lll_lock_elision", "lll_clocklock_elision", "lll_robust_lock_wait",
        "mtx_lock", "mtx_timedlock", "mtx_timedlock64"), _K.MUTEX),
    **dict.fromkeys((
        "pthread_rwlock_rdlock", "pthread_rwlock_wrlock", "pthread_rwlock_timedrdlock", "pthread_rwlock_timedwrlock",
        "pthread_rwlock_timedrdlock64", "pthread_rwlock_timedwrlock64", "pthread_rwlock_clockrdlock",
        "pthread_rwlock_clockwrlock", "pthread_rwlock_clockrdlock64", "pthread_rwlock_clockwrlock64",
        "pthread_rwlock_rdlock_full", "pthread_rwlock_wrlock_full", "pthread_rwlock_rdlock_full64",
        "pthread_rwlock_wrlock_full64"), _K.RWLOCK),
    **dict.fromkeys((
        "pthread_cond_wait", "pthread_cond_timedwait", "pthread_cond_timedwait64", "pthread_cond_clockwait",
        "pthread_cond_clockwait64", "pthread_cond_wait_common", "pthread_cond_wait_2_0",
        "pthread_cond_timedwait_2_0", "cnd_wait", "cnd_timedwait", "cnd_timedwait64"), _K.CONDITION),
    **dict.fromkeys((
        "pthread_join", "pthread_timedjoin_np", "pthread_timedjoin_np64", "pthread_clockjoin_np",
        "pthread_clockjoin_np64", "pthread_clockjoin_ex", "pthread_tryjoin_np", "thrd_join"), _K.JOIN),
    **dict.fromkeys((
        "sem_wait", "sem_timedwait", "sem_timedwait64", "sem_clockwait", "sem_clockwait64", "new_sem_wait",
        "new_sem_wait_slow", "new_sem_wait_slow64", "old_sem_wait"), _K.SEMAPHORE),
    # Known waits that are none of the kinds above: they end the search.
    **dict.fromkeys(("pthread_barrier_wait", "pthread_once", "pthread_once_slow", "call_once",
                     "libc_allocate_once_slow"), _K.OTHER),
}
# The futex plumbing between an entry point and the system call: looked through.
_PLUMBING = frozenset((
    "syscall", "futex_abstimed_wait_common", "futex_abstimed_wait_common64", "futex_abstimed_wait",
    "futex_abstimed_wait64", "futex_abstimed_wait_cancelable", "futex_abstimed_wait_cancelable64",
    "futex_wait", "futex_wait_simple", "futex_wait_cancelable", "futex_lock_pi", "futex_lock_pi64",
    "do_futex_wait", "lll_futex_wait", "timedwait", "timedwait_cp", "futexwait", "syscall_cp", "syscall_cp_c",
    "syscall_cp_asm", "libc_do_syscall"))
# Kinds whose glibc implementation waits only with FUTEX_WAIT_BITSET (or requeue-PI).
_BITSET_ONLY = frozenset({_K.CONDITION})
# A name that is only a place: "0x7f12... (libc.so.6)" or "libc.so.6+0x891f5".
_PLACE_NAME = re.compile(r"^(0x[0-9a-fA-F]+\b.*|\S+\+0x[0-9a-fA-F]+)$")


def normalize(name: str) -> str:
    """A symbol name without version, compiler-clone suffix, glibc's __GI_ alias prefix or
    leading underscores, so aliases of one function compare equal."""
    name = name.split("@", 1)[0].split(".", 1)[0]
    if name.startswith("__GI_"):
        name = name[len("__GI_"):]
    return name.lstrip("_")


def wait_kind(wait_bits: int, frames: Iterable[Frame]) -> LockWaitKind:
    """The kind of a futex wait from its WAIT_BITS and its stack (leaf first)."""
    command = wait_bits & COMMAND_MASK
    if command in (FUTEX_LOCK_PI, FUTEX_LOCK_PI2):
        return LockWaitKind.MUTEX
    if command == FUTEX_WAIT_REQUEUE_PI:
        return LockWaitKind.CONDITION
    if command not in (FUTEX_WAIT, FUTEX_WAIT_BITSET):
        return LockWaitKind.OTHER
    named = _kind_from_stack(frames)
    if named is not None and named in _BITSET_ONLY and command != FUTEX_WAIT_BITSET:
        return LockWaitKind.OTHER
    if wait_bits & WAIT_THREAD_TID:
        return LockWaitKind.JOIN if named in (None, LockWaitKind.JOIN) else LockWaitKind.OTHER
    return named or LockWaitKind.OTHER


def _kind_from_stack(frames: Iterable[Frame]) -> LockWaitKind | None:
    """The kind named by the first named frame past the futex plumbing; None if that name is
    no known wait function (the program's own code, a runtime) or the stack has no name."""
    for frame in frames:
        if frame.frame_type == FrameType.KERNEL or not frame.function or _PLACE_NAME.match(frame.function):
            continue
        name = normalize(frame.function)
        if name in _PLUMBING:
            continue
        return _WAIT_FUNCTIONS.get(name)
    return None


def futex_address(label: int) -> int:
    return label & ADDRESS_MASK


def wait_bits(label: int) -> int:
    return label >> LABEL_ADDRESS_BITS
