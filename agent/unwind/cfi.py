"""DWARF call-frame information (``.eh_frame`` / ``.debug_frame``) to compact unwind rows.

Only what an x86-64 stack walker needs survives: for every code address, how to find the
canonical frame address (CFA), whether the return address is at CFA-8 (or undefined: the
outermost frame), and where the caller's rbp was saved. Rules for other registers are
dropped, which lets consecutive CFI rows that differ only in, say, where rbx was pushed
merge into one: libc's ~7,000 FDEs become ~30,000 rows rather than ~90,000.

The parser is written against the byte format (DWARF 4/5 §6.4, LSB "Exception Frames")
with ``struct`` rather than pyelftools: pyelftools decodes every instruction into Python
objects and takes seconds on a large ``.eh_frame``; this takes a fraction of that.

Row kinds (mirrored in bpf/unwind.h; keep the two in step):

- ``CFA_RSP`` / ``CFA_RBP``: CFA = rsp/rbp + ``cfa_offset``;
- ``CFA_DEREF_RBP``: CFA = *(rbp + ``cfa_offset``), GCC's stack-realigning prologues
  (``DW_OP_breg6 N; DW_OP_deref``);
- ``PLT``: the standard PLT expression, CFA = rsp + 8, +8 more once (rip & 15) >= ``cfa_offset``;
- ``END``: the return address is undefined (``_start``, ``clone``): the stack ends cleanly;
- ``NONE``: no FDE covers the address (a gap between FDEs): the walker uses frame pointers;
- ``UNSUPPORTED``: any other rule (CFA in r10, signal trampolines, other expressions):
  the walker stops and counts it.

In every supported row the return address is at CFA-8 and, when ``rbp_offset`` is not 0,
the caller's rbp is saved at CFA + ``rbp_offset``.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from agent.bpf.layouts import UnwindKind

# The row kinds are BPF's (bpf/unwind.h enum unwind_kind): one definition, in agent/bpf/layouts.py.
RowKind = UnwindKind


class CfiError(ValueError):
    """The section is malformed beyond what skipping one entry can recover from."""


# x86-64 DWARF register numbers (System V ABI, figure 3.36)
_RBP, _RSP, _RA = 6, 7, 16

# DW_EH_PE pointer encodings
_PE_OMIT = 0xFF
_PE_FORMAT_MASK, _PE_APPL_MASK, _PE_INDIRECT = 0x0F, 0x70, 0x80
_PE_ABSPTR, _PE_ULEB128, _PE_UDATA2, _PE_UDATA4, _PE_UDATA8 = 0x00, 0x01, 0x02, 0x03, 0x04
_PE_SLEB128, _PE_SDATA2, _PE_SDATA4, _PE_SDATA8 = 0x09, 0x0A, 0x0B, 0x0C
_PE_PCREL, _PE_DATAREL = 0x10, 0x30

_U16, _U32, _U64 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")
_S16, _S32, _S64 = struct.Struct("<h"), struct.Struct("<i"), struct.Struct("<q")

# CFA expression of the .plt section emitted by GNU ld and lld:
#   DW_OP_breg7 (rsp) 8; DW_OP_breg16 (rip) 0; DW_OP_lit15; DW_OP_and; DW_OP_lit11|lit10;
#   DW_OP_ge; DW_OP_lit3; DW_OP_shl; DW_OP_plus
_PLT_PREFIX = bytes([0x77, 0x08, 0x80, 0x00, 0x3F, 0x1A])
_PLT_SUFFIX = bytes([0x2A, 0x33, 0x24, 0x22])
_DW_OP_LIT0, _DW_OP_BREG6, _DW_OP_DEREF = 0x30, 0x76, 0x06


class Rule(NamedTuple):
    """How to unwind from the addresses of one row (see the module docstring).

    A NamedTuple rather than a dataclass: rows are compared and hashed hundreds of
    thousands of times while a table is built, and tuple comparison runs in C."""

    kind: RowKind
    cfa_offset: int = 0
    rbp_offset: int = 0


NO_INFO = Rule(RowKind.NONE)
UNSUPPORTED = Rule(RowKind.UNSUPPORTED)
END = Rule(RowKind.END)


@dataclass(slots=True)
class _Cie:
    code_align: int
    data_align: int
    ra_register: int
    fde_encoding: int
    initial_instructions: bytes
    has_augmentation_data: bool
    initial_state: _State | None = None  # the initial instructions' result, computed once per CIE


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def u8(self) -> int:
        b = self.data[self.pos]
        self.pos += 1
        return b

    def uleb(self) -> int:
        result = shift = 0
        data = self.data
        while True:
            b = data[self.pos]
            self.pos += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return result

    def sleb(self) -> int:
        result = shift = 0
        data = self.data
        while True:
            b = data[self.pos]
            self.pos += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                if b & 0x40:
                    result -= 1 << shift
                return result

    def fixed(self, fmt: struct.Struct) -> int:
        (v,) = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        return int(v)

    def cstring(self) -> bytes:
        end = self.data.index(b"\0", self.pos)
        s = self.data[self.pos : end]
        self.pos = end + 1
        return s

    def encoded(self, encoding: int, section_vaddr: int) -> int:
        """A DW_EH_PE-encoded pointer; pc-relative ones are resolved against ``section_vaddr``."""
        if encoding == _PE_OMIT:
            return 0
        field_vaddr = section_vaddr + self.pos
        fmt = encoding & _PE_FORMAT_MASK
        if fmt in (_PE_ABSPTR, _PE_UDATA8):
            value = self.fixed(_U64)
        elif fmt == _PE_UDATA4:
            value = self.fixed(_U32)
        elif fmt == _PE_SDATA4:
            value = self.fixed(_S32)
        elif fmt == _PE_UDATA2:
            value = self.fixed(_U16)
        elif fmt == _PE_SDATA2:
            value = self.fixed(_S16)
        elif fmt == _PE_SDATA8:
            value = self.fixed(_S64)
        elif fmt == _PE_ULEB128:
            value = self.uleb()
        elif fmt == _PE_SLEB128:
            value = self.sleb()
        else:
            raise CfiError(f"unknown pointer encoding {encoding:#x}")
        if encoding & _PE_APPL_MASK == _PE_PCREL:
            value += field_vaddr
        return value & 0xFFFF_FFFF_FFFF_FFFF


class FdeRows:
    """One FDE's rows: their addresses in an array and their (interned, shared) rules in a
    list; iterating gives (address, rule) pairs. A table's build holds every FDE's rows at
    once (libLLVM: ~1,000,000), and a tuple and an int per row (~95 B) were a burst of
    small objects that left ~90 of Python's 1 MiB allocator arenas resident after the build
    (docs/design/overhead.md); this is ~16 B a row."""

    __slots__ = ("addresses", "rules")

    def __init__(self) -> None:
        self.addresses: array[int] = array("Q")
        self.rules: list[Rule] = []

    def __iter__(self) -> Iterator[tuple[int, Rule]]:
        return zip(self.addresses, self.rules, strict=True)

    def __len__(self) -> int:
        return len(self.addresses)


Fde = tuple[int, int, FdeRows]  # pc_begin, pc_end, rows


class CfiRows:
    """Every FDE of a section in flat arrays, in section order: FDE ``i`` covers
    [begins[i], ends[i]) and its rows are ``addresses``/``rules`` [firsts[i], firsts[i + 1]).
    No object per FDE or per row: a large library has ~160,000 FDEs and ~1,000,000 rows."""

    __slots__ = ("addresses", "begins", "ends", "firsts", "rules")

    def __init__(self) -> None:
        self.begins: array[int] = array("Q")
        self.ends: array[int] = array("Q")
        self.firsts: array[int] = array("Q", [0])
        self.addresses: array[int] = array("Q")
        self.rules: list[Rule] = []

    def __len__(self) -> int:
        return len(self.begins)

    def add(self, begin: int, end: int) -> None:
        """Close the FDE whose rows were just appended."""
        self.begins.append(begin)
        self.ends.append(end)
        self.firsts.append(len(self.addresses))

    def discard_rows(self) -> None:
        """Drop rows appended after the last ``add`` (an FDE that failed to decode)."""
        keep = self.firsts[-1]
        del self.addresses[keep:]
        del self.rules[keep:]

    def fdes(self) -> list[Fde]:
        """The same FDEs as tuples (for callers that want a few of them)."""
        out: list[Fde] = []
        for i in range(len(self.begins)):
            rows = FdeRows()
            lo, hi = self.firsts[i], self.firsts[i + 1]
            rows.addresses.extend(self.addresses[lo:hi])
            rows.rules.extend(self.rules[lo:hi])
            out.append((self.begins[i], self.ends[i], rows))
        return out


def parse_cfi(data: bytes, section_vaddr: int, is_eh_frame: bool = True) -> list[Fde]:
    """All FDEs of a section as (pc_begin, pc_end, rows), in section order (``parse_cfi_rows``)."""
    return parse_cfi_rows(data, section_vaddr, is_eh_frame).fdes()


def parse_cfi_rows(data: bytes, section_vaddr: int, is_eh_frame: bool = True) -> CfiRows:
    """All FDEs of a section and their rows, in section order, in flat arrays.

    ``section_vaddr`` is the section's ELF virtual address (``.eh_frame`` pointers are
    pc-relative to it). Entries that cannot be decoded are skipped; only a broken length
    field (which loses the position of every later entry) ends the walk early.
    """
    cies: dict[int, _Cie | None] = {}
    fdes = CfiRows()
    pos, size = 0, len(data)
    while pos + 4 <= size:
        start = pos
        (length,) = _U32.unpack_from(data, pos)
        pos += 4
        offset_size = 4
        if length == 0xFFFF_FFFF:
            if pos + 8 > size:
                break
            (length,) = _U64.unpack_from(data, pos)
            pos += 8
            offset_size = 8
        if length == 0:
            if is_eh_frame:
                break  # .eh_frame terminator
            pos = start + 4
            continue
        end = pos + length
        if end > size:
            break
        id_pos = pos
        cie_id = (_U32 if offset_size == 4 else _U64).unpack_from(data, pos)[0]
        is_cie = cie_id == 0 if is_eh_frame else cie_id == (0xFFFF_FFFF if offset_size == 4 else 0xFFFF_FFFF_FFFF_FFFF)
        try:
            if is_cie:
                cies[start] = _parse_cie(data, id_pos + offset_size, end, is_eh_frame)
            else:
                cie_start = id_pos - cie_id if is_eh_frame else cie_id
                if cie_start not in cies:
                    cies[cie_start] = _cie_at(data, cie_start, is_eh_frame)
                cie = cies[cie_start]
                if cie is not None:
                    _parse_fde(data, id_pos + offset_size, end, cie, section_vaddr, fdes)
        except (IndexError, struct.error, CfiError, ValueError):
            fdes.discard_rows()
            if is_cie:
                cies[start] = None
        pos = end
    return fdes


def _cie_at(data: bytes, start: int, is_eh_frame: bool) -> _Cie | None:
    """A CIE referenced before it was walked (``.debug_frame`` allows any order)."""
    try:
        (length,) = _U32.unpack_from(data, start)
        pos, offset_size = start + 4, 4
        if length == 0xFFFF_FFFF:
            (length,) = _U64.unpack_from(data, pos)
            pos, offset_size = pos + 8, 8
        return _parse_cie(data, pos + offset_size, pos + length, is_eh_frame)
    except (IndexError, struct.error, CfiError, ValueError):
        return None


def _parse_cie(data: bytes, pos: int, end: int, is_eh_frame: bool) -> _Cie | None:
    r = _Reader(data, pos)
    version = r.u8()
    augmentation = r.cstring()
    if not is_eh_frame and version >= 4:
        if r.u8() != 8:
            return None  # address size: only 64-bit code is unwound
        r.u8()  # segment selector size
    if augmentation and not augmentation.startswith(b"z"):
        return None  # pre-"z" augmentations ("eh") cannot be skipped safely
    code_align = r.uleb()
    data_align = r.sleb()
    ra_register = r.u8() if version == 1 else r.uleb()
    fde_encoding = _PE_ABSPTR
    if augmentation.startswith(b"z"):
        aug_len = r.uleb()
        aug_end = r.pos + aug_len
        for ch in augmentation[1:]:
            if ch == ord("R"):
                fde_encoding = r.u8()
            elif ch == ord("P"):
                r.encoded(r.u8() & ~_PE_INDIRECT & 0xFF, 0)  # personality routine: not needed
            elif ch == ord("L"):
                r.u8()  # LSDA encoding
            elif ch in (ord("S"), ord("B")):
                pass
            else:
                break  # unknown letter: the length lets us skip the rest
        r.pos = aug_end
    return _Cie(code_align, data_align, ra_register, fde_encoding, data[r.pos : end], augmentation.startswith(b"z"))


def _parse_fde(data: bytes, pos: int, end: int, cie: _Cie, section_vaddr: int, out: CfiRows) -> None:
    """Append one FDE and its rows to ``out`` (nothing for an FDE covering no code)."""
    r = _Reader(data, pos)
    pc_begin = r.encoded(cie.fde_encoding, section_vaddr)
    pc_range = r.encoded(cie.fde_encoding & _PE_FORMAT_MASK, 0)
    if pc_range == 0:
        return
    if cie.has_augmentation_data:
        r.pos += r.uleb()  # augmentation data (the LSDA pointer): not needed to unwind
    _run_program(cie, data[r.pos : end], pc_begin, section_vaddr, out.addresses, out.rules)
    out.add(pc_begin, pc_begin + pc_range)


# Values of the rbp and return-address rules besides an offset from the CFA.
_UNCHANGED, _UNDEFINED, _OTHER = "same", "undefined", "other"
# CFA register meaning "CFA given by the expression in cfa_expr" / "lost track (unsupported)".
_CFA_EXPR, _CFA_LOST = -1, -2
# (cfa_register, cfa_offset, cfa_expr, rbp_rule, ra_rule)
_State = tuple[int, int, "Rule | None", "int | str", "int | str"]


def _run_program(cie: _Cie, program: bytes, pc_begin: int, section_vaddr: int,
                 addresses: array[int], rules: list[Rule]) -> None:
    """Interpret the CIE's initial instructions, then the FDE's; appends one address and
    one rule per row (a row whose rule equals the previous row's is left out)."""
    initial = cie.initial_state
    if initial is None:
        start: _State = (_CFA_LOST, 0, None, _UNCHANGED, _OTHER)
        initial = cie.initial_state = _interpret(cie, cie.initial_instructions, start, start, None, 0, section_vaddr)
    rows: list[tuple[int, _State]] = []
    _interpret(cie, program, initial, initial, rows, pc_begin, section_vaddr)
    cache = _RULES
    first = len(rules)
    for loc, state in rows:
        rule = cache.get(state)
        if rule is None:
            rule = cache[state] = _rule(state)
        if len(rules) > first and rules[-1] == rule:
            continue
        addresses.append(loc)
        rules.append(rule)
    if len(cache) > 4096:  # distinct states are few (hundreds per library); bound it anyway
        cache.clear()


_RULES: dict[_State, Rule] = {}


def _interpret(cie: _Cie, program: bytes, state: _State, initial: _State, rows: list[tuple[int, _State]] | None,
               loc: int, section_vaddr: int) -> _State:
    """Run one CFA program from ``state``; appends the state in force at each location to ``rows``.

    Written for speed (this is where table building spends its time): the state lives in
    locals, only rbp and the return address are tracked (other registers never affect our
    walk), and single-byte LEB128 operands are decoded inline.
    """
    cfa_reg, cfa_off, cfa_expr, rbp, ra = state
    caf, daf, ra_reg = cie.code_align, cie.data_align, cie.ra_register
    stack: list[_State] = []
    r = _Reader(program)
    data = program
    n = len(data)
    while r.pos < n:
        op = data[r.pos]
        r.pos += 1
        high = op & 0xC0
        if high == 0x40:  # DW_CFA_advance_loc
            if rows is not None:
                rows.append((loc, (cfa_reg, cfa_off, cfa_expr, rbp, ra)))
            loc += (op & 0x3F) * caf
            continue
        if high == 0x80:  # DW_CFA_offset
            reg = op & 0x3F
            b = data[r.pos]
            if b < 0x80:
                r.pos += 1
                off = b * daf
            else:
                off = r.uleb() * daf
            if reg == _RBP:
                rbp = off
            elif reg == ra_reg:
                ra = off
            continue
        if high == 0xC0:  # DW_CFA_restore
            reg = op & 0x3F
            if reg == _RBP:
                rbp = initial[3]
            elif reg == ra_reg:
                ra = initial[4]
            continue
        if op == 0x00:  # nop
            continue
        if op in (0x01, 0x02, 0x03, 0x04):  # set_loc, advance_loc1/2/4
            if rows is not None:
                rows.append((loc, (cfa_reg, cfa_off, cfa_expr, rbp, ra)))
            if op == 0x01:
                loc = r.encoded(cie.fde_encoding, section_vaddr)
            elif op == 0x02:
                loc += r.u8() * caf
            elif op == 0x03:
                loc += r.fixed(_U16) * caf
            else:
                loc += r.fixed(_U32) * caf
            continue
        if op == 0x0E:  # def_cfa_offset
            off = r.uleb()
            if cfa_reg >= 0:
                cfa_off = off
            else:
                cfa_reg = _CFA_LOST
        elif op == 0x0C:  # def_cfa
            cfa_reg = r.uleb()
            cfa_off = r.uleb()
        elif op == 0x0D:  # def_cfa_register
            reg = r.uleb()
            cfa_reg = reg if cfa_reg >= 0 else _CFA_LOST
        elif op == 0x0A:  # remember_state
            stack.append((cfa_reg, cfa_off, cfa_expr, rbp, ra))
        elif op == 0x0B:  # restore_state
            if stack:
                cfa_reg, cfa_off, cfa_expr, rbp, ra = stack.pop()
        elif op in (0x05, 0x11, 0x2F):  # offset_extended(_sf), GNU_negative_offset_extended
            reg = r.uleb()
            off = r.uleb() * daf if op == 0x05 else r.sleb() * daf if op == 0x11 else -r.uleb() * daf
            if reg == _RBP:
                rbp = off
            elif reg == ra_reg:
                ra = off
        elif op == 0x06:  # restore_extended
            reg = r.uleb()
            if reg == _RBP:
                rbp = initial[3]
            elif reg == ra_reg:
                ra = initial[4]
        elif op in (0x07, 0x08):  # undefined, same_value
            reg = r.uleb()
            value = _UNDEFINED if op == 0x07 else _UNCHANGED
            if reg == _RBP:
                rbp = _UNCHANGED  # an undefined rbp is not restored by anyone: keep the current one
            elif reg == ra_reg:
                ra = value
        elif op == 0x09:  # register
            reg = r.uleb()
            r.uleb()
            if reg == _RBP:
                rbp = _OTHER
            elif reg == ra_reg:
                ra = _OTHER
        elif op == 0x0F:  # def_cfa_expression
            size = r.uleb()
            cfa_reg, cfa_expr = _CFA_EXPR, _cfa_expression(data[r.pos : r.pos + size])
            r.pos += size
        elif op in (0x10, 0x16):  # expression, val_expression
            reg = r.uleb()
            r.pos += r.uleb()
            if reg == _RBP:
                rbp = _OTHER
            elif reg == ra_reg:
                ra = _OTHER
        elif op == 0x12:  # def_cfa_sf
            cfa_reg = r.uleb()
            cfa_off = r.sleb() * daf
        elif op == 0x13:  # def_cfa_offset_sf
            off = r.sleb() * daf
            if cfa_reg >= 0:
                cfa_off = off
            else:
                cfa_reg = _CFA_LOST
        elif op in (0x14, 0x15):  # val_offset(_sf)
            reg = r.uleb()
            r.uleb() if op == 0x14 else r.sleb()
            if reg == _RBP:
                rbp = _OTHER
            elif reg == ra_reg:
                ra = _OTHER
        elif op == 0x2E:  # GNU_args_size
            r.uleb()
        else:
            # An opcode we cannot size: nothing after it can be trusted.
            cfa_reg = _CFA_LOST
            break
    final: _State = (cfa_reg, cfa_off, cfa_expr, rbp, ra)
    if rows is not None:
        rows.append((loc, final))
    return final


def _cfa_expression(expr: bytes) -> Rule:
    if len(expr) == len(_PLT_PREFIX) + 1 + len(_PLT_SUFFIX) and expr.startswith(_PLT_PREFIX) \
            and expr.endswith(_PLT_SUFFIX) and _DW_OP_LIT0 <= expr[len(_PLT_PREFIX)] <= _DW_OP_LIT0 + 15:
        return Rule(RowKind.PLT, expr[len(_PLT_PREFIX)] - _DW_OP_LIT0)
    if len(expr) >= 3 and expr[0] == _DW_OP_BREG6 and expr[-1] == _DW_OP_DEREF:
        r = _Reader(expr, 1)
        try:
            off = r.sleb()
        except IndexError:
            return UNSUPPORTED
        if r.pos == len(expr) - 1:
            return Rule(RowKind.CFA_DEREF_RBP, off)
    return UNSUPPORTED


def _rule(state: _State) -> Rule:
    cfa_reg, cfa_off, cfa_expr, rbp, ra = state
    if ra == _UNDEFINED:
        return END
    if ra != -8:
        return UNSUPPORTED
    if rbp == _UNCHANGED:
        rbp_offset = 0
    elif isinstance(rbp, int) and rbp != 0:
        rbp_offset = rbp
    else:
        return UNSUPPORTED
    if cfa_reg == _CFA_EXPR:
        assert cfa_expr is not None
        if cfa_expr.kind == RowKind.UNSUPPORTED:
            return cfa_expr
        return Rule(cfa_expr.kind, cfa_expr.cfa_offset, rbp_offset)
    if cfa_reg == _RSP:
        return Rule(RowKind.CFA_RSP, cfa_off, rbp_offset)
    if cfa_reg == _RBP:
        return Rule(RowKind.CFA_RBP, cfa_off, rbp_offset)
    return UNSUPPORTED
