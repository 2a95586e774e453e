"""Batched ring-buffer wakeups (bpf/ring_wakeup.h) on the real kernel.

A tracepoint program that submits one record per getppid() call of this process, with
WAKEUP_EVERY=8: fewer than 8 records wake nobody (a poll times out with nothing delivered,
yet a consume finds them all); the 8th record wakes the poller at once.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from agent.bpf.loader import expand_local_includes

PROGRAM_TEMPLATE = """
#include "ring_wakeup.h"
BPF_RINGBUF_OUTPUT(events, 8);
TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
    if ((bpf_get_current_pid_tgid() >> 32) != TEST_TGID)
        return 0;
    u64 *ev = events.ringbuf_reserve(sizeof(u64));
    if (!ev)
        return 0;
    *ev = bpf_ktime_get_ns();
    events.ringbuf_submit(ev, SUBMIT_FLAGS);
    return 0;
}
"""


def program_text(submit_flags: str) -> str:
    """One record (its time) per getppid() of this process, submitted with ``submit_flags``."""
    return expand_local_includes(PROGRAM_TEMPLATE.replace("SUBMIT_FLAGS", submit_flags))


@pytest.fixture()
def program() -> Any:
    bcc = pytest.importorskip("bcc")
    bpf = bcc.BPF(text=program_text("ring_wakeup_flag()"), cflags=[f"-DTEST_TGID={os.getpid()}", "-DWAKEUP_EVERY=8"])
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})  # the count is per CPU: keep every record on one
    try:
        yield bpf
    finally:
        os.sched_setaffinity(0, cpus)
        bpf.cleanup()


def test_records_wait_for_the_batch_and_none_are_lost(program: Any) -> None:
    delivered: list[int] = []
    program["events"].open_ring_buffer(lambda _ctx, _data, _size: delivered.append(1) or 0)
    for _ in range(5):
        os.getppid()
    program.ring_buffer_poll(300)
    assert delivered == []  # no wakeup: the poll timed out with the records still queued
    program.ring_buffer_consume()
    assert len(delivered) == 5  # all there when asked

    for _ in range(8):  # the 8th record on a CPU since the last wakeup forces one
        os.getppid()
    started = time.monotonic()
    program.ring_buffer_poll(5000)
    assert time.monotonic() - started < 2.5
    program.ring_buffer_consume()
    assert len(delivered) == 13


def test_a_record_wanted_soon_wakes_at_once_then_not_again_within_the_interval() -> None:
    """``ring_wakeup_soon_flag`` (the CPU profile's whole stacks): the first record wakes the
    poller at once; another within NEW_RECORD_WAKEUP_NS (here 60 s) does not, and below
    WAKEUP_BYTES it waits for the consumer like any batched record."""
    bcc = pytest.importorskip("bcc")
    bpf = bcc.BPF(text=program_text("ring_wakeup_soon_flag(sizeof(u64), *ev)"),
                  cflags=[f"-DTEST_TGID={os.getpid()}", "-DWAKEUP_BYTES=1048576",
                          "-DNEW_RECORD_WAKEUP_NS=60000000000ULL"])
    try:
        delivered: list[int] = []
        bpf["events"].open_ring_buffer(lambda _ctx, _data, _size: delivered.append(1) or 0)
        os.getppid()
        started = time.monotonic()
        bpf.ring_buffer_poll(5000)
        assert time.monotonic() - started < 2.5 and delivered == [1]
        # epoll looks at the ring again once after reporting it ready: an empty look first,
        # so the next poll waits for a wakeup.
        bpf.ring_buffer_poll(50)
        for _ in range(3):
            os.getppid()
        bpf.ring_buffer_poll(300)
        assert delivered == [1]  # no wakeup within the interval
        bpf.ring_buffer_consume()
        assert len(delivered) == 4
    finally:
        bpf.cleanup()


FIRST_PROGRAM = """
#include "ring_wakeup.h"
BPF_RINGBUF_OUTPUT(events, 8);
TRACEPOINT_PROBE(syscalls, sys_enter_getpgid)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (tgid != TEST_TGID)
        return 0;
    u64 *ev = events.ringbuf_reserve(sizeof(u64));
    if (!ev)
        return 0;
    *ev = bpf_ktime_get_ns();
    /* The test names the image by getpgid's argument. */
    struct wakeup_image image = {.tgid = tgid, .generation = (u64)args->pid};
    events.ringbuf_submit(ev, ring_wakeup_first_flag(sizeof(u64), *ev, &image));
    return 0;
}
"""


def test_only_the_first_record_of_an_image_wakes_the_poller() -> None:
    """``ring_wakeup_first_flag`` (the CPU profile's whole stacks): the first record of a
    process image wakes the poller at once, later ones of the same image wait for the
    consumer (with no interval between wakeups here), and another image's first record wakes
    it again."""
    bcc = pytest.importorskip("bcc")
    bpf = bcc.BPF(text=expand_local_includes(FIRST_PROGRAM),
                  cflags=[f"-DTEST_TGID={os.getpid()}", "-DWAKEUP_BYTES=1048576", "-DNEW_RECORD_WAKEUP_NS=0"])
    try:
        delivered: list[int] = []

        def deliver(_ctx: Any, _data: Any, _size: int) -> int:
            delivered.append(1)
            return 0

        bpf["events"].open_ring_buffer(deliver)

        def woken_by(image: int) -> bool:
            os.getpgid(image)
            started = time.monotonic()
            bpf.ring_buffer_poll(1000)
            woke = time.monotonic() - started < 0.9
            bpf.ring_buffer_poll(50)  # epoll's second look, so the next poll waits for a wakeup
            return woke

        me = os.getpid()
        assert woken_by(0)
        assert not woken_by(0)
        assert not woken_by(0)
        assert woken_by(me)  # another image
        assert not woken_by(me)
        bpf.ring_buffer_consume()
        assert len(delivered) == 5  # none lost
    finally:
        bpf.cleanup()
