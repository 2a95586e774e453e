"""Reading code objects out of a live CPython process: name, file and line table.

BPF records only a code object's address per frame; its strings are read here, from
``/proc/PID/mem``, while the process lives, and cached per (process, address): a code
object lives as long as its function, so the cache is hit on nearly every sample. Every
read is validated (the object's type must be ``code``, sizes bounded), because a torn BPF
read or a freed-and-reused address can point anywhere.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass

from agent.process.memory import ProcessMemory, UnreadableMemory
from agent.runtimes.python.offsets import NONE, PythonOffsets

_PTR = struct.Struct("<Q")
_I32 = struct.Struct("<i")
_OB_TYPE = 8  # PyObject.ob_type
_TP_NAME = 24  # PyTypeObject.tp_name (after ob_refcnt, ob_type, ob_size)
_STR_LENGTH = 16  # PyASCIIObject.length
_STR_STATE = 32  # PyASCIIObject.state (after length and hash)
_BYTES_SIZE = 16  # PyVarObject.ob_size
_BYTES_DATA = 32  # PyBytesObject.ob_sval
MAX_STRING = 4096
MAX_LINETABLE = 256 * 1024


class BadObject(ValueError):
    """The address does not hold what we expected (freed, reused, torn read)."""


@dataclass(frozen=True, slots=True)
class CodeInfo:
    name: str
    filename: str
    first_line: int
    linetable: bytes


class CodeReader:
    """Code objects of one process, validated and cached (bounded LRU)."""

    def __init__(self, memory: ProcessMemory, offsets: PythonOffsets, capacity: int = 8192) -> None:
        self.memory = memory
        self.offsets = offsets
        self.capacity = capacity
        self._cache: OrderedDict[int, CodeInfo] = OrderedDict()
        self._code_types: set[int] = set()

    def code(self, address: int) -> CodeInfo:
        cached = self._cache.get(address)
        if cached is not None:
            self._cache.move_to_end(address)
            return cached
        try:
            info = self._read(address)
        except UnreadableMemory as exc:  # a freed or torn address: as bad as a wrong type
            raise BadObject(str(exc)) from exc
        self._cache[address] = info
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return info

    def _read(self, address: int) -> CodeInfo:
        if address < 4096 or address & 7:
            raise BadObject(f"not an object address: {address:#x}")
        o = self.offsets
        self._check_type(self.memory.word(address + _OB_TYPE))
        name_field = o.co_qualname if o.co_qualname != NONE else o.co_name
        header = self.memory.read(address, max(name_field, o.co_filename, o.co_linetable, o.co_firstlineno) + 8)
        name = self.string(_PTR.unpack_from(header, name_field)[0])
        filename = self.string(_PTR.unpack_from(header, o.co_filename)[0])
        first_line = _I32.unpack_from(header, o.co_firstlineno)[0]
        linetable = self.bytes_object(_PTR.unpack_from(header, o.co_linetable)[0])
        return CodeInfo(name, filename, first_line, linetable)

    def _check_type(self, type_address: int) -> None:
        if type_address in self._code_types:
            return
        name_pointer = self.memory.word(type_address + _TP_NAME)
        if self.memory.read(name_pointer, 5) != b"code\0":
            raise BadObject(f"object of type at {type_address:#x} is not a code object")
        self._code_types.add(type_address)

    def string(self, address: int) -> str:
        """A compact ``str`` object's text (code names and file names are always compact)."""
        head = self.memory.read(address, _STR_STATE + 4)
        length = _PTR.unpack_from(head, _STR_LENGTH)[0]
        state = _I32.unpack_from(head, _STR_STATE)[0]
        kind, compact, ascii_ = (state >> 2) & 7, (state >> 5) & 1, (state >> 6) & 1
        if not compact or kind not in (1, 2, 4) or length > MAX_STRING:
            raise BadObject(f"unexpected string object at {address:#x}")
        if ascii_:
            return self.memory.read(address + self.offsets.ascii_data, length).decode("ascii", "replace")
        data = self.memory.read(address + self.offsets.compact_data, length * kind)
        codec = {1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}[kind]
        return data.decode(codec, "replace")

    def bytes_object(self, address: int) -> bytes:
        size = _PTR.unpack(self.memory.read(address + _BYTES_SIZE, 8))[0]
        if size > MAX_LINETABLE:
            raise BadObject(f"line table of {size} bytes at {address:#x}")
        return self.memory.read(address + _BYTES_DATA, size) if size else b""
