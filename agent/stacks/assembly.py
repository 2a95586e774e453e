"""From a raw BPF stack event to symbolized frames, with every stack failure counted."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from agent.bpf.records import RawStackEvent
from agent.stacks.scan import recover_skipped_frames
from agent.symbols import Symbolizer
from shared.counters import Counters
from shared.model import Frame

if TYPE_CHECKING:
    from agent.runtimes.python import PythonStacks


def event_frames(ev: RawStackEvent, symbolizer: Symbolizer, counters: Counters, type_name: str,
                 python: PythonStacks | None = None) -> tuple[Frame, ...]:
    """Leaf-first frames: the kernel part (if any) on top of the user part, with CPython
    frames in place of the interpreter's evaluation loop when ``python`` is given.

    A failed user or kernel stack read is counted by errno and the sample is kept with what
    was captured; kernel threads simply have no user stack (that is not an error).
    """
    if ev.user_error and ev.user_error != -errno.EFAULT:
        counters.inc("stack_errors", type=type_name, part="user", errno=errno.errorcode.get(-ev.user_error, "?"))
    if ev.kernel_error:
        counters.inc("stack_errors", type=type_name, part="kernel",
                     errno=errno.errorcode.get(-ev.kernel_error, "?"))
    kernel = symbolizer.symbolize_kernel(ev.kernel) if ev.kernel else ()
    addresses = recover_skipped_frames(ev.pid, ev.user, ev.user_sp, ev.stack_copy, symbolizer, counters)
    user = symbolizer.symbolize_user(ev.pid, addresses) if addresses else ()
    if python is not None:
        user = python.splice(ev.pid, user, ev.python, ev.py_status)
    return tuple(kernel) + tuple(user)
