"""Native unwinding from DWARF call-frame information, for code without frame pointers.

``cfi`` parses ``.eh_frame``/``.debug_frame`` into rules, ``table`` merges them into one
compact sorted table per file, ``cache`` keeps tables per file identity, ``loader`` feeds
them to the BPF unwinder in bpf/unwind.h, and ``reference`` is the same walk in Python
for tests and debugging. Design and measurements: docs/design/native-unwinding.md.
"""

from agent.unwind.loader import BccUnwindMaps, NativeUnwinder

__all__ = ["BccUnwindMaps", "NativeUnwinder"]
