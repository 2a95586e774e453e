"""Names for a process's BPF programs, so per-program costs can say which program is which.

Two kernel answers, as ``bpftool prog`` and ``bpftool perf`` give them: the program's own
name (``BPF_OBJ_GET_INFO_BY_FD`` on an fd from ``BPF_PROG_GET_FD_BY_ID``; bcc names a
program after its C function, cut to 15 characters, so ``on_cpu_sample`` is clear but every
``TRACEPOINT_PROBE`` reads ``tracepoint__sch``...), and, for each perf-event or link fd the
process holds, where its program is attached (``BPF_TASK_FD_QUERY``: ``tracepoint
sched_switch``, ``uprobe FILE+OFFSET``). bpftool is not installed everywhere and bcc's Python
module has no call for either, so the system calls are made here with ctypes.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

SYS_BPF = 321  # x86_64
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_TASK_FD_QUERY = 20
PROG_INFO_NAME_OFFSET = 64  # struct bpf_prog_info: char name[BPF_OBJ_NAME_LEN] after map_ids
BPF_OBJ_NAME_LEN = 16
FD_TYPES = {0: "raw_tracepoint", 1: "tracepoint", 2: "kprobe", 3: "kretprobe", 4: "uprobe", 5: "uretprobe"}


class TaskFdQuery(ctypes.Structure):
    """``union bpf_attr``'s task_fd_query member (include/uapi/linux/bpf.h)."""

    _fields_ = [("pid", ctypes.c_uint32), ("fd", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("buf_len", ctypes.c_uint32), ("buf", ctypes.c_uint64), ("prog_id", ctypes.c_uint32),
                ("fd_type", ctypes.c_uint32), ("probe_offset", ctypes.c_uint64), ("probe_addr", ctypes.c_uint64)]


class ProgGetFdById(ctypes.Structure):
    _fields_ = [("prog_id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]


class ObjGetInfoByFd(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    return int(_libc.syscall(SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr)))


def program_name(prog_id: int) -> str | None:
    """The kernel's name of program ``prog_id`` (root only), or None if it cannot be read."""
    fd = _bpf(BPF_PROG_GET_FD_BY_ID, ProgGetFdById(prog_id=prog_id))
    if fd < 0:
        return None
    try:
        info = ctypes.create_string_buffer(256)  # larger than the kernel's struct: the tail stays zero
        if _bpf(BPF_OBJ_GET_INFO_BY_FD, ObjGetInfoByFd(bpf_fd=fd, info_len=len(info),
                                                       info=ctypes.addressof(info))) != 0:
            return None
        raw = info.raw[PROG_INFO_NAME_OFFSET:PROG_INFO_NAME_OFFSET + BPF_OBJ_NAME_LEN]
        return raw.split(b"\0", 1)[0].decode(errors="replace")
    finally:
        os.close(fd)


def describe(fd_type: int, name: str, probe_offset: int) -> str:
    """A readable attach point: ``tracepoint sched_switch``, ``uprobe nats-server+0x5ad40``
    (a probed file by its base name: results are shared, the machine's paths are not)."""
    kind = FD_TYPES.get(fd_type, f"type {fd_type}")
    if fd_type in (4, 5):
        base = Path(name).name
        return f"{kind} {base}+{probe_offset:#x}" if probe_offset else f"{kind} {base}"
    return f"{kind} {name}"


def query_fd(pid: int, fd: int) -> tuple[int, str] | None:
    """(program id, attach point) of ``pid``'s perf-event or link ``fd``, or None when the fd
    has no such program (a software perf event such as cpu-clock is not queryable: its
    program is told apart by its type, perf_event)."""
    buf = ctypes.create_string_buffer(256)
    attr = TaskFdQuery(pid=pid, fd=fd, flags=0, buf_len=len(buf), buf=ctypes.addressof(buf))
    if _bpf(BPF_TASK_FD_QUERY, attr) != 0:
        return None
    return attr.prog_id, describe(attr.fd_type, buf.value.decode(errors="replace"), attr.probe_offset)


def attach_points(pid: int) -> dict[int, str]:
    """Attach points by program id for the perf-event and BPF-link fds ``pid`` holds."""
    points: dict[int, str] = {}
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return points
    for entry in fds:
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target not in ("anon_inode:[perf_event]", "anon_inode:bpf_link"):
            continue
        found = query_fd(pid, int(entry.name))
        if found:
            points.setdefault(found[0], found[1])
    return points


def program_labels(pid: int, prog_ids: list[int]) -> dict[int, str]:
    """``name`` or ``name @ attach point`` for each of ``prog_ids`` (the id itself if unnamed)."""
    points = attach_points(pid)
    labels = {}
    for prog_id in prog_ids:
        name = program_name(prog_id) or str(prog_id)
        labels[prog_id] = f"{name} @ {points[prog_id]}" if prog_id in points else name
    return labels
