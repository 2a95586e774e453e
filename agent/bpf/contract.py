"""Checking the C side of every shared layout against agent/bpf/layouts.py, at compile time.

:func:`assertions` turns the Python descriptions into C11 ``_Static_assert`` lines that the
loader (agent/bpf/loader.py) appends to each program before bcc compiles it: struct sizes,
each field's offset, size and signedness, enum constants, slot counts and ``#define`` values.
Any disagreement stops the compile; clang's diagnostic carries our message, which names the
struct and field (or the enum constant), and :func:`mismatches` picks those messages out of
the compiler's output so the loader can raise :class:`ContractMismatch` with them.

Static assertions rather than reading the compiled program's BTF: bcc 0.26's Python API
does not hand out the BTF it generates (it would take a BTF parser of our own plus a
``bpf_prog_info`` round trip per program), while an assertion costs nothing at run time,
fails before anything is loaded into the kernel, and checks exactly the program text and
``-D`` defines the agent compiles. Each check is wrapped in the include guard of the header
defining it, so programs that leave a header out (no native unwinding, no Python frames)
are checked for what they contain.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterable
from enum import IntEnum
from typing import Any

import bpf as bpf_sources
from agent.bpf.layouts import C_CONSTANTS, C_ENUMS, LAYOUTS, PROGRAM_COUNTERS, Layout, is_padding

MARKER = "stackfleet contract: "
_GUARD = re.compile(r"^#ifndef (\w+)\s*\n#define \1\b", re.MULTILINE)
_MESSAGE = re.compile(re.escape('"' + MARKER) + r'([^"]*)"')


class ContractMismatch(RuntimeError):
    """A BPF program's C layouts, enums or constants differ from agent/bpf/layouts.py."""


def _assert(condition: str, message: str) -> str:
    return f'_Static_assert({condition}, "{MARKER}{message}");'


def _is_scalar(ctype: Any) -> bool:
    return issubclass(ctype, ctypes._SimpleCData) and ctype is not ctypes.c_char


def layout_assertions(layout: type[Layout]) -> list[str]:
    """Size, and every field's offset, size and signedness, of one struct."""
    c = f"struct {layout.c_name}"
    who = f"{c} (agent: {layout.__name__})"
    lines = [_assert(f"sizeof({c}) == {ctypes.sizeof(layout)}", f"{who}: size is {ctypes.sizeof(layout)} bytes "
                                                                   "in the agent")]
    ctype: Any
    for name, ctype, *_ in layout._fields_:
        field = getattr(layout, name)
        member = f"((({c} *)0)->{name})"
        lines.append(_assert(f"__builtin_offsetof({c}, {name}) == {field.offset}",
                             f"{who} field {name}: offset is {field.offset} in the agent"))
        lines.append(_assert(f"sizeof{member} == {field.size}",
                             f"{who} field {name}: size is {field.size} bytes in the agent"))
        if _is_scalar(ctype) and not is_padding(name):
            signed = ctype(-1).value < 0
            lines.append(_assert(f"(((__typeof__{member})-1) < 0) == {int(signed)}",
                                 f"{who} field {name}: {'signed' if signed else 'unsigned'} in the agent"))
    return lines


def enum_assertions(enum: type[IntEnum], name: str, prefix: str, slots: str) -> list[str]:
    """Every constant of one C enum, and its slot count."""
    lines = [_assert(f"sizeof(enum {name}) > 0", f"enum {name} (agent: {enum.__name__}) is missing")]
    for member in enum:
        const = prefix + member.name
        lines.append(_assert(f"{const} == {int(member)}", f"enum {name} constant {const}: {int(member)} in the agent "
                                                          f"({enum.__name__}.{member.name})"))
    if slots:
        count = max(enum) + 1
        lines.append(_assert(f"{slots} == {count}", f"enum {name} {slots}: {count} in the agent ({enum.__name__} "
                                                    "has a member per slot: add new C slots there too)"))
    return lines


def _guard(home: str) -> str | None:
    """The include guard of header ``home``; None for a program file (always present)."""
    if not home.endswith(".h"):
        return None
    match = _GUARD.search(bpf_sources.source(home))
    if match is None:
        raise ContractMismatch(f"bpf/{home} has no include guard: the contract cannot tell whether it is included")
    return match.group(1)


def assertions(files: Iterable[str]) -> str:
    """C text asserting every layout, enum and constant defined in ``files`` (bpf/ file names:
    the program and the headers inlined into it) against agent/bpf/layouts.py."""
    wanted = set(files)
    by_home: dict[str, list[str]] = {}
    for layout in LAYOUTS:
        if layout.c_home in wanted:
            by_home.setdefault(layout.c_home, []).extend(layout_assertions(layout))
    for spec in C_ENUMS:
        if spec.home in wanted:
            by_home.setdefault(spec.home, []).extend(enum_assertions(spec.enum, spec.name, spec.prefix, spec.slots))
    for macro, value, home in C_CONSTANTS:
        if home in wanted:
            shown = hex(value) if value > 0xFFFF else str(value)
            by_home.setdefault(home, []).append(_assert(f"{macro} == {value}ULL", f"{macro} is {shown} in the agent"))
    for program, enum in PROGRAM_COUNTERS.items():
        if program in wanted:
            slots = max(enum) + 1
            by_home.setdefault(program, []).append(_assert(
                f"COUNTER_SLOTS == {slots}", f"bpf/{program} counters: {slots} slots in the agent ({enum.__name__})"))
    out = ["", "/* ---- generated by agent/bpf/contract.py: the C<->Python contract ---- */"]
    for home in sorted(by_home):
        guard = _guard(home)
        out += [f"#ifdef {guard}", *by_home[home], "#endif"] if guard else by_home[home]
    return "\n".join(out) + "\n"


def mismatches(compiler_output: str) -> list[str]:
    """The contract's failed checks among the compiler's diagnostics, in order, without repeats:
    a failed assertion gives its message; any other error inside a check (a name the C lacks)
    gives clang's words and the check's message."""
    found: list[str] = []
    lines = compiler_output.splitlines()
    for i, line in enumerate(lines):
        if "error:" not in line:
            continue
        own = _MESSAGE.search(line)
        if own is not None:
            message = own.group(1)
        else:  # clang echoes the offending source line next
            check = _MESSAGE.search(lines[i + 1]) if i + 1 < len(lines) else None
            if check is None:
                continue
            message = f"{line.split('error:', 1)[1].strip()} ({check.group(1)})"
        if message not in found:
            found.append(message)
    return found
