"""Line numbers from a code object's line table, for a given instruction byte offset.

Hand-written: the formats are CPython internals with no library to parse them outside
the interpreter that owns them (the agent runs on another interpreter, and the code
object lives in another process). Formats:

- 3.11+: the location table (CPython's Objects/locations.md): entries of one header byte
  (bit 7 set, code in bits 3-6, length-1 in code units in bits 0-2) plus varints.
- 3.10: pairs of (byte-offset delta, signed line delta), -128 meaning "no line" (PEP 626).
- 3.8, 3.9: ``co_lnotab``, pairs of (byte-offset increment, signed line increment); the line
  of an offset is the first line plus the increments of every pair whose address (the sum
  of byte increments so far, this pair's included) is not past the offset.
"""

from __future__ import annotations

CODE_UNIT = 2  # bytes per bytecode instruction word


def line_for_offset(version: tuple[int, int], table: bytes, first_line: int, offset: int) -> int:
    """The source line of the instruction at byte ``offset``; 0 when the table has none."""
    if version >= (3, 11):
        return _location_table_line(table, first_line, offset // CODE_UNIT)
    if version >= (3, 10):
        return _linetable_310_line(table, first_line, offset)
    return _lnotab_line(table, first_line, offset)


def _location_table_line(table: bytes, first_line: int, unit: int) -> int:
    line = first_line
    address = 0
    pos, size = 0, len(table)
    while pos < size:
        header = table[pos]
        pos += 1
        if not header & 0x80:
            return 0  # not at an entry start: the table is not what we expect
        code = (header >> 3) & 0x0F
        length = (header & 0x07) + 1
        located = True
        if code == 15:  # no location
            located = False
        elif code == 14:  # long form: line delta, end line delta, column, end column
            delta, pos = _svarint(table, pos)
            line += delta
            for _ in range(3):
                _, pos = _varint(table, pos)
        elif code == 13:  # no column information
            delta, pos = _svarint(table, pos)
            line += delta
        elif code in (10, 11, 12):  # one-line forms: line delta code-10, two column bytes
            line += code - 10
            pos += 2
        else:  # short forms 0-9: same line, one column byte
            pos += 1
        if address <= unit < address + length:
            return line if located else 0
        address += length
    return 0


def _varint(table: bytes, pos: int) -> tuple[int, int]:
    """6-bit little-endian groups, bit 6 set on every group but the last."""
    value = shift = 0
    while pos < len(table):
        byte = table[pos]
        pos += 1
        value |= (byte & 0x3F) << shift
        shift += 6
        if not byte & 0x40:
            break
    return value, pos


def _svarint(table: bytes, pos: int) -> tuple[int, int]:
    value, pos = _varint(table, pos)
    return (-(value >> 1) if value & 1 else value >> 1), pos


def _linetable_310_line(table: bytes, first_line: int, offset: int) -> int:
    line = first_line
    address = 0
    for i in range(0, len(table) - 1, 2):
        span, delta = table[i], table[i + 1]
        delta = delta - 256 if delta > 127 else delta
        if delta != -128:
            line += delta
        if address <= offset < address + span:
            return line if delta != -128 else 0
        address += span
    return 0


def _lnotab_line(table: bytes, first_line: int, offset: int) -> int:
    line = first_line
    address = 0
    for i in range(0, len(table) - 1, 2):
        address += table[i]
        if address > offset:
            break
        delta = table[i + 1]
        line += delta - 256 if delta > 127 else delta
    return line
